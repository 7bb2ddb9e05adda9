"""Pass 1 of the moment methods, shared by the tensor method (ICML 2019) and the expert loss
(AISTATS 2020): standardisation of x, the spectrum of T2 = E[P2(y) S2(z)] / c2 (dense or
matrix-free), the noise from the second moment of y, and the checks of the design assumptions.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_moe._links import Link
from numpyro_moe._moments import DataSource, FirstPass, first_pass, p2_sketch, pilot_rows, pilot_shifts
from numpyro_moe._transforms import OutputTransforms, gaussian_expectation_nodes
from numpyro_moe._validation import ReliabilityWarning

__all__ = [
    "SecondMoment",
    "Standardization",
    "estimate_noise",
    "mixed_rounding_bound",
    "random_probes",
    "second_moment",
    "subspace_eigh",
    "warn_design",
    "warn_given_noise",
]

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


class Standardization(NamedTuple):
    """``z = whitening^T (x - mean)``: ``mean`` (d,), symmetric ``whitening`` (d, d)."""

    mean: np.ndarray
    whitening: np.ndarray

    def transform(self, x):
        """Standardise inputs x (n, d)."""
        return (x - self.mean) @ self.whitening


class SecondMoment(NamedTuple):
    """Pass 1 over the data and T2's spectrum in standardised coordinates (see `second_moment`)."""

    stats: FirstPass
    standardization: Standardization
    eigenvalues: np.ndarray  # descending, of T2 / c2 in z-coordinates
    eigenvectors: np.ndarray  # (d, d), columns
    noise_floor: float
    skewness: np.ndarray
    excess_kurtosis: np.ndarray


def second_moment(
    source: DataSource,
    transforms: OutputTransforms,
    standardize: bool,
    chunk_size: int,
    probes: np.ndarray | None = None,
    precision: str = "float64",
):
    """Pass 1 and T2's eigenpairs in standardised coordinates: all d of them (dense), or, with
    ``probes`` (d, p), the top p by the randomised eigensolver (`subspace_eigh`)."""
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
        eigenvalues, eigenvectors = subspace_eigh(image, t2_times, POWER_ITERATIONS)

    p2_variance = max(stats.sum_p2sq / n - p2_mean**2, 0.0)
    noise_floor = 2 * np.sqrt(d) * np.sqrt(p2_variance / n) / abs(transforms.c2)
    return SecondMoment(
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


def random_probes(key, dim: int, num_experts: int, eigensolver: str) -> np.ndarray | None:
    """Gaussian (d, k + OVERSAMPLING) probes for the randomised eigensolver, or None (dense)."""
    width = num_experts + OVERSAMPLING
    if eigensolver == "dense" or width >= dim or (eigensolver == "auto" and dim < RANDOMIZED_MIN_DIM):
        return None
    return np.asarray(jax.random.normal(jax.random.fold_in(key, 2), (dim, width)), dtype=np.float64)


def subspace_eigh(image: np.ndarray, t2_times, power_iterations: int) -> tuple[np.ndarray, np.ndarray]:
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


def _ysecond_moment(stats: FirstPass, link: Link) -> tuple[float, float, float]:
    """mean(y^2), its standard error, and E[g(Z)^2] (what unit-norm experts give without noise)."""
    n = stats.count
    nodes, weights = gaussian_expectation_nodes("piecewise")
    with jax.enable_x64(True):
        g = np.asarray(link.function(jax.numpy.asarray(nodes)), dtype=np.float64)
    y2_mean = stats.sum_y[1] / n
    standard_error = np.sqrt(max(stats.sum_y[3] / n - y2_mean**2, 0.0) / n)
    return y2_mean, standard_error, float(weights @ g**2)


def estimate_noise(stats: FirstPass, link: Link) -> float:
    """s^2 = E[y^2] - E[g(Z)^2]: under the design (z ~ N(0, I), unit experts, orthogonal gates)
    each expert's input a_i . z is N(0, 1) independently of the gate.

    When the noise is small next to the sampling error of mean(y^2), the difference is not
    resolved; the estimate is then floored at that standard error (an upper bound for s^2 at
    this n). Only a significantly negative difference (3 standard errors) means the design
    assumptions fail, and warns.
    """
    y2_mean, standard_error, g2_mean = _ysecond_moment(stats, link)
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


def warn_given_noise(stats: FirstPass, link: Link, noise: float) -> None:
    """A given noise fixes the scale of y the transforms expect: E[y^2] = E[g(Z)^2] + s^2 for
    unit-norm experts. A mismatch that is both significant (3 standard errors) and practically
    relevant (over 10 %) biases the transforms: for y scaled by 1e-4 the estimate is unrelated to
    the experts (measured expert error 1.2 against 0.06 unscaled)."""
    y2_mean, standard_error, g2_mean = _ysecond_moment(stats, link)
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


def warn_design(moment: SecondMoment) -> None:
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
