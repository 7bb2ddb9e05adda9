"""Checks at the public boundary: each error names the argument, what was expected and what came."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_moe._params import MoEParams

__all__ = [
    "ReliabilityWarning",
    "check_design",
    "check_key",
    "check_nonnegative",
    "check_num_experts",
    "check_params",
    "check_positive",
    "check_positive_int",
    "check_response",
]


class ReliabilityWarning(UserWarning):
    """A result was computed but its assumptions failed: it may not be trustworthy."""


def _as_float_array(value, name: str) -> jax.Array:
    try:
        if isinstance(value, jax.Array | jax.core.Tracer):
            array = jnp.asarray(value)
        else:
            # Host data: put on the device as it is (jnp.asarray compiles a staging program for
            # every new shape; device_put compiles nothing).
            host = np.asarray(value)
            if host.dtype.kind not in "biufc":
                raise TypeError(f"dtype {host.dtype}")
            array = jax.device_put(host)
    except (TypeError, ValueError) as error:
        dtype = getattr(value, "dtype", None)
        given = type(value).__name__ + (f" of dtype {dtype}" if dtype is not None else "")
        raise TypeError(f"{name}: expected a numeric array, got {given}") from error
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


def check_gate_x(gate_x, num_samples: int, name: str = "gate_x") -> jax.Array | None:
    """The gate's own covariates validated as a finite (n, q) array in JAX's default float dtype
    with ``num_samples`` rows (one per row of x), or None (the gate reads x)."""
    if gate_x is None:
        return None
    gate_x = check_design(gate_x, name)
    if gate_x.shape[0] != num_samples:
        raise ValueError(f"{name}: expected {num_samples} rows (one per row of x), got {gate_x.shape[0]}")
    return gate_x.astype(jnp.result_type(float))


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


def _as_real_number(value, name: str, expected: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real | np.ndarray | jax.Array):
        raise TypeError(f"{name}: expected {expected}, got {value!r}")
    if isinstance(value, np.ndarray | jax.Array) and (
        value.size != 1
        or not (jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer))
    ):
        raise TypeError(f"{name}: expected {expected}, got an array of dtype {value.dtype} and shape {value.shape}")
    return float(np.asarray(value).reshape(()))


def check_positive(value, name: str) -> float:
    """Return ``value`` as a finite float > 0, or raise naming ``name``."""
    value = _as_real_number(value, name, "a positive number")
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {value}")
    return value


def check_nonnegative(value, name: str) -> float:
    """Return ``value`` as a finite float >= 0, or raise naming ``name``."""
    value = _as_real_number(value, name, "a number >= 0")
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {value}")
    return value


def check_probability(value, name: str) -> float:
    """Return ``value`` as a float strictly between 0 and 1, or raise naming ``name``."""
    value = _as_real_number(value, name, "a number strictly between 0 and 1")
    if not 0 < value < 1:
        raise ValueError(f"{name}: expected a number strictly between 0 and 1, got {value}")
    return value


def _count_nonfinite(value) -> int:
    if isinstance(value, jax.core.Tracer):  # inside a trace: shapes only
        return 0
    array = np.asarray(value)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        return array.size
    return int(array.size - np.isfinite(array).sum())


def check_params(
    value,
    name: str = "params",
    *,
    dim: int | None = None,
    num_experts: int | None = None,
    require_noise: bool = False,
    gate_dim: int | None = None,
) -> MoEParams:
    """Return ``value`` as a well-formed `MoEParams` with noise of shape (k,), or raise naming ``name``.

    Checks: the type; experts (k, d) and gates (k, q) (all k gate rows, the last zero; q = d
    unless ``gate_dim`` says the gate reads q covariates of its own);
    intercepts of shape (k,) when set; a noise of shape () (broadcast to (k,)) or (k,); finite
    experts, gates and intercepts; ``dim`` columns and ``num_experts`` rows when given; and, with
    ``require_noise``, finite noise > 0 (needed wherever the likelihood is evaluated). Values
    inside a jit trace are not checked (shapes are).
    """
    if not isinstance(value, MoEParams):
        hint = ""
        if isinstance(getattr(value, "params", None), MoEParams):
            hint = " (pass its .params)"
        elif hasattr(value, "to_params"):
            hint = " (use its .to_params())"
        raise TypeError(f"{name}: expected MoEParams, got {type(value).__name__}{hint}")
    experts_shape, gates_shape = np.shape(value.experts), np.shape(value.gates)
    if len(experts_shape) != 2 or 0 in experts_shape:
        raise ValueError(f"{name}: expected experts of shape (k, d), got shape {experts_shape}")
    k, d = experts_shape
    expected_gate_dim = d if gate_dim is None else gate_dim
    if len(gates_shape) != 2 or gates_shape[0] != k or (k > 1 and gates_shape[1] != expected_gate_dim):
        inputs = "x" if gate_dim is None else "gate_x"
        # Only the width is off, and no gate_x was given: a record fitted with gate covariates.
        width_only = gate_dim is None and len(gates_shape) == 2 and gates_shape[0] == k
        hint = "; a gate with covariates of its own needs gate_x" if width_only else ""
        raise ValueError(
            f"{name}: expected gates of shape ({k}, {expected_gate_dim}) (all k gate rows, the last zero; "
            f"one column per column of {inputs}), got gates {gates_shape} with experts {experts_shape}{hint}"
        )
    for field in ("expert_intercepts", "gate_intercepts"):
        intercepts = getattr(value, field)
        if intercepts is not None and np.shape(intercepts) != (k,):
            raise ValueError(f"{name}: expected {field} of shape ({k},), got shape {np.shape(intercepts)}")
    if np.shape(value.noise) not in ((), (k,)):
        raise ValueError(
            f"{name}: expected noise of shape ({k},) (one sd per expert) or () (shared), got shape "
            f"{np.shape(value.noise)}"
        )
    if dim is not None and d != dim:
        raise ValueError(f"{name}: expected experts with {dim} columns like x, got {d}")
    if num_experts is not None and k != num_experts:
        raise ValueError(f"{name}: expected {num_experts} experts, got {k}")
    for field in ("experts", "gates", "expert_intercepts", "gate_intercepts"):
        field_value = getattr(value, field)
        bad = 0 if field_value is None else _count_nonfinite(field_value)
        if bad:
            raise ValueError(f"{name}: expected finite {field}, found {bad} NaN or inf entries")
    if require_noise and not isinstance(value.noise, jax.core.Tracer):
        noise = np.asarray(value.noise)
        if _count_nonfinite(noise) or not np.all(noise > 0):
            raise ValueError(f"{name}: expected noise > 0 (finite standard deviations), got {noise}")
    if np.shape(value.noise) == ():
        value = value.replace(noise=jnp.broadcast_to(jnp.asarray(value.noise), (k,)))
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
