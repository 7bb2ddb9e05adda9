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
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from numpyro_moe._links import Link, resolve_link
from numpyro_moe._metrics import match_experts
from numpyro_moe._moments import (
    DEFAULT_CHUNK_SIZE,
    DataSource,
    FirstPass,
    as_data_source,
    first_pass,
    p2_sketch,
    pilot_rows,
    pilot_shifts,
    resolve_chunk_size,
    whitened_third_moment,
)
from numpyro_moe._params import MoEParams
from numpyro_moe._tensor import DECOMPOSITIONS, decompose_symmetric_tensor
from numpyro_moe._transforms import OutputTransforms, gaussian_expectation_nodes, output_transforms
from numpyro_moe._validation import (
    ReliabilityWarning,
    check_design,
    check_key,
    check_positive,
    check_positive_int,
    check_response,
)

__all__ = [
    "ExpertDiagnostics",
    "ExpertEstimate",
    "NumExpertsSuggestion",
    "Standardization",
    "bootstrap_standard_errors",
    "estimate_experts",
    "suggest_num_experts",
]

METHODS = ("tensor", "landscape")
EIGENSOLVERS = ("auto", "dense", "randomized")
# Probes beyond k of the randomised eigensolver (the usual oversampling of randomised range
# finders): enough that the top-k eigenspace of a rank-k-plus-noise T2 is captured.
OVERSAMPLING = 10
# Passes over the data of the randomised eigensolver beyond the first (subspace iterations).
POWER_ITERATIONS = 2
# eigensolver="auto" goes matrix-free from this d. Measured (2 CPU cores, k=5, float64): dense
# is faster up to d=200 (it needs two passes, the randomised one four, and each pass costs a copy
# of the data into XLA); at d=400 and d=1000 the randomised solver took 0.82x and 0.61x the
# dense time but its error was 1.3x and 1.7x the dense one (n=250k and 100k, where T2's gap is
# small next to the noise). So it is the default only where the d x d products dominate.
RANDOMIZED_MIN_DIM = 1024
PRECISIONS = ("auto", "float64", "mixed")
# precision="mixed": each chunk's products in float32, summed in float64. Their relative error
# against float64 was measured at 2-3e-8 (n=1e6, d=100, centred data); this bound keeps a margin.
# It grows with the correlation matrix's condition number (whitening amplifies it) and with
# offsets the shifts did not remove, and "auto" uses float32 products only where the bound stays
# below MIXED_NOISE_FRACTION of the sampling error 1/sqrt(n), and where they pay (n d^2 large).
MIXED_ROUNDING = 1e-7
MIXED_NOISE_FRACTION = 0.1
MIXED_MIN_WORK = 1e9
# A marginal skewness / excess kurtosis this far from 0 is a practically relevant departure
# from the Gaussian design (and, at the sample sizes used, also a significant one).
SKEWNESS_LIMIT = 0.25
KURTOSIS_LIMIT = 0.5
DECOMPOSITION_RESIDUAL_LIMIT = 0.25
# 1 - |cos| between the components and those of a second run from other random starts (same
# settings, so no recompilation). Converged runs agree to rounding (measured: <= 4e-11, mostly
# 1e-16, on papers'-setting and noisy small-n fits; unconverged ones differ by 4e-5 to 0.6);
# 1e-6 (an angle of 1.4e-3 rad) is far below any statistical error.
DECOMPOSITION_CHANGE_LIMIT = 1e-6


class Standardization(NamedTuple):
    """``z = whitening^T (x - mean)``: ``mean`` (d,), symmetric ``whitening`` (d, d)."""

    mean: np.ndarray
    whitening: np.ndarray

    def transform(self, x):
        """Standardise inputs x (n, d)."""
        return (x - self.mean) @ self.whitening


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


