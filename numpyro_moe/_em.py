"""Expectation-maximisation for the mixture of experts (DESIGN section 4).

One EM iteration, compiled once per (link, which blocks are updated) and run in blocks inside
``lax.while_loop`` so a Python loop can show progress between blocks without recompiling:

- E-step: responsibilities ``r_ni`` from the model's joint log-probabilities.
- Gates: ``argmax sum_n sum_i r_ni log softmax(W x_n)_i`` over W with the last row zero, a convex
  soft-label multinomial logistic regression (a 1e-8 ridge keeps it strictly convex when the
  labels separate). Each iteration takes one Newton step on it, with a step search, from the
  current gate (``gate_steps``, default 1) rather than solving it to tolerance (Jordan and Jacobs
  1994 solve it by IRLS; this is one of its iterations): a generalised EM (Dempster, Laird and
  Rubin 1977) with the same fixed points, since at a fixed point the step is zero, i.e. the gate
  solves its M-step. The targets move little between iterations, so the solves to tolerance spent
  most of their Newton steps, each a pass over the data, on a problem about to change. Measured
  side by side with up to 50 steps per iteration: on the papers' setting (d = 10, k = 3, n = 1,000 to 200,000)
  `fit_moe` reached the same optimum in as many iterations 2.5-3x faster; on d = 10, k = 8,
  n = 4,000 (``benchmarks/speed.py`` part C, 10 seeds per gate scale) the same optimum on every
  seed, median times 4.1 s -> 1.1 s and 13.9 s -> 4.9 s. The streamed EM
  (`numpyro_moe._streamed`) takes the same step.
- Experts (joint EM only): the weighted least squares ``sum_n r_ni (y_n - g(a_i . x_n))^2`` by
  damped Gauss-Newton with a step search; for the linear link one step is the exact solution.
- Noise: shared, ``s^2 = sum_n sum_i r_ni (y_n - g(a_i . x_n))^2 / n``; or one per expert,
  ``s_i^2 = sum_n r_ni (y_n - g(a_i . x_n))^2 / sum_n r_ni``.

Penalised (MAP) EM (Fraley and Raftery 2007, "Bayesian regularization for normal mixture estimation
and model-based clustering"): with a `Penalty` (the model's priors, `penalty_from_priors`), every
block maximises the expected complete-data log-likelihood plus the log prior instead, in closed
form: Normal priors on gates and experts add their precision to the Newton and Gauss-Newton systems
(a ridge towards the prior mean), and the noise step solves the stationarity equation of the
expected log-likelihood plus the noise prior (InverseGamma(alpha, beta) on s: a quadratic in s;
HalfNormal(tau): a quadratic in s^2). The prior on s keeps a component that collapses onto a few
points from an unbounded likelihood, and the gate prior keeps separating gates finite.

Student-t experts, ``y | z = i ~ StudentT(nu_i, g(a_i . x + c_i), s_i)``, by ECM with latent
precision weights (Liu and Rubin 1995, "ML estimation of the t distribution using EM and its
extensions, ECM and ECME"; McLachlan and Peel 2000, "Finite Mixture Models", ch. 7): given z = i a
point's precision u ~ Gamma(nu_i / 2, nu_i / 2) and y | u ~ Normal(mu_i, s_i^2 / u). The E-step adds
``u_ni = E[u | y_n, z = i] = (nu_i + 1) / (nu_i + ((y_n - mu_ni) / s_i)^2)`` (small for outliers);
the experts' least squares take the weights ``r_ni u_ni``, the noise step the squares
``sum_n r_ni u_ni res_ni^2`` over the count ``sum_n r_ni``; the gates are unchanged; and each nu_i
(when estimated) maximises its part of the expected complete-data log-likelihood (plus, when
penalised, a Gamma(alpha, beta) prior's log density) by solving the ECM equation

    (1/2) {n_i [log(nu/2) - psi(nu/2) + 1 + psi((nu_old + 1)/2) - log((nu_old + 1)/2)]
           + sum_n r_ni (log u_ni - u_ni)} + (alpha - 1) / nu - beta = 0,   n_i = sum_n r_ni,

by bisection in log nu over [0.5, 200] (the left side decreases in nu, so its root, or the bound
it passes, is the maximiser).

Every block only increases its objective (expected complete-data log-likelihood, plus the log prior
when penalised), so the log-likelihood (penalised: the log posterior) never decreases
(generalised EM, ECM). Blocks can be held fixed (experts, gates, noise; the degrees of freedom).
Intercepts are handled by a column of ones appended to x. The joint log-probabilities are
`MixtureOfExperts`' ``component_log_probs``: the same likelihood as the NumPyro model.
"""

from __future__ import annotations

import contextlib
import contextvars
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.scipy.special import digamma, logsumexp

from numpyro_moe._distribution import MixtureOfExperts
from numpyro_moe._links import Link
from numpyro_moe._model import contrast_quadratic
from numpyro_moe._params import MoEParams

__all__ = [
    "EMResult", "Penalty", "em_iterations", "flat_penalty", "padded_at_least", "padded_size", "penalty_from_priors",
    "split_augmented", "to_augmented",
]

