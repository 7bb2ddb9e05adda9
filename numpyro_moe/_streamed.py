"""EM over data read in chunks: memory flat in n, for data that do not fit in memory.

The same penalised EM (or ECM for Student-t experts) as `numpyro_moe._em`, with every sum over the
data taken chunk by chunk from a `DataSource` (a NumPy memmap, a Dask array, an iterable of
chunks) through the moments' staging path (`numpyro_moe._moments`: fixed-size blocks, the last
zero-padded and masked, so each pass compiles once per model structure, whatever n). One iteration
reads the data twice:

1. At the current parameters: the log-likelihood, the responsibilities' sums, and the sufficient
   statistics of the M-step: the gate's soft-label cross-entropy with its gradient and Hessian, and
   each expert's weighted Gauss-Newton normal equations (weights r_ni, times the latent precisions
   u_ni for Student-t experts) with its weighted squared residuals.
2. The gate's Newton step and each expert's Gauss-Newton step are then tried at the step lengths
   1, 1/2, ..., 1/1024 at once: the pass evaluates every candidate's objective (with the
   responsibilities of the current parameters), and the longest step that lowers it is taken (no
   step if none does), as the in-memory EM's step search.

So each iteration takes one Newton step on the gate and one Gauss-Newton step per expert (exact for
the linear link) rather than solving the gate's M-step to tolerance: a generalised EM (ECM), whose
objective (log-likelihood plus log prior) never decreases and whose fixed points are the in-memory
EM's. The noise and the Student-t degrees of freedom take their closed-form or one-dimensional steps
from the same sums. Several starts share every pass (vmapped), and a start that has converged stops
moving while the others go on.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

from numpyro_moe._em import (
    _RIDGE,
    EMResult,
    Penalty,
    _joint,
    df_from_sums,
    gate_prior_terms,
    log_prior,
    noise_from_sums,
)
from numpyro_moe._links import Link
from numpyro_moe._moments import DataSource, _accumulate, _blocks, resolve_chunk_size

__all__ = ["DataSummary", "StreamedData", "starting_noise", "streamed", "streamed_em", "summarize"]

# Step lengths tried by the second pass: 1, 1/2, ..., 2^-10 (the in-memory step search's halvings).
_STEPS = 2.0 ** -np.arange(11)


class StreamedData(NamedTuple):
    """A chunk source and the rows per block its passes read."""

    source: DataSource
    chunk_size: int


class DataSummary(NamedTuple):
    """What one pass over the data tells: the number of points, and y's sum and sum of squares."""

    num_samples: int
    y_sum: float
    y_squares: float

    @property
    def y_mean(self) -> float:
        return self.y_sum / self.num_samples

    @property
    def y_std(self) -> float:
        return float(np.sqrt(max(self.y_squares / self.num_samples - self.y_mean**2, 0.0)))


def streamed(source: DataSource, chunk_size: int | None = None) -> StreamedData:
    return StreamedData(source, resolve_chunk_size(chunk_size, source.dim, source.num_samples))


def _mask(x, rows):
    return (jnp.arange(x.shape[0]) < rows).astype(x.dtype)


def _design(x, rows, intercepts: bool):
    """The block with a column of ones when the model has intercepts (zero on padding rows)."""
    if not intercepts:
        return x
    return jnp.concatenate([x, _mask(x, rows)[:, None]], axis=1)


@jax.jit
def _summary_chunk(totals, x, y, rows):
    mask = _mask(x, rows)
    count, y_sum, y_squares, nonfinite = totals
    finite = jnp.all(jnp.isfinite(x), axis=1) & jnp.isfinite(y)
    return (
        count + jnp.sum(mask),
        y_sum + jnp.sum(mask * y),
        y_squares + jnp.sum(mask * y**2),
        nonfinite + jnp.sum(mask * (1.0 - finite)),
    )


