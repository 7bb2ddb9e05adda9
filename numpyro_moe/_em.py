"""Expectation-maximisation for the mixture of experts (DESIGN section 4).

One EM iteration, compiled once per (link, which blocks are updated) and run in blocks inside
``lax.while_loop`` so a Python loop can show progress between blocks without recompiling:

- E-step: responsibilities ``r_ni`` from the model's joint log-probabilities.
- Gates: ``argmax sum_n sum_i r_ni log softmax(W x_n)_i`` over W with the last row zero, a convex
  soft-label multinomial logistic regression, solved by Newton's method to tolerance
  (a 1e-8 ridge keeps it strictly convex when the labels separate).
- Experts (joint EM only): the weighted least squares ``sum_n r_ni (y_n - g(a_i . x_n))^2`` by
  damped Gauss-Newton with a step search; for the linear link one step is the exact solution.
- Noise: shared, ``s^2 = sum_n sum_i r_ni (y_n - g(a_i . x_n))^2 / n``; or one per expert,
  ``s_i^2 = sum_n r_ni (y_n - g(a_i . x_n))^2 / sum_n r_ni``.

Every block only increases the expected complete-data log-likelihood, so the log-likelihood never
decreases (generalised EM). Blocks can be held fixed (experts, gates, noise). Intercepts are handled
by a column of ones appended to x. The joint log-probabilities are `MixtureOfExperts`'
``component_log_probs``: the same likelihood as the NumPyro model.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

from numpyro_moe._distribution import MixtureOfExperts
from numpyro_moe._links import Link
from numpyro_moe._params import MoEParams

__all__ = ["em_iterations", "split_augmented", "to_augmented"]

_RIDGE = 1e-8


class _State(NamedTuple):
    experts: jax.Array  # (k, p), p = d (+ 1 with intercepts)
    gates: jax.Array  # (k, p), last row zero
    noise: jax.Array  # (k,)
    log_likelihood: jax.Array  # mean per point, before the latest iteration's update
    change: jax.Array
    iteration: jax.Array
    history: jax.Array  # (max_iterations,) log_likelihood before each iteration


def to_augmented(params: MoEParams, intercepts: bool):
    """Experts and gates (last row zero) with intercepts as a last column (when ``intercepts``);
    leading axes of stacked records are kept."""
    experts, gates = jnp.asarray(params.experts), jnp.asarray(params.gates)
    gates = gates - gates[..., -1:, :]
    if not intercepts:
        return experts, gates
    zeros = jnp.zeros(experts.shape[:-1], experts.dtype)
    expert_bias = zeros if params.expert_intercepts is None else jnp.asarray(params.expert_intercepts)
    gate_bias = zeros if params.gate_intercepts is None else jnp.asarray(params.gate_intercepts)
    gate_bias = gate_bias - gate_bias[..., -1:]
    return (
        jnp.concatenate([experts, expert_bias[..., None].astype(experts.dtype)], axis=-1),
        jnp.concatenate([gates, gate_bias[..., None].astype(gates.dtype)], axis=-1),
    )


def split_augmented(experts, gates, noise, intercepts: bool, link: Link) -> MoEParams:
    """Inverse of `to_augmented`."""
    if not intercepts:
        return MoEParams(experts, gates, noise, link=link)
    return MoEParams(experts[..., :-1], gates[..., :-1], noise, experts[..., -1], gates[..., -1], link)


def _joint(experts, gates, noise, x, y, link_function):
    """(n, k) log [P(z = i | x_n) Normal(y_n; g(a_i . x_n), s_i^2)]."""
    return MixtureOfExperts(x @ gates.T, link_function(x @ experts.T), noise).component_log_probs(y)


def _gate_objective(free, x, targets):
    """Mean soft-label cross-entropy (+ ridge) of gates whose last row is zero."""
    logits = jnp.concatenate([x @ free.T, jnp.zeros((x.shape[0], 1), x.dtype)], axis=1)
    cross_entropy = -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1))
    return cross_entropy + 0.5 * _RIDGE * jnp.sum(free**2)


def _backtrack(objective, point, direction, max_halvings=10, current=None):
    """``point + t direction`` for the largest t in 1, 1/2, 1/4, ... that lowers ``objective``.

    Returns ``(new_point, accepted)``; ``point`` itself when no step up to 2^-max_halvings
    lowers it (so an EM block never decreases the likelihood). ``current`` is
    ``objective(point)`` when the caller has it already.
    """
    current = objective(point) if current is None else current

    def keep_halving(carry):
        step, value, halvings = carry
        return (value >= current) & (halvings < max_halvings)

    def halve(carry):
        step, _, halvings = carry
        step = step / 2
        return step, objective(point + step * direction), halvings + 1

    one = jnp.asarray(1.0, point.dtype)
    step, value, _ = jax.lax.while_loop(keep_halving, halve, (one, objective(point + direction), 0))
    accepted = value < current
    return jnp.where(accepted, point + step * direction, point), accepted


def _gate_newton(gates, x, targets, tol, max_steps):
    """Minimise `_gate_objective` over the free rows by Newton's method with a step search."""
    free = gates[:-1]
    k1, p = free.shape
    if k1 == 0:  # one expert: the gate is constant
        return gates
    n = x.shape[0]

    def step(carry):
        free, _, count = carry
        logits = jnp.concatenate([x @ free.T, jnp.zeros((n, 1), x.dtype)], axis=1)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        current = -jnp.mean(jnp.sum(targets * log_probs, axis=-1)) + 0.5 * _RIDGE * jnp.sum(free**2)
        probs = jnp.exp(log_probs[:, :-1])
        gradient = (probs - targets[:, :-1]).T @ x / n + _RIDGE * free
        # Hessian blocks sum_n (p_ni delta_ij - p_ni p_nj) x_n x_n^T, as two plain matrix
        # products over an (n, (k-1) p) matrix (XLA's CPU einsum of three operands is far slower).
        weighted = (probs[:, :, None] * x[:, None, :]).reshape(n, k1 * p)
        diagonal = (weighted.T @ x).reshape(k1, p, p) / n
        hessian = -(weighted.T @ weighted).reshape(k1, p, k1, p) / n
        hessian = hessian + jnp.einsum("iab,ij->iajb", diagonal, jnp.eye(k1, dtype=x.dtype))
        hessian = hessian.reshape(k1 * p, k1 * p) + _RIDGE * jnp.eye(k1 * p, dtype=x.dtype)
        direction = jnp.linalg.solve(hessian, gradient.reshape(-1)).reshape(k1, p)
        new_free, accepted = _backtrack(
            lambda candidate: _gate_objective(candidate, x, targets), free, -direction, current=current
        )
        return new_free, jnp.where(accepted, jnp.max(jnp.abs(gradient)), 0.0), count + 1

    def keep_going(carry):
        _, gradient_size, count = carry
        return (gradient_size > tol) & (count < max_steps)

    free, _, _ = jax.lax.while_loop(keep_going, step, (free, jnp.asarray(jnp.inf, x.dtype), 0))
    return jnp.concatenate([free, jnp.zeros((1, p), free.dtype)], axis=0)