class ExpertEstimate(NamedTuple):
    """Experts estimated by the method of moments.

    Attributes
    ----------
    experts
        (k, d) expert vectors in the units of the input x.
    weights
        (k,) mean gate probabilities ``pi_i = E[softmax(W x)_i]``, summing to 1.
    noise
        () noise standard deviation (given, or estimated: see `estimate_experts`).
    expert_intercepts
        (k,) offsets ``-a_i . mean(x)`` from centring x, or None without standardisation.
    diagnostics
        `ExpertDiagnostics`.
    standardization
        `Standardization` applied to x before the moments.
    """

    experts: np.ndarray
    weights: np.ndarray
    noise: np.ndarray
    expert_intercepts: np.ndarray | None
    diagnostics: ExpertDiagnostics
    standardization: Standardization

    def to_params(self, gates=None, *, intercepts: bool = False) -> MoEParams:
        """`MoEParams` with these experts and noise; gates zero (k, d) unless given.

        With ``intercepts=True`` the centring offsets become ``expert_intercepts`` (and the
        gate intercepts start at zero).
        """
        k, d = self.experts.shape
        gates = np.zeros((k, d)) if gates is None else np.asarray(gates)
        if gates.shape != (k, d):
            raise ValueError(f"gates: expected shape ({k}, {d}) like the experts (all k rows), got {gates.shape}")
        if intercepts:
            expert_intercepts = self.expert_intercepts if self.expert_intercepts is not None else np.zeros(k)
            return MoEParams(self.experts, gates, self.noise, expert_intercepts, np.zeros(k))
        return MoEParams(self.experts, gates, self.noise)


class NumExpertsSuggestion(NamedTuple):
    """Result of `suggest_num_experts`: the count of T2 eigenvalues above ``noise_floor``."""

    num_experts: int
    t2_eigenvalues: np.ndarray
    noise_floor: float


class _SecondMoment(NamedTuple):
    stats: FirstPass
    standardization: Standardization
    eigenvalues: np.ndarray  # descending, of T2 / c2 in z-coordinates
    eigenvectors: np.ndarray  # (d, d), columns
    noise_floor: float
    skewness: np.ndarray
    excess_kurtosis: np.ndarray


def _second_moment(
    source: DataSource,
    transforms: OutputTransforms,
    standardize: bool,
    chunk_size: int,
    probes: np.ndarray | None = None,
    precision: str = "float64",
):
    """Pass 1 and T2's eigenpairs in standardised coordinates: all d of them (dense), or, with
    ``probes`` (d, p), the top p by the randomised eigensolver (`_subspace_eigh`)."""
    pilot_x, pilot_y = pilot_rows(source)
    shifts = pilot_shifts(pilot_x, pilot_y, transforms)
    d = source.dim
    wanted = precision
    if precision == "auto":
        precision = "mixed" if _mixed_may_pay(pilot_x, source.num_samples) else "float64"
    stats = first_pass(source, transforms, chunk_size, probes, precision=precision, shifts=shifts)
    if wanted == "auto" and stats.precision == "mixed" and not _mixed_is_safe(stats, transforms):
        # A design whose whitening would magnify the float32 rounding past a tenth of the
        # sampling error (seen only now, with all n rows): pass 1 again in float64.
        stats = first_pass(source, transforms, chunk_size, probes, precision="float64", shifts=shifts)
    n = stats.count
    if n < d + 2:
        raise ValueError(
            f"x: too few samples: the moments need more rows than columns + 1; got n={int(n)}, d={d}"
        )
    y_first, y_second = stats.sum_y[0] / n, stats.sum_y[1] / n
    y_variance = y_second - y_first**2
    if y_variance <= 1e-12 * y_second:  # also y == 0
        raise ValueError(
            f"y: expected responses that vary, got a constant y (mean {y_first:.6g}, variance "
            f"{max(y_variance, 0.0):.3g}); its moments carry no information about the experts"
        )
    mean = stats.sum_x / n  # of the shifted x
    covariance = stats.sum_xx / n - np.outer(mean, mean)
    if standardize:
        values, vectors = np.linalg.eigh(covariance)
        if values[0] <= 1e-10 * max(values[-1], 1e-300):
            raise ValueError(
                "x: the columns are (nearly) linearly dependent (covariance eigenvalue "
                f"{values[0]:.2e}); drop or combine redundant columns"
            )
        whitening = (vectors / np.sqrt(values)) @ vectors.T
        centre = stats.x_shift + mean
    else:
        centre = np.zeros(d)
        whitening = np.eye(d)

    skewness, excess_kurtosis = _marginal_shape(stats)
    y_mean, y2_mean = stats.sum_y[0] / n, stats.sum_y[1] / n
    p2_mean = y2_mean + transforms.gamma * y_mean - stats.p2_shift  # of the shifted P2
    weighted_first = (stats.sum_p2x - p2_mean * stats.sum_x) / n

    offset = centre - stats.x_shift  # the centring point in the shifted coordinates

    def centred_times(sketch, vectors):
        # C V for C = E[(P2 - mean P2)(x - centre)(x - centre)^T], from sketch = sum P2 x x^T V
        # (all shifted; the P2 part of the term in E[P2 - mean P2] = 0 drops out).
        weighted = (sketch - p2_mean * stats.sum_xx @ vectors) / n
        return weighted - np.outer(weighted_first, offset @ vectors) - np.outer(offset, weighted_first @ vectors)

    # In z-coordinates T2 = W C W / c2 (W = whitening, symmetric).
    if probes is None:
        t2 = whitening @ centred_times(stats.sum_p2xx, np.eye(d)) @ whitening / transforms.c2
        eigenvalues, eigenvectors = np.linalg.eigh((t2 + t2.T) / 2)
        eigenvalues, eigenvectors = eigenvalues[::-1], eigenvectors[:, ::-1]
    else:

        def t2_times(vectors):  # one more pass over the data
            sketch = p2_sketch(
                source, transforms, whitening @ vectors, chunk_size, (stats.x_shift, stats.p2_shift)
            )
            return whitening @ centred_times(sketch, whitening @ vectors) / transforms.c2

        # T2 applied to W^{-1} Omega is W C Omega / c2, from pass 1's sketch.
        image = whitening @ centred_times(stats.sum_p2xx, stats.probes) / transforms.c2
        eigenvalues, eigenvectors = _subspace_eigh(image, t2_times, POWER_ITERATIONS)

    p2_variance = max(stats.sum_p2sq / n - p2_mean**2, 0.0)
    noise_floor = 2 * np.sqrt(d) * np.sqrt(p2_variance / n) / abs(transforms.c2)
    return _SecondMoment(
        stats, Standardization(centre, whitening), eigenvalues, eigenvectors, float(noise_floor),
        skewness, excess_kurtosis,
    )