def summarize(data: StreamedData) -> DataSummary:
    """One pass: n, sum y, sum y^2; a ValueError when a value is NaN or infinite."""
    dtype = jnp.result_type(float)
    count, y_sum, y_squares, nonfinite = _accumulate(
        _summary_chunk, lambda: tuple(jnp.zeros((), dtype) for _ in range(4)), _blocks(data.source, data.chunk_size)
    )
    if nonfinite > 0:
        raise ValueError(f"x, y: {int(nonfinite)} rows hold NaN or infinite values; drop or impute them first")
    if count < 2:
        raise ValueError(f"x: expected at least 2 rows, got {int(count)}")
    return DataSummary(int(count), float(y_sum), float(y_squares))


@partial(jax.jit, static_argnames=("link_function", "intercepts"))
def _closest_expert_chunk(totals, x, y, rows, experts, *, link_function, intercepts):
    design = _design(x, rows, intercepts)
    means = link_function(jnp.einsum("np,skp->snk", design, experts))
    best = jnp.min((y[None, :, None] - means) ** 2, axis=-1)  # (starts, rows)
    return (totals[0] + jnp.sum(_mask(x, rows) * best, axis=-1),)


def starting_noise(data: StreamedData, experts, noise, summary: DataSummary, link: Link, intercepts: bool):
    """As `numpyro_moe._fit._starting_noise`, streamed: where a start's noise is not finite and
    positive, the residual spread of the closest expert per point."""
    noise = jnp.asarray(noise)
    valid = jnp.all(jnp.isfinite(noise) & (noise > 0), axis=-1, keepdims=True)
    if bool(jnp.all(valid)):
        return noise
    kernel = partial(_closest_expert_chunk, link_function=link.function, intercepts=intercepts)
    (squares,) = _accumulate(
        kernel, lambda: (jnp.zeros(experts.shape[0], experts.dtype),), _blocks(data.source, data.chunk_size), experts
    )
    variance = summary.y_squares / summary.num_samples - summary.y_mean**2
    spread = np.sqrt(np.maximum(squares / summary.num_samples, 1e-6 * variance + 1e-12))
    return jnp.where(valid, noise, jnp.asarray(spread, noise.dtype)[:, None])


class _Sums(NamedTuple):
    """Pass-1 sums for one start."""

    log_likelihood: jax.Array  # sum_n log p(y_n)
    entropy: jax.Array  # -sum r log r
    weight: jax.Array  # (k,) sum_n r_ni
    gate_loss: jax.Array  # -sum_n sum_i r_ni log softmax_i
    gate_gradient: jax.Array  # (k - 1, q) sum_n (p_ni - r_ni) x_n
    gate_diagonal: jax.Array  # (k - 1, q, q) sum_n p_ni x_n x_n^T
    gate_cross: jax.Array  # ((k - 1) q, (k - 1) q) sum_n (p_n x_n)(p_n x_n)^T
    expert_normal: jax.Array  # (k, p, p) sum_n w_ni g'^2 x_n x_n^T
    expert_rhs: jax.Array  # (k, p) sum_n w_ni g' (y_n - g) x_n
    expert_loss: jax.Array  # (k,) sum_n w_ni (y_n - g)^2
    df_sum: jax.Array  # (k,) sum_n r_ni (log u_ni - u_ni) (Student-t), else zeros


def _responsibilities(experts, gates, noise, df, x, y, mask, link_function):
    joint = _joint(experts, gates, noise, x, x, y, link_function, df)
    pointwise = logsumexp(joint, axis=-1)
    log_r = joint - pointwise[:, None]
    r = jnp.exp(log_r) * mask[:, None]
    u = None
    if df is not None:
        standardized = (y[:, None] - link_function(x @ experts.T)) / noise
        u = (df + 1.0) / (df + standardized**2)
    return pointwise, log_r, r, u