def _expert_gauss_newton(experts, x, y, weights, link_function, num_steps):
    """Decrease sum_n w_ni (y_n - g(a_i . x_n))^2 for each expert i (damped Gauss-Newton)."""

    def loss(experts):
        return jnp.sum(weights * (y[:, None] - link_function(x @ experts.T)) ** 2, axis=0)

    def step(experts, _):
        pre = x @ experts.T
        means, slopes = jax.jvp(link_function, (pre,), (jnp.ones_like(pre),))
        residual = y[:, None] - means
        scaled = weights * slopes**2  # (n, k)
        rows, k = scaled.shape
        normal = ((scaled[:, :, None] * x[:, None, :]).reshape(rows, k * x.shape[1]).T @ x).reshape(k, x.shape[1], x.shape[1])
        rhs = (weights * slopes * residual).T @ x
        damping = 1e-10 * jnp.trace(normal, axis1=1, axis2=2)[:, None, None] + 1e-30
        direction = jnp.linalg.solve(normal + damping * jnp.eye(x.shape[1], dtype=x.dtype), rhs[..., None])[..., 0]
        # The loss separates over experts, so its sum decreases iff the step is a descent step
        # for the experts taken together; halve the step until it is.
        experts, _ = _backtrack(lambda candidate: jnp.sum(loss(candidate)), experts, direction)
        return experts, None

    experts, _ = jax.lax.scan(step, experts, None, length=num_steps)
    return experts


def _noise_step(targets, residual, y, shared_noise):
    """The noise M-step: the responsibility-weighted mean squared residual, pooled or per expert
    (an expert with no responsibility keeps the pooled value); floored far below any real noise."""
    squares = targets * residual**2
    pooled = jnp.sum(squares) / y.shape[0]
    if shared_noise:
        variance = jnp.full(targets.shape[1], pooled)
    else:
        weight = jnp.sum(targets, axis=0)
        variance = jnp.where(weight > 1e-12, jnp.sum(squares, axis=0) / jnp.maximum(weight, 1e-12), pooled)
    return jnp.sqrt(jnp.maximum(variance, 1e-24 * jnp.mean(y**2) + 1e-300))