def _marginal_shape(stats: FirstPass) -> tuple[np.ndarray, np.ndarray]:
    """Per-column sample skewness and excess kurtosis from the shifted power sums."""
    s1, s2, s3, s4 = stats.shape_sums / stats.shape_count
    variance = np.maximum(s2 - s1**2, 1e-300)
    third = s3 - 3 * s1 * s2 + 2 * s1**3
    fourth = s4 - 4 * s1 * s3 + 6 * s1**2 * s2 - 3 * s1**4
    return third / variance**1.5, fourth / variance**2 - 3


def _mixed_may_pay(pilot_x: np.ndarray, num_samples: int | None) -> bool:
    """First look, before any pass: float64 JAX, enough work (n d^2 >= `MIXED_MIN_WORK`; a
    chunk source, whose n is unknown, is taken to be large) and a design not already too
    ill-conditioned in the pilot rows. `_mixed_is_safe` has the last word after pass 1."""
    if jnp.result_type(float) != jnp.float64:
        return False
    n, d = num_samples, pilot_x.shape[1]
    if n is not None and n * d * d < MIXED_MIN_WORK:
        return False
    if len(pilot_x) <= 2 * d:
        return True
    kappa = _condition_number(np.cov(pilot_x, rowvar=False))
    return MIXED_ROUNDING * kappa <= MIXED_NOISE_FRACTION / np.sqrt(max(n or 0, len(pilot_x)))


def _condition_number(covariance: np.ndarray) -> float:
    scale = np.sqrt(np.maximum(np.diag(covariance), 1e-300))
    values = np.linalg.eigvalsh(covariance / np.outer(scale, scale))
    return float(values[-1] / max(values[0], 1e-300))


