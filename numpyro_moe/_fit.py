"""Point fits of the mixture of experts, all returning one record, `Fit` (DESIGN sections 3, 4).

- `fit_em`: EM from one start or several (run together; the best likelihood wins). Holding the
  experts fixed (``fix=("experts",)``) is EM over the gate alone, which the ICML 2019 paper proves
  converges to the true gate; joint EM refines everything.
- `fit_map`: the posterior mode of `moe_regression` (the same model's priors) by NumPyro SVI with
  an ``AutoDelta`` guide; ``fix`` holds parameter groups by ``handlers.condition``.
- `fit_moe`: the whole pipeline. The moment estimate has no local optima but needs many samples
  and is biased when the design assumptions fail; EM from random starts is accurate at its optimum
  but can stop in a wrong one. So the estimate (its gate learned by EM, experts fixed) is one start
  among ``num_starts``, all refined by joint EM, and the best likelihood wins; the record says
  which start that was.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpyro import handlers
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoDelta

from numpyro_moe._distribution import MixtureOfExperts
from numpyro_moe._em import (
    DF_BOUNDS,
    DF_START,
    EMResult,
    em_iterations,
    flat_penalty,
    penalty_from_priors,
    split_augmented,
    to_augmented,
)
from numpyro_moe._experts import estimate_experts
from numpyro_moe._links import Link, resolve_link
from numpyro_moe._model import (
    as_params,
    check_family,
    check_fix,
    fixed_sites,
    init_to_params,
    moe_regression,
    params_to_sites,
    resolve_priors,
    sites_to_params,
)
from numpyro_moe._moments import as_data_source
from numpyro_moe._params import MoEParams
from numpyro_moe._streamed import DataSummary, StreamedData, starting_noise, streamed_em, summarize
from numpyro_moe._streamed import streamed as as_streamed
from numpyro_moe._validation import (
    ReliabilityWarning,
    check_design,
    check_gate_x,
    check_key,
    check_num_experts,
    check_params,
    check_positive,
    check_positive_int,
    check_response,
)

__all__ = [
    "Fit", "as_starts", "check_data", "fit_em", "fit_map", "fit_moe", "random_starts", "starting_df",
]


class Fit(NamedTuple):
    """A point fit: from `fit_em`, `fit_map`, `fit_moe` and the baselines.

    Attributes
    ----------
    params
        `MoEParams` of the winning start at the end of the fit.
    log_likelihood
        Mean log-likelihood per point at ``params``.
    history
        (iterations,) the objective per point along the winning start's fit: for EM the mean
        log-likelihood before each iteration (non-decreasing); for MAP the mean log joint density
        (log-likelihood plus log prior, over n); for gradient descent minus the mean loss.
    iterations
        Iterations (EM) or optimiser steps run by the winning start.
    converged
        Whether the winning start met its convergence test (see each fit).
    method
        ``"em"``, ``"map"``, ``"likelihood_gd"`` or ``"squared_loss_gd"``.
    start
        Index of the winning start.
    start_log_likelihoods
        (num_starts,) final mean log-likelihood per point of every start (``-inf`` if it failed).
    start_labels
        Where each start came from: ``"tensor"`` (the moment estimate), ``"random"``, ``"given"``.
    expert_weights
        (k,) share of the data each expert carries at ``params`` (its responsibilities' mean over
        the points; they sum to 1), or None where not computed.
    entropy
        ``-sum_n sum_i r_ni log r_ni`` of the responsibilities at ``params`` (for ICL), or None.
    start_objectives
        (num_starts,) final objective per point of every start, the one EM ranks them by (the
        log posterior per point when penalised, else the log-likelihood; ``-inf`` if it failed),
        or None where not computed.
    num_points
        n, the rows the fit read (EM fits), or None.
    """

    params: MoEParams
    log_likelihood: float
    history: np.ndarray
    iterations: int
    converged: bool
    method: str
    start: int = 0
    start_log_likelihoods: np.ndarray | None = None
    start_labels: tuple[str, ...] = ("given",)
    expert_weights: np.ndarray | None = None
    entropy: float | None = None
    start_objectives: np.ndarray | None = None
    num_points: int | None = None

    @property
    def predictive_noise(self) -> np.ndarray | None:
        """(k,) the experts' noise sds for predicting new points: the fitted ones with the degrees
        of freedom of each expert's mean restored, ``s_i sqrt(N_i / (N_i - p))``.

        N_i is the points expert i carries (``expert_weights`` times ``num_points``) and p its
        mean's parameters (d, plus one with intercepts). EM's noise step divides an expert's
        weighted squared residuals by N_i (the maximum-likelihood, or with the prior the MAP,
        estimate), which understates the spread of new points by the factor (N_i - p) / N_i; the
        corrected variance is the unbiased one of a weighted least-squares fit, what R's ``lm``
        reports as the residual standard error and what flexmix's Gaussian experts use (with
        the total n for every expert). It matters where an expert carries few points per
        parameter: on the held-out rows of the five data sets of ``benchmarks/real_data.py`` and
        of ten R data sets (MASS and datasets) it raised the point fit's log-likelihood per point
        on 10 of the 15, by 0.034 on average (by 0.16 with 26 and 16 points per expert, d = 2; by
        0.19 with 29, 70 and 59, d = 6), and lowered it on the other five by 0.01 at most. One
        shared noise (every expert's sd the same): ``s sqrt(n / (n - k p))``. N_i - p is floored at 1 (an expert with fewer points than
        parameters, which `fit_em` warns about). None when the fit did not record n and the
        experts' shares (`fit_map`, the baselines): the fitted sds are then used as they are.
        `numpyro_moe.predict` and ``numpyro-moe predict`` use it for a point fit.
        """
        if self.num_points is None or self.expert_weights is None:
            return None
        noise = np.asarray(self.params.noise, dtype=float)
        num_experts = self.params.num_experts
        per_expert = self.params.dim + int(self.params.has_intercepts)
        noise = np.broadcast_to(noise, (num_experts,))
        if num_experts > 1 and np.all(noise == noise[0]):  # one shared noise
            factor = np.full(num_experts, self.num_points / max(self.num_points - num_experts * per_expert, 1.0))
        else:
            counts = np.asarray(self.expert_weights, dtype=float) * self.num_points
            factor = counts / np.maximum(counts - per_expert, 1.0)
        return noise * np.sqrt(np.maximum(factor, 1.0))

    @property
    def tensor_gap(self) -> float | None:
        """How far the tensor start ended below the winner: the winning start's final objective
        minus the tensor start's, per point (0 when the tensor start won). None when no start
        came from the moment estimate (k > d, or the labels say otherwise) or the per-start
        objectives were not kept. Over many fits, how often it is 0 (or within EM's tolerance)
        is the moment start's share of wins."""
        if "tensor" not in self.start_labels or self.start_objectives is None:
            return None
        objectives = np.asarray(self.start_objectives, dtype=float)
        return float(objectives[self.start] - objectives[self.start_labels.index("tensor")])


def check_data(x, y):
    """Validated (x, y) in JAX's default float dtype (float64 under x64, else float32).

    Narrower float input (float32 under x64, float16) is promoted, as `estimate_experts` does:
    the fits' compiled loops carry the data's dtype and mixing the two is an error.
    """
    x = check_design(x)
    y = check_response(y, x.shape[0])
    dtype = jnp.result_type(float)
    return x.astype(dtype), y.astype(dtype)


def _is_out_of_core(x) -> bool:
    """A NumPy memmap or a Dask array: data read chunk by chunk rather than loaded."""
    return isinstance(x, np.memmap) or type(x).__module__.split(".")[0] == "dask"


def stream_data(x, y, streamed: bool | None, chunk_size: int | None, gate_x, devices=None) -> StreamedData | None:
    """The chunk source of data fitted out of core, or None for data fitted in memory.

    ``streamed=None`` streams chunk sources (``y=None``: ``x`` a re-iterable of ``(x_chunk,
    y_chunk)`` pairs), NumPy memmaps and Dask arrays, data split over ``devices``, and every
    process's rows under ``jax.distributed``, and keeps other arrays in memory.
    """
    if streamed is not None and not isinstance(streamed, bool):
        raise TypeError(f"streamed: expected True, False or None, got {type(streamed).__name__}")
    if chunk_size is not None:
        chunk_size = check_positive_int(chunk_size, "chunk_size")
    spread = devices is not None or jax.process_count() > 1
    if streamed is False and spread:
        raise ValueError(
            "streamed: False fits in memory on one device; data over several devices or processes are streamed "
            "(pass streamed=None)"
        )
    if y is None:
        if streamed is False:
            raise ValueError("streamed: False needs arrays x and y; with y=None, x is a chunk source, read streamed")
    elif streamed is False or (streamed is None and not (spread or _is_out_of_core(x) or _is_out_of_core(y))):
        return None
    if gate_x is not None:
        raise ValueError(
            "gate_x: streamed (out-of-core) EM reads the gate's inputs from x; fit gate covariates in memory "
            "(streamed=False)"
        )
    return as_streamed(as_data_source(x, y, chunk_size=chunk_size, devices=devices), chunk_size)


def _checked_data(x, y, gate_x, streamed, chunk_size, devices):
    """``(x, y, gate_x, data, summary)``: checked arrays for a fit in memory (``data`` and
    ``summary`` None), or the user's x and y with their chunk source and one pass's summary."""
    data = stream_data(x, y, streamed, chunk_size, gate_x, devices)
    if data is not None:
        return x, y, gate_x, data, summarize(data)
    x, y = check_data(x, y)
    return x, y, check_gate_x(gate_x, x.shape[0]), None, None


def _pilot(data: StreamedData) -> np.ndarray:
    """The first two rows of the first chunk, in JAX's default float dtype."""
    first, _ = next(iter(data.source.chunks()))
    return np.asarray(first[:2], jnp.result_type(float))


def _gate_dim(gate_x) -> int | None:
    """The gate's number of inputs to check records against: None when it reads x."""
    return None if gate_x is None else gate_x.shape[1]


def _check_start_df(params: MoEParams, name: str) -> None:
    """A start's Student-t degrees of freedom: None, or one number or one per expert."""
    if params.df is None:
        return
    k = np.shape(params.experts)[-2]
    batch = np.shape(params.experts)[:-2]
    if np.shape(params.df) not in ((*batch,), (*batch, k)) or (batch and np.shape(params.df) == ()):
        raise ValueError(
            f"{name}: expected df (Student-t degrees of freedom) of shape ({k},) (one per expert) or (), "
            f"got shape {np.shape(params.df)}"
        )


def _one_start(value, name: str, dim: int, gate_dim: int | None) -> MoEParams:
    params = as_params(value, name)
    _check_start_df(params, name)
    if gate_dim is not None and not isinstance(value, MoEParams) and not hasattr(value, "params"):
        # An expert estimate's record has a uniform gate over x: give it the gate's width.
        params = params.replace(
            gates=np.zeros((*np.shape(params.gates)[:-1], gate_dim), np.result_type(params.gates))
        )
    # Starts are set up on the host (NumPy): nothing is compiled for them.
    if np.ndim(params.experts) != 3:
        return jax.tree_util.tree_map(
            lambda leaf: np.asarray(leaf)[None], check_params(params, name, dim=dim, gate_dim=gate_dim)
        )
    # Starts stacked on a leading axis: each is checked as one start would be.
    params = jax.tree_util.tree_map(np.asarray, params)
    count = np.shape(params.experts)[0]
    for index in range(count):
        check_params(
            jax.tree_util.tree_map(lambda leaf: leaf[index], params), f"{name}[{index}]", dim=dim, gate_dim=gate_dim
        )
    return params


def as_starts(init, dim: int, name: str = "init", gate_dim: int | None = None) -> MoEParams:
    """One or more starts as `MoEParams` stacked on a leading start axis.

    ``init``: `MoEParams` (one record, or records stacked on a leading axis as `random_starts`
    gives), an expert estimate, a `Fit`, or a list of these. All starts share the link, the
    number of experts, and whether they have intercepts (missing intercepts start at zero); their
    gates have ``gate_dim`` columns when the gate reads covariates of its own (an expert estimate's
    uniform gate is widened to them). When
    any start has Student-t degrees of freedom all get a (starts, k) ``df``, NaN where a start has
    none (the fits then start those at their default).
    """
    values = list(init) if isinstance(init, list | tuple) and not hasattr(init, "_fields") else [init]
    if not values:
        raise ValueError(f"{name}: expected at least one start, got an empty {type(init).__name__}")
    starts = [_one_start(value, name, dim, gate_dim) for value in values]
    links = {start.link for start in starts}
    if len(links) > 1:
        raise ValueError(f"{name}: the starts have different links {sorted(link.name for link in links)}")
    shapes = {start.experts.shape[1:] for start in starts}
    if len(shapes) > 1:
        raise ValueError(f"{name}: the starts have experts of different shapes {sorted(shapes)}")
    intercepts = any(start.has_intercepts for start in starts)
    degrees = any(start.df is not None for start in starts)
    dtype = jnp.result_type(float)

    def normal_form(start: MoEParams) -> MoEParams:
        count, k = start.experts.shape[:2]
        zeros = np.zeros((count, k), dtype)
        noise = np.broadcast_to(np.asarray(start.noise, dtype).reshape(count, -1), (count, k))
        return MoEParams(
            np.asarray(start.experts, dtype),
            np.asarray(start.gates, dtype),
            noise,
            (np.asarray(start.expert_intercepts, dtype) if start.expert_intercepts is not None else zeros)
            if intercepts
            else None,
            (np.asarray(start.gate_intercepts, dtype) if start.gate_intercepts is not None else zeros)
            if intercepts
            else None,
            start.link,
            (
                np.full((count, k), np.nan, dtype)
                if start.df is None
                else np.broadcast_to(np.asarray(start.df, dtype).reshape(count, -1), (count, k))
            )
            if degrees
            else None,
        )

    starts = [normal_form(start) for start in starts]
    return jax.tree_util.tree_map(lambda *leaves: np.concatenate(leaves), *starts)


def random_starts(
    x,
    y,
    *,
    num_experts: int,
    num_starts: int,
    key: jax.Array,
    link: str | Link = "linear",
    intercepts: bool = False,
    family: str = "normal",
    df=None,
    gate_x=None,
) -> MoEParams:
    """``num_starts`` random starts stacked on a leading axis: unit-norm Gaussian expert
    directions, a uniform gate (over ``gate_x``'s columns when the gate has covariates of its
    own), every noise sd(y), intercepts zero (with ``intercepts``), and for
    ``family="student_t"`` degrees of freedom ``df`` (fixed ones) or 4 (estimated, ``df=None``)."""
    key = check_key(key)
    x, y = check_data(x, y)
    gate_x = check_gate_x(gate_x, x.shape[0])
    num_experts = check_positive_int(num_experts, "num_experts")
    num_starts = check_positive_int(num_starts, "num_starts")
    family, df = check_family(family, df, num_experts)
    gate_dim = x.shape[1] if gate_x is None else gate_x.shape[1]
    # sd(y) on the host: nothing compiled per n.
    return _random_params(key, num_starts, num_experts, x.shape[1], gate_dim, float(np.std(np.asarray(y))), link,
                          intercepts, family, df)


def _normal_draws(key, shape: tuple[int, ...], dtype) -> np.ndarray:
    """Standard normal draws of ``shape`` (host array) from one compiled program per size class.

    The draw is of a flat length rounded up to a power of two (at least 1,024), of which the first
    entries are kept: with JAX's partitionable threefry (its default), each draw is a function of
    the key and its flat position alone, so they equal ``jax.random.normal(key, shape)``, while a
    new number of experts or starts compiles no new sampler (about 0.7 s each in a fresh process
    at d = 13).
    """
    size = math.prod(shape)
    length = max(1024, 1 << max(size - 1, 0).bit_length())
    return np.asarray(jax.random.normal(key, (length,), dtype))[:size].reshape(shape)


def _random_params(key, num_starts, num_experts, dim, gate_dim, y_std, link, intercepts, family, df) -> MoEParams:
    dtype = jnp.result_type(float)
    experts = _normal_draws(key, (num_starts, num_experts, dim), dtype)
    experts = experts / np.linalg.norm(experts, axis=-1, keepdims=True)
    zeros = np.zeros((num_starts, num_experts), dtype)
    return MoEParams(
        experts,
        np.zeros((num_starts, num_experts, gate_dim), dtype),
        np.full((num_starts, num_experts), y_std, dtype),
        zeros if intercepts else None,
        zeros if intercepts else None,
        link,
        starting_df(None, family, df, (num_starts, num_experts), dtype),
    )


def starting_df(given, family: str, df, shape: tuple[int, ...], dtype, *, clip: bool = True):
    """Starting degrees of freedom of shape ``shape``: None for Gaussian experts; ``df`` when it
    is fixed; else the starts' own (``given``; clipped to the interval EM searches) where finite
    and positive, and 4 elsewhere."""
    if family == "normal":
        return None
    xp = jnp if isinstance(given, jax.core.Tracer) or isinstance(df, jax.core.Tracer) else np
    if df is not None:
        return xp.broadcast_to(xp.asarray(df, dtype), shape)
    if given is None:
        return xp.full(shape, DF_START, dtype)
    given = xp.broadcast_to(xp.asarray(given, dtype), shape)
    valid = xp.isfinite(given) & (given > 0)
    start = xp.clip(given, *DF_BOUNDS) if clip else given
    return xp.where(valid, start, DF_START).astype(dtype)


def _first(starts: MoEParams) -> MoEParams:
    return jax.tree_util.tree_map(lambda leaf: leaf[0], starts)


def _starting_noise(starts: MoEParams, x, y) -> jax.Array:
    """The starts' noise, where a start has none (not finite and positive): the residual spread
    of the closest expert per point, a rough positive start that EM corrects."""
    noise = np.asarray(starts.noise)
    valid = np.all(np.isfinite(noise) & (noise > 0), axis=-1, keepdims=True)
    if bool(np.all(valid)):
        return noise
    means = jax.vmap(lambda start: start.expert_means(x))(starts)  # (starts, n, k)
    best = jnp.min((y[None, :, None] - means) ** 2, axis=-1)
    spread = jnp.sqrt(jnp.maximum(jnp.mean(best, axis=-1), 1e-6 * jnp.var(y) + 1e-12))
    return jnp.where(valid, noise, spread[:, None])


def resolvable_tol(tol: float, dtype) -> float:
    """``tol`` floored at 8 float epsilons of ``dtype`` (about 1e-6 in float32, 2e-15 in float64).

    The mean log-likelihood per point is O(1), so changes below a few epsilons are rounding: a
    float32 EM with tol=1e-8 otherwise runs to max_iterations (measured: 500 iterations where
    float64 needs 6).
    """
    return max(tol, 8 * float(jnp.finfo(dtype).eps))


class _EMRun(NamedTuple):
    """Every start's EM result (`em_iterations`), their final parameters stacked, and the settings
    the fits read back."""

    result: EMResult
    params: MoEParams
    tol: float
    intercepts: bool
    dim: int
    estimate_df: bool


def _em_all(
    x, y, init, *, gate_x, fix, shared_noise, penalized, priors, family, df, max_iterations, tol, progress_bar,
    data: StreamedData | None = None, summary: DataSummary | None = None, accelerate: bool | str = False,
    history_length: int | None = None,
) -> _EMRun:
    """EM from every start of ``init`` on checked data, or over the chunks of ``data`` (with its
    ``summary``) when streamed (see `fit_em`)."""
    dim = x.shape[1] if data is None else data.source.dim
    starts = as_starts(init, dim, gate_dim=_gate_dim(gate_x))
    # The link maps arrays elementwise, or a ValueError naming it.
    _first(starts).expert_means(np.asarray(x)[:2] if data is None else _pilot(data))
    fix = check_fix(fix)
    dtype = jnp.result_type(float) if data is not None else x.dtype
    tol = resolvable_tol(check_positive(tol, "tol"), dtype)
    intercepts = starts.has_intercepts
    num_experts, dim = starts.experts.shape[1:]
    gate_dim = starts.gates.shape[-1]
    family, df = check_family(family, df, num_experts)
    estimate_df = family == "student_t" and df is None and "noise" not in fix
    degrees = starting_df(starts.df, family, df, starts.experts.shape[:2], dtype, clip=estimate_df)
    if penalized:
        chosen = resolve_priors(priors)
        penalty = penalty_from_priors(
            chosen, num_experts, dim, intercepts=intercepts, dtype=dtype, estimate_df=estimate_df,
            gate_dim=gate_dim,
        )
        if not priors:
            if data is None:
                values = np.asarray(y)  # on the host: nothing compiled for a new n
                _check_default_scale(float(np.mean(values)), float(np.std(values)))
            else:
                _check_default_scale(summary.y_mean, summary.y_std)
    else:
        if priors:
            raise ValueError("priors: given with penalized=False, which fits no priors; drop one of them")
        penalty = flat_penalty(num_experts, dim + int(intercepts), dtype, gate_dim + int(intercepts))
    experts, gates = to_augmented(starts, intercepts)
    if data is None:
        noise = _starting_noise(starts, x, y)
    else:
        noise = starting_noise(data, experts, starts.noise, summary, starts.link, intercepts)
    if shared_noise:  # a shared model starts from one noise, so its first step is an EM step
        xp = np if isinstance(noise, np.ndarray) else jnp
        noise = xp.broadcast_to(xp.sqrt(xp.mean(noise**2, axis=-1, keepdims=True)), noise.shape)
    if data is not None:
        result = streamed_em(
            data, experts, gates, noise, summary=summary, penalty=penalty, link=starts.link, intercepts=intercepts,
            fix=fix if estimate_df or degrees is None else (*fix, "df"), shared_noise=shared_noise,
            max_iterations=max_iterations, tol=tol, df=degrees, progress="EM (streamed)" if progress_bar else None,
        )
        params = split_augmented(result.experts, result.gates, result.noise, intercepts, starts.link, result.df)
        return _EMRun(result, params, tol, intercepts, dim, estimate_df)
    # Host-side (NumPy) columns of ones: nothing is compiled for a new n.
    ones = np.ones((x.shape[0], 1), x.dtype)
    design = np.concatenate([np.asarray(x), ones], axis=1) if intercepts else x
    gate_design = None
    if gate_x is not None:
        gate_design = np.concatenate([np.asarray(gate_x), ones], axis=1) if intercepts else gate_x
    result = em_iterations(
        experts,
        gates,
        noise,
        design,
        y,
        penalty=penalty,
        link=starts.link,
        fix=fix if estimate_df or degrees is None else (*fix, "df"),
        shared_noise=shared_noise,
        max_iterations=max_iterations,
        tol=tol,
        progress="EM" if progress_bar else None,
        df=degrees,
        gate_x=gate_design,
        accelerate=accelerate,
        history_length=history_length,
    )
    params = split_augmented(result.experts, result.gates, result.noise, intercepts, starts.link, result.df)
    return _EMRun(result, params, tol, intercepts, dim, estimate_df)


def _check_accelerate(accelerate) -> bool | str:
    if isinstance(accelerate, str) and accelerate == "auto":
        return accelerate
    if isinstance(accelerate, (bool, np.bool_)):
        return bool(accelerate)
    raise ValueError(f"accelerate: expected True, False or 'auto', got {accelerate!r}")


def fit_em(
    x,
    y,
    init,
    *,
    fix: tuple[str, ...] = (),
    shared_noise: bool = False,
    penalized: bool = True,
    priors: dict | None = None,
    family: str = "normal",
    df=None,
    gate_x=None,
    max_iterations: int = 500,
    tol: float = 1e-8,
    progress_bar: bool = False,
    streamed: bool | None = None,
    chunk_size: int | None = None,
    devices=None,
    accelerate: bool | str = False,
) -> Fit:
    """EM for the mixture of experts from one start or several; the best fit wins.

    By default penalised (MAP) EM: each M-step maximises the expected log-likelihood plus the
    log prior of `moe_regression`'s priors (`default_priors`, made for standardised x and y), so
    EM, `fit_map` and NUTS share one model, and a component that collapses onto a few points or a
    gate that separates the data cannot win on likelihood (Fraley and Raftery 2007).
    ``penalized=False`` is the papers' maximum-likelihood EM.

    Parameters
    ----------
    x, y
        (n, d) inputs and (n,) responses; computed in JAX's default float dtype (float32 input
        is promoted to float64 when x64 mode is on). For data read chunk by chunk (see
        ``streamed``): a NumPy memmap or a Dask array, or ``y=None`` and ``x`` a re-iterable of
        ``(x_chunk, y_chunk)`` pairs (a list, or a callable returning an iterator).
    init
        The start(s) (see `as_starts`): `MoEParams` (its link is the fit's), an expert estimate
        (gates start at zero, a uniform gate), a `Fit`, `random_starts`, or a list of these, run
        together (vmapped); the best final objective (log posterior per point when penalised, else log-likelihood) wins, the first of those within ``tol`` of
        it on a tie. Intercepts are fitted when the starts have them. A start without a finite
        positive noise starts at the residual spread of its closest expert per point.
    fix
        Parameter groups held at their starting values: ``"experts"`` (with their intercepts; EM
        over the gate alone, as in the ICML 2019 paper), ``"gates"`` (with theirs), ``"noise"``
        (with the Student-t degrees of freedom).
    shared_noise
        One noise sd for all experts (the M-step pools the residuals), or one per expert (the
        default, as in flexmix).
    penalized, priors
        Maximise the log posterior (log-likelihood plus log prior) rather than the
        log-likelihood; ``priors`` replaces entries of `default_priors` (closed-form M-steps take
        Normal priors on coefficients and an InverseGamma or HalfNormal prior on the noise sd).
    family, df
        The experts' noise, as in `moe_priors`: ``"normal"`` (the default; the starts' degrees of
        freedom, if any, are dropped) or ``"student_t"``, experts
        ``StudentT(nu_i, g(a_i . x + c_i), s_i)`` fitted by ECM with latent precision weights
        (Liu and Rubin 1995; McLachlan and Peel 2000, ch. 7): each point's weight in its expert's
        least squares and noise step is r_ni u_ni, u_ni = (nu_i + 1) / (nu_i + (res_ni / s_i)^2),
        small for outliers. ``df=None`` estimates nu_i per expert (starting at the starts' ``df``
        where they have it, else 4; searched in [0.5, 200]; penalised by ``priors["df"]``,
        default Gamma(2, 0.1)); a positive number or (k,) array fixes them.
    gate_x
        (n, q) covariates of the gate's own (flexmix's concomitant variables), or None (the
        default): the gate reads x. With them P(z = i | x, z) = softmax(W z + b)_i, the starts'
        gates have q columns, and the gate's M-step is the same penalised Newton step on z.
    max_iterations, tol
        Stop after ``max_iterations`` or when the objective per point (mean log-likelihood, plus
        the log prior over n when penalised) changes by less than ``tol`` (floored at 8 float
        epsilons of the data's dtype, below which the change is rounding); a winning start that
        hits the cap warns (`ReliabilityWarning`).
    progress_bar
        Show a progress bar (updated every 20 iterations).
    streamed, chunk_size
        Out-of-core EM: every iteration reads the data in blocks of ``chunk_size`` rows (None: about
        16 MB of x per block), so memory stays flat in n; each iteration takes one Newton step on
        the gate and one Gauss-Newton step per expert with a step search, two passes over the data
        (a generalised EM with the same fixed points; see ``numpyro_moe._streamed``). None (the
        default) streams chunk sources, NumPy memmaps and Dask arrays and fits other arrays in
        memory; True streams any data. The gate reads x when streamed (no ``gate_x``).
    devices
        Split every chunk by rows over several devices, as `estimate_experts` does (``"all"``, a
        number, or a list of devices; None: JAX's default device); implies streamed EM. Under
        ``jax.distributed`` each process passes its own rows, the sums of every pass are added
        across the processes, and every process returns the fit of all the rows.
    accelerate
        SQUAREM (Varadhan and Roland 2008, scheme S3) for EM in memory: cycles of two EM steps,
        an extrapolation along their path, and one EM step from there, kept only when its
        objective is at least the first step's (else the cycle ends at the second EM step), so
        the objective still never decreases. Where EM crawls it needs several times fewer
        iterations (measured: Student-t experts, k = 3, n = 4,000, 730 iterations plain, 186
        accelerated, the same optimum); its compiled program is larger (a fresh process compiles
        about 2 s longer). ``"auto"``: plain EM for the first `ACCELERATE_AFTER` = 100
        iterations, SQUAREM after them for a fit still moving, so a fit that converges sooner is
        exactly plain EM and compiles nothing more. True: SQUAREM from the first iteration; False
        (the default): plain EM. Not the default because finishing EM is not always what predicts
        best: on the High School and Beyond data of ``benchmarks/real_data.py`` plain EM stops at
        its 500-iteration cap at k = 3 and 4, and with ``"auto"`` the k = 3 fit converged to a
        higher mode (-1.2429 per point against -1.2461) with a narrow expert (noise sd 0.17 of y's)
        that BIC then chose over k = 4, whose held-out log-likelihood was worse (-3.1894 per point
        against -3.1804) and whose posterior NUTS could not sample (max r_hat 1.29, 765 divergent
        transitions). Streamed EM ignores it.

    Returns
    -------
    Fit
        ``log_likelihood`` is the mean log-likelihood per point; ``history`` is the objective per
        point and never decreases (up to rounding); the best objective wins among starts.
        An expert carrying fewer points than it has parameters warns (`ReliabilityWarning`).
    """
    x, y, gate_x, data, summary = _checked_data(x, y, gate_x, streamed, chunk_size, devices)
    num_points = x.shape[0] if data is None else summary.num_samples
    max_iterations = check_positive_int(max_iterations, "max_iterations")
    run = _em_all(
        x, y, init, gate_x=gate_x, fix=fix, shared_noise=shared_noise, penalized=penalized, priors=priors,
        family=family, df=df, max_iterations=max_iterations, tol=tol, progress_bar=progress_bar, data=data,
        summary=summary, accelerate=_check_accelerate(accelerate),
    )
    result, tol, intercepts, dim, estimate_df = run.result, run.tol, run.intercepts, run.dim, run.estimate_df
    history, iterations = result.history, result.iterations
    objectives = np.where(np.isfinite(result.objective), result.objective, -np.inf)
    log_likelihoods = np.where(np.isfinite(objectives), result.log_likelihood, -np.inf)
    # Starts that reach the same optimum (within the convergence tolerance) tie: the first wins.
    best = int(np.argmax(objectives >= np.max(objectives) - tol))
    count = int(iterations[best])
    best_history = np.asarray(history[best, :count])
    converged = count < max_iterations or bool(count > 1 and abs(best_history[-1] - best_history[-2]) < tol)
    if not converged:
        warnings.warn(
            f"EM hit max_iterations={max_iterations} before the change of its objective per point "
            f"({'log posterior' if penalized else 'log-likelihood'}) fell below tol={tol}; the fit may "
            "not have converged: raise max_iterations",
            ReliabilityWarning,
            stacklevel=2,
        )
    params = jax.tree_util.tree_map(lambda leaf: leaf[best], run.params)
    weights = np.asarray(result.weights[best]) / num_points
    _check_weights(weights, num_points, dim + int(intercepts) + 1 + int(estimate_df))
    return Fit(
        params=params,
        log_likelihood=float(log_likelihoods[best]),
        history=best_history,
        iterations=count,
        converged=converged,
        method="em",
        start=best,
        start_log_likelihoods=log_likelihoods,
        start_labels=("given",) * len(log_likelihoods),
        expert_weights=weights,
        entropy=float(result.entropy[best]),
        start_objectives=objectives,
        num_points=int(num_points),
    )


def _check_default_scale(centre: float, spread: float) -> None:
    """Warn when the default priors (made for a standardised y) meet a y far from that scale."""
    if not 0.1 <= spread <= 10 or abs(centre) > 10 * max(spread, 1e-12):
        warnings.warn(
            f"y: mean {centre:.3g} and sd {spread:.3g}, while the default priors of penalised EM are "
            "made for a standardised y (mean 0, sd 1); standardise x and y, pass priors= on your "
            "scale, or pass penalized=False",
            ReliabilityWarning,
            stacklevel=4,
        )


def _check_weights(weights: np.ndarray, num_points: int, parameters: int) -> None:
    """Warn about experts that carry fewer points than they have parameters."""
    counts = weights * num_points
    thin = [i for i, count in enumerate(counts) if count < parameters]
    if len(weights) > 1 and thin:
        described = ", ".join(f"expert {i} carries {counts[i]:.1f} points ({100 * weights[i]:.2g}%)" for i in thin)
        warnings.warn(
            f"{described} of {num_points}, fewer than its {parameters} parameters: the data do not "
            "support it; fit fewer experts (select_num_experts compares k by BIC)",
            ReliabilityWarning,
            stacklevel=3,
        )


def fit_map(
    x,
    y,
    init,
    *,
    key: jax.Array,
    fix: tuple[str, ...] = (),
    priors: dict | None = None,
    shared_noise: bool = False,
    family: str = "normal",
    df=None,
    gate_x=None,
    num_steps: int = 2000,
    learning_rate: float = 0.01,
    tol: float = 1e-4,
    progress_bar: bool = False,
) -> Fit:
    """The posterior mode of `moe_regression` by NumPyro SVI with an ``AutoDelta`` guide (Adam).

    Parameters
    ----------
    x, y
        (n, d) inputs and (n,) responses.
    init
        The start: `MoEParams`, an expert estimate or a `Fit`; its link, number of experts and
        intercepts define the model (started by `init_to_params`).
    key
        PRNG key of the SVI run.
    fix
        Parameter groups held at ``init``'s values by ``handlers.condition``: ``"experts"``,
        ``"gates"``, ``"noise"`` (each with its intercepts; the noise with the Student-t degrees
        of freedom).
    priors, shared_noise
        The model's priors and noise structure (see `moe_priors`).
    family, df
        The experts' noise (see `moe_priors`): ``"student_t"`` with ``df=None`` estimates the
        degrees of freedom (site ``df``, starting at ``init``'s or 4); a number fixes them.
    gate_x
        (n, q) covariates of the gate's own, or None: the gate reads x (see `fit_em`).
    num_steps, learning_rate
        Adam steps and step size.
    tol
        Converged when the mean log joint density per point changed by less than ``tol`` over
        the last tenth of the steps; otherwise a `ReliabilityWarning` says to raise ``num_steps``.
    progress_bar
        Show NumPyro's progress bar.
    """
    x, y = check_data(x, y)
    key = check_key(key)
    fix = check_fix(fix)
    num_steps = check_positive_int(num_steps, "num_steps")
    learning_rate = check_positive(learning_rate, "learning_rate")
    tol = check_positive(tol, "tol")
    gate_x = check_gate_x(gate_x, x.shape[0])
    starts = as_starts(init, x.shape[1], gate_dim=_gate_dim(gate_x))
    if starts.experts.shape[0] != 1:
        raise ValueError(
            f"init: fit_map takes one start, got {starts.experts.shape[0]}; run fit_em for several"
        )
    family, df = check_family(family, df, starts.experts.shape[1])
    start = _first(starts).replace(
        noise=_starting_noise(starts, x, y)[0],
        df=starting_df(starts.df, family, df, starts.experts.shape[:2], x.dtype, clip=False),
    )
    start = start.replace(df=None if start.df is None else start.df[0])
    model_kwargs = dict(
        num_experts=start.num_experts,
        link=start.link,
        intercepts=start.has_intercepts,
        shared_noise=shared_noise,
        priors=priors,
        family=family,
        df=df,
        gate_x=gate_x,
    )
    fixed = fixed_sites(fix, start, shared_noise=shared_noise)
    model = handlers.condition(moe_regression, fixed) if fixed else moe_regression
    guide = AutoDelta(model, init_loc_fn=init_to_params(params=start))
    svi = SVI(model, guide, optax.adam(learning_rate), Trace_ELBO())
    result = svi.run(key, num_steps, x, y, progress_bar=progress_bar, **model_kwargs)
    sites = {**params_to_sites(start, shared_noise=shared_noise), **guide.median(result.params), **fixed}
    params = sites_to_params(sites, link=start.link, df=start.df, gate_dim=start.gate_dim)
    history = -np.asarray(result.losses) / x.shape[0]
    window = max(num_steps // 10, 1)
    converged = bool(num_steps > window and abs(history[-1] - history[-1 - window]) < tol)
    if not converged:
        warnings.warn(
            f"MAP: the log joint density per point still changed by more than tol={tol} over the last "
            f"{window} of num_steps={num_steps} Adam steps; raise num_steps",
            ReliabilityWarning,
            stacklevel=2,
        )
    log_likelihood = float(jnp.mean(MixtureOfExperts.from_params(params, x, gate_x=gate_x).log_prob(y)))
    return Fit(
        params=params,
        log_likelihood=log_likelihood,
        history=history,
        iterations=num_steps,
        converged=converged,
        method="map",
        start_log_likelihoods=np.asarray([log_likelihood]),
    )


def fit_moe(
    x,
    y,
    *,
    num_experts: int,
    key: jax.Array,
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
    screen_iterations: int = 10,
    screen_rows: int | None = 4_096,
    subsample_rows: int | None = 20_000,
    design: str = "gaussian",
    estimate_options: dict | None = None,
    max_iterations: int = 500,
    tol: float = 1e-8,
    progress_bar: bool = False,
    streamed: bool | None = None,
    chunk_size: int | None = None,
    devices=None,
    accelerate: bool | str = False,
    split_merge: int = 0,
) -> Fit:
    """Fit a mixture of experts: the tensor estimate and random starts, joint EM, best wins.

    Parameters
    ----------
    x, y
        (n, d) inputs and (n,) responses; or data read chunk by chunk (a NumPy memmap, a Dask
        array, or ``y=None`` and ``x`` a re-iterable of ``(x_chunk, y_chunk)`` pairs; see
        ``streamed``).
    num_experts
        k. For k > d the tensor method cannot apply and every start is random.
    key
        PRNG key (the tensor decomposition's restarts and the random starts).
    link, intercepts, shared_noise
        The model: the experts' link, expert and gate intercepts, one noise or one per expert
        (the default).
    penalized, priors
        Penalised (MAP) EM under the model's priors (the default) or maximum likelihood; see
        `fit_em`.
    family, df
        Gaussian experts (``"normal"``, the default) or robust Student-t experts
        (``"student_t"``, by ECM; ``df=None`` estimates the degrees of freedom, starting at 4, a
        number fixes them); see `fit_em`. The moment estimate's start is the same either way.
    gate_x
        (n, q) covariates of the gate's own, or None: the gate reads x (see `fit_em`). The
        moment estimate of the experts reads x alone either way; its gate is fitted on ``gate_x``.
    num_starts
        EM starts in all: the tensor estimate (when k <= d; its gate first fitted by EM with the
        experts fixed) and ``num_starts - 1`` `random_starts`.
    num_finalists, screen_iterations
        Short-EM starts (Biernacki, Celeux and Govaert 2003, "Choosing starting values for the EM
        algorithm"): with ``num_finalists`` set below ``num_starts``, every start first runs
        ``screen_iterations`` EM iterations, and only the ``num_finalists`` best by the objective
        (and the tensor start, always) continue to convergence, so many starts cost little and
        none waits for the slowest. When the screen reads every row, it runs the starts as many at
        a time as there are finalists, so that it and the finalists' run share one compiled EM
        program. None (the default): every start runs to convergence.
        ``start_labels`` and the per-start figures of the result describe the finalists.
    screen_rows
        The short-EM screen runs on a random subsample of this many rows when the data (in
        memory) have more, the finalists on all of them: the screen ranks starts, which a few
        thousand rows do as well as all of them, and its cost no longer grows with n (measured in
        a warm process, d = 10, k = 3, 20 starts and 5 finalists: at n = 20,000 the fit took 3.8 s
        against 12.7 s with the screen on every row; at n = 200,000, 19.6 s against 38 s and
        192 s, on two keys, for the random starts run to convergence on ``subsample_rows`` rows,
        where one slow start holds up the others; the same optimum each time). None: the screen
        reads every row.
    subsample_rows
        Without a screen (``num_finalists`` None), with more rows than this (in memory), the
        random starts first run EM to convergence on a random subsample of ``subsample_rows``
        rows, and only the best of them joins the tensor start on all the data: a random start's
        role is to find a basin, which the subsample finds as well at a fraction of the cost
        (measured at n = 200,000, d = 10, k = 3: 110 s with every start on all the data, 15 s
        this way, the same optimum and expert error). None: every start runs on all the data.
    design
        The input design the moment estimate assumes (`estimate_experts`): ``"gaussian"`` (the
        default), ``"mixture"`` (score functions of a density fitted to x, for non-Gaussian
        inputs) or ``"auto"`` (the mixture where a normality test rejects and n >= 20,000).
    estimate_options
        Options of `estimate_experts` (e.g. ``noise``, ``num_power_restarts``, ``method``).
    max_iterations, tol
        EM limits (see `fit_em`), for the gate-only and the joint EM.
    progress_bar
        Show progress bars.
    streamed, chunk_size
        Out of core (see `fit_em`): the moments, the gate EM and the joint EM all read the data
        in blocks of ``chunk_size`` rows, so memory stays flat in n. None (the default) streams
        chunk sources, NumPy memmaps and Dask arrays.
    devices
        Split the data by rows over several devices in every pass (the moments and both EMs; see
        `fit_em`); under ``jax.distributed`` each process passes its own rows.
    accelerate
        SQUAREM-accelerated EM: ``"auto"`` once EM has run 100 iterations, True throughout, False
        (the default) never (see `fit_em`).
    split_merge
        Rounds of split-and-merge moves after EM (Ueda, Nakano, Ghahramani and Hinton 2000, "SMEM
        algorithm for mixture models"), for EM's typical local optima with many experts: one
        expert spread over two true ones, another spent where one suffices, or a rare expert
        missed altogether. Each round frees one expert's slot and either splits another expert in
        two (its points divided by the sign of their residual, a weighted least-squares line for
        each half, the freed slot taking its gate; for the three experts with the largest share of
        residual variance and every slot) or gives the slot a new expert through the points the
        fit explains worst (a birth, `_birth_candidates`: a trimmed least-squares line through
        them, with the gate of the expert that held most of them; 2 k moves); tries every such
        move by a short EM (``screen_iterations``), runs the best two to convergence, and keeps
        the result only when it raises EM's objective; rounds stop at the first that does not.
        0 (the default): none. In memory only. It mends the optima it is built for
        (``tests/test_split_merge.py``: two identical experts over two true ones, a fixed point of
        EM, expert error 1.08 -> 0.01; a missing expert, its slot a twin of another). In the
        rare-expert regime (d = 10, k = 8, n = 4,000, gate scale 8, the 10 seeds of
        ``benchmarks/speed.py`` part C) the default fit reached EM-from-truth's optimum on 7/10
        seeds; with ``split_merge=3`` on 9/10 (the births found the rare expert on the two seeds
        whose fits had missed it, closing gaps of 0.058 and 0.11 per point), the fits taking
        a median 9.1 s against 5.8 s (at most 14.1 s against 9.8 s). Not the default, for a measured reason: made the default of
        every fit, the point fits of ``benchmarks/real_data.py`` (``numpyro-moe fit --experts
        auto``, fresh process) took 4-5x as long (motorcycle 15.9 -> 81.8 s, faithful 10.8 ->
        54.0 s, High School and Beyond 55.6 -> 126.3 s) and predicted held-out rows worse: the
        moves found higher optima (faithful at k = 3: log-likelihood per point -0.250 -> -0.204),
        BIC then chose other k (faithful 2 -> 3, High School and Beyond 4 -> 3), and the held-out
        log-likelihood per point fell (motorcycle -3.974 -> -4.024, faithful -0.238 -> -0.303,
        High School and Beyond -3.180 -> -3.187; diabetes and Boston unchanged).

    Returns
    -------
    Fit
        ``start_labels`` says which start is the tensor estimate's (``"split-merge"`` for every
        finalist when a move was kept).
    """
    x, y, gate_x, data, summary = _checked_data(x, y, gate_x, streamed, chunk_size, devices)
    dim = x.shape[1] if data is None else data.source.dim
    link = resolve_link(link)
    key = check_key(key)
    num_experts = check_num_experts(num_experts, dim, require_k_le_d=False)
    family, df = check_family(family, df, num_experts)
    num_starts = check_positive_int(num_starts, "num_starts")
    if num_finalists is not None:
        num_finalists = check_positive_int(num_finalists, "num_finalists")
    screen_iterations = check_positive_int(screen_iterations, "screen_iterations")
    if subsample_rows is not None:
        subsample_rows = check_positive_int(subsample_rows, "subsample_rows")
    if screen_rows is not None:
        screen_rows = check_positive_int(screen_rows, "screen_rows")
    max_iterations = check_positive_int(max_iterations, "max_iterations")
    tol = check_positive(tol, "tol")
    if isinstance(split_merge, bool) or not isinstance(split_merge, (int, np.integer)) or split_merge < 0:
        raise ValueError(f"split_merge: expected a number of rounds >= 0 (an integer), got {split_merge!r}")
    if split_merge and data is not None:
        raise ValueError("split_merge: the moves need the data in memory; pass arrays, or split_merge=0 to stream")
    if estimate_options is not None and not isinstance(estimate_options, dict):
        raise TypeError(
            f"estimate_options: expected a dict of estimate_experts options, got {type(estimate_options).__name__}"
        )
    options = dict(estimate_options or {})
    taken = sorted(set(options) & {"num_experts", "key", "link", "design", "devices"})
    if taken:
        raise ValueError(f"estimate_options: {taken} are set by fit_moe's own arguments; pass them there")
    tensor_key, random_key = jax.random.split(key)
    em_options = dict(
        shared_noise=shared_noise,
        penalized=penalized,
        priors=priors,
        family=family,
        df=df,
        gate_x=gate_x,
        max_iterations=max_iterations,
        tol=tol,
        progress_bar=progress_bar,
        streamed=data is not None,
        chunk_size=None if data is None else data.chunk_size,
        devices=devices,
        accelerate=accelerate,
    )
    starts, labels = [], []
    if num_experts <= dim:
        # The estimate is a start that EM refines: its own reliability notes (design, eigen-gap)
        # matter when it is used alone (estimate_experts warns then), not here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ReliabilityWarning)
            # Host arrays take the moments' staging path: fixed-size chunks, nothing compiled per n
            # (and streamed data are read the same way).
            estimate = estimate_experts(
                *((np.asarray(x), np.asarray(y)) if data is None else (x, y)), num_experts=num_experts, link=link,
                key=tensor_key, design=design, devices=devices, **options,
            )
            start = estimate.to_params(intercepts=intercepts)
            if gate_x is not None:  # a uniform gate over the gate's own covariates
                start = start.replace(gates=np.zeros((num_experts, gate_x.shape[1]), x.dtype))
            gated = fit_em(x, y, start, fix=("experts",), **em_options)
        starts.append(gated.params)
        labels.append("tensor")
    if num_starts > len(starts):
        count = num_starts - len(starts)
        if data is None:
            randoms = random_starts(
                x, y, num_experts=num_experts, num_starts=count, key=random_key, link=link, intercepts=intercepts,
                family=family, df=df, gate_x=gate_x,
            )
        else:
            randoms = _random_params(
                random_key, count, num_experts, dim, dim, summary.y_std, link, intercepts, family, df
            )
        starts.append(randoms)
        labels += ["random"] * count
    width = 0
    if num_finalists is not None and num_finalists < len(labels):
        rows = None
        if screen_rows is not None and data is None and x.shape[0] > screen_rows:
            rows = _row_subsample(jax.random.fold_in(random_key, 2), x.shape[0], screen_rows)
        # When the screen reads every row (in memory), it runs in the finalists' width (the
        # finalists and the tensor start), a group at a time: the screen and the run to
        # convergence share one compiled EM program (compiling one takes about a second in a fresh
        # process; the copies that fill the groups cost a fifth more screen, at most).
        shared = rows is None and data is None and accelerate is not True
        width = num_finalists + int("tensor" in labels) if shared else 0
        starts, labels = _screened(
            x, y, starts, labels, num_finalists, screen_iterations, em_options, data, summary, rows=rows,
            width=width, history_length=max_iterations if shared else None,
        )
    elif (
        subsample_rows is not None and data is None and labels.count("random") > 1
        and x.shape[0] > subsample_rows
    ):
        starts, labels = _subsample_screen(x, y, gate_x, starts, labels, subsample_rows, random_key, em_options)
    count = len(labels)
    if width > count:  # a copy of the first finalist fills the width; its results are dropped
        starts = _filled(starts, width)
    fit = fit_em(x, y, starts, **em_options)
    if width > count:  # a copy ties with its original, which comes first and wins (fit_em)
        fit = fit._replace(
            start=fit.start if fit.start < count else 0,
            start_log_likelihoods=fit.start_log_likelihoods[:count],
            start_objectives=fit.start_objectives[:count],
        )
    fit = fit._replace(start_labels=tuple(labels))
    if split_merge:
        fit, _ = _split_merge(x, y, fit, int(split_merge), screen_iterations, em_options)
    return fit


def _subsample_screen(x, y, gate_x, starts: list, labels: list[str], rows: int, key, em_options: dict):
    """The random starts (the last entry of ``starts``, stacked) run EM on ``rows`` rows drawn
    without replacement; their winner joins the other starts, to be refined on all the data."""
    chosen = _row_subsample(jax.random.fold_in(key, 1), x.shape[0], rows)
    options = {name: value for name, value in em_options.items() if name not in ("progress_bar", "gate_x")}
    host_x, host_y = np.asarray(x), np.asarray(y)
    with warnings.catch_warnings():  # the fit on all the data says what matters
        warnings.simplefilter("ignore", ReliabilityWarning)
        screened = fit_em(
            host_x[chosen], host_y[chosen], starts[-1], gate_x=None if gate_x is None else np.asarray(gate_x)[chosen],
            **options,
        )
    return [*starts[:-1], screened.params], [*labels[: labels.index("random")], "random"]


def _row_subsample(key: jax.Array, n: int, rows: int) -> np.ndarray:
    """``rows`` of ``n`` row indices, sorted, drawn without replacement (on the host)."""
    seed = int(jax.random.randint(key, (), 0, np.iinfo(np.int32).max))
    return np.sort(np.random.default_rng(seed).choice(n, size=rows, replace=False))


def _screened(
    x, y, starts: list, labels: list[str], keep: int, iterations: int, em_options: dict, data, summary,
    rows: np.ndarray | None = None, width: int = 0, history_length: int | None = None,
):
    """The short-EM screen: ``iterations`` EM iterations from every start (on the ``rows`` of the
    data when given), then the ``keep`` best by the objective, and the tensor start, as stacked
    starts for the full EM, with their labels. ``width`` > 0: the screen runs the starts ``width``
    at a time (the last group filled with copies of its first start, whose results are dropped),
    with EM's history buffer ``history_length`` long (see `em_iterations`), so that it runs the
    compiled program of the finalists' run."""
    dropped = ("max_iterations", "progress_bar", "streamed", "chunk_size", "devices", "accelerate")
    options = {name: value for name, value in em_options.items() if name not in dropped}
    if rows is not None:
        x, y = np.asarray(x)[rows], np.asarray(y)[rows]
        if options.get("gate_x") is not None:
            options["gate_x"] = np.asarray(options["gate_x"])[rows]
    with warnings.catch_warnings():  # the full EM says what matters about the data
        warnings.simplefilter("ignore", ReliabilityWarning)
        dim = x.shape[1] if data is None else data.source.dim
        stacked = as_starts(starts, dim, gate_dim=_gate_dim(options.get("gate_x")))
        groups = [stacked] if not width else [
            _filled(_starts_slice(stacked, first, width), width) for first in range(0, len(labels), width)
        ]
        runs = [
            _em_all(
                x, y, group, fix=(), max_iterations=iterations, progress_bar=False, data=data, summary=summary,
                history_length=history_length, **options
            )
            for group in groups
        ]
    objective = np.concatenate([run.result.objective for run in runs])[: len(labels)]
    params = jax.tree_util.tree_map(lambda *leaves: np.concatenate(leaves)[: len(labels)], *(run.params for run in runs))
    objectives = np.where(np.isfinite(objective), objective, -np.inf)
    order = [int(index) for index in np.argsort(-objectives, kind="stable")]
    chosen = sorted(set(order[:keep]) | {index for index, label in enumerate(labels) if label == "tensor"})
    finalists = jax.tree_util.tree_map(lambda leaf: leaf[np.asarray(chosen)], params)
    return finalists, [labels[index] for index in chosen]


def _starts_slice(starts: MoEParams, first: int, count: int) -> MoEParams:
    """Stacked starts ``first`` to ``first + count`` (fewer at the end)."""
    return jax.tree_util.tree_map(lambda leaf: leaf[first : first + count], starts)


def _filled(starts: MoEParams, width: int) -> MoEParams:
    """Stacked starts with copies of the first appended up to ``width``."""
    count = np.shape(starts.experts)[0]
    if count >= width:
        return starts
    return jax.tree_util.tree_map(lambda leaf: np.concatenate([leaf, np.repeat(leaf[:1], width - count, axis=0)]), starts)


def _weighted_least_squares(design: np.ndarray, y: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, float]:
    """Coefficients of y on ``design`` under ``weights`` (a tiny ridge keeps a thin set solvable)
    and the weighted residual sd."""
    weighted = design * weights[:, None]
    gram = design.T @ weighted
    ridge = 1e-8 * (np.trace(gram) / gram.shape[0] + 1.0)
    coef = np.linalg.solve(gram + ridge * np.eye(gram.shape[0]), weighted.T @ y)
    residual = y - design @ coef
    return coef, float(np.sqrt(np.sum(weights * residual**2) / max(np.sum(weights), 1e-300)))


def _with_lines(params: MoEParams, lines: dict, *, free: int, gate_of: int, noise_floor: float, shared_noise: bool,
                dtype) -> MoEParams:
    """``params`` with the experts of ``lines`` (slot -> (coefficients, with the intercept last when
    the model has them; residual sd)) replaced, and slot ``free`` given the gate (and Student-t
    degrees of freedom) of expert ``gate_of``: a split-and-merge or birth move."""
    experts = np.asarray(params.experts).copy()
    noise = np.broadcast_to(np.asarray(params.noise), (params.num_experts,)).copy()
    intercepts = None if params.expert_intercepts is None else np.asarray(params.expert_intercepts).copy()
    for slot, (coef, sd) in lines.items():
        experts[slot] = coef[: experts.shape[1]]
        if intercepts is not None:
            intercepts[slot] = coef[-1]
        if not shared_noise:
            noise[slot] = max(sd, noise_floor)
    gates = np.asarray(params.gates).copy()
    gates[free] = gates[gate_of]
    gate_intercepts = params.gate_intercepts
    if gate_intercepts is not None:
        gate_intercepts = np.asarray(gate_intercepts).copy()
        gate_intercepts[free] = gate_intercepts[gate_of]
    df = params.df
    if df is not None and np.ndim(df) == 1:
        df = np.asarray(df).copy()
        df[free] = df[gate_of]
    return params.replace(
        experts=jnp.asarray(experts, dtype),
        gates=jnp.asarray(gates, dtype),
        noise=jnp.asarray(noise if np.ndim(params.noise) else params.noise, dtype),
        expert_intercepts=None if intercepts is None else jnp.asarray(intercepts, dtype),
        gate_intercepts=None if gate_intercepts is None else jnp.asarray(gate_intercepts, dtype),
        df=df if df is None else jnp.asarray(df, dtype),
    ).normalized()


def _split_merge_candidates(
    params: MoEParams, x, y, *, gate_x=None, num_splits: int = 3, shared_noise: bool = False
) -> list[MoEParams]:
    """Split-and-merge moves from a fitted mixture of experts (Ueda, Nakano, Ghahramani and Hinton
    2000, "SMEM algorithm for mixture models"), as starts for EM.

    EM's typical local optimum with many experts has one expert spread over two true ones and
    another spent where one suffices. Each move frees a slot ``j`` (its points go back to the
    others through EM: the merge) and splits an expert ``l`` into ``l`` and ``j``: the points
    ``l`` is responsible for are divided by the sign of their residual under ``l``, and each half
    gets its own weighted least-squares line (its intercept too, when the model has them) and
    residual sd; ``j`` takes ``l``'s gate. The ``num_splits`` experts with the largest share of
    residual variance (responsibility mass times noise variance) are split, each into every other
    slot: ``num_splits * (k - 1)`` candidates. The lines are linear fits whatever the link: starts
    that EM refines.
    """
    k = params.num_experts
    x, y = np.asarray(x), np.asarray(y)
    mixture = MixtureOfExperts.from_params(params, x, gate_x=gate_x)
    responsibilities = np.asarray(mixture.expert_probabilities(y))
    noise = np.broadcast_to(np.asarray(params.noise), (k,))
    intercepts = None if params.expert_intercepts is None else np.asarray(params.expert_intercepts)
    design = x if intercepts is None else np.column_stack([x, np.ones(x.shape[0], x.dtype)])
    residuals = y[:, None] - np.asarray(params.expert_means(x))
    spread = responsibilities.sum(0) * noise**2
    moves = []
    for split in np.argsort(-spread, kind="stable")[: min(num_splits, k)]:
        above = residuals[:, split] > 0
        halves = [_weighted_least_squares(design, y, responsibilities[:, split] * side) for side in (above, ~above)]
        for free in range(k):
            if free == split:
                continue
            lines = dict(zip((split, free), halves, strict=True))
            moves.append(_with_lines(params, lines, free=free, gate_of=split, noise_floor=1e-3 * float(noise[split]),
                                     shared_noise=shared_noise, dtype=x.dtype))
    return moves


BIRTH_Z = 3.0  # a point is unexplained when its residual exceeds this many of its expert's sds


def _birth_candidates(params: MoEParams, x, y, *, gate_x=None, shared_noise: bool = False) -> list[MoEParams]:
    """Birth moves from a fitted mixture of experts, as starts for EM: an expert for the points the
    fit leaves unexplained, in each slot in turn.

    EM misses a rare expert (a gate region holding about 1% of the data) when, from every start,
    its points are absorbed by neighbours, and no split of a fitted expert finds its line. Its
    points are the fit's worst explained: ranked two ways, by the residual under the expert most
    responsible for each point in units of that expert's sd (the points beyond `BIRTH_Z` sds,
    at least twice the coefficients per expert) and by the mixture's log density (the same
    number of the lowest), a least-squares line through each set, trimmed five times to the points
    within 3 median absolute residuals of it (the largest group sharing one line), gives an
    expert; it replaces each slot in turn, taking the gate of the expert that held most of its
    points (EM then shapes the gate from the responsibilities the new line earns). ``2 k``
    candidates; the lines are linear fits whatever the link.
    """
    k = params.num_experts
    x, y = np.asarray(x), np.asarray(y)
    mixture = MixtureOfExperts.from_params(params, x, gate_x=gate_x)
    responsibilities = np.asarray(mixture.expert_probabilities(y))
    noise = np.broadcast_to(np.asarray(params.noise), (k,))
    owner = responsibilities.argmax(1)
    rows = np.arange(x.shape[0])
    z = np.abs(y - np.asarray(params.expert_means(x))[rows, owner]) / noise[owner]
    intercepts = None if params.expert_intercepts is None else np.asarray(params.expert_intercepts)
    design = x if intercepts is None else np.column_stack([x, np.ones(x.shape[0], x.dtype)])
    size = max(int(np.sum(z > BIRTH_Z)), 2 * design.shape[1])
    if size >= x.shape[0]:
        return []
    log_density = np.asarray(mixture.log_prob(y))
    moves = []
    for unexplained in (np.argsort(-z, kind="stable")[:size], np.argsort(log_density, kind="stable")[:size]):
        kept = unexplained
        weights = np.zeros(x.shape[0])
        weights[kept] = 1.0
        coef, sd = _weighted_least_squares(design, y, weights)
        for _ in range(5):
            residual = np.abs(y[unexplained] - design[unexplained] @ coef)
            trimmed = unexplained[residual <= 3 * np.median(residual)]
            if trimmed.size < design.shape[1]:
                break
            kept = trimmed
            weights = np.zeros(x.shape[0])
            weights[kept] = 1.0
            coef, sd = _weighted_least_squares(design, y, weights)
        host = int(np.bincount(owner[kept], minlength=k).argmax())
        for free in range(k):
            moves.append(_with_lines(params, {free: (coef, sd)}, free=free, gate_of=host,
                                     noise_floor=1e-3 * float(noise.max()), shared_noise=shared_noise, dtype=x.dtype))
    return moves


def _objective(fit: Fit) -> float:
    return float(fit.start_objectives[fit.start]) if fit.start_objectives is not None else float(fit.log_likelihood)


def _split_merge(x, y, fit: Fit, rounds: int, screen_iterations: int, em_options: dict) -> tuple[Fit, int]:
    """Up to ``rounds`` rounds of `_split_merge_candidates` and `_birth_candidates`: each round screens every move by a short
    EM, runs the best two to convergence and keeps the result when it raises EM's objective.
    Returns the fit and the number of moves accepted."""
    accepted = 0
    for _ in range(rounds):
        moves = [
            *_split_merge_candidates(
                fit.params, x, y, gate_x=em_options["gate_x"], shared_noise=em_options["shared_noise"]
            ),
            *_birth_candidates(fit.params, x, y, gate_x=em_options["gate_x"], shared_noise=em_options["shared_noise"]),
        ]
        if not moves:
            break
        stacked = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *moves)
        finalists, _ = _screened(
            x, y, [stacked], ["split-merge"] * len(moves), 2, screen_iterations, em_options, None, None
        )
        with warnings.catch_warnings(record=True) as caught:  # said only for a move that is kept
            warnings.simplefilter("always", ReliabilityWarning)
            moved = fit_em(x, y, finalists, **em_options)
        if not _objective(moved) > _objective(fit) + 1e-9 * max(1.0, abs(_objective(fit))):
            break
        for warning in caught:
            warnings.warn(warning.message, warning.category, stacklevel=3)
        fit = moved._replace(start_labels=("split-merge",) * len(moved.start_labels))
        accepted += 1
    return fit, accepted


FINISH_ITERATIONS = 5_000


def finish_em(x, y, fit: Fit, *, max_iterations: int = FINISH_ITERATIONS, **em_options) -> Fit:
    """``fit`` (an EM fit that stopped at its iteration cap) continued to convergence by
    SQUAREM-accelerated EM (`fit_em` with ``accelerate=True``; ``em_options`` its model options:
    priors, noise, family, gate covariates, tol), keeping the record of its starts.

    Where experts overlap EM crawls: on the High School and Beyond data of
    ``benchmarks/real_data.py`` (k = 4) the winning start was still climbing at 500 iterations,
    and 306 accelerated iterations (2-4 s) took it to convergence, raising its held-out
    log-likelihood (-3.1804 to -3.1770 per point) and giving NUTS a posterior mode to start at.
    The objective never decreases (SQUAREM's monotone safeguard). A fit that converged is
    returned as it is.
    """
    if fit.converged:
        return fit
    finished = fit_em(x, y, fit.params, max_iterations=max_iterations, accelerate=True, **em_options)

    def updated(per_start, value):  # the winner's entry is now the finished fit's
        if per_start is None:
            return None
        per_start = np.array(per_start, dtype=float)
        per_start[fit.start] = value
        return per_start

    return finished._replace(
        history=np.concatenate([np.asarray(fit.history), np.asarray(finished.history)]),
        iterations=int(fit.iterations) + int(finished.iterations),
        start=fit.start,
        start_log_likelihoods=updated(fit.start_log_likelihoods, finished.log_likelihood),
        start_labels=fit.start_labels,
        start_objectives=updated(fit.start_objectives, float(np.asarray(finished.start_objectives)[0])),
    )