_RIDGE = 1e-8
# Degrees of freedom of Student-t experts: the interval the ECM step searches (below 0.5 the t has
# hardly a centre; above 200 it is Gaussian to 1e-4 in log density within 3 scales), the bisection
# steps in log nu (60 halvings of log 400: far below float64 resolution), and the default start.
DF_BOUNDS = (0.5, 200.0)
_DF_STEPS = 60
DF_START = 4.0


class _State(NamedTuple):
    experts: jax.Array  # (k, p), p = d (+ 1 with intercepts)
    gates: jax.Array  # (k, p), last row zero
    noise: jax.Array  # (k,)
    log_likelihood: jax.Array  # mean per point, before the latest iteration's update
    change: jax.Array
    iteration: jax.Array
    history: jax.Array  # (max_iterations,) objective (log-likelihood + log prior / n) before each iteration
    df: jax.Array | None = None  # (k,) Student-t degrees of freedom; None: Gaussian experts


class EMResult(NamedTuple):
    experts: jax.Array
    gates: jax.Array
    noise: jax.Array
    log_likelihood: np.ndarray  # mean per point
    objective: np.ndarray  # mean log-likelihood + log prior / n
    history: np.ndarray
    iterations: np.ndarray
    weights: np.ndarray  # (k,) sum_n r_ni
    entropy: np.ndarray  # -sum_ni r_ni log r_ni
    df: jax.Array | None = None  # Student-t degrees of freedom, or None


class Penalty(NamedTuple):
    """Log prior of penalised EM, in the forms its closed-form M-steps use (p = d (+ 1)).

    Coefficients: ``-0.5 sum precision * (value - loc)^2`` (Normal priors; precision 0 is flat).
    Noise s_i: ``-count_i log s_i - inverse_i / s_i - 0.5 square_i s_i^2`` (InverseGamma(alpha,
    beta) on s: count alpha + 1, inverse beta; HalfNormal(tau): square 1 / tau^2; all 0 is flat).
    Student-t degrees of freedom nu_i (when estimated): ``df_power_i log nu_i - df_rate_i nu_i``
    (Gamma(alpha, beta): power alpha - 1, rate beta; both 0 is flat or fixed degrees of freedom).
    """

    expert_loc: jax.Array  # (k, p)
    expert_precision: jax.Array  # (k, p)
    gate_loc: jax.Array  # (k, p), each expert's row (`gate_prior_terms`)
    gate_precision: jax.Array  # (k, p)
    noise_count: jax.Array  # (k,)
    noise_inverse: jax.Array  # (k,)
    noise_square: jax.Array  # (k,)
    df_power: jax.Array  # (k,)
    df_rate: jax.Array  # (k,)


def _module(*values):
    """NumPy for concrete values (host-side set-up compiles nothing), jax.numpy inside a trace."""
    return jnp if any(isinstance(value, jax.core.Tracer) for value in values) else np


def flat_penalty(num_experts: int, width: int, dtype, gate_width: int | None = None) -> Penalty:
    """No prior: plain maximum-likelihood EM (``gate_width``: the gate's columns, default ``width``)."""
    zeros = np.zeros((num_experts, width), dtype)
    gate_zeros = np.zeros((num_experts, width if gate_width is None else gate_width), dtype)
    flat = np.zeros((num_experts,), dtype)
    return Penalty(zeros, zeros, gate_zeros, gate_zeros, flat, flat, flat, flat, flat)


def _normal_prior(prior, name: str, shape: tuple[int, ...]):
    if not isinstance(prior, dist.Normal):
        raise ValueError(
            f"priors[{name!r}]: EM's closed-form M-steps take a Normal prior here, got "
            f"{type(prior).__name__}; use fit_map for other priors"
        )
    xp = _module(prior.loc, prior.scale)
    loc = xp.broadcast_to(xp.asarray(prior.loc), shape)
    return loc, xp.broadcast_to(1.0 / xp.asarray(prior.scale) ** 2, shape)


def _noise_prior(prior, shape: tuple[int, ...]):
    if isinstance(prior, dist.InverseGamma):
        xp = _module(prior.concentration, prior.rate)
        count = xp.broadcast_to(xp.asarray(prior.concentration) + 1.0, shape)
        return count, xp.broadcast_to(xp.asarray(prior.rate), shape), np.zeros(shape)
    if isinstance(prior, dist.HalfNormal):
        xp = _module(prior.scale)
        return np.zeros(shape), np.zeros(shape), xp.broadcast_to(1.0 / xp.asarray(prior.scale) ** 2, shape)
    raise ValueError(
        f"priors['noise']: EM's closed-form noise step takes an InverseGamma or HalfNormal prior on "
        f"the noise sd, got {type(prior).__name__}; use fit_map for other priors"
    )


def _df_prior(prior, shape: tuple[int, ...]):
    if isinstance(prior, dist.Exponential):  # Gamma(1, rate)
        xp = _module(prior.rate)
        return np.zeros(shape), xp.broadcast_to(xp.asarray(prior.rate), shape)
    if isinstance(prior, dist.Gamma):
        xp = _module(prior.concentration, prior.rate)
        concentration = xp.broadcast_to(xp.asarray(prior.concentration), shape)
        if not isinstance(concentration, jax.core.Tracer) and not bool(np.all(concentration >= 1)):
            raise ValueError(
                "priors['df']: EM's degrees-of-freedom step takes a Gamma prior with concentration >= 1 "
                f"(a log-concave one), got concentration {np.asarray(prior.concentration).tolist()}; use "
                "fit_map for other priors"
            )
        return concentration - 1.0, xp.broadcast_to(xp.asarray(prior.rate), shape)
    raise ValueError(
        f"priors['df']: EM's degrees-of-freedom step takes a Gamma or Exponential prior, got "
        f"{type(prior).__name__}; "
        "use fit_map for other priors"
    )