def _first_sums(experts, gates, noise, df, x, y, mask, link_function, update_gates, update_experts) -> _Sums:
    pointwise, log_r, r, u = _responsibilities(experts, gates, noise, df, x, y, mask, link_function)
    rows, k = r.shape
    width = x.shape[1]
    log_p = jax.nn.log_softmax(x @ gates.T, axis=-1)
    gate_loss = -jnp.sum(r * log_p)
    k1 = k - 1
    if update_gates and k1 > 0:
        p = jnp.exp(log_p[:, :-1])
        gradient = (p - r[:, :-1]).T @ x
        weighted = (p[:, :, None] * x[:, None, :]).reshape(rows, k1 * width)
        diagonal = (weighted.T @ x).reshape(k1, width, width)
        cross = weighted.T @ weighted
    else:
        gradient = jnp.zeros((k1, width), x.dtype)
        diagonal = jnp.zeros((k1, width, width), x.dtype)
        cross = jnp.zeros((k1 * width, k1 * width), x.dtype)
    w = r if u is None else r * u
    pre = x @ experts.T
    means, slopes = jax.jvp(link_function, (pre,), (jnp.ones_like(pre),))
    residual = y[:, None] - means
    if update_experts:
        scaled = w * slopes**2
        normal = ((scaled[:, :, None] * x[:, None, :]).reshape(rows, k * width).T @ x).reshape(k, width, width)
        rhs = (w * slopes * residual).T @ x
    else:
        normal = jnp.zeros((k, width, width), x.dtype)
        rhs = jnp.zeros((k, width), x.dtype)
    df_sum = jnp.zeros(k, x.dtype) if u is None else jnp.sum(r * (jnp.log(u) - u), axis=0)
    return _Sums(
        jnp.sum(mask * pointwise),
        -jnp.sum(r * jnp.where(r > 0, log_r, 0.0)),
        jnp.sum(r, axis=0),
        gate_loss,
        gradient,
        diagonal,
        cross,
        normal,
        rhs,
        jnp.sum(w * residual**2, axis=0),
        df_sum,
    )


@partial(jax.jit, static_argnames=("link_function", "intercepts", "update_gates", "update_experts"))
def _first_chunk(
    totals, x, y, rows, experts, gates, noise, df, *, link_function, intercepts, update_gates, update_experts
):
    design = _design(x, rows, intercepts)
    mask = _mask(x, rows)
    sums = jax.vmap(
        lambda a, w, s, nu: _first_sums(a, w, s, nu, design, y, mask, link_function, update_gates, update_experts)
    )(experts, gates, noise, df)
    return tuple(total + part for total, part in zip(totals, sums, strict=True))


def _candidate_losses(
    experts, gates, noise, df, gate_steps, expert_steps, x, y, mask, link_function, update_gates, update_experts
):
    """The gate's cross-entropy at each candidate gate (T,) and each expert's weighted squared
    residuals at each candidate (T, k), with the responsibilities of the current parameters
    (zeros for a block that is held fixed)."""
    _, _, r, u = _responsibilities(experts, gates, noise, df, x, y, mask, link_function)
    size, k = expert_steps.shape[:2]
    gate_losses = jnp.zeros(size, x.dtype)
    if update_gates:
        log_p = jax.nn.log_softmax(jnp.einsum("np,tkp->ntk", x, gate_steps), axis=-1)
        gate_losses = -jnp.einsum("nk,ntk->t", r, log_p)
    expert_losses = jnp.zeros((size, k), x.dtype)
    if update_experts:
        w = r if u is None else r * u
        means = link_function(jnp.einsum("np,tkp->ntk", x, expert_steps))
        expert_losses = jnp.einsum("nk,ntk->tk", w, (y[:, None, None] - means) ** 2)
    return gate_losses, expert_losses


@partial(jax.jit, static_argnames=("link_function", "intercepts", "update_gates", "update_experts"))
def _second_chunk(
    totals, x, y, rows, experts, gates, noise, df, gate_steps, expert_steps, *, link_function, intercepts,
    update_gates, update_experts,
):
    design = _design(x, rows, intercepts)
    mask = _mask(x, rows)
    parts = jax.vmap(
        lambda a, w, s, nu, gc, ec: _candidate_losses(
            a, w, s, nu, gc, ec, design, y, mask, link_function, update_gates, update_experts
        )
    )(experts, gates, noise, df, gate_steps, expert_steps)
    return tuple(total + part for total, part in zip(totals, parts, strict=True))


