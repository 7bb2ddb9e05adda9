"""The expert link registry, `resolve_link`, and the link a `MoEParams` record carries."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import expit

import numpyro_moe as moe
from numpyro_moe._links import LINKS, Link, resolve_link

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


# --------------------------------------------------------------------------- the record's link


def _record(link):
    rng = np.random.default_rng(0)
    experts = jnp.asarray(rng.normal(size=(2, 3)))
    gates = jnp.asarray(np.vstack([rng.normal(size=(1, 3)), np.zeros((1, 3))]))
    return moe.MoEParams(experts, gates, jnp.array([0.1, 0.2]), link=link)


def test_moe_params_resolves_its_link():
    assert _record("linear").link == resolve_link("linear")
    assert moe.MoEParams(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.ones(2)).link.name == "linear"  # default
    tanh = _record("tanh")
    assert isinstance(tanh.link, Link) and tanh.link.name == "tanh"
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 3)))
    np.testing.assert_allclose(tanh.expert_means(x), np.tanh(np.asarray(x) @ np.asarray(tanh.experts).T), rtol=1e-12)

    def cubic(t):
        return t**3

    record = _record(cubic)
    assert record.link.name == "cubic" and record.link.function is cubic
    np.testing.assert_allclose(record.expert_means(x), (np.asarray(x) @ np.asarray(record.experts).T) ** 3, rtol=1e-12)
    resolved = resolve_link("sigmoid")
    assert _record(resolved).link is resolved


def test_moe_params_bad_link_is_an_error_naming_link():
    with pytest.raises(ValueError, match=r"^link: unknown link"):
        _record("softmax")
    with pytest.raises(TypeError, match=r"^link: expected a link name"):
        _record(3)


def test_link_is_static_under_jit_and_survives_tree_maps():
    record = _record("tanh")
    # The link is not a leaf: only the three arrays (intercepts None) are.
    assert len(jax.tree.leaves(record)) == 3
    doubled = jax.tree.map(lambda leaf: 2 * leaf, record)
    assert doubled.link is record.link
    x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 3)))
    means = jax.jit(lambda params: params.expert_means(x))(record)
    np.testing.assert_allclose(means, np.tanh(np.asarray(x) @ np.asarray(record.experts).T), rtol=1e-12)
    # A different link is a different static value: the jitted function follows it, not a cache.
    linear = jax.jit(lambda params: params.expert_means(x))(record.replace(link="linear"))
    np.testing.assert_allclose(linear, np.asarray(x) @ np.asarray(record.experts).T, rtol=1e-12)


def test_link_that_changes_shapes_is_rejected_naming_link():
    record = _record(lambda t: jnp.sum(t, axis=-1))
    with pytest.raises(ValueError, match=r"^link: '<lambda>' must map arrays elementwise"):
        record.expert_means(jnp.ones((4, 3)))