def penalty_from_priors(
    priors: dict, num_experts: int, dim: int, *, intercepts: bool, dtype, estimate_df: bool = False,
    gate_dim: int | None = None,
) -> Penalty:
    """The `Penalty` of a complete priors dict (every site of `moe_priors`), for augmented
    parameters (intercepts as a last column when ``intercepts``); ``gate_dim`` is the gate's
    number of inputs (default ``dim``); with ``estimate_df``, the prior of the Student-t degrees
    of freedom (``priors["df"]``, a Gamma) too."""
    k = num_experts
    expert_loc, expert_precision = _normal_prior(priors["experts"], "experts", (k, dim))
    gate_loc, gate_precision = _normal_prior(priors["gates"], "gates", (k, dim if gate_dim is None else gate_dim))
    if intercepts:
        bias_loc, bias_precision = _normal_prior(priors["expert_intercepts"], "expert_intercepts", (k,))
        xp = _module(expert_loc, expert_precision, bias_loc, bias_precision)
        expert_loc = xp.concatenate([expert_loc, bias_loc[:, None]], axis=1)
        expert_precision = xp.concatenate([expert_precision, bias_precision[:, None]], axis=1)
        bias_loc, bias_precision = _normal_prior(priors["gate_intercepts"], "gate_intercepts", (k,))
        xp = _module(gate_loc, gate_precision, bias_loc, bias_precision)
        gate_loc = xp.concatenate([gate_loc, bias_loc[:, None]], axis=1)
        gate_precision = xp.concatenate([gate_precision, bias_precision[:, None]], axis=1)
    count, inverse, square = _noise_prior(priors["noise"], (k,))
    power = rate = np.zeros((k,))
    if estimate_df:
        power, rate = _df_prior(priors["df"], (k,))
    leaves = (expert_loc, expert_precision, gate_loc, gate_precision, count, inverse, square, power, rate)
    # Host (NumPy) arrays when the priors are concrete: nothing is compiled to set them up.
    xp = _module(*leaves)
    return Penalty(*(xp.asarray(leaf, dtype) for leaf in leaves))


def gate_prior_terms(free, loc, precision):
    """The gate prior on the free rows of gates whose last row is zero: each expert's gate row
    ``w_i`` (all k of them) Normal(``loc_i``, ``precision_i^-1/2``) entry by entry, and the common
    shift of the rows (which the softmax ignores) integrated out. The free rows are the contrasts
    ``w_i - w_k``; per column a, their prior precision is the Schur complement
    ``P_a = diag(pi_a) - pi_a pi_a^T / (sum of all k rows' precisions in column a)`` (pi_a: the
    first k - 1 rows' precisions), the same for every labelling of the experts.

    Returns ``(value, gradient, hessian)``: half the quadratic form ``sum_a r_a^T P_a r_a`` of
    ``r = free - (loc[:-1] - loc[-1])``, its gradient (k - 1, p) and its Hessian ((k-1) p, (k-1) p)
    in the row-major order of ``free``."""
    k1, p = free.shape
    weights = precision[:-1]
    total = jnp.sum(precision, axis=0)
    safe = jnp.where(total > 0, total, 1.0)
    residual = free - (loc[:-1] - loc[-1])
    weighted = jnp.sum(weights * residual, axis=0)
    value = 0.5 * contrast_quadratic(residual, precision)
    gradient = weights * residual - weights * jnp.where(total > 0, weighted / safe, 0.0)
    blocks = jax.vmap(jnp.diag, in_axes=1)(weights) - jnp.where(
        (total > 0)[:, None, None], weights.T[:, :, None] * weights.T[:, None, :] / safe[:, None, None], 0.0
    )  # (p, k - 1, k - 1)
    hessian = jnp.einsum("aij,ab->iajb", blocks, jnp.eye(p, dtype=free.dtype)).reshape(k1 * p, k1 * p)
    return value, gradient, hessian


def log_prior(experts, gates, noise, penalty: Penalty, df=None) -> jax.Array:
    """The penalty's log prior (up to a constant) of augmented parameters (and of the Student-t
    degrees of freedom ``df``, when given)."""
    gate = gate_prior_terms(gates[:-1] - gates[-1:], penalty.gate_loc, penalty.gate_precision)[0]
    coefficients = -0.5 * jnp.sum(penalty.expert_precision * (experts - penalty.expert_loc) ** 2) - gate
    total = coefficients + jnp.sum(
        -penalty.noise_count * jnp.log(noise) - penalty.noise_inverse / noise - 0.5 * penalty.noise_square * noise**2
    )
    if df is not None:
        total = total + jnp.sum(penalty.df_power * jnp.log(df) - penalty.df_rate * df)
    return total