def mixed_rounding_bound(stats: FirstPass, transforms: OutputTransforms) -> float:
    """Bound on the relative error that float32 products add to the whitened moments of pass 1:
    `MIXED_ROUNDING` times the correlation matrix's condition number, times what the shifts left
    of the means of x (in standard deviations, squared) and of P2(y)."""
    n = stats.count
    mean = stats.sum_x / n
    covariance = stats.sum_xx / n - np.outer(mean, mean)
    offset = np.max(np.abs(mean) / np.sqrt(np.maximum(np.diag(covariance), 1e-300)))
    p2_mean = stats.sum_y[1] / n + transforms.gamma * stats.sum_y[0] / n - stats.p2_shift
    p2_spread = np.sqrt(max(stats.sum_p2sq / n - p2_mean**2, 1e-300))
    return MIXED_ROUNDING * _condition_number(covariance) * (1 + offset**2) * (1 + abs(p2_mean) / p2_spread)


def _mixed_is_safe(stats: FirstPass, transforms: OutputTransforms) -> bool:
    return mixed_rounding_bound(stats, transforms) <= MIXED_NOISE_FRACTION / np.sqrt(stats.count)


def _probes(key, dim: int, num_experts: int, eigensolver: str) -> np.ndarray | None:
    """Gaussian (d, k + OVERSAMPLING) probes for the randomised eigensolver, or None (dense)."""
    width = num_experts + OVERSAMPLING
    if eigensolver == "dense" or width >= dim or (eigensolver == "auto" and dim < RANDOMIZED_MIN_DIM):
        return None
    return np.asarray(jax.random.normal(jax.random.fold_in(key, 2), (dim, width)), dtype=np.float64)


