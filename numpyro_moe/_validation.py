"""Checks at the public boundary: each error names the argument, what was expected and what came."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "ReliabilityWarning",
    "check_design",
    "check_key",
    "check_num_experts",
    "check_positive",
    "check_positive_int",
    "check_response",
]


class ReliabilityWarning(UserWarning):
    """A result was computed but its assumptions failed: it may not be trustworthy."""


def _as_float_array(value, name: str) -> jax.Array:
    try:
        array = jnp.asarray(value)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name}: expected a numeric array, got {type(value).__name__}") from error
    if not (jnp.issubdtype(array.dtype, jnp.floating) or jnp.issubdtype(array.dtype, jnp.integer)
            or array.dtype == jnp.bool_):
        raise TypeError(f"{name}: expected a real numeric array, got dtype {array.dtype}")
    if not jnp.issubdtype(array.dtype, jnp.floating):
        array = array.astype(jnp.result_type(float))
    return array


def _check_finite(array: jax.Array, name: str) -> None:
    # Concrete values only: inside a jit trace the check is skipped, not faked.
    if isinstance(array, jax.core.Tracer):
        return
    finite = np.isfinite(np.asarray(array))
    if not finite.all():
        bad = int(finite.size - finite.sum())
        raise ValueError(f"{name}: expected finite values, found {bad} NaN or inf entries")


def check_design(x, name: str = "x") -> jax.Array:
    """Return ``x`` as a finite float array of shape (n, d), or raise naming ``name``."""
    x = _as_float_array(x, name)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-d array (num_samples, dim), got shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty (num_samples, dim) array, got shape {x.shape}")
    _check_finite(x, name)
    return x


def check_response(y, num_samples: int, name: str = "y") -> jax.Array:
    """Return ``y`` as a finite float array of shape (num_samples,), or raise naming ``name``."""
    y = _as_float_array(y, name)
    if y.ndim != 1:
        raise ValueError(f"{name}: expected a 1-d array of length {num_samples}, got shape {y.shape}")
    if y.shape[0] != num_samples:
        raise ValueError(
            f"{name}: expected length {num_samples} to match x's rows, got length {y.shape[0]}"
        )
    _check_finite(y, name)
    return y


def check_positive_int(value, name: str, minimum: int = 1) -> int:
    """Return ``value`` as an int >= ``minimum``, or raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value}")
    return int(value)


def check_num_experts(num_experts, dim: int, *, require_k_le_d: bool) -> int:
    """Validate the number of experts against the input dimension."""
    num_experts = check_positive_int(num_experts, "num_experts", minimum=1)
    if require_k_le_d and num_experts > dim:
        raise ValueError(
            f"num_experts: expected at most dim={dim} experts (the experts must be linearly "
            f"independent), got {num_experts}"
        )
    return num_experts


def check_positive(value, name: str) -> float:
    """Return ``value`` as a finite float > 0, or raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real | np.ndarray | jax.Array):
        raise TypeError(f"{name}: expected a positive number, got {value!r}")
    value = float(value)
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {value}")
    return value


def check_key(key, name: str = "key") -> jax.Array:
    """Return a JAX PRNG key, or raise naming ``name``.

    Accepts typed keys (``jax.random.key``) and raw uint32 keys (``jax.random.PRNGKey``).
    """
    if key is None:
        raise TypeError(f"{name}: expected a JAX PRNG key, e.g. jax.random.key(0), got None")
    if isinstance(key, jax.Array):
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ():
            return key
        if key.dtype == jnp.uint32 and key.shape == (2,):
            return key
    raise TypeError(
        f"{name}: expected a JAX PRNG key, e.g. jax.random.key(0), got "
        f"{type(key).__name__} with shape {getattr(key, 'shape', None)}"
    )