def to_augmented(params: MoEParams, intercepts: bool):
    """Experts and gates (last row zero) with intercepts as a last column (when ``intercepts``);
    leading axes of stacked records are kept."""
    leaves = [params.experts, params.gates, params.expert_intercepts, params.gate_intercepts]
    xp = _module(*(leaf for leaf in leaves if leaf is not None))
    experts, gates = xp.asarray(params.experts), xp.asarray(params.gates)
    gates = gates - gates[..., -1:, :]
    if not intercepts:
        return experts, gates
    zeros = xp.zeros(experts.shape[:-1], experts.dtype)
    expert_bias = zeros if params.expert_intercepts is None else xp.asarray(params.expert_intercepts)
    gate_bias = zeros if params.gate_intercepts is None else xp.asarray(params.gate_intercepts)
    gate_bias = gate_bias - gate_bias[..., -1:]
    return (
        xp.concatenate([experts, expert_bias[..., None].astype(experts.dtype)], axis=-1),
        xp.concatenate([gates, gate_bias[..., None].astype(gates.dtype)], axis=-1),
    )


def split_augmented(experts, gates, noise, intercepts: bool, link: Link, df=None) -> MoEParams:
    """Inverse of `to_augmented` (``df``: the Student-t degrees of freedom, or None)."""
    if not intercepts:
        return MoEParams(experts, gates, noise, link=link, df=df)
    return MoEParams(experts[..., :-1], gates[..., :-1], noise, experts[..., -1], gates[..., -1], link, df)


def _joint(experts, gates, noise, x, gate_x, y, link_function, df=None):
    """(n, k) log [P(z = i | gate_x_n) p_i(y_n)], p_i the expert's Normal(g(a_i . x_n), s_i^2) or,
    with ``df``, StudentT(nu_i, g(a_i . x_n), s_i)."""
    return MixtureOfExperts(
        gate_x @ gates.T, link_function(x @ experts.T), noise, expert_df=df
    ).component_log_probs(y)


def _gate_objective(free, x, targets, loc, precision, n):
    """Mean soft-label cross-entropy of gates whose last row is zero, plus their Normal prior's
    penalty, over the n points (padding rows carry no targets), and a tiny ridge."""
    logits = jnp.concatenate([x @ free.T, jnp.zeros((x.shape[0], 1), x.dtype)], axis=1)
    cross_entropy = -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1)) / n
    penalty = gate_prior_terms(free, loc, precision)[0] / n
    return cross_entropy + penalty + 0.5 * _RIDGE * jnp.sum(free**2)


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


def _gate_newton(gates, x, targets, tol, max_steps, loc, precision, n):
    """Minimise `_gate_objective` over the free rows by Newton's method with a step search (n: the
    number of real points; padding rows are zero in x and in ``targets``, so they add nothing)."""
    free = gates[:-1]
    k1, p = free.shape
    if k1 == 0:  # one expert: the gate is constant
        return gates
    rows = x.shape[0]

    def step(carry):
        free, _, count = carry
        logits = jnp.concatenate([x @ free.T, jnp.zeros((rows, 1), x.dtype)], axis=1)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        prior_value, prior_gradient, prior_hessian = gate_prior_terms(free, loc, precision)
        current = -jnp.sum(targets * log_probs) / n + prior_value / n + 0.5 * _RIDGE * jnp.sum(free**2)
        probs = jnp.exp(log_probs[:, :-1])
        gradient = (probs - targets[:, :-1]).T @ x / n + prior_gradient / n + _RIDGE * free
        # Hessian blocks sum_n (p_ni delta_ij - p_ni p_nj) x_n x_n^T, as two plain matrix
        # products over an (n, (k-1) p) matrix (XLA's CPU einsum of three operands is far slower).
        weighted = (probs[:, :, None] * x[:, None, :]).reshape(rows, k1 * p)
        diagonal = (weighted.T @ x).reshape(k1, p, p) / n
        hessian = -(weighted.T @ weighted).reshape(k1, p, k1, p) / n
        hessian = hessian + jnp.einsum("iab,ij->iajb", diagonal, jnp.eye(k1, dtype=x.dtype))
        hessian = hessian.reshape(k1 * p, k1 * p) + prior_hessian / n + _RIDGE * jnp.eye(k1 * p, dtype=x.dtype)
        direction = jnp.linalg.solve(hessian, gradient.reshape(-1)).reshape(k1, p)
        new_free, accepted = _backtrack(
            lambda candidate: _gate_objective(candidate, x, targets, loc, precision, n),
            free,
            -direction,
            current=current,
        )
        return new_free, jnp.where(accepted, jnp.max(jnp.abs(gradient)), 0.0), count + 1

    def keep_going(carry):
        _, gradient_size, count = carry
        return (gradient_size > tol) & (count < max_steps)

    free, _, _ = jax.lax.while_loop(keep_going, step, (free, jnp.asarray(jnp.inf, x.dtype), 0))
    return jnp.concatenate([free, jnp.zeros((1, p), free.dtype)], axis=0)