def _gate_penalty(free, loc, precision, n):
    return gate_prior_terms(free, loc, precision)[0] / n + 0.5 * _RIDGE * jnp.sum(free**2)


@partial(jax.jit, static_argnames=("update_gates", "update_experts"))
def _directions(experts, gates, noise, sums: _Sums, n, penalty: Penalty, *, update_gates, update_experts):
    """Each start's Newton direction for the gate's free rows and Gauss-Newton direction per expert,
    and their current objectives (the step search's reference)."""

    def one(experts, gates, noise, sums):
        k, width = gates.shape
        k1 = k - 1
        free, loc, precision = gates[:-1], penalty.gate_loc, penalty.gate_precision
        gate_current = sums.gate_loss / n + _gate_penalty(free, loc, precision, n)
        if update_gates and k1 > 0:
            _, prior_gradient, prior_hessian = gate_prior_terms(free, loc, precision)
            gradient = sums.gate_gradient / n + prior_gradient / n + _RIDGE * free
            hessian = -sums.gate_cross.reshape(k1, width, k1, width) / n
            hessian = hessian + jnp.einsum("iab,ij->iajb", sums.gate_diagonal / n, jnp.eye(k1, dtype=gates.dtype))
            hessian = hessian.reshape(k1 * width, k1 * width) + prior_hessian / n + _RIDGE * jnp.eye(
                k1 * width, dtype=gates.dtype
            )
            gate_direction = -jnp.linalg.solve(hessian, gradient.reshape(-1)).reshape(k1, width)
        else:
            gate_direction = jnp.zeros_like(free)
        gate_direction = jnp.concatenate([gate_direction, jnp.zeros((1, width), gates.dtype)], axis=0)
        ridge = noise[:, None] ** 2 * penalty.expert_precision
        expert_current = sums.expert_loss + jnp.sum(ridge * (experts - penalty.expert_loc) ** 2, axis=1)
        if update_experts:
            p = experts.shape[1]
            normal = sums.expert_normal + jax.vmap(jnp.diag)(ridge)
            rhs = sums.expert_rhs - ridge * (experts - penalty.expert_loc)
            damping = 1e-10 * jnp.trace(normal, axis1=1, axis2=2)[:, None, None] + 1e-30
            expert_direction = jnp.linalg.solve(normal + damping * jnp.eye(p, dtype=experts.dtype), rhs[..., None])[
                ..., 0
            ]
        else:
            expert_direction = jnp.zeros_like(experts)
        return gate_direction, gate_current, expert_direction, expert_current

    return jax.vmap(one)(experts, gates, noise, sums)


@partial(jax.jit, static_argnames=("updates", "shared_noise", "estimate_df"))
def _take_steps(
    experts, gates, noise, df, sums: _Sums, gate_direction, gate_current, expert_direction, expert_current,
    gate_losses, expert_losses, n, y_squares, penalty: Penalty, *, updates, shared_noise, estimate_df,
):
    """The longest candidate step that lowers each objective (none if no step does), then the
    noise and degrees-of-freedom steps from the accepted experts' squared residuals."""
    update_experts, update_gates, update_noise = updates
    steps = jnp.asarray(_STEPS, experts.dtype)

    def one(experts, gates, noise, df, sums, gate_direction, gate_current, expert_direction, expert_current,
            gate_losses, expert_losses):
        if update_gates:
            candidates = gates[None] + steps[:, None, None] * gate_direction[None]
            penalties = jax.vmap(
                lambda c: _gate_penalty(c[:-1], penalty.gate_loc, penalty.gate_precision, n)
            )(candidates)
            lower = gate_losses / n + penalties < gate_current
            gates = jnp.where(jnp.any(lower), candidates[jnp.argmax(lower)], gates)
        squares = sums.expert_loss
        if update_experts:
            candidates = experts[None] + steps[:, None, None] * expert_direction[None]  # (T, k, p)
            ridge = noise[:, None] ** 2 * penalty.expert_precision
            objective = expert_losses + jnp.sum(ridge * (candidates - penalty.expert_loc) ** 2, axis=2)  # (T, k)
            lower = objective < expert_current
            first = jnp.argmax(lower, axis=0)  # (k,)
            accepted = jnp.any(lower, axis=0)
            chosen = jnp.take_along_axis(candidates, first[None, :, None], axis=0)[0]
            experts = jnp.where(accepted[:, None], chosen, experts)
            squares = jnp.where(accepted, jnp.take_along_axis(expert_losses, first[None], axis=0)[0], squares)
        if update_noise:
            noise = noise_from_sums(sums.weight, squares, n, y_squares, shared_noise, penalty)
        if df is not None and estimate_df:
            df = df_from_sums(sums.weight, sums.df_sum, df, penalty)
        return experts, gates, noise, df

    return jax.vmap(one)(
        experts, gates, noise, df, sums, gate_direction, gate_current, expert_direction, expert_current,
        gate_losses, expert_losses,
    )


