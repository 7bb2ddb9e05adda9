"""Experts by the method of moments (Makkuva, Kannan, Oh, Viswanath, "Breaking the gridlock in
Mixture-of-Experts", ICML 2019).

With x standardised to z (mean 0, identity covariance), unit-norm experts and gates orthogonal
to them, ``T2 = E[P2(y) S2(z)] = c2 sum_i pi_i a_i a_i^T`` and
``T3 = E[P3(y) S3(z)] = c3 sum_i pi_i a_i^{(x)3}``. T2's top-k eigenpairs (U, L) give the whitening
``M = U L^{-1/2}`` with ``M^T (T2 / c2) M = I``; then ``(T3 / c3)(M, M, M) = sum_i pi_i^{-1/2} v_i^{(x)3}``
with orthonormal ``v_i = pi_i^{1/2} M^T a_i``, which the tensor power method recovers. Un-whitening:
``a_i ∝ U L^{1/2} v_i``, ``pi_i = lambda_i^{-2}``.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import numpy as np
from scipy.optimize import linear_sum_assignment

from numpyro_moe._design import (
    AUTO_MIN_SAMPLES,
    DESIGNS,
    GAUSSIANITY_LEVEL,
    MixtureDesign,
    design_second_moment,
    design_third_moment,
    fit_mixture_design,
    gaussianity_pvalue,
    sample_rows,
)
from numpyro_moe._landscape import landscape_experts
from numpyro_moe._links import Link, resolve_link
from numpyro_moe._moments import DEFAULT_CHUNK_SIZE, as_data_source, resolve_chunk_size, whitened_third_moment
from numpyro_moe._params import MoEParams
from numpyro_moe._second_moment import (
    EIGENSOLVERS,
    PRECISIONS,
    Standardization,
    estimate_noise,
    random_probes,
    second_moment,
    warn_design,
    warn_given_noise,
)
from numpyro_moe._tensor import DECOMPOSITIONS, decompose_symmetric_tensor
from numpyro_moe._transforms import output_transforms
from numpyro_moe._validation import (
    ReliabilityWarning,
    check_design,
    check_key,
    check_positive,
    check_positive_int,
    check_response,
)
from numpyro_moe.metrics import match_experts

__all__ = [
    "ExpertDiagnostics",
    "ExpertEstimate",
    "NumExpertsSuggestion",
    "bootstrap_standard_errors",
    "estimate_experts",
    "suggest_num_experts",
]

METHODS = ("tensor", "landscape")
DECOMPOSITION_RESIDUAL_LIMIT = 0.25
# 1 - |cos| between the components and those of a second run from other random starts (same
# settings, so no recompilation). Converged runs agree to rounding (measured: <= 4e-11, mostly
# 1e-16, on papers'-setting and noisy small-n fits; unconverged ones differ by 4e-5 to 0.6);
# 1e-6 (an angle of 1.4e-3 rad) is far below any statistical error.
DECOMPOSITION_CHANGE_LIMIT = 1e-6

class ExpertDiagnostics(NamedTuple):
    """How far to trust an `ExpertEstimate`.

    Attributes
    ----------
    t2_eigenvalues
        (d,) eigenvalues of T2 / c2 in standardised coordinates, descending. Under the model the
        top k are the ``pi_i`` -weighted expert energies and the rest are sampling noise.
    noise_floor
        Size below which a T2 eigenvalue is indistinguishable from sampling noise (twice the
        sqrt(d)-scaled standard error of T2's entries: the edge of a noise matrix's spectrum).
    eigen_gap
        ``t2_eigenvalues[k-1] - t2_eigenvalues[k]`` in units of ``noise_floor``; below 1 the
        k-th expert direction is not resolved.
    tensor_eigenvalues
        (k,) eigenvalues of the whitened third moment, ``pi_i^{-1/2}`` in theory.
    decomposition_residual
        ||T - sum lambda v^{(x)3}|| / ||T|| of the whitened tensor; 0 at population size.
    skewness, excess_kurtosis
        (d,) marginal sample skewness and excess kurtosis of x (from the first eighth, at least
        1024 rows, of every streamed chunk: spread over the whole data); 0 for a Gaussian design.
    noise_source
        ``"given"`` or ``"moments"`` (estimated as in `estimate_experts`).
    num_samples
        n.
    decomposition_change
        Largest ``1 - |cos|`` between a component and its match in a second decomposition from
        other random starts; above 1e-6 the power method had not converged (or its restarts
        disagree).
    method
        ``"tensor"``, or ``"landscape"`` (then ``tensor_eigenvalues``, ``decomposition_residual``
        and ``decomposition_change`` are NaN: there is no third-moment decomposition).
    precision
        The dtype of pass 1's per-chunk d x d products: ``"float64"``, ``"mixed"`` (float32
        products summed in float64) or ``"float32"`` (JAX without x64); see `estimate_experts`.
    design
        The input density whose score functions the moments used: ``"gaussian"`` (the Hermite
        tensors) or ``"mixture"`` (a fitted `MixtureDesign`); see `estimate_experts`.
    gaussianity_pvalue
        Bonferroni p-value of the columns' Jarque-Bera tests of normality (from the same rows as
        ``skewness``); ``design="auto"`` keeps the Gaussian path when it is at least 0.01 (or
        n < 20,000).
    """

    t2_eigenvalues: np.ndarray
    noise_floor: float
    eigen_gap: float
    tensor_eigenvalues: np.ndarray
    decomposition_residual: float
    skewness: np.ndarray
    excess_kurtosis: np.ndarray
    noise_source: str
    num_samples: int
    decomposition_change: float = 0.0
    method: str = "tensor"
    precision: str = "float64"
    design: str = "gaussian"
    gaussianity_pvalue: float = float("nan")


class ExpertEstimate(NamedTuple):
    """Experts estimated by the method of moments.

    Attributes
    ----------
    experts
        (k, d) expert vectors in the units of the input x.
    weights
        (k,) mean gate probabilities ``pi_i = E[softmax(W x)_i]``, summing to 1.
    noise
        () noise standard deviation (given, or estimated: see `estimate_experts`); the moment
        transforms assume one noise shared by the experts.
    expert_intercepts
        (k,) offsets ``-a_i . mean(x)`` from centring x, or None without standardisation.
    diagnostics
        `ExpertDiagnostics`.
    standardization
        `Standardization` applied to x before the moments.
    link
        The link the experts were estimated for (a `Link`).
    """

    experts: np.ndarray
    weights: np.ndarray
    noise: np.ndarray
    expert_intercepts: np.ndarray | None
    diagnostics: ExpertDiagnostics
    standardization: Standardization
    link: Link

    def to_params(self, gates=None, *, intercepts: bool = False) -> MoEParams:
        """`MoEParams` with these experts, link and noise (for every expert); gates zero (k, d)
        unless given.

        With ``intercepts=True`` the centring offsets become ``expert_intercepts`` (and the
        gate intercepts start at zero).
        """
        k, d = self.experts.shape
        gates = np.zeros((k, d)) if gates is None else np.asarray(gates)
        if gates.shape != (k, d):
            raise ValueError(f"gates: expected shape ({k}, {d}) like the experts (all k rows), got {gates.shape}")
        noise = np.full(k, float(self.noise))
        if intercepts:
            expert_intercepts = self.expert_intercepts if self.expert_intercepts is not None else np.zeros(k)
            return MoEParams(self.experts, gates, noise, expert_intercepts, np.zeros(k), self.link)
        return MoEParams(self.experts, gates, noise, link=self.link)


class NumExpertsSuggestion(NamedTuple):
    """Result of `suggest_num_experts`: the count of T2 eigenvalues above ``noise_floor``."""

    num_experts: int
    t2_eigenvalues: np.ndarray
    noise_floor: float

def _decomposition_change(result, check) -> float:
    """Largest 1 - |cos| between matched components of two decompositions."""
    cosines = np.abs(result.eigenvectors @ check.eigenvectors.T)
    rows, cols = linear_sum_assignment(-cosines)
    return float(np.max(1.0 - cosines[rows, cols]))


def _check_source(x, y) -> None:
    """An in-memory x needs its y: only a re-iterable of chunks goes without."""
    if y is None and isinstance(x, np.ndarray | jax.Array):
        raise TypeError(
            f"y: expected an (n,) array of responses to go with the {type(x).__name__} x, got None; "
            "pass y, or pass x as a re-iterable of (x_chunk, y_chunk) pairs"
        )


def estimate_experts(
    x,
    y=None,
    *,
    num_experts: int,
    key: jax.Array,
    link: str | Link = "linear",
    noise: float | None = None,
    method: str = "tensor",
    standardize: bool = True,
    decomposition: str = "power",
    num_power_restarts: int = 10,
    num_power_iterations: int = 50,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    eigensolver: str = "auto",
    landscape_options: dict | None = None,
    precision: str = "auto",
    design: str | MixtureDesign = "gaussian",
    devices=None,
) -> ExpertEstimate:
    """Estimate the experts of a mixture of experts by the tensor method of moments.

    Two streamed passes over the data, O(n d^2 + n d k) work and O(d^2 + k^3) memory beyond one
    chunk (with ``eigensolver="randomized"``: four passes, and T2 costs O(n d k) instead of
    O(n d^2)); no local optima (the power method's restarts handle the decomposition's).

    Parameters
    ----------
    x, y
        Inputs (n, d) and responses (n,); or ``y=None`` and ``x`` a re-iterable of
        ``(x_chunk, y_chunk)`` pairs (a list, or a callable returning an iterator) for data that
        does not fit in memory. Chunks are computed in JAX's default float dtype (float64 when
        x64 mode is on, whatever the input's dtype; float32 otherwise) and summed across chunks
        in float64; the results are float64 NumPy arrays.
    num_experts
        k <= d.
    key
        PRNG key for the power method's random restarts (or the landscape's random starts).
    link
        Expert link: name or callable (see `resolve_link`); recorded in the estimate. Its
        transforms come from `output_transforms`.
    noise
        Noise standard deviation, if known. If None it is estimated from the second moment of
        y: ``s^2 = mean(y^2) - E[g(Z)^2]``, valid under the design assumptions below; EM refines it.
    method
        ``"tensor"``: the ICML 2019 method of moments (above). ``"landscape"``: gradient descent
        (Adam) on the AISTATS 2020 expert loss L4 inside the span of T2's top k eigenvectors
        (`landscape_experts`; in-memory arrays only); ``landscape_options`` passes its
        ``num_starts``, ``num_steps``, ``learning_rate``, ``mu`` and ``lam``.
    standardize
        Centre and whiten x by its sample mean and covariance first (keep it on for real data);
        the experts are reported in the original units of x, with the centring offsets in
        ``expert_intercepts``. Off: x is taken to be N(0, I) as it is.
    decomposition
        ``"power"`` (robust tensor power method in JAX) or ``"tensorly"``
        (``tensorly.decomposition.symmetric_parafac_power_iteration``).
    num_power_restarts, num_power_iterations
        Restarts of the tensor power method per component, and its iterations per run.
    chunk_size
        Rows per streamed chunk (memory use is O(chunk_size * d)); None picks a power of two
        with about 2^21 entries (16 MB of float64).
    eigensolver
        How T2's top-k eigenspace is found: ``"dense"`` forms the d x d matrix (O(n d^2) work in
        pass 1 beyond the covariance); ``"randomized"`` is matrix-free, from the sketch of T2 on
        k + 10 random probes (O(n d k) work; the diagnostics then hold the top k + 10 T2
        eigenvalues; each power iteration is one more pass, and a small T2 eigen-gap costs it
        more accuracy than the dense solver); ``"auto"`` picks ``"randomized"`` for d >= 1024.
    precision
        Dtype of each chunk's d x d products in pass 1, always summed in float64 (pass 2's k
        projections are always float64): ``"float64"``; ``"mixed"``: float32 products of the
        shifted data (about twice as fast on a CPU; their rounding, relative 1e-7 times the
        design's condition number, is far below the sampling error unless x is nearly
        collinear); ``"auto"`` (the default)
        uses ``"mixed"`` only when it pays (n d^2 >= 1e9; a chunk source counts as large) and
        the rounding bound (1e-7 times the condition number of x's correlation matrix, and more
        for offsets the shifts left) stays below a tenth of the sampling error 1/sqrt(n),
        checked after pass 1 (else pass 1 runs again in float64). Without JAX's x64 mode
        everything is float32. The choice is in ``diagnostics.precision``.
    design
        The input density whose score functions replace the Gaussian Hermite tensors in T2 and
        T3 (Stein's identity for any density: Janzamin, Sedghi and Anandkumar 2014).
        ``"gaussian"`` (the default, the ICML 2019 method): x is taken to be Gaussian.
        ``"mixture"``: a density is fitted to x (on at most 2^16 rows spread over the data, one
        more read): independent components (FastICA) of the standardised x, each a 1-d
        Gaussian mixture of 1 to 4 components chosen by BIC (`MixtureDesign`); T2 and T3 then
        take one streamed pass each (O(n d^2), dense eigensolver), and the Gaussian path's bias
        on skewed, heavy-tailed or multimodal inputs goes (what remains is measured in
        ``benchmarks/real_designs.py``). ``"auto"``: ``"mixture"`` when the columns'
        Jarque-Bera tests reject normality at level 0.01 (Bonferroni) and n >= 20,000 (below
        that the design's scores, noisier than the Hermite tensors, cost more than the Gaussian
        path's bias, as measured), else ``"gaussian"``.
        A fitted `MixtureDesign` (in the units of x) is used as given. The choice is in
        ``diagnostics.design``, the test's p-value in ``diagnostics.gaussianity_pvalue``.
    devices
        Split every chunk by rows over several devices (one mesh axis, see
        ``numpyro_moe._moments``): ``"all"`` (every device of this process), a number (the
        first that many) or a list of devices; None (the default) uses JAX's default device.
        Under ``jax.distributed`` each process passes its own rows and the sums are added across
        the processes, so every process gets the estimate of all the rows.

    Returns
    -------
    ExpertEstimate

    Notes
    -----
    The consistency guarantee assumes a Gaussian design, unit-norm linearly independent experts
    and every gate row orthogonal to every expert. When the assumptions fail the estimate is
    biased and serves as a starting point for EM, MAP or NUTS. A `ReliabilityWarning` is issued
    for a non-Gaussian-looking x, an unresolved T2 eigen-gap at k, a power method that had not
    converged (a second run from other random starts disagrees), a
    decomposition far from orthogonal, an impossible noise estimate, or a given noise that does
    not fit the scale of y.

    Raises
    ------
    ValueError
        For k > d (the experts cannot be linearly independent: fit by EM from several random
        starts instead), too few samples, non-finite data, a constant y, or an unknown link,
        method or design.
    TypeError
        For ``y=None`` with an array ``x``, or non-numeric data.
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if eigensolver not in EIGENSOLVERS:
        raise ValueError(f"eigensolver: expected one of {EIGENSOLVERS}, got {eigensolver!r}")
    if decomposition not in DECOMPOSITIONS:
        raise ValueError(f"decomposition: expected one of {DECOMPOSITIONS}, got {decomposition!r}")
    if not isinstance(design, MixtureDesign) and (not isinstance(design, str) or design not in DESIGNS):
        raise ValueError(f"design: expected one of {DESIGNS} or a fitted MixtureDesign, got {design!r}")
    link = resolve_link(link)
    key = check_key(key)
    if method == "landscape":
        if design != "gaussian":
            raise ValueError("design: method='landscape' supports only design='gaussian'")
        return _landscape_estimate(x, y, num_experts, link, noise, key, standardize, landscape_options)
    if landscape_options is not None:
        raise ValueError("landscape_options: only used with method='landscape'")
    if chunk_size is not None:
        chunk_size = check_positive_int(chunk_size, "chunk_size")
    num_power_restarts = check_positive_int(num_power_restarts, "num_power_restarts")
    num_power_iterations = check_positive_int(num_power_iterations, "num_power_iterations")
    if noise is not None:
        noise = check_positive(noise, "noise")
    _check_source(x, y)
    source = as_data_source(x, y, chunk_size=chunk_size, devices=devices)
    chunk_size = resolve_chunk_size(chunk_size, source.dim, source.num_samples)
    num_experts = check_positive_int(num_experts, "num_experts")
    if num_experts > source.dim:
        raise ValueError(
            f"num_experts: the tensor method needs num_experts <= dim so the experts can be linearly "
            f"independent; got num_experts={num_experts}, dim={source.dim}. Fit by EM from several "
            "random starts instead (or reduce num_experts)"
        )

    transforms = output_transforms(link, 0.0)
    probes = random_probes(key, source.dim, num_experts, eigensolver)
    if not (isinstance(design, str) and design == "gaussian"):
        if eigensolver == "randomized":
            raise ValueError("eigensolver: the design-aware moments use the dense eigensolver; pass 'auto' or 'dense'")
        probes = None
    moment = second_moment(source, transforms, standardize, chunk_size, probes, precision)
    pvalue = gaussianity_pvalue(moment.skewness, moment.excess_kurtosis, moment.stats.shape_count)
    design_model = design if isinstance(design, MixtureDesign) else None
    automatic = design == "auto" and pvalue < GAUSSIANITY_LEVEL and moment.stats.count >= AUTO_MIN_SAMPLES
    if design == "mixture" or automatic:
        rows = sample_rows(source, moment.stats.count)
        design_model = fit_mixture_design(rows, moment.standardization)
    if design_model is None:
        warn_design(moment)
    else:
        if design_model.center.shape != (source.dim,) or design_model.unmixing.shape != (source.dim, source.dim):
            raise ValueError(f"design: expected a MixtureDesign for {source.dim} columns like x")
        t2 = design_second_moment(
            source, transforms, design_model, moment.stats, chunk_size, moment.standardization
        )
        eigenvalues, eigenvectors = np.linalg.eigh(t2)
        moment = moment._replace(eigenvalues=eigenvalues[::-1], eigenvectors=eigenvectors[:, ::-1])
    noise_source = "given"
    if noise is None:
        noise, noise_source = estimate_noise(moment.stats, link), "moments"
    else:
        warn_given_noise(moment.stats, link, noise)
    transforms = output_transforms(link, noise)

    values = moment.eigenvalues
    next_value = values[num_experts] if num_experts < len(values) else 0.0
    top = values[num_experts - 1]
    eigen_gap = (top - next_value) / moment.noise_floor if moment.noise_floor > 0 else np.inf
    if eigen_gap < 1 or top <= 0:
        gap = (
            f"the gap between T2's eigenvalues {num_experts} and {num_experts + 1} ({top - next_value:.3g})"
            if num_experts < len(values) else f"T2's eigenvalue {num_experts} ({top:.3g})"
        )
        warnings.warn(
            f"num_experts: {gap} is below the sampling-noise floor ({moment.noise_floor:.3g}); "
            "the k-th expert direction is not resolved: use more data or fewer experts (see "
            "suggest_num_experts). The estimate is only a starting point.",
            ReliabilityWarning,
            stacklevel=2,
        )

    basis = moment.eigenvectors[:, :num_experts]  # U (d, k), z-coordinates
    # Eigenvalues within the noise (even negative ones) are floored so the whitening exists.
    floor = max(moment.noise_floor, 1e-12 * max(abs(values[0]), 1e-300))
    scales = np.sqrt(np.maximum(values[:num_experts], floor))
    whiten = basis / scales  # M
    standardization = moment.standardization
    projection = standardization.whitening @ whiten
    if design_model is None:
        tensor = whitened_third_moment(
            source, transforms, standardization.mean, projection, whiten.T @ whiten, moment.stats, chunk_size,
        ) / transforms.c3
    else:
        tensor = design_third_moment(
            source, transforms, design_model, moment.stats, chunk_size, standardization, whiten
        ) / transforms.c3
    result = decompose_symmetric_tensor(
        tensor, num_experts, key=key, method=decomposition, num_restarts=num_power_restarts,
        num_iterations=num_power_iterations,
    )
    change = _decomposition_change(
        result,
        decompose_symmetric_tensor(
            tensor, num_experts, key=jax.random.fold_in(key, 1), method=decomposition,
            num_restarts=num_power_restarts, num_iterations=num_power_iterations,
        ),
    )
    if change > DECOMPOSITION_CHANGE_LIMIT:
        warnings.warn(
            f"the tensor power method did not converge in num_power_iterations={num_power_iterations}: "
            f"a second run from other random starts moves a component by 1 - |cos| = {change:.2g}; "
            "raise num_power_iterations or num_power_restarts",
            ReliabilityWarning,
            stacklevel=2,
        )
    if result.residual > DECOMPOSITION_RESIDUAL_LIMIT:
        warnings.warn(
            f"the whitened third moment is far from orthogonally decomposable (relative residual "
            f"{result.residual:.2f}): sampling noise dominates or the design assumptions fail; treat "
            "the experts as a starting point",
            ReliabilityWarning,
            stacklevel=2,
        )

    directions = (basis * scales) @ (result.eigenvalues[:, None] * result.eigenvectors).T  # (d, k)
    directions = directions / np.linalg.norm(directions, axis=0, keepdims=True)
    experts = (standardization.whitening @ directions).T
    weights = 1.0 / result.eigenvalues**2
    weights = weights / weights.sum()
    intercepts = -experts @ standardization.mean if standardize else None
    diagnostics = ExpertDiagnostics(
        t2_eigenvalues=values,
        noise_floor=moment.noise_floor,
        eigen_gap=float(eigen_gap),
        tensor_eigenvalues=result.eigenvalues,
        decomposition_residual=result.residual,
        skewness=moment.skewness,
        excess_kurtosis=moment.excess_kurtosis,
        noise_source=noise_source,
        num_samples=int(moment.stats.count),
        decomposition_change=change,
        precision=moment.stats.precision,
        design="gaussian" if design_model is None else "mixture",
        gaussianity_pvalue=pvalue,
    )
    return ExpertEstimate(experts, weights, np.asarray(noise), intercepts, diagnostics, standardization, link)


def _landscape_estimate(x, y, num_experts, link, noise, key, standardize, options) -> ExpertEstimate:
    """`estimate_experts(method="landscape")`: `landscape_experts` as an `ExpertEstimate`."""
    if y is None:
        raise TypeError(
            "y: method='landscape' needs in-memory arrays x (n, d) and y (n,); a chunk source "
            "works with method='tensor'"
        )
    options = dict(options or {})
    allowed = {"num_starts", "num_steps", "learning_rate", "mu", "lam"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"landscape_options: unknown option(s) {unknown}; expected some of {sorted(allowed)}")
    result = landscape_experts(
        x, y, num_experts=num_experts, link=link, noise=noise, key=key, standardize=standardize, **options
    )
    values = result.subspace_eigenvalues
    next_value = values[num_experts] if num_experts < len(values) else 0.0
    floor = result.subspace_noise_floor
    gap = (values[num_experts - 1] - next_value) / floor if floor > 0 else np.inf
    diagnostics = ExpertDiagnostics(
        t2_eigenvalues=values,
        noise_floor=floor,
        eigen_gap=float(gap),
        tensor_eigenvalues=np.full(num_experts, np.nan),
        decomposition_residual=float("nan"),
        skewness=result.skewness,
        excess_kurtosis=result.excess_kurtosis,
        noise_source=result.noise_source,
        num_samples=int(np.shape(x)[0]),
        decomposition_change=float("nan"),
        method="landscape",
    )
    return ExpertEstimate(
        result.experts, result.weights, np.asarray(result.noise), result.expert_intercepts, diagnostics,
        result.standardization, link,
    )


def suggest_num_experts(
    x,
    y=None,
    *,
    link: str | Link = "linear",
    standardize: bool = True,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> NumExpertsSuggestion:
    """Suggest k as the number of T2 eigenvalues above the sampling-noise floor.

    One streamed pass (the first of `estimate_experts`). Under the model, T2 / c2 has k
    eigenvalues ``~ pi_i`` and d - k at zero, perturbed by noise whose spectrum stays below
    ``noise_floor`` (see `ExpertDiagnostics`). Inspect ``t2_eigenvalues`` too: a weak expert
    (small ``pi_i``) can fall under the floor at small n.
    """
    link = resolve_link(link)
    if chunk_size is not None:
        chunk_size = check_positive_int(chunk_size, "chunk_size")
    _check_source(x, y)
    source = as_data_source(x, y, chunk_size=chunk_size)
    chunk_size = resolve_chunk_size(chunk_size, source.dim, source.num_samples)
    moment = second_moment(source, output_transforms(link, 0.0), standardize, chunk_size)
    count = int((moment.eigenvalues > moment.noise_floor).sum())
    return NumExpertsSuggestion(max(count, 1), moment.eigenvalues, moment.noise_floor)


def bootstrap_standard_errors(
    x,
    y,
    estimate: ExpertEstimate,
    *,
    key: jax.Array,
    num_bootstrap: int = 50,
    **estimate_kwargs,
) -> np.ndarray:
    """(k, d) bootstrap standard errors of ``estimate.experts`` (in-memory arrays only).

    Each replicate re-estimates (with ``estimate``'s link and ``estimate_kwargs``, passed to
    `estimate_experts`) on rows drawn with replacement, is matched to ``estimate``'s labelling
    (`match_experts`), and the entrywise standard deviation is returned. Warnings of the
    replicates are collected into one.
    """
    if not isinstance(estimate, ExpertEstimate):
        raise TypeError(f"estimate: expected ExpertEstimate, got {type(estimate).__name__}")
    taken = sorted(set(estimate_kwargs) & {"num_experts", "key", "link"})
    if taken:
        raise ValueError(f"{taken[0]}: set by the estimate or by bootstrap_standard_errors itself; do not pass it")
    key = check_key(key)
    num_bootstrap = check_positive_int(num_bootstrap, "num_bootstrap", minimum=2)
    x = np.asarray(check_design(x))
    y = np.asarray(check_response(y, x.shape[0]))
    k, d = estimate.experts.shape
    if x.shape[1] != d:
        raise ValueError(f"x: expected {d} columns like estimate.experts, got {x.shape[1]}")
    replicates = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ReliabilityWarning)
        for replicate_key in jax.random.split(key, num_bootstrap):
            draw_key, fit_key = jax.random.split(replicate_key)
            rows = np.asarray(jax.random.randint(draw_key, (x.shape[0],), 0, x.shape[0]))
            fit = estimate_experts(
                x[rows], y[rows], num_experts=k, link=estimate.link, key=fit_key, **estimate_kwargs
            )
            match = match_experts(fit.experts, estimate.experts)
            replicates.append(fit.experts[match.permutation])
    unreliable = sum(isinstance(w.message, ReliabilityWarning) for w in caught)
    if unreliable:
        warnings.warn(
            f"{unreliable} warnings in {num_bootstrap} bootstrap replicates: the standard errors "
            "describe an estimate whose assumptions look violated",
            ReliabilityWarning,
            stacklevel=2,
        )
    return np.std(np.stack(replicates), axis=0, ddof=1)