def _expert_gauss_newton(experts, x, y, weights, link_function, num_steps, noise, loc, precision):
    """Decrease sum_n w_ni (y_n - g(a_i . x_n))^2 + s_i^2 sum_j precision_ij (a_ij - loc_ij)^2
    for each expert i (damped Gauss-Newton; the second term is the Normal prior's penalty, scaled
    by the expert's noise variance s_i^2 as in a ridge regression)."""
    ridge = noise[:, None] ** 2 * precision  # (k, p)

    def loss(experts):
        fit = jnp.sum(weights * (y[:, None] - link_function(x @ experts.T)) ** 2, axis=0)
        return fit + jnp.sum(ridge * (experts - loc) ** 2, axis=1)

    def step(experts, _):
        pre = x @ experts.T
        means, slopes = jax.jvp(link_function, (pre,), (jnp.ones_like(pre),))
        residual = y[:, None] - means
        scaled = weights * slopes**2  # (n, k)
        rows, k = scaled.shape
        normal = ((scaled[:, :, None] * x[:, None, :]).reshape(rows, k * x.shape[1]).T @ x).reshape(k, x.shape[1], x.shape[1])
        normal = normal + jax.vmap(jnp.diag)(ridge)
        rhs = (weights * slopes * residual).T @ x - ridge * (experts - loc)
        damping = 1e-10 * jnp.trace(normal, axis1=1, axis2=2)[:, None, None] + 1e-30
        direction = jnp.linalg.solve(normal + damping * jnp.eye(x.shape[1], dtype=x.dtype), rhs[..., None])[..., 0]
        # The loss separates over experts, so its sum decreases iff the step is a descent step
        # for the experts taken together; halve the step until it is.
        experts, _ = _backtrack(lambda candidate: jnp.sum(loss(candidate)), experts, direction)
        return experts, None

    experts, _ = jax.lax.scan(step, experts, None, length=num_steps)
    return experts


def _noise_mode(count, squares, penalty_count, inverse, square):
    """argmax_s -(count + penalty_count) log s - squares / (2 s^2) - inverse / s - square s^2 / 2,
    for a prior with ``inverse`` or ``square`` zero (InverseGamma, HalfNormal or flat)."""
    total = count + penalty_count
    # InverseGamma (square = 0): total s^2 - inverse s - squares = 0, its positive root.
    by_inverse = (inverse + jnp.sqrt(inverse**2 + 4 * total * squares)) / (2 * jnp.maximum(total, 1e-300))
    # HalfNormal (inverse = 0): square v^2 + total v - squares = 0 in v = s^2 (stable root).
    by_square = jnp.sqrt(2 * squares / (total + jnp.sqrt(total**2 + 4 * squares * square) + 1e-300))
    return jnp.where(square > 0, by_square, by_inverse)


def _noise_step(targets, residual, y, shared_noise, penalty: Penalty, n, precisions=None):
    """The noise M-step: the responsibility-weighted mean squared residual, pooled or per expert
    (an expert with no responsibility keeps the pooled value), moved by the noise prior to the
    mode of the penalised objective; floored far below any real noise. Student-t experts weight
    each square by the point's expected precision (``precisions``, (n, k) u_ni) too."""
    squares = targets * residual**2 if precisions is None else targets * precisions * residual**2
    return noise_from_sums(
        jnp.sum(targets, axis=0), jnp.sum(squares, axis=0), n, jnp.sum(y**2), shared_noise, penalty
    )


def noise_from_sums(weight, squares, n, y_squares, shared_noise, penalty: Penalty):
    """`_noise_step` from its sums: ``weight`` (k,) sum_n r_ni, ``squares`` (k,) the weighted
    squared residuals of each expert, ``n`` points and ``y_squares`` = sum_n y_n^2."""
    k = weight.shape[0]
    first = lambda leaf: leaf[0]  # noqa: E731  (a shared noise has one prior: the first entry's)
    pooled = _noise_mode(
        n, jnp.sum(squares),
        first(penalty.noise_count), first(penalty.noise_inverse), first(penalty.noise_square),
    )
    if shared_noise:
        scale = jnp.full(k, pooled)
    else:
        own = _noise_mode(weight, squares, penalty.noise_count, penalty.noise_inverse, penalty.noise_square)
        usable = (weight > 1e-12) | (penalty.noise_count > 0) | (penalty.noise_inverse > 0)
        scale = jnp.where(usable, own, pooled)
    return jnp.maximum(scale, jnp.sqrt(1e-24 * y_squares / n + 1e-300))


def _df_step(targets, precisions, df, penalty: Penalty):
    """The ECM step for the Student-t degrees of freedom nu_i: the maximiser over [0.5, 200] of
    the expected complete-data log-likelihood's nu-part plus the Gamma prior's log density, by
    bisection in log nu on its derivative (decreasing in nu, so one sign change at most).

    ``targets`` and ``precisions`` are (n, k) r_ni and u_ni at the current nu (``df``, (k,)).
    An expert with no responsibility and no prior keeps its nu.
    """
    weight = jnp.sum(targets, axis=0)  # n_i
    pooled = jnp.sum(targets * (jnp.log(precisions) - precisions), axis=0)  # sum_n r_ni (log u - u)
    return df_from_sums(weight, pooled, df, penalty)