def _subspace_eigh(image: np.ndarray, t2_times, power_iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """Top eigenpairs of the symmetric T2 by randomised subspace iteration, matrix-free.

    ``image`` (d, p) is T2 applied to random probes; ``t2_times(V)`` applies T2 by one pass over
    the data. Each power iteration multiplies the ratio of noise to signal in the subspace by
    lambda_{k+1} / lambda_k (Halko, Martinsson, Tropp 2011, algorithm 4.4); the last pass gives the
    exact Rayleigh-Ritz projection Q^T T2 Q. Returns p eigenvalues (descending) and the (d, p)
    eigenvectors.
    """
    basis, _ = np.linalg.qr(image)
    for iteration in range(power_iterations):
        image = t2_times(basis)
        if iteration < power_iterations - 1:
            basis, _ = np.linalg.qr(image)
    small = basis.T @ image
    values, vectors = np.linalg.eigh((small + small.T) / 2)
    return values[::-1], basis @ vectors[:, ::-1]


def _y_second_moment(stats: FirstPass, link: Link) -> tuple[float, float, float]:
    """mean(y^2), its standard error, and E[g(Z)^2] (what unit-norm experts give without noise)."""
    n = stats.count
    nodes, weights = gaussian_expectation_nodes("piecewise")
    with jax.enable_x64(True):
        g = np.asarray(link.function(jax.numpy.asarray(nodes)), dtype=np.float64)
    y2_mean = stats.sum_y[1] / n
    standard_error = np.sqrt(max(stats.sum_y[3] / n - y2_mean**2, 0.0) / n)
    return y2_mean, standard_error, float(weights @ g**2)


def _estimate_noise(stats: FirstPass, link: Link) -> float:
    """s^2 = E[y^2] - E[g(Z)^2]: under the design (z ~ N(0, I), unit experts, orthogonal gates)
    each expert's input a_i . z is N(0, 1) independently of the gate.

    When the noise is small next to the sampling error of mean(y^2), the difference is not
    resolved; the estimate is then floored at that standard error (an upper bound for s^2 at
    this n). Only a significantly negative difference (3 standard errors) means the design
    assumptions fail, and warns.
    """
    y2_mean, standard_error, g2_mean = _y_second_moment(stats, link)
    variance = y2_mean - g2_mean
    if variance < -3 * standard_error:
        warnings.warn(
            f"noise: mean(y^2) is {-variance:.3g} below what unit-norm experts give (3 standard "
            f"errors would be {3 * standard_error:.3g}): the design assumptions fail (expert scale, "
            "Gaussian x). Using a small noise; pass noise= explicitly or refine with EM.",
            ReliabilityWarning,
            stacklevel=3,
        )
    variance = max(variance, standard_error, 1e-12 * max(y2_mean, 1e-300))
    return float(np.sqrt(variance))


def _warn_given_noise(stats: FirstPass, link: Link, noise: float) -> None:
    """A given noise fixes the scale of y the transforms expect: E[y^2] = E[g(Z)^2] + s^2 for
    unit-norm experts. A mismatch that is both significant (3 standard errors) and practically
    relevant (over 10 %) biases the transforms: for y scaled by 1e-4 the estimate is unrelated to
    the experts (measured expert error 1.2 against 0.06 unscaled)."""
    y2_mean, standard_error, g2_mean = _y_second_moment(stats, link)
    expected = g2_mean + noise**2
    if abs(y2_mean - expected) > max(3 * standard_error, 0.1 * expected):
        warnings.warn(
            f"noise: with noise={noise:.3g}, unit-norm experts give mean(y^2) ~ {expected:.3g}, but "
            f"the data have {y2_mean:.3g} (3 standard errors: {3 * standard_error:.3g}): y's scale "
            "does not fit the method's assumption of unit-norm experts, so its transforms are "
            "biased. Rescale y, pass noise=None, or treat the estimate as a starting point for EM.",
            ReliabilityWarning,
            stacklevel=3,
        )


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


def _warn_design(moment: _SecondMoment) -> None:
    n = moment.stats.shape_count
    skew_limit = max(SKEWNESS_LIMIT, 5 * np.sqrt(6 / n))
    kurt_limit = max(KURTOSIS_LIMIT, 5 * np.sqrt(24 / n))
    bad = np.flatnonzero(
        (np.abs(moment.skewness) > skew_limit) | (np.abs(moment.excess_kurtosis) > kurt_limit)
    )
    if bad.size:
        worst = bad[np.argmax(np.abs(moment.excess_kurtosis[bad]) + np.abs(moment.skewness[bad]))]
        warnings.warn(
            f"x: {bad.size} of {moment.skewness.size} columns look non-Gaussian (column {worst}: "
            f"skewness {moment.skewness[worst]:.2f}, excess kurtosis {moment.excess_kurtosis[worst]:.2f}); "
            "the tensor method's guarantee needs a Gaussian design, so treat the estimate as a "
            "starting point and refine it by EM or MCMC",
            ReliabilityWarning,
            stacklevel=3,
        )


def estimate_experts(
    x,
    y=None,
    *,
    num_experts: int,
    link: str | Link = "linear",
    noise: float | None = None,
    method: str = "tensor",
    key: jax.Array | None = None,
    standardize: bool = True,
    decomposition: str = "power",
    num_restarts: int = 10,
    num_iterations: int = 50,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    eigensolver: str = "auto",
    landscape_options: dict | None = None,
    precision: str = "auto",
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
    link
        Expert link: name or callable (see `resolve_link`). Its transforms come from
        `output_transforms`.
    noise
        Noise standard deviation, if known. If None it is estimated from the second moment of
        y: ``s^2 = mean(y^2) - E[g(Z)^2]``, valid under the design assumptions below; EM refines it.
    method
        ``"tensor"``: the ICML 2019 method of moments (above). ``"landscape"``: gradient descent
        (Adam) on the AISTATS 2020 expert loss L4 inside the span of T2's top k eigenvectors
        (`landscape_experts`; in-memory arrays only); ``landscape_options`` passes its
        ``num_starts``, ``num_steps``, ``learning_rate``, ``mu`` and ``lam``.
    key
        PRNG key for the power method's random restarts (or the landscape's random starts); None
        uses ``jax.random.key(0)``, so the result is reproducible either way.
    standardize
        Centre and whiten x by its sample mean and covariance first (keep it on for real data);
        the experts are reported in the original units of x, with the centring offsets in
        ``expert_intercepts``. Off: x is taken to be N(0, I) as it is.
    decomposition
        ``"power"`` (robust tensor power method in JAX) or ``"tensorly"``
        (``tensorly.decomposition.symmetric_parafac_power_iteration``).
    num_restarts, num_iterations
        Power-method restarts per component and iterations per run.
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
        starts instead), too few samples, non-finite data, a constant y, or an unknown link or
        method.
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
    link = resolve_link(link)
    key = jax.random.key(0) if key is None else check_key(key)
    if method == "landscape":
        return _landscape_estimate(x, y, num_experts, link, noise, key, standardize, landscape_options)
    if landscape_options is not None:
        raise ValueError("landscape_options: only used with method='landscape'")
    if chunk_size is not None:
        chunk_size = check_positive_int(chunk_size, "chunk_size")
    num_restarts = check_positive_int(num_restarts, "num_restarts")
    num_iterations = check_positive_int(num_iterations, "num_iterations")
    if noise is not None:
        noise = check_positive(noise, "noise")
    _check_source(x, y)
    source = as_data_source(x, y, chunk_size=chunk_size)
    chunk_size = resolve_chunk_size(chunk_size, source.dim, source.num_samples)
    num_experts = check_positive_int(num_experts, "num_experts")
    if num_experts > source.dim:
        raise ValueError(
            f"num_experts: the tensor method needs num_experts <= dim so the experts can be linearly "
            f"independent; got num_experts={num_experts}, dim={source.dim}. Fit by EM from several "
            "random starts instead (or reduce num_experts)"
        )

    transforms = output_transforms(link, 0.0)
    probes = _probes(key, source.dim, num_experts, eigensolver)
    moment = _second_moment(source, transforms, standardize, chunk_size, probes, precision)
    _warn_design(moment)
    noise_source = "given"
    if noise is None:
        noise, noise_source = _estimate_noise(moment.stats, link), "moments"
    else:
        _warn_given_noise(moment.stats, link, noise)
    transforms = output_transforms(link, noise)

    values = moment.eigenvalues
    next_value = values[num_experts] if num_experts < len(values) else 0.0
    top = values[num_experts - 1]
    eigen_gap = (top - next_value) / moment.noise_floor if moment.noise_floor > 0 else np.inf
    if eigen_gap < 1 or top <= 0:
        warnings.warn(
            f"num_experts: the gap between T2's eigenvalues {num_experts} and {num_experts + 1} "
            f"({top - next_value:.3g}) is below the sampling-noise floor ({moment.noise_floor:.3g}); "
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
    tensor = whitened_third_moment(
        source, transforms, standardization.mean, projection, whiten.T @ whiten, moment.stats, chunk_size,
    ) / transforms.c3
    result = decompose_symmetric_tensor(
        tensor, num_experts, key=key, method=decomposition, num_restarts=num_restarts,
        num_iterations=num_iterations,
    )
    change = _decomposition_change(
        result,
        decompose_symmetric_tensor(
            tensor, num_experts, key=jax.random.fold_in(key, 1), method=decomposition,
            num_restarts=num_restarts, num_iterations=num_iterations,
        ),
    )
    if change > DECOMPOSITION_CHANGE_LIMIT:
        warnings.warn(
            f"the tensor power method did not converge in num_iterations={num_iterations}: a second "
            f"run from other random starts moves a component by 1 - |cos| = {change:.2g}; raise "
            "num_iterations or num_restarts",
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
    )
    return ExpertEstimate(experts, weights, np.asarray(noise), intercepts, diagnostics, standardization)


def _landscape_estimate(x, y, num_experts, link, noise, key, standardize, options) -> ExpertEstimate:
    """`estimate_experts(method="landscape")`: `landscape_experts` as an `ExpertEstimate`."""
    from numpyro_moe._landscape import landscape_experts  # the landscape module builds on this one

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
        result.standardization,
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
    moment = _second_moment(source, output_transforms(link, 0.0), standardize, chunk_size)
    count = int((moment.eigenvalues > moment.noise_floor).sum())
    return NumExpertsSuggestion(max(count, 1), moment.eigenvalues, moment.noise_floor)


def bootstrap_standard_errors(
    x,
    y,
    estimate: ExpertEstimate,
    *,
    key: jax.Array,
    num_bootstrap: int = 50,
    link: str | Link = "linear",
    **estimate_kwargs,
) -> np.ndarray:
    """(k, d) bootstrap standard errors of ``estimate.experts`` (in-memory arrays only).

    Each replicate re-estimates on rows drawn with replacement, is matched to ``estimate``'s
    labelling (`match_experts`), and the entrywise standard deviation is returned. Warnings of
    the replicates are collected into one.
    """
    if not isinstance(estimate, ExpertEstimate):
        raise TypeError(f"estimate: expected ExpertEstimate, got {type(estimate).__name__}")
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
                x[rows], y[rows], num_experts=k, link=link, key=fit_key, **estimate_kwargs
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
