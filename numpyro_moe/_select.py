"""Choosing the number of experts for point fits: BIC, ICL or cross-validation over a range of k.

For posteriors, `compare_num_experts` ranks k by PSIS-LOO instead; the T2 spectrum of the moment
method (`suggest_num_experts`) is reported as a hint, not used to choose: it counts directions
above the sampling-noise floor and only under a Gaussian design.

- BIC (Schwarz 1978): ``-2 log L + p log n``, with p the free parameters (experts and their
  intercepts, the free gate rows and theirs, one noise per expert or one shared, and the k
  degrees of freedom of Student-t experts when they are estimated).
- ICL (Biernacki, Celeux and Govaert 2000, "Assessing a mixture model for clustering with the
  integrated completed likelihood"): BIC plus twice the entropy of the responsibilities, which
  favours well-separated experts. Lower is better for both.
- Cross-validation (``"cv"``): the data are split into ``folds`` parts (a random assignment from
  ``key``); each part's log-likelihood is scored under the fit to the others, and the criterion is
  ``-2`` times their sum (a deviance on the BIC's scale; lower is better). It estimates what the
  other two approximate, the density of new data, without their assumptions (BIC's large n, a
  regular model); it costs ``folds`` more fits per k. On the five real data sets of
  ``benchmarks/real_data.py`` it mostly chose BIC's k (where the two differed, on two sets with
  some keys, it took one expert fewer); its column is also a way to compare other choices
  (priors, noise family) on the same folds.

`select_expert_prior_scale` uses the same cross-validation to choose, at a given k, the sd of the
Normal prior on the experts' coefficients and intercepts. The default sd, 1 in standardised units,
suits columns of comparable scale that are not strongly correlated; columns that nearly cancel
(a polynomial basis, a variable and its square) need coefficients far larger than the response's
sd, which that prior shrinks towards each other.

With penalised EM (the default) the log-likelihood is taken at the posterior mode, as mclust does
with its conjugate priors (Fraley and Raftery 2007).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import NamedTuple

import jax
import numpy as np

from numpyro_moe._distribution import MixtureOfExperts
from numpyro_moe._em import padded_at_least
from numpyro_moe._experts import suggest_num_experts
from numpyro_moe._fit import Fit, check_data, fit_moe
from numpyro_moe._links import Link, resolve_link
from numpyro_moe._model import check_family, predictive_params
from numpyro_moe._params import MoEParams
from numpyro_moe._validation import ReliabilityWarning, check_gate_x, check_key, check_positive_int

__all__ = [
    "PriorScaleSelection",
    "Selection",
    "num_parameters",
    "select_expert_prior_scale",
    "select_num_experts",
]

_CRITERIA = ("bic", "icl", "cv", "auto")
# criterion="auto": cross-validation on data of at most this many rows, BIC on more.
CV_ROWS = 2_000


class Selection(NamedTuple):
    """Result of `select_num_experts`.

    Attributes
    ----------
    fit
        The `Fit` at the chosen k.
    num_experts
        The chosen k (lowest ``criterion``).
    table
        One dict per k tried, in the order given: ``num_experts``, ``log_likelihood`` (mean per
        point), ``num_parameters``, ``bic``, ``icl``, ``converged``, ``smallest_weight`` (the
        smallest expert's share of the data); with ``criterion="cv"`` also ``cv`` (-2 times the
        held-out log-likelihood summed over the folds).
    fits
        Every k's `Fit`, by k.
    criterion
        ``"bic"``, ``"icl"`` or ``"cv"`` (the one used, also when ``"auto"`` was asked for).
    spectrum_hint
        The number of T2 eigenvalues above the sampling-noise floor (`suggest_num_experts`), a
        hint from the moment method; None when it could not be computed.
    """

    fit: Fit
    num_experts: int
    table: list[dict]
    fits: dict[int, Fit]
    criterion: str = "bic"
    spectrum_hint: int | None = None


class PriorScaleSelection(NamedTuple):
    """Result of `select_expert_prior_scale`.

    Attributes
    ----------
    fit
        The `Fit` to all the data with the chosen prior.
    scale
        The chosen sd (the one-standard-error rule: see `select_expert_prior_scale`).
    table
        One dict per scale tried, in the order given: ``scale``, ``cv`` (-2 times the held-out
        log-likelihood summed over the folds) and ``cv_se_difference`` (the standard error of its
        difference to the lowest ``cv``; 0 for the lowest).
    """

    fit: Fit
    scale: float
    table: list[dict]


def num_parameters(params: MoEParams, *, shared_noise: bool = False, fixed_df: bool = False) -> int:
    """Free parameters of a mixture of experts: experts (and their intercepts), the k - 1 free
    gate rows (and theirs), k noises (one when ``shared_noise``), and the k degrees of freedom of
    Student-t experts (``params.df`` set) unless they were fixed (``fixed_df``)."""
    k = params.num_experts
    expert_width = params.experts.shape[-1] + (params.expert_intercepts is not None)
    gate_width = params.gates.shape[-1] + (params.gate_intercepts is not None)
    degrees = k if params.df is not None and not fixed_df else 0
    return k * expert_width + (k - 1) * gate_width + (1 if shared_noise else k) + degrees


def _resolved_criterion(criterion: str, num_rows: int) -> str:
    """``criterion``, with ``"auto"`` read as ``"cv"`` on at most `CV_ROWS` rows, ``"bic"`` on more."""
    if criterion == "auto":
        return "cv" if num_rows <= CV_ROWS else "bic"
    return criterion


def _candidates(num_experts) -> list[int]:
    values = [num_experts] if isinstance(num_experts, int) else list(num_experts)
    if not values:
        raise ValueError("num_experts: expected at least one number of experts, got none")
    checked = [check_positive_int(value, "num_experts") for value in values]
    if len(set(checked)) != len(checked):
        raise ValueError(f"num_experts: expected distinct numbers of experts, got {checked}")
    return checked


def select_num_experts(
    x,
    y,
    *,
    key: jax.Array,
    num_experts: Iterable[int] = (1, 2, 3, 4, 5),
    criterion: str = "bic",
    link: str | Link = "linear",
    intercepts: bool = False,
    shared_noise: bool = False,
    penalized: bool = True,
    priors: dict | None = None,
    family: str = "normal",
    df=None,
    gate_x=None,
    num_starts: int = 5,
    num_finalists: int | None = None,
    design: str = "gaussian",
    estimate_options: dict | None = None,
    max_iterations: int = 500,
    tol: float = 1e-8,
    progress_bar: bool = False,
    folds: int = 5,
) -> Selection:
    """Fit each number of experts with `fit_moe` and choose k by BIC (or ICL, or cross-validation).

    Parameters
    ----------
    x, y
        (n, d) inputs and (n,) responses (standardise real data: the default priors assume it).
    key
        PRNG key; each k gets its own split.
    num_experts
        The k to try (distinct positive integers).
    criterion
        ``"bic"`` (default), ``"icl"``, ``"cv"`` (``folds``-fold cross-validated log-likelihood,
        as a deviance) or ``"auto"`` (``"cv"`` on data of at most `CV_ROWS` rows, 2,000, and
        ``"bic"`` on more; what ``numpyro-moe fit`` uses); the lowest wins. The chosen fit is the
        fit to all the data either way. BIC's penalty is an asymptotic approximation; on small
        data it and held-out fit disagree, and cross-validation, at ``folds + 1`` fits per k, is
        affordable there. Measured on the 15 real data sets of ``benchmarks/real_data.py``, all
        14 of at most 2,000 rows: cross-validation chose another k than BIC on five, and predicted
        held-out rows better on three (Boston: k 3 -> 2, log-likelihood per point -2.822 ->
        -2.801, MSE 35.5 -> 20.2 against least squares' 24.0; R's whiteside: 2 -> 1, -0.665 ->
        -0.354; quakes: 1 -> 3, 0.285 -> 0.312) and worse on two (hills, 26 rows: 2 -> 1, -3.04
        -> -3.76; cpus: 3 -> 2, -5.09 -> -5.28, MSE 3871 -> 3370). The folds' fits run the EM
        programs compiled for the fit to all the data (`padded_at_least`), so in a fresh process
        they add computing, not compiling: ``numpyro-moe fit --experts auto`` on Boston's 380 rows
        took 35.7 s with cross-validation and 30.1 s with BIC (63.3 s with each fold compiling).
    folds
        Parts of the data for ``criterion="cv"`` (at least 2; each k is fitted ``folds`` more
        times). Ignored by the other criteria.
    link, intercepts, shared_noise, penalized, priors, family, df, gate_x, num_starts, num_finalists,
    design, estimate_options, max_iterations, tol, progress_bar
        As in `fit_moe`, for every k. With ``gate_x`` (covariates of the gate's own) the gate's
        parameters are counted over its q columns; with ``family="student_t"`` (robust Student-t
        experts) the degrees of freedom, when estimated (``df=None``), count as k parameters.

    Returns
    -------
    Selection
        The chosen fit, k, the table of every k, and the moment method's spectrum hint. The
        chosen fit's warnings are passed on, prefixed by its k (the other fits' are not: they are
        not kept); a `ReliabilityWarning` says when the chosen k is the largest tried.
    """
    x, y = check_data(x, y)
    gate_x = check_gate_x(gate_x, x.shape[0])
    key = check_key(key)
    link = resolve_link(link)
    candidates = _candidates(num_experts)
    if criterion not in _CRITERIA:
        raise ValueError(f"criterion: expected one of {list(_CRITERIA)}, got {criterion!r}")
    family, df = check_family(family, df)
    n = x.shape[0]
    criterion = _resolved_criterion(criterion, n)
    fold_of = _fold_assignment(key, n, folds) if criterion == "cv" else None
    options = {
        "link": link,
        "intercepts": intercepts,
        "shared_noise": shared_noise,
        "penalized": penalized,
        "priors": priors,
        "family": family,
        "df": df,
        "num_starts": num_starts,
        "num_finalists": num_finalists,
        "design": design,
        "estimate_options": estimate_options,
        "max_iterations": max_iterations,
        "tol": tol,
    }
    fits, table, notes = {}, [], []
    for k, fit_key in zip(candidates, jax.random.split(key, len(candidates)), strict=True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ReliabilityWarning)
            fit = fit_moe(x, y, num_experts=k, key=fit_key, gate_x=gate_x, progress_bar=progress_bar, **options)
        notes += [(k, warning) for warning in caught]
        cv = None if fold_of is None else _cross_validated(x, y, gate_x, fold_of, k, fit_key, options)
        fits[k] = fit
        parameters = num_parameters(fit.params, shared_noise=shared_noise, fixed_df=df is not None)
        bic = -2 * n * fit.log_likelihood + parameters * math.log(n)
        entropy = float(fit.entropy) if fit.entropy is not None else 0.0
        weights = fit.expert_weights if fit.expert_weights is not None else np.ones(k) / k
        table.append(
            {
                "num_experts": k,
                "log_likelihood": float(fit.log_likelihood),
                "num_parameters": parameters,
                "bic": float(bic),
                "icl": float(bic + 2 * entropy),
                "converged": bool(fit.converged),
                "smallest_weight": float(np.min(weights)),
                **({} if cv is None else {"cv": cv}),
            }
        )
    scores = np.array([row[criterion] for row in table], dtype=float)
    best = int(np.nanargmin(scores)) if np.isfinite(scores).any() else 0
    chosen = candidates[best]
    for k, warning in notes:
        if k == chosen or not issubclass(warning.category, ReliabilityWarning):
            category = warning.category if issubclass(warning.category, Warning) else ReliabilityWarning
            warnings.warn(f"k={k}: {warning.message}", category, stacklevel=2)
    if len(candidates) > 1 and chosen == max(candidates):
        warnings.warn(
            f"num_experts: {criterion.upper()} chose k={chosen}, the largest tried; try larger k too",
            ReliabilityWarning,
            stacklevel=2,
        )
    try:
        hint = suggest_num_experts(x, y, link=link).num_experts
    except ValueError:
        hint = None
    return Selection(fits[chosen], chosen, table, fits, criterion, hint)


def _fold_assignment(key: jax.Array, n: int, folds) -> np.ndarray:
    """Each row's fold, a random balanced assignment (from ``fold_in(key, 1)``, so that the fits'
    own keys are unchanged by the cross-validation)."""
    folds = check_positive_int(folds, "folds")
    if not 2 <= folds <= n:
        raise ValueError(f"folds: expected between 2 and the number of rows ({n}), got {folds}")
    return np.asarray(jax.random.permutation(jax.random.fold_in(key, 1), n)) % folds


def select_expert_prior_scale(
    x,
    y,
    *,
    key: jax.Array,
    num_experts: int,
    scales: Iterable[float] = (1.0, 3.0, 10.0),
    folds: int = 5,
    priors: dict | None = None,
    gate_x=None,
    **options,
) -> PriorScaleSelection:
    """Choose the sd of the experts' Normal prior by cross-validation, then fit with it.

    For each sd in ``scales`` the experts' coefficients and intercepts get the prior
    ``Normal(0, sd)`` (in the units of standardised data) and `fit_moe` is run ``folds`` times,
    each part of the data scored under the fit to the others, giving a deviance (-2 times the
    held-out log-likelihood summed over the parts); one sd is chosen (below), and the data are
    fitted once more with it. Every sd is tried on the same folds and the same starts (common
    random numbers), so the comparison is of the priors alone. The folds are those
    `select_num_experts` uses with ``criterion="cv"`` and the same key.

    The choice follows the one-standard-error rule (Breiman, Friedman, Olshen and Stone 1984;
    glmnet's ``lambda.1se``): the smallest sd (the strongest prior) whose deviance is within one
    standard error of the lowest, the standard error being that of the paired difference over the
    rows (as ``arviz.compare``'s ``dse``). On small data the deviances are noisy (on the 100
    training rows of the motorcycle set, differences to sd 1 of 17 to 49 with standard errors of
    25 to 38, their signs changing from one choice of folds to another), and the rule keeps the
    stronger prior unless the data clearly ask for a weaker one.

    Parameters
    ----------
    x, y
        (n, d) inputs and (n,) responses, standardised (the scales are in standardised units).
    key
        PRNG key of the folds and of every fit.
    num_experts
        k.
    scales
        The sds to try (distinct positive numbers).
    folds
        Parts of the data (at least 2); the cost is ``len(scales) * folds + 1`` fits.
    priors
        Priors of the other sites (gates, noise), as in `fit_moe`; the experts' own are the ones
        being chosen, so ``"experts"`` and ``"expert_intercepts"`` may not be among them.
    gate_x, **options
        As in `fit_moe` (``link``, ``intercepts``, ``num_starts``, ...), for every fit.

    Returns
    -------
    PriorScaleSelection
        The fit with the chosen sd, the sd, and the table of every sd's deviance.
    """
    x, y = check_data(x, y)
    gate_x = check_gate_x(gate_x, x.shape[0])
    key = check_key(key)
    num_experts = check_positive_int(num_experts, "num_experts")
    try:
        values = [float(value) for value in scales]
    except (TypeError, ValueError):
        raise TypeError(f"scales: expected an iterable of positive numbers, got {scales!r}") from None
    positive = all(math.isfinite(value) and value > 0 for value in values)
    if not values or not positive or len(set(values)) < len(values):
        raise ValueError(f"scales: expected distinct positive numbers, got {values}")
    priors = dict(priors or {})
    taken = sorted({"experts", "expert_intercepts"} & set(priors))
    if taken:
        raise ValueError(f"priors: the experts' prior is what is chosen here; leave out {taken}")
    chosen, table = _choose_prior_scale(x, y, gate_x, key, num_experts, values, folds, priors, options)
    fit = fit_moe(x, y, num_experts=num_experts, key=key, gate_x=gate_x, **_with_expert_scale(options, priors, chosen))
    return PriorScaleSelection(fit, chosen, table)


def _with_expert_scale(options: dict, priors: dict, scale: float) -> dict:
    """`fit_moe`'s ``options`` with ``priors`` and the experts' Normal(0, ``scale``) prior."""
    import numpyro.distributions as dist

    normal = dist.Normal(0.0, scale)
    return {**options, "priors": {**priors, "experts": normal, "expert_intercepts": normal}}


def _choose_prior_scale(
    x, y, gate_x, key: jax.Array, num_experts: int, values: list[float], folds: int, priors: dict, options: dict
) -> tuple[float, list[dict]]:
    """`select_expert_prior_scale` on checked arguments, without the final fit: the chosen sd and
    the table of every sd's deviance."""
    fold_of = _fold_assignment(key, x.shape[0], folds)
    densities = [
        _held_out_log_densities(x, y, gate_x, fold_of, num_experts, key, _with_expert_scale(options, priors, value))
        for value in values
    ]
    scores = np.array([-2.0 * np.sum(row) for row in densities])
    best = int(np.nanargmin(scores)) if np.isfinite(scores).any() else 0
    table, within = [], []
    for value, score, row in zip(values, scores, densities, strict=True):
        # The standard error of the deviance difference to the best, from the rows' paired
        # differences (as `az.compare`'s dse).
        difference = -2.0 * (row - densities[best])
        se = float(np.sqrt(len(difference)) * np.std(difference))
        table.append({"scale": value, "cv": float(score), "cv_se_difference": se})
        if np.isfinite(score) and score - scores[best] <= se:
            within.append(value)
    return (min(within) if within else values[best]), table


def _prior_scale_deviance(
    x, y, gate_x, key: jax.Array, num_experts: int, scale: float, folds: int, priors: dict, options: dict
) -> float:
    """The cross-validated deviance of the experts' Normal(0, ``scale``) prior, on the folds
    `_choose_prior_scale` uses with ``key`` (one entry of its table)."""
    fold_of = _fold_assignment(key, x.shape[0], folds)
    return _cross_validated(x, y, gate_x, fold_of, num_experts, key, _with_expert_scale(options, priors, scale))


@jax.jit
def _log_densities(params: MoEParams, x, gate_x, y) -> jax.Array:
    """(n,) log density of each row of ``y`` under ``params`` (one compiled program per structure
    and n)."""
    return MixtureOfExperts.from_params(params, x, gate_x=gate_x).log_prob(y)


def _cross_validated(x, y, gate_x, fold_of: np.ndarray, k: int, key: jax.Array, options: dict) -> float:
    """-2 times the held-out log-likelihood summed over the folds (`_held_out_log_densities`)."""
    return -2.0 * float(np.sum(_held_out_log_densities(x, y, gate_x, fold_of, k, key, options)))


def _held_out_log_densities(
    x, y, gate_x, fold_of: np.ndarray, k: int, key: jax.Array, options: dict
) -> np.ndarray:
    """(n,) log density of each row under the fit to the folds it is not in (`fit_moe` with
    ``options``). The folds' own warnings are not passed on: the fit to all the data is the one
    kept, and its warnings are.

    Compiled once per k, not per fold: the folds' fits are padded to the size class of all n rows
    (`padded_at_least`), the class of the fit to all the data, whose EM programs they run; and
    every fold's fit scores all n rows in one compiled pass, of which its own are kept.
    """
    x, y = np.asarray(x), np.asarray(y)  # host arrays: slicing them compiles nothing
    gate_x = None if gate_x is None else np.asarray(gate_x)
    densities = np.empty(x.shape[0])
    for fold, fold_key in enumerate(jax.random.split(key, int(fold_of.max()) + 1)):
        test = fold_of == fold
        train_gate = None if gate_x is None else gate_x[~test]
        with warnings.catch_warnings(), padded_at_least(x.shape[0]):
            warnings.simplefilter("ignore")
            fit = fit_moe(x[~test], y[~test], num_experts=k, key=fold_key, gate_x=train_gate, **options)
        # Scored as predict scores a point fit (the experts' unbiased noise sds).
        densities[test] = np.asarray(_log_densities(predictive_params(fit), x, gate_x, y))[test]
    return densities