def df_from_sums(weight, pooled, df, penalty: Penalty):
    """`_df_step` from its sums: ``weight`` (k,) sum_n r_ni and ``pooled`` (k,)
    sum_n r_ni (log u_ni - u_ni)."""
    half = (df + 1.0) / 2.0
    constant = weight * (1.0 + digamma(half) - jnp.log(half)) + pooled

    def derivative(nu):
        return 0.5 * (weight * (jnp.log(nu / 2.0) - digamma(nu / 2.0)) + constant) + (
            penalty.df_power / nu - penalty.df_rate
        )

    def halve(_, bounds):
        low, high = bounds
        middle = (low + high) / 2.0
        rising = derivative(jnp.exp(middle)) > 0  # the maximiser lies above the middle
        return jnp.where(rising, middle, low), jnp.where(rising, high, middle)

    dtype = df.dtype
    low = jnp.full_like(df, np.log(DF_BOUNDS[0]), dtype=dtype)
    high = jnp.full_like(df, np.log(DF_BOUNDS[1]), dtype=dtype)
    low, high = jax.lax.fori_loop(0, _DF_STEPS, halve, (low, high))
    solved = jnp.exp((low + high) / 2.0)
    usable = (weight > 1e-12) | (penalty.df_power > 0) | (penalty.df_rate > 0)
    return jnp.where(usable, solved, df)


def _em_step(
    state: _State, x, gate_x, y, mask, penalty, estimate_df, link_function, updates, shared_noise, expert_steps, gate_tol,
    gate_steps,
):
    update_experts, update_gates, update_noise = updates
    df = state.df
    joint = _joint(state.experts, state.gates, state.noise, x, gate_x, y, link_function, df)
    pointwise = logsumexp(joint, axis=-1)
    n = jnp.sum(mask)  # the real points; padding rows (mask 0) have no responsibility
    # Fixed degrees of freedom have no prior in the penalty (zero power and rate): no term here.
    log_likelihood = (
        jnp.sum(mask * pointwise) + log_prior(state.experts, state.gates, state.noise, penalty, df)
    ) / n
    targets = jnp.exp(joint - pointwise[:, None]) * mask[:, None]
    precisions = None
    if df is not None:  # Student-t experts: the E-step's expected precisions u_ni (old parameters)
        standardized = (y[:, None] - link_function(x @ state.experts.T)) / state.noise
        precisions = (df + 1.0) / (df + standardized**2)
    gates = state.gates
    if update_gates:
        gates = _gate_newton(
            gates, gate_x, targets, gate_tol, gate_steps, penalty.gate_loc, penalty.gate_precision, n
        )
    experts = state.experts
    if update_experts:
        experts = _expert_gauss_newton(
            experts, x, y, targets if precisions is None else targets * precisions, link_function,
            expert_steps, state.noise, penalty.expert_loc, penalty.expert_precision,
        )
    noise = state.noise
    if update_noise:
        noise = _noise_step(
            targets, y[:, None] - link_function(x @ experts.T), y, shared_noise, penalty, n, precisions
        )
    if df is not None:  # a traced switch: fixed and estimated degrees of freedom share one program
        df = jnp.where(estimate_df, _df_step(targets, precisions, df, penalty), df)
    return _State(
        experts, gates, noise, log_likelihood, jnp.abs(log_likelihood - state.log_likelihood),
        state.iteration + 1, state.history.at[state.iteration].set(log_likelihood), df,
    )


ACCELERATE_AFTER = 100
"""``accelerate="auto"``: EM iterations run plainly before SQUAREM takes over a fit still moving.
Fits that converge sooner (most do, in tens of iterations) never compile the accelerated program."""

# SQUAREM's largest extrapolation (Varadhan and Roland 2008 bound the step length to keep the
# extrapolated point near the EM path; the step is then doubled up to this after each success).
_SQUAREM_MAX_STEP = 64.0


def _flat(state: _State) -> jax.Array:
    """The parameters SQUAREM extrapolates, unconstrained: experts, gates, log noise, log df."""
    parts = [state.experts.ravel(), state.gates.ravel(), jnp.log(state.noise)]
    if state.df is not None:
        parts.append(jnp.log(state.df))
    return jnp.concatenate(parts)


def _unflat(vector, like: _State, updates, estimate_df) -> _State:
    """``like`` with the updated blocks taken from ``vector`` (held blocks stay exactly as they are)."""
    update_experts, update_gates, update_noise = updates
    sizes = [like.experts.size, like.gates.size, like.noise.size]
    experts, gates, log_noise, rest = jnp.split(vector, np.cumsum(sizes))
    df = like.df
    if df is not None and update_noise:
        df = jnp.where(estimate_df, jnp.exp(rest), df)
    return like._replace(
        experts=experts.reshape(like.experts.shape) if update_experts else like.experts,
        gates=gates.reshape(like.gates.shape) if update_gates else like.gates,
        noise=jnp.exp(log_noise) if update_noise else like.noise,
        df=df,
    )


