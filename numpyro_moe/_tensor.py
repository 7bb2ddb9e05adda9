"""Decomposition of an orthogonally decomposable symmetric tensor T = sum_i lambda_i v_i^{(x)3}.

The robust tensor power method (Anandkumar, Ge, Hsu, Kakade, Telgarsky, JMLR 2014): for each
component, ``num_restarts`` random starts run ``num_iterations`` power steps
``v <- T(I, v, v) / ||T(I, v, v)||``, the start with the largest ``T(v, v, v)`` is refined by
another ``num_iterations`` steps, and ``lambda v^{(x)3}`` is deflated from T. In JAX, jitted, with
an explicit key. TensorLy's ``symmetric_parafac_power_iteration`` is the cross-checked alternative.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["TensorDecomposition", "decompose_symmetric_tensor"]

DECOMPOSITIONS = ("power", "tensorly")


class TensorDecomposition(NamedTuple):
    """``eigenvalues`` (k,) and unit ``eigenvectors`` (k, k) (one per row), and ``residual``,
    the relative Frobenius error ||T - sum_i lambda_i v_i^{(x)3}|| / ||T||."""

    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    residual: float


def _apply(tensor, vectors):
    """T(I, v, v) for each row v of ``vectors`` (L, k)."""
    return jnp.einsum("abc,lb,lc->la", tensor, vectors, vectors)


def _power_steps(tensor, vectors, num_iterations):
    def step(vectors, _):
        image = _apply(tensor, vectors)
        return image / jnp.linalg.norm(image, axis=-1, keepdims=True), None

    vectors, _ = jax.lax.scan(step, vectors, None, length=num_iterations)
    return vectors


def _values(tensor, vectors):
    return jnp.einsum("abc,la,lb,lc->l", tensor, vectors, vectors, vectors)


@partial(jax.jit, static_argnames=("num_components", "num_restarts", "num_iterations"))
def _robust_power_method(tensor, key, num_components, num_restarts, num_iterations):
    size = tensor.shape[0]

    def component(tensor, component_key):  # find one component, then deflate it
        starts = jax.random.normal(component_key, (num_restarts, size), tensor.dtype)
        starts = starts / jnp.linalg.norm(starts, axis=-1, keepdims=True)
        candidates = _power_steps(tensor, starts, num_iterations)
        best = candidates[jnp.argmax(_values(tensor, candidates))][None]
        best = _power_steps(tensor, best, num_iterations)
        value = _values(tensor, best)[0]
        vector = best[0]
        deflated = tensor - value * jnp.einsum("a,b,c->abc", vector, vector, vector)
        return deflated, (value, vector)

    # One compiled loop over the components (not an unrolled one per component).
    tensor, (eigenvalues, eigenvectors) = jax.lax.scan(
        component, tensor, jax.random.split(key, num_components)
    )
    return eigenvalues, eigenvectors, tensor


def _tensorly_power_method(tensor, key, num_components, num_restarts, num_iterations):
    import tensorly as tl
    from tensorly.decomposition import symmetric_parafac_power_iteration

    # TensorLy draws its starts from NumPy's global generator: seed it from the key, then restore.
    seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        with tl.backend_context("numpy"):
            weights, factor = symmetric_parafac_power_iteration(
                tl.tensor(np.asarray(tensor, dtype=np.float64)),
                rank=num_components,
                n_repeat=num_restarts,
                n_iteration=num_iterations,
            )
    finally:
        np.random.set_state(state)
    return np.asarray(weights), np.asarray(factor).T


def decompose_symmetric_tensor(
    tensor,
    num_components: int,
    *,
    key: jax.Array,
    method: str = "power",
    num_restarts: int = 10,
    num_iterations: int = 50,
) -> TensorDecomposition:
    """Decompose a symmetric (k, k, k) tensor into ``num_components`` positive rank-one terms.

    Components come back with ``lambda_i > 0`` (a sign flip ``(-lambda, -v)`` is the same term),
    ordered by decreasing ``lambda``.
    """
    if method not in DECOMPOSITIONS:
        raise ValueError(f"decomposition: expected one of {DECOMPOSITIONS}, got {method!r}")
    tensor = np.asarray(tensor, dtype=np.float64)
    if method == "power":
        with jax.enable_x64(True):
            values, vectors, _ = _robust_power_method(
                jnp.asarray(tensor), key, num_components, num_restarts, num_iterations
            )
            values, vectors = np.asarray(values), np.asarray(vectors)
    else:
        values, vectors = _tensorly_power_method(tensor, key, num_components, num_restarts, num_iterations)
    signs = np.where(values < 0, -1.0, 1.0)
    values, vectors = values * signs, vectors * signs[:, None]
    order = np.argsort(-values)
    values, vectors = values[order], vectors[order]
    rebuilt = np.einsum("i,ia,ib,ic->abc", values, vectors, vectors, vectors)
    residual = float(np.linalg.norm(tensor - rebuilt) / max(np.linalg.norm(tensor), 1e-300))
    return TensorDecomposition(values, vectors, residual)
