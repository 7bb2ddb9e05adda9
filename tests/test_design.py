"""Score functions of a fitted design (`numpyro_moe._design`) and `estimate_experts(design=...)`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpyro_moe import estimate_experts, metrics, simulation
from numpyro_moe._design import (
    AUTO_MIN_SAMPLES,
    MixtureDesign,
    design_scores,
    fit_mixture_design,
    gaussianity_pvalue,
)
from numpyro_moe._second_moment import Standardization


def _small_design() -> MixtureDesign:
    """d = 2: a skewed and a bimodal coordinate, mixed by a non-orthogonal unmixing."""
    log_weights = np.log(np.array([[0.7, 0.3, 0.0], [0.5, 0.5, 0.0]]) + 1e-300)
    log_weights[:, 2] = -np.inf
    means = np.array([[-0.4, 0.9, 0.0], [-0.8, 0.8, 0.0]])
    scales = np.array([[0.6, 1.1, 1.0], [0.5, 0.5, 1.0]])
    unmixing = np.array([[1.2, 0.3], [-0.4, 0.9]])
    return MixtureDesign(np.array([0.5, -1.0]), unmixing, log_weights, means, scales, np.array([2, 2]))


def test_one_dimensional_scores_match_finite_differences_of_the_density():
    design = _small_design()
    params = tuple(jnp.asarray(value) for value in (design.log_weights, design.means, design.scales))
    t = jnp.linspace(-3.0, 3.0, 13)[:, None] * jnp.ones((1, 2))
    psi = design_scores(t, *params)

    def density(t):
        terms = (t[..., None] - params[1]) / params[2]
        return jnp.sum(jnp.exp(params[0] - 0.5 * terms**2) / params[2], axis=-1)

    h = 1e-3
    p = density(t)
    first = (density(t + h) - density(t - h)) / (2 * h)
    second = (density(t + h) - 2 * p + density(t - h)) / h**2
    third = (density(t + 2 * h) - 2 * density(t + h) + 2 * density(t - h) - density(t - 2 * h)) / (2 * h**3)
    # Central differences: relative error O(h^2 * (scale^-2)) ~ 1e-5 for the narrowest sd 0.5.
    for order, (score, derivative) in enumerate(zip(psi, (first, second, third), strict=True), start=1):
        np.testing.assert_allclose(score, (-1) ** order * derivative / p, rtol=1e-4, atol=1e-4)


def test_score_tensors_are_the_derivatives_of_the_density_over_the_density():
    """S_2 = grad^2 p / p and S_3 = -grad^3 p / p in x, through the unmixing (autodiff of the
    mixture's own density)."""
    design = _small_design()
    x = jnp.array([[0.3, -0.7], [1.5, 0.2], [-1.0, -2.5]])
    s2, s3 = design.score_tensors(x)

    def density(point):
        return jnp.exp(design.log_density(point[None])[0])

    p = jax.vmap(density)(x)
    second = jax.jit(jax.vmap(jax.hessian(density)))(x)
    third = jax.jit(jax.vmap(jax.jacfwd(jax.hessian(density))))(x)
    np.testing.assert_allclose(s2, second / p[:, None, None], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(s3, -third / p[:, None, None, None], rtol=1e-9, atol=1e-9)


def test_steins_identity_holds_with_the_design_scores_and_fails_with_hermite_tensors():
    """E[f S_m] = E[grad^m f] on the small design, by Monte Carlo (10^6 draws, 4 standard errors),
    while the Gaussian Hermite tensors, on the standardised x, miss it by many."""
    design = _small_design()
    x = design.sample(jax.random.PRNGKey(0), 400_000)
    a, b = jnp.array([0.8, -0.6]), jnp.array([0.3, 0.5])
    # f = sin(a.x) + (b.x)^3 and its derivatives in closed form.
    values = jnp.sin(x @ a) + (x @ b) ** 3
    hessians = -jnp.sin(x @ a)[:, None, None] * jnp.outer(a, a) + 6 * (x @ b)[:, None, None] * jnp.outer(b, b)
    thirds = -jnp.cos(x @ a).mean() * jnp.einsum("i,j,k->ijk", a, a, a) + 6 * jnp.einsum("i,j,k->ijk", b, b, b)
    s2, s3 = design.score_tensors(x)
    for samples, wanted in (
        (values[:, None, None] * s2, hessians.mean(0)),
        (values[:, None, None, None] * s3, thirds),
    ):
        mean, error = samples.mean(0), samples.std(0) / np.sqrt(x.shape[0])
        np.testing.assert_array_less(np.abs(mean - wanted), 4 * error + 1e-12)

    cholesky = jnp.linalg.cholesky(jnp.cov(x.T))  # x = L z + mean, so grad_z^2 f = L^T H L
    z = (x - x.mean(0)) @ jnp.linalg.inv(cholesky).T
    hermite = values[:, None, None] * (z[:, :, None] * z[:, None, :] - jnp.eye(2))
    wanted = cholesky.T @ hessians.mean(0) @ cholesky
    standard = hermite.std(0) / np.sqrt(x.shape[0])
    # Measured: 142 standard errors (the largest entry) at this size.
    assert float(jnp.max(jnp.abs(hermite.mean(0) - wanted) / standard)) > 20


def test_the_fit_recovers_a_bimodal_coordinate_and_keeps_a_gaussian_one_gaussian():
    rng = np.random.default_rng(0)
    n = 40_000
    bimodal = rng.choice([-0.8, 0.8], n) + 0.6 * rng.standard_normal(n)
    x = np.column_stack([bimodal, rng.standard_normal(n)])
    design = fit_mixture_design(x, Standardization(np.zeros(2), np.eye(2)), rotate=False)
    assert list(design.num_components) == [2, 1]
    order = np.argsort(design.means[0, :2])
    # Sampling error of the fitted parameters at n = 4e4 is about 0.01.
    np.testing.assert_allclose(design.means[0, order], [-0.8, 0.8], atol=0.03)
    np.testing.assert_allclose(design.scales[0, order], [0.6, 0.6], atol=0.03)
    np.testing.assert_allclose(np.exp(design.log_weights[0, order]), [0.5, 0.5], atol=0.03)
    np.testing.assert_allclose([design.means[1, 0], design.scales[1, 0]], [0.0, 1.0], atol=0.03)


def test_gaussianity_pvalue_separates_gaussian_from_skewed_columns():
    rng = np.random.default_rng(1)
    gaussian = rng.standard_normal((20_000, 4))
    skewed = np.exp(0.3 * rng.standard_normal((20_000, 4)))

    def shape(x):
        centred = x - x.mean(0)
        variance = (centred**2).mean(0)
        return (centred**3).mean(0) / variance**1.5, (centred**4).mean(0) / variance**2 - 3

    assert gaussianity_pvalue(*shape(gaussian), 20_000) > 0.01
    assert gaussianity_pvalue(*shape(skewed), 20_000) < 1e-10


def _lognormal_data(seed: int, n: int, d: int = 6, k: int = 3):
    truth = simulation.true_params(key=jax.random.PRNGKey(seed), dim=d, num_experts=k, noise=0.1)
    rng = np.random.default_rng(seed)
    x = np.exp(0.3 * rng.standard_normal((n, d)))
    x = (x - np.exp(0.045)) / np.sqrt((np.exp(0.09) - 1) * np.exp(0.09))
    y = np.asarray(simulation.sample_response(truth, x, key=jax.random.PRNGKey(100 + seed)))
    return x, y, truth


@pytest.mark.slow
def test_mixture_design_beats_the_gaussian_path_on_skewed_inputs():
    """Standardised lognormal(0, 0.3) columns (skewness 0.95), d=6, k=3, n=1e5. Measured over
    seeds 0-2: Gaussian path 0.41 / 0.62 / 0.52, mixture design 0.13 / 0.16 / 0.10."""
    x, y, truth = _lognormal_data(1, 100_000)
    key = jax.random.PRNGKey(2)
    with pytest.warns(Warning):  # the Gaussian path warns about the design
        gaussian = estimate_experts(x, y, num_experts=3, key=key)
    mixture = estimate_experts(x, y, num_experts=3, key=key, design="mixture")
    automatic = estimate_experts(x, y, num_experts=3, key=key, design="auto")
    gaussian_error = metrics.expert_error(gaussian.experts, truth.experts)
    mixture_error = metrics.expert_error(mixture.experts, truth.experts)
    assert gaussian.diagnostics.design == "gaussian"
    assert mixture.diagnostics.design == automatic.diagnostics.design == "mixture"
    np.testing.assert_allclose(automatic.experts, mixture.experts)
    assert mixture_error < 0.25
    assert mixture_error < 0.5 * gaussian_error


@pytest.mark.filterwarnings("ignore::numpyro_moe.ReliabilityWarning")  # design choice only
def test_auto_picks_the_mixture_on_skewed_inputs_from_enough_rows():
    x, y, _ = _lognormal_data(0, AUTO_MIN_SAMPLES, d=4, k=2)
    key = jax.random.PRNGKey(0)
    estimate = estimate_experts(x, y, num_experts=2, key=key, design="auto")
    assert estimate.diagnostics.design == "mixture"
    assert estimate.diagnostics.gaussianity_pvalue < 1e-6
    fewer = estimate_experts(x[:-1], y[:-1], num_experts=2, key=key, design="auto")
    assert fewer.diagnostics.design == "gaussian"
    assert fewer.diagnostics.gaussianity_pvalue < 1e-6


def test_streamed_chunks_give_the_in_memory_estimate():
    """The design is fitted on the same rows and the passes sum the same terms, whatever the
    chunking: equal up to rounding, which the design's iterative fit and the decomposition amplify
    (the largest difference measured 2.2e-8, relative 2e-7, with jax 0.12.0.1 and numpy 2.5.5,
    where earlier releases kept it below 1e-8); one row left out moves the experts by
    1.6e-3, one block's y shifted by a row by 5.6e-2."""
    x, y, _ = _lognormal_data(2, 6_000, d=4, k=2)
    key = jax.random.PRNGKey(1)
    in_memory = estimate_experts(x, y, num_experts=2, key=key, design="mixture", chunk_size=1024)
    chunks = [(x[start : start + 700], y[start : start + 700]) for start in range(0, len(x), 700)]
    streamed = estimate_experts(chunks, num_experts=2, key=key, design="mixture", chunk_size=1024)
    assert streamed.diagnostics.design == "mixture"
    np.testing.assert_allclose(streamed.experts, in_memory.experts, atol=1e-6)


def test_auto_keeps_the_gaussian_path_on_gaussian_inputs():
    data = simulation.simulate(key=jax.random.PRNGKey(3), num_samples=20_000, dim=5, num_experts=2)
    key = jax.random.PRNGKey(4)
    automatic = estimate_experts(data.x, data.y, num_experts=2, key=key, design="auto")
    default = estimate_experts(data.x, data.y, num_experts=2, key=key)
    assert automatic.diagnostics.design == default.diagnostics.design == "gaussian"
    assert automatic.diagnostics.gaussianity_pvalue > 0.01
    np.testing.assert_array_equal(automatic.experts, default.experts)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"design": "copula"}, "design: expected one of"),
        ({"design": None}, "design: expected one of"),
        ({"design": "mixture", "method": "landscape"}, "design: method='landscape'"),
        ({"design": "mixture", "eigensolver": "randomized"}, "eigensolver: the design-aware"),
    ],
)
def test_bad_design_arguments_are_named(options, message):
    data = simulation.simulate(key=jax.random.PRNGKey(5), num_samples=500, dim=4, num_experts=2)
    with pytest.raises(ValueError, match=message):
        estimate_experts(data.x, data.y, num_experts=2, key=jax.random.PRNGKey(0), **options)


def test_a_design_for_other_columns_is_refused():
    data = simulation.simulate(key=jax.random.PRNGKey(5), num_samples=500, dim=4, num_experts=2)
    design = _small_design()
    with pytest.raises(ValueError, match="design: expected a MixtureDesign for 4 columns"):
        estimate_experts(data.x, data.y, num_experts=2, key=jax.random.PRNGKey(0), design=design)