def _squarem(state: _State, step, max_step, updates, estimate_df):
    """One SQUAREM cycle (Varadhan and Roland 2008, "Simple and globally convergent methods for
    accelerating the convergence of any EM algorithm", scheme S3): two EM steps theta_1, theta_2
    from theta_0, the extrapolation theta' = theta_0 - 2 alpha r + alpha^2 v (r = theta_1 - theta_0,
    v = theta_2 - 2 theta_1 + theta_0, alpha = -|r| / |v|, at most ``max_step`` long), then one EM
    step from theta'. Monotone safeguard: theta' is kept only when its objective is at least theta_1's
    (the EM step from it then only increases it); else the cycle ends at theta_2. Returns the new
    state and the next step bound (doubled after a success, reset to 1 after a failure)."""
    first = step(state)
    second = step(first)
    theta0, theta1, theta2 = _flat(state), _flat(first), _flat(second)
    r, v = theta1 - theta0, theta2 - 2.0 * theta1 + theta0
    norm_v = jnp.sqrt(jnp.sum(v**2))
    alpha = -jnp.clip(jnp.sqrt(jnp.sum(r**2)) / jnp.where(norm_v > 0, norm_v, 1.0), 1.0, max_step)
    alpha = jnp.where(norm_v > 0, alpha, -1.0)
    extrapolated = _unflat(theta0 - 2.0 * alpha * r + alpha**2 * v, second, updates, estimate_df)
    polished = step(extrapolated)  # its log_likelihood field: the objective at theta'
    accepted = jnp.isfinite(polished.log_likelihood) & (polished.log_likelihood >= second.log_likelihood)
    chosen = jax.tree_util.tree_map(lambda a, b: jnp.where(accepted, a, b), polished, second)
    # The history: theta_0's and theta_1's objectives, then theta''s when accepted.
    chosen = chosen._replace(
        history=jnp.where(accepted, polished.history, second.history),
        iteration=jnp.where(accepted, polished.iteration, second.iteration),
    )
    return chosen, jnp.where(accepted, jnp.minimum(2.0 * max_step, _SQUAREM_MAX_STEP), 1.0)


@partial(
    jax.jit,
    static_argnames=("link_function", "updates", "shared_noise", "expert_steps", "gate_steps", "block", "accelerate"),
)
def _em_block(
    state, x, gate_x, y, mask, penalty, estimate_df, tol, gate_tol, cap, *, link_function, updates, shared_noise,
    expert_steps, gate_steps, block, accelerate=False,
):
    """Up to ``block`` EM iterations (with ``accelerate``, SQUAREM cycles of three); stops once the
    objective's change (log-likelihood plus log prior, per point) is below ``tol`` or ``cap``
    iterations are done (a traced count: a short screen and a run to convergence share the
    program), at most the history buffer's length. Returns the state and `_summary` at its parameters (one
    more E-step per block, in the same program: the fit's figures need no program of their own)."""
    start = state.iteration
    limit = jnp.minimum(state.history.shape[-1], cap)

    def keep_going(carry):
        state = carry[0]
        return (state.change >= tol) & (state.iteration - start < block) & (state.iteration < limit)

    def step(state):
        return _em_step(
            state, x, gate_x, y, mask, penalty, estimate_df, link_function, updates, shared_noise, expert_steps, gate_tol,
            gate_steps,
        )

    def body(carry):
        state, max_step = carry
        if not accelerate:
            return step(state), max_step
        # Near the end of the history buffer, plain EM steps.
        return jax.lax.cond(
            state.iteration + 3 <= limit,
            lambda: _squarem(state, step, max_step, updates, estimate_df),
            lambda: (step(state), max_step),
        )

    state, _ = jax.lax.while_loop(keep_going, body, (state, jnp.asarray(1.0, state.history.dtype)))
    summary = _summary(state.experts, state.gates, state.noise, state.df, x, gate_x, y, mask, penalty, link_function)
    return state, summary


def _summary(experts, gates, noise, df, x, gate_x, y, mask, penalty, link_function):
    """Mean log-likelihood per point, (n, k) responsibilities' column sums and their entropy,
    over the real points (mask 1)."""
    joint = _joint(experts, gates, noise, x, gate_x, y, link_function, df)
    pointwise = logsumexp(joint, axis=-1)
    log_responsibilities = joint - pointwise[:, None]
    responsibilities = jnp.exp(log_responsibilities) * mask[:, None]
    entropy = -jnp.sum(responsibilities * jnp.where(responsibilities > 0, log_responsibilities, 0.0))
    n = jnp.sum(mask)
    log_likelihood = jnp.sum(mask * pointwise) / n
    objective = log_likelihood + log_prior(experts, gates, noise, penalty, df) / n
    return log_likelihood, objective, jnp.sum(responsibilities, axis=0), entropy


def padded_size(n: int) -> int:
    """The smallest size m 2^e >= n with m in 4..7 (at least 16): at most 25% padding, and one
    compiled EM program serves every n of a size class."""
    if n <= 16:
        return 16
    exponent = int(n).bit_length() - 3  # n / 2^exponent lies in [4, 8)
    return next(m << exponent for m in (4, 5, 6, 7, 8) if m << exponent >= n)


_ROW_FLOOR: contextvars.ContextVar[int] = contextvars.ContextVar("numpyro_moe_row_floor", default=0)


@contextlib.contextmanager
def padded_at_least(rows: int):
    """Within the block, EM pads its data to at least ``padded_size(rows)`` rows.

    Fits to parts of one data set (cross-validation's folds, 4/5 of the rows) then run the
    programs compiled for the fit to all of it, instead of compiling them again for their own
    size class: in a fresh process, each EM program takes about a second to compile.
    """
    token = _ROW_FLOOR.set(int(rows))
    try:
        yield
    finally:
        _ROW_FLOOR.reset(token)


def _padded(x, gate_x, y):
    """``x``, ``gate_x``, ``y`` with zero rows appended up to `padded_size` (of n, or of the
    floor `padded_at_least` sets), and the (rows,) mask of the real points (host-side padding:
    nothing is compiled for the new n)."""
    n = x.shape[0]
    rows = padded_size(max(n, _ROW_FLOOR.get()))
    dtype = x.dtype
    mask = np.zeros(rows, dtype)
    mask[:n] = 1.0

    def pad(values):
        values = np.asarray(values, dtype)
        if rows == n:
            return values
        return np.concatenate([values, np.zeros((rows - n, *values.shape[1:]), dtype)])

    same = gate_x is x
    x, y = pad(x), pad(y)
    return x, (x if same else pad(gate_x)), y, mask


