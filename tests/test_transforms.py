"""Output transforms P2, P3 of the tensor method (Makkuva, Kannan, Oh, Viswanath, ICML 2019)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from numpyro_moe._links import LINKS
from numpyro_moe._transforms import gaussian_expectation_nodes
from numpyro_moe.experts import output_transforms

NOISES = (0.0, 0.3)

# Reference table of the design notes, section 2 (beta at noise 0; it shifts by -3 noise^2).
# The relu row is not used here: see `exact_relu_transforms` and `test_design_table_relu_row_is_off`.
REFERENCE = {
    "linear": {"alpha": 0.0, "beta": -3.0, "c3": 6.0, "gamma": 0.0, "c2": 2.0},
    "sigmoid": {"alpha": -1.5, "beta": 0.6510, "c3": 0.0228, "gamma": -1.0, "c2": 0.0624},
    "tanh": {"alpha": 0.0, "beta": -0.6999, "c3": 0.2335, "gamma": 0.0, "c2": 0.3636},
}
DESIGN_TABLE_RELU = {"alpha": -3.2884, "beta": 2.2475, "c3": 0.3761, "gamma": -1.5958, "c2": 0.3647}


def exact_relu_transforms() -> dict[str, float]:
    """The relu transforms in closed form, from half-normal moments M_m = E[Z^m; Z > 0].

    With g = relu, E[g^p He_m(Z)] = E[Z^p He_m(Z); Z > 0] is a combination of the M_m.
    """
    root = np.sqrt(2 * np.pi)
    m1, m2, m3, m4, m5, m6 = 1 / root, 1 / 2, 2 / root, 3 / 2, 8 / root, 15 / 2
    g_he1, g_he2, g_he3 = m2, m3 - m1, m4 - 3 * m2
    g2_he1, g2_he2, g2_he3 = m3, m4 - m2, m5 - 3 * m3
    g3_he1, g3_he2, g3_he3 = m4, m5 - m3, m6 - 3 * m4
    alpha, beta = np.linalg.solve(
        np.array([[g2_he1, g_he1], [g2_he2, g_he2]]), -np.array([g3_he1, g3_he2])
    )
    gamma = -g2_he1 / g_he1
    return {
        "alpha": alpha,
        "beta": beta,
        "c3": g3_he3 + alpha * g2_he3 + beta * g_he3,
        "gamma": gamma,
        "c2": g2_he2 + gamma * g_he2,
    }


@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("link", sorted(REFERENCE))
def test_reference_table(link, noise):
    transforms = output_transforms(link, noise)
    expected = dict(REFERENCE[link])
    expected["beta"] -= 3 * noise**2
    for name, value in expected.items():
        assert getattr(transforms, name) == pytest.approx(value, abs=1e-3), name
    assert transforms.beta_noiseless == pytest.approx(REFERENCE[link]["beta"], abs=1e-3)
    assert transforms.noise == noise


def test_exact_relu_values_match_closed_form_numbers():
    # Guards the closed form itself against a slip: these are the values it must produce.
    exact = exact_relu_transforms()
    expected = {"alpha": -3.29359, "beta": 2.25582, "c3": 0.37209, "gamma": -1.59577, "c2": 0.36338}
    for name, value in expected.items():
        assert exact[name] == pytest.approx(value, abs=1e-5), name


@pytest.mark.parametrize("noise", NOISES)
def test_relu_matches_half_normal_closed_form(noise):
    transforms = output_transforms("relu", noise)
    exact = exact_relu_transforms()
    exact["beta"] -= 3 * noise**2
    for name, value in exact.items():
        assert getattr(transforms, name) == pytest.approx(value, abs=1e-6), name


def test_design_table_relu_row_is_off():
    """The design notes' relu row came from a Gauss-Hermite rule that cannot resolve the kink at 0.

    The exact values differ from it by more than the table's own 1e-3 precision; the library
    follows the exact values.
    """
    exact = exact_relu_transforms()
    assert abs(exact["c3"] - DESIGN_TABLE_RELU["c3"]) > 1e-3
    assert abs(exact["alpha"] - DESIGN_TABLE_RELU["alpha"]) > 1e-3
    assert abs(output_transforms("relu").c3 - DESIGN_TABLE_RELU["c3"]) > 1e-3


@pytest.mark.parametrize("noise", NOISES)
def test_user_callable_tanh_matches_registered_tanh(noise):
    # The callable goes through the piecewise Gauss-Legendre rule, "tanh" through Gauss-Hermite.
    registered = output_transforms("tanh", noise)
    user = output_transforms(lambda t: jnp.tanh(t), noise)
    for name in ("alpha", "beta", "gamma", "c2", "c3", "beta_noiseless"):
        assert getattr(user, name) == pytest.approx(getattr(registered, name), abs=1e-8), name


@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("link", sorted(LINKS))
def test_defining_conditions_hold(link, noise):
    """E[h3'] = E[h3''] = 0, E[h2'] = 0, and c3 = E[h3'''], c2 = E[h2''] (Stein: E[h^(m)] = E[h He_m]).

    h3(t) = E_eps[P3(g(t) + noise eps)] = g^3 + 3 s^2 g + alpha g^2 + beta g (+ const) and
    h2(t) = g^2 + gamma g (+ const), evaluated with the kink-safe piecewise rule for every link.
    """
    transforms = output_transforms(link, noise)
    nodes, weights = gaussian_expectation_nodes("piecewise")
    g = np.asarray(LINKS[link](jnp.asarray(nodes)))
    he1, he2, he3 = nodes, nodes**2 - 1, nodes**3 - 3 * nodes
    h3 = g**3 + 3 * noise**2 * g + transforms.alpha * g**2 + transforms.beta * g
    h2 = g**2 + noise**2 + transforms.gamma * g
    assert abs(weights @ (h3 * he1)) < 1e-8
    assert abs(weights @ (h3 * he2)) < 1e-8
    assert abs(weights @ (h2 * he1)) < 1e-8
    assert weights @ (h3 * he3) == pytest.approx(transforms.c3, abs=1e-8)
    assert weights @ (h2 * he2) == pytest.approx(transforms.c2, abs=1e-8)


def test_transforms_apply_their_coefficients():
    transforms = output_transforms("sigmoid", 0.3)
    y = np.array([-1.0, 0.5, 2.0])
    np.testing.assert_allclose(transforms.p2(y), y**2 + transforms.gamma * y, rtol=1e-14)
    np.testing.assert_allclose(
        transforms.p3(y), y**3 + transforms.alpha * y**2 + transforms.beta * y, rtol=1e-14
    )


def test_even_link_is_refused():
    # E[g'(Z)] = E[2 Z] = 0: the second moment carries no information about the experts.
    with pytest.raises(ValueError, match="link"):
        output_transforms(lambda t: t**2)


@pytest.mark.parametrize("noise", [-0.1, float("nan"), float("inf")])
def test_bad_noise_is_refused(noise):
    with pytest.raises(ValueError, match="noise"):
        output_transforms("linear", noise)


def test_unknown_link_is_refused():
    with pytest.raises(ValueError, match="link"):
        output_transforms("softplus")