@jax.jit
def _objectives(experts, gates, noise, df, log_likelihood, n, penalty: Penalty):
    priors = jax.vmap(lambda a, w, s, nu: log_prior(a, w, s, penalty, nu))(experts, gates, noise, df)
    return log_likelihood / n, (log_likelihood + priors) / n


def _first_pass(data: StreamedData, experts, gates, noise, df, link: Link, intercepts, update_gates, update_experts):
    count, k, p = experts.shape
    q = gates.shape[-1]
    dtype = experts.dtype

    def zeros():
        return tuple(_Sums(
            jnp.zeros(count, dtype), jnp.zeros(count, dtype), jnp.zeros((count, k), dtype), jnp.zeros(count, dtype),
            jnp.zeros((count, k - 1, q), dtype), jnp.zeros((count, k - 1, q, q), dtype),
            jnp.zeros((count, (k - 1) * q, (k - 1) * q), dtype), jnp.zeros((count, k, p, p), dtype),
            jnp.zeros((count, k, p), dtype), jnp.zeros((count, k), dtype), jnp.zeros((count, k), dtype),
        ))

    kernel = partial(
        _first_chunk, link_function=link.function, intercepts=intercepts, update_gates=update_gates,
        update_experts=update_experts,
    )
    totals = _accumulate(kernel, zeros, _blocks(data.source, data.chunk_size), experts, gates, noise, df)
    return _Sums(*(jnp.asarray(total, dtype) for total in totals))


def _second_pass(
    data: StreamedData, experts, gates, noise, df, gate_steps, expert_steps, link: Link, intercepts, update_gates,
    update_experts,
):
    count, k = experts.shape[:2]
    dtype = experts.dtype
    size = len(_STEPS)
    kernel = partial(
        _second_chunk, link_function=link.function, intercepts=intercepts, update_gates=update_gates,
        update_experts=update_experts,
    )
    totals = _accumulate(
        kernel,
        lambda: (jnp.zeros((count, size), dtype), jnp.zeros((count, size, k), dtype)),
        _blocks(data.source, data.chunk_size),
        experts, gates, noise, df, gate_steps, expert_steps,
    )
    return tuple(jnp.asarray(total, dtype) for total in totals)