def em_iterations(
    experts,
    gates,
    noise,
    x,
    y,
    *,
    penalty: Penalty,
    link: Link,
    fix: tuple[str, ...],
    shared_noise: bool,
    max_iterations: int,
    tol: float,
    block: int = 20,
    progress: str | None = None,
    df=None,
    gate_x=None,
    accelerate: bool | str = False,
    gate_steps: int = 1,
    history_length: int | None = None,
) -> EMResult:
    """Run EM from augmented ``experts`` (k, p), ``gates`` (k, p_gate) and ``noise`` (k,); a
    leading start axis is vmapped. The gate reads ``gate_x`` (n, p_gate) when given (its own
    covariates, augmented like x), else x. The parameter groups in ``fix`` (``"experts"``, ``"gates"``, ``"noise"``,
    ``"df"``) keep their starting values; ``penalty`` is the log prior (`flat_penalty` for none).
    ``df`` (k,) are the starting degrees of freedom of Student-t experts (ECM), None for Gaussian
    experts; they are estimated unless ``"df"`` or ``"noise"`` is in ``fix``. ``gate_steps``: the
    Newton steps on the gate per iteration (at most; fewer once its gradient is below 1e-9, 1e-5
    in float32): 1, the generalised EM of the module's note, or more to solve each M-step.
    ``accelerate``: SQUAREM cycles (`_squarem`) instead of single EM steps; ``"auto"``: plain
    steps for the first `ACCELERATE_AFTER` iterations (to the end of that block), SQUAREM cycles
    after them while any start still moves. ``history_length``: the history buffer's length (at
    least ``max_iterations``; the default), a shape of the compiled program: a short screen with
    the full run's length compiles nothing more for that run.

    Returns an `EMResult` with, per start, the final parameters, mean log-likelihood and
    objective, the (max_iterations,) objective history (valid up to ``iterations``), the
    iteration count, each expert's total responsibility and the responsibilities' entropy.
    Progress (a tqdm bar named ``progress``) is updated between compiled blocks of ``block``
    iterations.
    """
    expert_steps = 1 if link.name == "linear" else 3
    batched = experts.ndim == 3
    dtype = x.dtype
    shape = experts.shape[:1] if batched else ()
    estimate_df = df is not None and "df" not in fix and "noise" not in fix
    if not estimate_df:  # held degrees of freedom: their prior is a constant, left out
        penalty = penalty._replace(df_power=np.zeros(np.shape(penalty.df_power)), df_rate=np.zeros(np.shape(penalty.df_rate)))
    updates = ("experts" not in fix, "gates" not in fix, "noise" not in fix)
    # The starting state on the host (NumPy): setting it up compiles nothing.
    state = _State(
        np.asarray(experts, dtype),
        np.asarray(gates, dtype),
        np.broadcast_to(np.asarray(noise, dtype), experts.shape[:-1]),
        np.full(shape, -np.inf, dtype),
        np.full(shape, np.inf, dtype),
        np.zeros(shape, np.int32),
        np.full(shape + (max(max_iterations, history_length or 0),), np.nan, dtype),
        None if df is None else np.broadcast_to(np.asarray(df, dtype), experts.shape[:-1]),
    )

    def program(accelerated: bool):
        run = partial(
            _em_block, link_function=link.function, updates=updates, shared_noise=shared_noise,
            expert_steps=expert_steps, gate_steps=gate_steps, block=block, accelerate=accelerated,
        )
        return jax.vmap(run, in_axes=(0, None, None, None, None, None, None, None, None, None)) if batched else run

    plain = program(accelerate is True)
    # "auto": the accelerated program is built (and compiled) only for a fit that needs it.
    switched = program(True) if accelerate == "auto" else plain
    gate_x = x if gate_x is None else np.asarray(gate_x, dtype)
    # Padding to a size of a coarse ladder: EM's programs compile once per structure and size
    # class, not for every n (padding rows are zero and masked out).
    x, gate_x, y, mask = _padded(x, gate_x, y)
    tol_array = np.asarray(tol, dtype)
    cap = np.asarray(max_iterations, np.int32)
    gate_tol = np.asarray(1e-9 if dtype == jnp.float64 else 1e-5, dtype)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_iterations, desc=progress, leave=False)
    while True:
        before = int(np.max(np.asarray(state.iteration)))
        run = switched if before >= ACCELERATE_AFTER else plain
        state, summary = run(state, x, gate_x, y, mask, penalty, np.asarray(estimate_df), tol_array, gate_tol, cap)
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
    log_likelihood, objective, weights, entropy = summary
    # Host arrays out too: what the callers slice and stack next compiles nothing.
    return EMResult(
        np.asarray(state.experts), np.asarray(state.gates), np.asarray(state.noise), np.asarray(log_likelihood),
        np.asarray(objective), np.asarray(state.history), iterations, np.asarray(weights), np.asarray(entropy),
        None if state.df is None else np.asarray(state.df),
    )