def _em_step(state: _State, x, y, link_function, updates, shared_noise, expert_steps, gate_tol, gate_steps):
    update_experts, update_gates, update_noise = updates
    joint = _joint(state.experts, state.gates, state.noise, x, y, link_function)
    pointwise = logsumexp(joint, axis=-1)
    log_likelihood = jnp.mean(pointwise)
    targets = jnp.exp(joint - pointwise[:, None])
    gates = _gate_newton(state.gates, x, targets, gate_tol, gate_steps) if update_gates else state.gates
    experts = state.experts
    if update_experts:
        experts = _expert_gauss_newton(experts, x, y, targets, link_function, expert_steps)
    noise = state.noise
    if update_noise:
        noise = _noise_step(targets, y[:, None] - link_function(x @ experts.T), y, shared_noise)
    return _State(
        experts, gates, noise, log_likelihood, jnp.abs(log_likelihood - state.log_likelihood),
        state.iteration + 1, state.history.at[state.iteration].set(log_likelihood),
    )


@partial(
    jax.jit,
    static_argnames=("link_function", "updates", "shared_noise", "expert_steps", "gate_steps", "block"),
)
def _em_block(state, x, y, tol, gate_tol, *, link_function, updates, shared_noise, expert_steps, gate_steps, block):
    """Up to ``block`` EM iterations; stops once the log-likelihood change is below ``tol`` or
    the history buffer (``max_iterations``) is full."""
    start = state.iteration
    limit = state.history.shape[-1]

    def keep_going(state):
        return (state.change >= tol) & (state.iteration - start < block) & (state.iteration < limit)

    def body(state):
        return _em_step(state, x, y, link_function, updates, shared_noise, expert_steps, gate_tol, gate_steps)

    return jax.lax.while_loop(keep_going, body, state)


@partial(jax.jit, static_argnames=("link_function",))
def _final_log_likelihood(experts, gates, noise, x, y, *, link_function):
    return jnp.mean(logsumexp(_joint(experts, gates, noise, x, y, link_function), axis=-1))


def em_iterations(
    experts,
    gates,
    noise,
    x,
    y,
    *,
    link: Link,
    fix: tuple[str, ...],
    shared_noise: bool,
    max_iterations: int,
    tol: float,
    block: int = 20,
    progress: str | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, np.ndarray, np.ndarray, np.ndarray]:
    """Run EM from augmented ``experts``/``gates`` (k, p) and ``noise`` (k,); a leading start
    axis is vmapped. The parameter groups in ``fix`` (``"experts"``, ``"gates"``, ``"noise"``)
    keep their starting values.

    Returns ``(experts, gates, noise, log_likelihood, history, iterations)`` with, per start,
    the final mean log-likelihood, the (max_iterations,) history buffer (valid up to
    ``iterations``) and the iteration count. Progress (a tqdm bar named ``progress``) is updated
    between compiled blocks of ``block`` iterations.
    """
    expert_steps = 1 if link.name == "linear" else 3
    batched = experts.ndim == 3
    dtype = x.dtype
    shape = experts.shape[:1] if batched else ()
    updates = ("experts" not in fix, "gates" not in fix, "noise" not in fix)
    state = _State(
        experts.astype(dtype),
        gates.astype(dtype),
        jnp.broadcast_to(jnp.asarray(noise, dtype), experts.shape[:-1]),
        jnp.full(shape, -jnp.inf, dtype),
        jnp.full(shape, jnp.inf, dtype),
        jnp.zeros(shape, jnp.int32),
        jnp.full(shape + (max_iterations,), jnp.nan, dtype),
    )
    run = partial(
        _em_block, link_function=link.function, updates=updates, shared_noise=shared_noise,
        expert_steps=expert_steps, gate_steps=50, block=block,
    )
    final = partial(_final_log_likelihood, link_function=link.function)
    if batched:
        run = jax.vmap(run, in_axes=(0, None, None, None, None))
        final = jax.vmap(final, in_axes=(0, 0, 0, None, None))
    tol_array = jnp.asarray(tol, dtype)
    gate_tol = jnp.asarray(1e-9 if dtype == jnp.float64 else 1e-5, dtype)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_iterations, desc=progress, leave=False)
    while True:
        before = int(np.max(np.asarray(state.iteration)))
        state = run(state, x, y, tol_array, gate_tol)
        iterations = np.asarray(state.iteration)
        after = int(np.max(iterations))
        if bar is not None:
            bar.update(after - before)
            bar.set_postfix(loglik=f"{float(np.max(np.asarray(state.log_likelihood))):.5f}")
        active = (np.asarray(state.change) >= tol) & (iterations < max_iterations)
        if not active.any():
            break
    if bar is not None:
        bar.close()
    log_likelihood = final(state.experts, state.gates, state.noise, x, y)
    return (
        state.experts, state.gates, state.noise, np.asarray(log_likelihood),
        np.asarray(state.history), iterations,
    )