def streamed_em(
    data: StreamedData,
    experts,
    gates,
    noise,
    *,
    summary: DataSummary,
    penalty: Penalty,
    link: Link,
    intercepts: bool,
    fix: tuple[str, ...],
    shared_noise: bool,
    max_iterations: int,
    tol: float,
    df=None,
    progress: str | None = None,
    on_iteration: Callable[[int], None] | None = None,
) -> EMResult:
    """EM from augmented starts ``experts`` (starts, k, p), ``gates`` (starts, k, p) (last row
    zero) and ``noise`` (starts, k), over the chunks of ``data``; arguments as `em_iterations`'s
    (``df``: (starts, k) starting Student-t degrees of freedom, or None for Gaussian experts).
    Each iteration reads the data twice (see the module's notes); the result has the same fields.
    """
    dtype = jnp.result_type(float)
    experts, gates = jnp.asarray(experts, dtype), jnp.asarray(gates, dtype)
    count = experts.shape[0]
    noise = jnp.broadcast_to(jnp.asarray(noise, dtype), experts.shape[:-1])
    estimate_df = df is not None and "df" not in fix and "noise" not in fix
    if not estimate_df:
        penalty = penalty._replace(df_power=jnp.zeros_like(penalty.df_power), df_rate=jnp.zeros_like(penalty.df_rate))
    degrees = None if df is None else jnp.broadcast_to(jnp.asarray(df, dtype), experts.shape[:-1])
    update_experts, update_gates, update_noise = ("experts" not in fix, "gates" not in fix, "noise" not in fix)
    update_gates = update_gates and experts.shape[1] > 1
    n = jnp.asarray(summary.num_samples, dtype)
    y_squares = jnp.asarray(summary.y_squares, dtype)
    history = np.full((count, max_iterations), np.nan)
    iterations = np.zeros(count, np.int32)
    previous = np.full(count, -np.inf)
    active = np.ones(count, bool)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_iterations, desc=progress, leave=False)
    for iteration in range(max_iterations):
        sums = _first_pass(data, experts, gates, noise, degrees, link, intercepts, update_gates, update_experts)
        _, objective = (np.asarray(value) for value in _objectives(
            experts, gates, noise, degrees, sums.log_likelihood, n, penalty
        ))
        history[active, iteration] = objective[active]
        iterations[active] += 1
        change = np.abs(objective - previous)
        previous = np.where(active, objective, previous)
        active = active & (change >= tol)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(objective=f"{float(np.max(objective)):.5f}")
        if on_iteration is not None:
            on_iteration(iteration)
        if not active.any() or iteration == max_iterations - 1:
            break
        gate_direction, gate_current, expert_direction, expert_current = _directions(
            experts, gates, noise, sums, n, penalty, update_gates=update_gates, update_experts=update_experts
        )
        steps = jnp.asarray(_STEPS, dtype)
        gate_candidates = gates[:, None] + steps[None, :, None, None] * gate_direction[:, None]
        expert_candidates = experts[:, None] + steps[None, :, None, None] * expert_direction[:, None]
        if update_gates or update_experts:
            gate_losses, expert_losses = _second_pass(
                data, experts, gates, noise, degrees, gate_candidates, expert_candidates, link, intercepts,
                update_gates, update_experts,
            )
        else:
            gate_losses = jnp.zeros((count, len(_STEPS)), dtype)
            expert_losses = jnp.zeros((count, len(_STEPS), experts.shape[1]), dtype)
        stepped = _take_steps(
            experts, gates, noise, degrees, sums, gate_direction, gate_current, expert_direction, expert_current,
            gate_losses, expert_losses, n, y_squares, penalty,
            updates=(update_experts, update_gates, update_noise), shared_noise=shared_noise, estimate_df=estimate_df,
        )
        moving = jnp.asarray(active)
        experts, gates, noise = (
            jnp.where(moving.reshape(-1, *([1] * (new.ndim - 1))), new, old)
            for new, old in zip(stepped[:3], (experts, gates, noise), strict=True)
        )
        if degrees is not None:
            degrees = jnp.where(moving[:, None], stepped[3], degrees)
    if bar is not None:
        bar.close()
    # The final parameters' log-likelihood, weights and entropy: one more pass.
    sums = _first_pass(data, experts, gates, noise, degrees, link, intercepts, False, False)
    log_likelihood, objective = (np.asarray(value) for value in _objectives(
        experts, gates, noise, degrees, sums.log_likelihood, n, penalty
    ))
    return EMResult(
        experts, gates, noise, log_likelihood, objective, history, iterations, np.asarray(sums.weight),
        np.asarray(sums.entropy), degrees,
    )
