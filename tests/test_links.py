"""The expert link registry and `resolve_link`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import expit

from numpyro_moe import LINKS, Link, resolve_link

T = jnp.linspace(-4.0, 4.0, 17)

REFERENCE = {
    "linear": lambda t: t,
    "sigmoid": expit,
    "relu": lambda t: np.maximum(t, 0.0),
    "tanh": np.tanh,
}


def test_registry_holds_exactly_the_documented_links():
    assert set(LINKS) == {"linear", "sigmoid", "relu", "tanh"}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_registered_name_resolves_to_the_right_function(name):
    link = resolve_link(name)
    assert isinstance(link, Link)
    assert link.name == name
    np.testing.assert_allclose(link.function(T), REFERENCE[name](np.asarray(T)), rtol=1e-12, atol=0)
    # Elementwise: shape preserved on a matrix too.
    matrix = T.reshape(1, -1) * jnp.ones((3, 1))
    assert link.function(matrix).shape == (3, T.shape[0])


def test_user_callable_is_accepted_and_named_after_itself():
    def cubic(t):
        return t**3

    link = resolve_link(cubic)
    assert link.name == "cubic"
    assert link.function is cubic
    np.testing.assert_allclose(link.function(T), np.asarray(T) ** 3)


def test_jax_function_and_lambda_are_accepted():
    assert resolve_link(jnp.sin).function is jnp.sin
    square = lambda t: t * t
    link = resolve_link(square)
    assert link.function is square
    assert link.name == "<lambda>"


def test_resolved_link_passes_through_unchanged():
    link = resolve_link("tanh")
    assert resolve_link(link) is link


def test_callable_link_is_traceable_under_jit():
    link = resolve_link(lambda t: jnp.exp(-t))
    np.testing.assert_allclose(jax.jit(link.function)(T), np.exp(-np.asarray(T)))


@pytest.mark.parametrize("name", ["nope", "Linear", "softplus", ""])
def test_unknown_name_is_a_value_error_naming_link(name):
    with pytest.raises(ValueError, match=r"^link: unknown link") as info:
        resolve_link(name)
    # The message lists what is accepted.
    for known in LINKS:
        assert known in str(info.value)


@pytest.mark.parametrize("value", [None, 3, 2.5, ["linear"], np.zeros(3)])
def test_non_callable_is_a_type_error_naming_link(value):
    with pytest.raises(TypeError, match=r"^link: expected a link name"):
        resolve_link(value)
