"""Score functions of a fitted input design, for the tensor method on non-Gaussian x.

Stein's identity holds for any input density p whose tails vanish fast enough: with the
higher-order score functions ``S_m(x) = (-1)^m grad^m p(x) / p(x)``,
``E[f(x) S_m(x)] = E[grad^m f(x)]`` (Janzamin, Sedghi and Anandkumar 2014, "Score function
features for discriminative learning: matrix and tensor frameworks"). For N(0, I) they are the
Hermite tensors ``S_2 = x x^T - I`` and ``S_3 = x^{(x)3} - sym(x (x) I)`` that the Gaussian path
uses; under another density they change, and with the design's own S_m the moments of the tensor
method measure ``E[grad^2 f_2]`` and ``E[grad^3 f_3]`` of ``f_m(x) = E[P_m(y) | x]`` again.

The family: independent components, each a 1-d Gaussian mixture
-------------------------------------------------------------------
After standardisation ``z = W^T (x - mean)``, an orthogonal unmixing R (FastICA, Hyvarinen and
Oja 2000, symmetric, log-cosh contrast, started at the identity) gives ``s = R z`` and

    p(s) = prod_j p_j(s_j),    p_j = sum_c rho_jc N(mu_jc, sigma_jc^2),

with the number of components of each p_j (1 to `MAX_COMPONENTS`) chosen by BIC, so a Gaussian
coordinate keeps one component and its Hermite score. Why this family: a Gaussian mixture in
the d-dimensional x is cheap to differentiate, but non-Gaussian columns are a product design
(d bimodal columns are 2^d clusters), which a product of 1-d mixtures holds exactly with d C
parameters. It is itself a Gaussian mixture, with C^d diagonal components on a grid.

For a Gaussian mixture ``p = sum_c rho_c phi_c``, ``grad^m p / p = sum_c r_c(x) grad^m phi_c /
phi_c`` exactly, with responsibilities ``r_c = rho_c phi_c / p``: differentiation is linear and
each component's derivative is itself times its Hermite tensor. So there are no cross terms
between components in S_m (they appear only through log-densities:
``grad^2 log p = S_2 - S_1 S_1^T``). In one dimension, with ``u_c = (t - mu_c) / sigma_c^2`` and
``lambda_c = sigma_c^{-2}``, the scores ``psi_m = (-1)^m p^(m) / p`` are

    psi_1 = sum_c r_c u_c,  psi_2 = sum_c r_c (u_c^2 - lambda_c),  psi_3 = sum_c r_c (u_c^3 - 3 lambda_c u_c).

A product density's S_m factorises over the distinct coordinates of an index: ``S_2[i, j] =
psi_1i psi_1j`` (i != j), ``psi_2i`` (i = j), and so on. With ``delta_2 = psi_2 - psi_1^2`` and
``delta_3 = psi_3 - psi_1^3 - 3 psi_1 delta_2``,

    S_2 = psi_1 psi_1^T + diag(delta_2),
    S_3 = psi_1^{(x)3} + sym(diag(delta_2) (x) psi_1) + diag_3(delta_3)      (sym: 3 placements),

(for N(0, 1): psi_1 = t, delta_2 = -1, delta_3 = 0, the Hermite tensors). Applied to k
directions N (d, k) with ``v = N^T psi_1``: ``S_3(N, N, N) = v^{(x)3} + sym(sum_i delta_2i
N_i N_i^T (x) v) + sum_i delta_3i N_i^{(x)3}``. A pass therefore accumulates ``sum P v^{(x)3}``
(k^3), ``sum P delta_2 v^T`` (d, k) and ``sum P delta_3`` (d): O(n d (d + C + k)) work per pass
(the d^2 is mapping x to s), never a d x d x d object. In z-coordinates the scores are
contracted with the Jacobian R: ``T_z(M, M, M) = T_s(R M, R M, R M)``, ``T2_z = R^T T2_s R``.

What the design's scores remove, and what they do not (linear experts)
----------------------------------------------------------------------
With ``f_3(x) = sum_i pi_i(x) h_3(a_i . x)``, ``h_3(t) = t^3 - 3 t`` (linear link, any noise)
and exact scores, Stein gives

    E[P3 S3] = 6 sum_i E[pi_i] a_i^{(x)3}
               + 18 sym(E[grad pi_i (a_i . x)] (x) a_i (x) a_i)
               + 9 sym(E[grad^2 pi_i ((a_i . x)^2 - 1)] (x) a_i)
               + sum_i E[grad^3 pi_i h_3(a_i . x)].

The first term needs only E[a_i . x] = 0 and E[(a_i . x)^2] = 1 (unit experts in standardised
coordinates), which standardisation gives on any design: the Gaussian path's bias (its S_3 is
the wrong score) is gone. The other three are the gate's cross terms. They vanish when a_i . x
is independent of the gate's input W x (a Gaussian design with a_i orthogonal to every w_j).
On a product design with non-Gaussian coordinates two orthogonal projections are uncorrelated
but not independent (Darmois-Skitovich), and e.g.
``E[(a . s) G(w . s)] = sum_j a_j w_j^2 kappa_3j E[G''] / 2 + ...`` (kappa_3: skewness), nonzero.
Their shape limits the damage: with gates orthogonal to the experts (in the standardised
metric, ``a_i^T Sigma w_j = 0``) every cross term has at least one leg in span(W), orthogonal
to span(A). T2's cross terms are ``4 sym(E[grad pi_i (a_i . x)] (x) a_i)`` (between span(W) and
span(A)) and ``sum_i E[grad^2 pi_i (a_i . x)^2]`` (inside span(W)); as long as they stay below
T2's expert eigenvalues ``2 pi_i``, T2's top-k eigenspace is span(A) turned by an angle of
order (cross term / eigen-gap), and projecting T3 onto it keeps of the cross terms only what
that angle lets through. The remaining bias is first order in that angle; it grows with the
gate's scale and the design's skewness, and `benchmarks/real_designs.py` measures it (the
``oracle design`` rows use the true density, so what remains there is the cross terms alone).
Nonlinear links add a bias the design cannot remove: their transforms make ``E[h_m'(Z)]`` vanish
for Gaussian Z only, and a_i . x is not Gaussian here.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

from numpyro_moe._moments import DataSource, FirstPass, _accumulate, _blocks
from numpyro_moe._second_moment import Standardization
from numpyro_moe._transforms import OutputTransforms

__all__ = [
    "AUTO_MIN_SAMPLES",
    "DESIGNS",
    "MixtureDesign",
    "design_scores",
    "design_second_moment",
    "design_third_moment",
    "fit_mixture_design",
    "gaussianity_pvalue",
    "sample_rows",
]

DESIGNS = ("gaussian", "mixture", "auto")
# Components per coordinate: BIC picks 1..MAX_COMPONENTS. Four hold a bimodal column exactly
# (two) and a skewed or heavy-tailed one to within the sampling error of the moments at n = 2e5
# (measured in benchmarks/real_designs.py).
MAX_COMPONENTS = 4
# The design is fitted on at most this many rows, spread evenly over the data (one read pass):
# its parameters' error, O(DESIGN_ROWS^-1/2), is then below the moments' own at the sizes where
# the design's bias matters.
DESIGN_ROWS = 2**16
HISTOGRAM_BINS = 1024
EM_ITERATIONS = 200
ICA_ITERATIONS = 200
# Smallest component sd (in standardised units): a narrower one makes the scores, which scale
# as sigma^-m, dominate the moments' variance (e.g. on an atom of a discrete column).
MIN_SCALE = 0.05
# design="auto" keeps the Gaussian path unless the Jarque-Bera test of some column rejects
# normality at this level (Bonferroni over the d columns).
GAUSSIANITY_LEVEL = 0.01
# ... and only from this many rows: below it the design's scores, whose variance is larger than
# the Hermite tensors', cost more than the Gaussian path's bias (benchmarks/real_designs.py,
# median expert error over 4 seeds at n = 2000, Gaussian vs mixture: 0.23 vs 0.63 bimodal,
# 0.60 vs 0.65 correlated, 0.80 vs 1.03 boston, 0.57 vs 0.66 diabetes inputs; at n = 20000 the
# mixture was ahead on five of six designs).
AUTO_MIN_SAMPLES = 20_000


class MixtureDesign(NamedTuple):
    """A fitted input density: ``s = unmixing^T (x - center)`` has independent coordinates, each a
    1-d Gaussian mixture (see the module notes).

    Attributes
    ----------
    center
        (d,) in the units of x.
    unmixing
        (d, d): ``W R^T`` for the standardisation W and the orthogonal ICA rotation R.
    log_weights, means, scales
        (d, C) per coordinate of s; unused components have log weight ``-inf``.
    num_components
        (d,) components in use per coordinate (BIC's choice).
    """

    center: np.ndarray
    unmixing: np.ndarray
    log_weights: np.ndarray
    means: np.ndarray
    scales: np.ndarray
    num_components: np.ndarray

    def log_density(self, x):
        """Log density of x (n, d) under the design (the Jacobian of the unmixing included)."""
        s = (jnp.asarray(x) - self.center) @ self.unmixing
        _, log_det = np.linalg.slogdet(np.asarray(self.unmixing))
        return jnp.sum(_coordinate_log_density(s, *self._parameters()), axis=-1) + log_det

    def score_tensors(self, x):
        """The score functions ``S_2`` (n, d, d) and ``S_3`` (n, d, d, d) at x (n, d), in the
        units of x: O(d^3) per row, for checks on small d (the moment passes never form them)."""
        s = (jnp.asarray(x) - self.center) @ self.unmixing
        psi1, psi2, psi3 = design_scores(s, *self._parameters())
        delta2 = psi2 - psi1 * psi1
        delta3 = psi3 - psi1**3 - 3 * psi1 * delta2
        eye = jnp.eye(s.shape[1])
        s2 = psi1[:, :, None] * psi1[:, None, :] + delta2[:, :, None] * eye
        pairs = jnp.einsum("ni,ij,nk->nijk", delta2, eye, psi1)
        s3 = (
            jnp.einsum("ni,nj,nk->nijk", psi1, psi1, psi1)
            + pairs + pairs.transpose(0, 1, 3, 2) + pairs.transpose(0, 3, 2, 1)
            + jnp.einsum("ni,ij,jk->nijk", delta3, eye, eye)
        )
        # Back to x: S_m(x) = S_m(s) contracted with ds/dx = unmixing^T on every index.
        b = jnp.asarray(self.unmixing)
        return (
            jnp.einsum("nij,ai,bj->nab", s2, b, b),
            jnp.einsum("nijk,ai,bj,ck->nabc", s3, b, b, b),
        )

    def sample(self, key, num_samples: int):
        """Draw ``num_samples`` rows of x (n, d) from the design."""
        component_key, noise_key = jax.random.split(key)
        d = self.means.shape[0]
        components = jax.random.categorical(
            component_key, jnp.asarray(self.log_weights), shape=(num_samples, d)
        )
        rows = jnp.arange(d)
        s = jnp.asarray(self.means)[rows, components] + jnp.asarray(self.scales)[rows, components] * (
            jax.random.normal(noise_key, (num_samples, d))
        )
        return jnp.asarray(self.center) + s @ jnp.linalg.inv(jnp.asarray(self.unmixing))

    def _parameters(self):
        return tuple(jnp.asarray(value) for value in (self.log_weights, self.means, self.scales))


def _coordinate_log_density(s, log_weights, means, scales):
    """(n, d) log p_j(s_j) of each coordinate's 1-d mixture."""
    return logsumexp(_component_log_terms(s, log_weights, means, scales), axis=-1)


def _component_log_terms(s, log_weights, means, scales):
    standard = (s[..., None] - means) / scales
    return log_weights - 0.5 * standard**2 - jnp.log(scales) - 0.5 * jnp.log(2 * jnp.pi)


def design_scores(s, log_weights, means, scales):
    """The 1-d score functions psi_1, psi_2, psi_3 (each (n, d)) of each coordinate of s (n, d)."""
    terms = _component_log_terms(s, log_weights, means, scales)
    responsibilities = jnp.exp(terms - logsumexp(terms, axis=-1, keepdims=True))
    precision = 1.0 / scales**2
    u = (s[..., None] - means) * precision
    psi1 = jnp.sum(responsibilities * u, axis=-1)
    psi2 = jnp.sum(responsibilities * (u * u - precision), axis=-1)
    psi3 = jnp.sum(responsibilities * (u * u * u - 3 * precision * u), axis=-1)
    return psi1, psi2, psi3


# ------------------------------------------------------------------------------------- fitting


def sample_rows(source: DataSource, count: float, rows: int = DESIGN_ROWS) -> np.ndarray:
    """Every ``ceil(count / rows)``-th row of x (float64), spread over the whole data, one read."""
    stride = max(int(np.ceil(count / rows)), 1)
    taken, seen = [], 0
    for x_chunk, _ in source.chunks():
        first = (-seen) % stride
        taken.append(np.asarray(x_chunk[first::stride], dtype=np.float64))
        seen += len(x_chunk)
    return np.concatenate(taken)


@partial(jax.jit, static_argnames=("num_iterations",))
def _fast_ica(z, num_iterations):
    """Orthogonal R (d, d) with ``z R^T`` as independent as the log-cosh contrast finds
    (symmetric FastICA on whitened z, started at the identity)."""
    count = z.shape[0]

    def step(rotation, _):
        s = z @ rotation.T
        g = jnp.tanh(s)
        update = (g.T @ z) / count - jnp.mean(1 - g * g, axis=0)[:, None] * rotation
        values, vectors = jnp.linalg.eigh(update @ update.T)
        return (vectors / jnp.sqrt(values)) @ vectors.T @ update, None

    rotation, _ = jax.lax.scan(step, jnp.eye(z.shape[1], dtype=z.dtype), None, length=num_iterations)
    return rotation


@partial(jax.jit, static_argnames=("max_components", "num_iterations"))
def _fit_coordinate(centres, counts, num_components, max_components, num_iterations):
    """EM for a 1-d Gaussian mixture of ``num_components`` (traced; the other slots of
    ``max_components`` stay empty, so every count shares one compilation) on a histogram (bin
    ``centres`` and ``counts``, (B,)); returns its parameters and log-likelihood. Started at
    equal weights, means at the quantiles, a common sd."""
    total = counts.sum()
    mean = counts @ centres / total
    spread = jnp.sqrt(counts @ (centres - mean) ** 2 / total)
    cumulative = jnp.cumsum(counts) / total
    slots = jnp.arange(max_components)
    active = slots < num_components
    probabilities = jnp.minimum((slots + 0.5) / num_components, 1.0)
    means = centres[jnp.minimum(jnp.searchsorted(cumulative, probabilities), centres.shape[0] - 1)]
    means = jnp.where(active, means, 0.0)
    scales = jnp.where(active, spread / num_components, 1.0)
    log_weights = jnp.where(active, -jnp.log(num_components), -jnp.inf)

    def step(state, _):
        log_weights, means, scales = state
        terms = _component_log_terms(centres[:, None], log_weights, means, scales)[:, 0]
        responsibilities = counts[:, None] * jnp.exp(terms - logsumexp(terms, axis=-1, keepdims=True))
        mass = responsibilities.sum(0) + 1e-12
        means = jnp.where(active, (responsibilities.T @ centres) / mass, 0.0)
        variance = jnp.sum(responsibilities * (centres[:, None] - means) ** 2, axis=0) / mass
        scales = jnp.where(active, jnp.sqrt(jnp.maximum(variance, MIN_SCALE**2)), 1.0)
        return (jnp.where(active, jnp.log(mass / total), -jnp.inf), means, scales), None

    (log_weights, means, scales), _ = jax.lax.scan(
        step, (log_weights, means, scales), None, length=num_iterations
    )
    log_likelihood = counts @ _coordinate_log_density(centres[:, None], log_weights, means, scales)[:, 0]
    return log_weights, means, scales, log_likelihood


def _histograms(s: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Bin centres and counts (d, bins) of each column of s (m, d), over its own range."""
    centres, counts = [], []
    for column in np.asarray(s).T:
        count, edges = np.histogram(column, bins=bins)
        centres.append((edges[:-1] + edges[1:]) / 2)
        counts.append(count.astype(np.float64))
    return np.stack(centres), np.stack(counts)


def fit_mixture_design(
    x: np.ndarray,
    standardization: Standardization,
    *,
    max_components: int = MAX_COMPONENTS,
    rotate: bool = True,
) -> MixtureDesign:
    """Fit the design density to rows x (m, d) in the coordinates of ``standardization``.

    FastICA (``rotate=True``) turns the standardised rows to independent coordinates; each gets
    a 1-d Gaussian mixture by EM, with 1..``max_components`` components chosen by BIC.
    """
    with jax.enable_x64(True):
        z = jnp.asarray(standardization.transform(np.asarray(x, np.float64)))
        d = z.shape[1]
        rotation = _fast_ica(z, ICA_ITERATIONS) if rotate and d > 1 else jnp.eye(d)
        s = z @ rotation.T
        count = s.shape[0]
        # EM runs on each coordinate's histogram: its cost does not grow with the rows, and bins
        # of width range / HISTOGRAM_BINS (about 0.01 sd) are far narrower than MIN_SCALE.
        centres, counts = (jnp.asarray(value) for value in _histograms(s, HISTOGRAM_BINS))
        counts_tried = jnp.arange(1, max_components + 1)
        fit_all = jax.vmap(  # over the component counts, then over the coordinates
            jax.vmap(
                lambda c, w, m: _fit_coordinate(c, w, m, max_components, EM_ITERATIONS),
                in_axes=(0, 0, None),
            ),
            in_axes=(None, None, 0),
        )
        log_weights, means, scales, log_likelihood = fit_all(centres, counts, counts_tried)  # (C, d, ...)
        bic = -2 * log_likelihood + (3 * counts_tried[:, None] - 1) * np.log(count)
        choice = jnp.argmin(bic, axis=0)  # (d,)
        columns = jnp.arange(d)
        best = (
            None, log_weights[choice, columns], means[choice, columns], scales[choice, columns],
            counts_tried[choice],
        )
        _, log_weights, means, scales, num_components = (np.asarray(value) for value in best)
        unmixing = standardization.whitening @ np.asarray(rotation).T
    return MixtureDesign(
        np.asarray(standardization.mean, np.float64), unmixing, log_weights, means, scales,
        num_components.astype(int),
    )


def gaussianity_pvalue(skewness: np.ndarray, excess_kurtosis: np.ndarray, count: float) -> float:
    """Bonferroni p-value of the Jarque-Bera tests of the d columns (``count`` rows each):
    ``count (skew^2 / 6 + kurt^2 / 24)`` is chi^2(2) under normality."""
    statistic = count * (np.asarray(skewness) ** 2 / 6 + np.asarray(excess_kurtosis) ** 2 / 24)
    # chi^2(2)'s survival function is exp(-t / 2) (no scipy.stats: its import alone takes a second).
    return float(min(1.0, np.size(statistic) * np.exp(-np.max(statistic) / 2)))


# ---------------------------------------------------------------------------- streamed moments


def _centered_responses(stats: FirstPass, transforms: OutputTransforms) -> np.ndarray:
    """Means of P2, of P3 without noise, and of y (to centre them: E[S_m] = 0)."""
    n = stats.count
    y1, y2, y3 = stats.sum_y[:3] / n
    return np.asarray([y2 + transforms.gamma * y1, y3 + transforms.alpha * y2 + transforms.beta_noiseless * y1, y1])


@jax.jit
def _second_chunk(totals, s, y, rows, design, gamma, centers):
    dtype = totals[0].dtype
    s, y = s.astype(dtype), y.astype(dtype)
    weight = (jnp.arange(s.shape[0]) < rows).astype(dtype)
    p2 = (y * y + gamma * y - centers[0]) * weight
    psi1, psi2, _ = design_scores(s, *design)
    return totals[0] + (p2[:, None] * psi1).T @ psi1, totals[1] + p2 @ (psi2 - psi1 * psi1)


def design_second_moment(
    source: DataSource, transforms: OutputTransforms, design: MixtureDesign, stats: FirstPass,
    chunk_size: int, standardization: Standardization,
) -> np.ndarray:
    """T2 = E[(P2(y) - mean P2) S2(z)] / c2 (d, d) in the z-coordinates of ``standardization``,
    with the design's S2, by one pass."""
    dtype = jnp.result_type(float)
    d = source.dim

    def zeros():
        return np.zeros((d, d), dtype), np.zeros((d,), dtype)

    gram, diagonal = _accumulate(
        _second_chunk, zeros, _blocks(source, chunk_size, shift=design.center, projection=design.unmixing),
        tuple(np.asarray(value, dtype) for value in (design.log_weights, design.means, design.scales)),
        np.asarray(transforms.gamma, dtype), _centered_responses(stats, transforms).astype(dtype),
    )
    t2_s = (gram + np.diag(diagonal)) / stats.count
    jacobian = _jacobian(design, standardization)
    t2 = jacobian.T @ t2_s @ jacobian / transforms.c2
    return (t2 + t2.T) / 2


def _jacobian(design: MixtureDesign, standardization: Standardization) -> np.ndarray:
    """ds/dz (d, d): s = unmixing^T (x - center) and x - mean = whitening^{-1} z."""
    return design.unmixing.T @ np.linalg.inv(standardization.whitening)


@jax.jit
def _third_chunk(totals, s, y, rows, design, directions, coefficients, centers):
    dtype = totals[0].dtype
    s, y = s.astype(dtype), y.astype(dtype)
    weight = (jnp.arange(s.shape[0]) < rows).astype(dtype)
    alpha, beta_noiseless = coefficients
    both = jnp.stack([
        (y**3 + alpha * y**2 + beta_noiseless * y - centers[1]) * weight,
        (y - centers[2]) * weight,
    ])  # (2, c): P3 without noise, and y, whose weight -3 s^2 is applied later
    psi1, psi2, psi3 = design_scores(s, *design)
    delta2 = psi2 - psi1 * psi1
    delta3 = psi3 - psi1**3 - 3 * psi1 * delta2
    v = psi1 @ directions  # (c, k)
    count, k = v.shape
    weighted = (both[:, :, None] * v[None]).transpose(0, 2, 1).reshape(2 * k, count)
    outer = (v[:, :, None] * v[:, None, :]).reshape(count, k * k)
    cubes = (weighted @ outer).reshape(2, k, k, k)
    pairs = jnp.einsum("sn,ni,nc->sic", both, delta2, v)  # (2, d, k)
    triples = both @ delta3  # (2, d)
    return totals[0] + cubes, totals[1] + pairs, totals[2] + triples


def design_third_moment(
    source: DataSource, transforms: OutputTransforms, design: MixtureDesign, stats: FirstPass,
    chunk_size: int, standardization: Standardization, whiten: np.ndarray,
) -> np.ndarray:
    """E[(P3(y) - mean P3) S3(z)](M, M, M) (k, k, k) with the design's S3, by one pass.

    ``whiten`` is M (d, k) in z-coordinates; the pass applies S3 of s to ``N = R M``
    (R = ds/dz), so only k projections of the scores are cubed.
    """
    dtype = jnp.result_type(float)
    directions = _jacobian(design, standardization) @ whiten  # (d, k)
    d, k = directions.shape

    def zeros():
        return np.zeros((2, k, k, k), dtype), np.zeros((2, d, k), dtype), np.zeros((2, d), dtype)

    cubes, pairs, triples = _accumulate(
        _third_chunk, zeros, _blocks(source, chunk_size, shift=design.center, projection=design.unmixing),
        tuple(np.asarray(value, dtype) for value in (design.log_weights, design.means, design.scales)),
        np.asarray(directions, dtype),
        np.asarray([transforms.alpha, transforms.beta_noiseless], dtype),
        _centered_responses(stats, transforms).astype(dtype),
    )
    combine = np.array([1.0, -3.0 * transforms.noise**2])
    cube, pair, triple = (np.tensordot(combine, part, axes=1) / stats.count for part in (cubes, pairs, triples))
    # sum_i delta2_i N_i N_i (x) v in its three placements, and sum_i delta3_i N_i^{(x)3}.
    placed = np.einsum("ia,ib,ic->abc", directions, directions, pair)
    diagonal = np.einsum("i,ia,ib,ic->abc", triple, directions, directions, directions)
    return cube + placed + placed.transpose(0, 2, 1) + placed.transpose(2, 1, 0) + diagonal
