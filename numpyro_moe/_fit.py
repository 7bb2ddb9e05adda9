"""Fitting the gate given the experts, and the joint refinement (DESIGN sections 3 and 4).

- `fit_gating`: experts fixed (the ICML 2019 paper proves EM over the gate alone converges to
  the true gate); by EM, by MAP on the NumPyro model, or by gradient descent on the gating loss of
  Makkuva, Oh, Kannan, Viswanath (AISTATS 2020), the negative log-likelihood in W.
- `fit_em`: joint EM over experts, gates and noise from any start; started at the moment
  estimate it removes the estimate's bias when the design assumptions fail.
"""

from __future__ import annotations

import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

from numpyro_moe._em import EMResult, em_iterations, split_augmented, to_augmented
from numpyro_moe._experts import ExpertEstimate
from numpyro_moe._links import Link, resolve_link
from numpyro_moe._map import fit_map
from numpyro_moe._params import MoEParams, expert_means, normalize_gates, pointwise_log_likelihood
from numpyro_moe._validation import (
    ReliabilityWarning,
    check_design,
    check_key,
    check_params,
    check_positive,
    check_positive_int,
    check_response,
)

__all__ = ["EMResult", "GATING_METHODS", "fit_em", "fit_gating", "as_params"]

GATING_METHODS = ("em", "map", "likelihood_gd")


def as_params(value, name: str, dim: int, *, num_experts: int | None = None) -> MoEParams:
    """Accept `MoEParams`, an `ExpertEstimate`, or a (k, d) experts array as a starting point.

    Raises
    ------
    TypeError
        For anything else, e.g. a fit result (``EMResult``, ``MoEFit``, ``MapResult``: pass
        its ``.params``).
    ValueError
        For experts not of shape (k, d) with d = ``dim`` (and k = ``num_experts`` when given),
        gates or intercepts of the wrong shape, or non-finite values.
    """
    if isinstance(value, ExpertEstimate):
        params = value.to_params()
    elif isinstance(value, MoEParams):
        params = value
    elif isinstance(value, tuple) and hasattr(value, "_fields"):  # another result NamedTuple
        check_params(value, name)  # raises a TypeError naming the type (and .params, if any)
    elif hasattr(value, "shape") or isinstance(value, list | tuple):
        try:
            experts = np.asarray(value, dtype=float)
        except (TypeError, ValueError) as error:
            raise TypeError(
                f"{name}: expected MoEParams, ExpertEstimate or a (k, d) array, got {type(value).__name__} "
                "that is not a numeric array"
            ) from error
        if experts.ndim != 2:
            raise ValueError(f"{name}: expected experts of shape (k, d), got shape {experts.shape}")
        params = MoEParams(experts, np.zeros_like(experts), np.asarray(np.nan))
    else:
        raise TypeError(
            f"{name}: expected MoEParams, ExpertEstimate or a (k, d) array, got {type(value).__name__}"
        )
    if np.ndim(params.experts) != 2:
        raise ValueError(f"{name}: expected experts of shape (k, d), got shape {np.shape(params.experts)}")
    return check_params(params, name, dim=dim, num_experts=num_experts)


def _starting_noise(params: MoEParams, noise, x, y, link) -> float:
    if noise is not None:
        return check_positive(noise, "noise")
    if np.isfinite(np.asarray(params.noise)) and float(params.noise) > 0:
        return float(params.noise)
    # Residual spread of the best expert per point: a rough, positive start that EM corrects.
    means = link.function(x @ jnp.asarray(params.experts).T)
    best = jnp.min((y[:, None] - means) ** 2, axis=1)
    return float(jnp.sqrt(jnp.maximum(jnp.mean(best), 1e-6 * jnp.var(y) + 1e-12)))


def resolvable_tol(tol: float, dtype) -> float:
    """``tol`` floored at 8 float epsilons of ``dtype`` (about 1e-6 in float32, 2e-15 in float64).

    The mean log-likelihood per point is O(1), so changes below a few epsilons are rounding: a
    float32 EM with tol=1e-8 otherwise runs to max_iterations (measured: 500 iterations where
    float64 needs 6).
    """
    return max(tol, 8 * float(jnp.finfo(dtype).eps))


def _em_fit(params, x, y, link, *, update_experts, intercepts, max_iterations, tol, progress):
    tol = resolvable_tol(tol, x.dtype)
    experts, gates = to_augmented(params, intercepts)
    design = jnp.concatenate([x, jnp.ones((x.shape[0], 1), x.dtype)], axis=1) if intercepts else x
    experts, gates, noise, log_likelihood, history, iterations = em_iterations(
        experts, gates, params.noise, design, y, link=link, update_experts=update_experts,
        max_iterations=max_iterations, tol=tol, progress=progress,
    )
    iterations = int(iterations)
    converged = iterations < max_iterations or bool(
        iterations > 1 and abs(history[iterations - 1] - history[iterations - 2]) < tol
    )
    if not converged:
        warnings.warn(
            f"EM hit max_iterations={max_iterations} before the log-likelihood change fell below "
            f"tol={tol}; the fit may not have converged: raise max_iterations",
            ReliabilityWarning,
            stacklevel=3,
        )
    result_params = split_augmented(experts, gates, noise, intercepts)
    if not intercepts and params.expert_intercepts is not None:
        result_params = result_params._replace(expert_intercepts=params.expert_intercepts)
    return EMResult(
        params=result_params,
        log_likelihood=float(log_likelihood),
        history=np.asarray(history[:iterations]),
        iterations=iterations,
        converged=converged,
    )


def _check_xy(x, y):
    """Validated (x, y) in JAX's default float dtype (float64 under x64, else float32).

    Narrower float input (float32 under x64, float16) is promoted, as `estimate_experts` does:
    the fits' compiled loops carry the data's dtype and mixing the two is an error.
    """
    x = check_design(x)
    y = check_response(y, x.shape[0])
    dtype = jnp.result_type(float)
    return x.astype(dtype), y.astype(dtype)


def _check_link_output(link: Link, x, params: MoEParams) -> None:
    """Raise (naming ``link``) unless the link maps the experts' (n, k) inputs elementwise."""
    expert_means(params._replace(experts=jnp.asarray(params.experts, x.dtype)), x[:2], link)


def fit_em(
    x,
    y,
    init,
    *,
    link: str | Link = "linear",
    noise: float | None = None,
    intercepts: bool = False,
    fix_experts: bool = False,
    max_iterations: int = 500,
    tol: float = 1e-8,
    progress: bool = False,
) -> EMResult:
    """Joint EM over experts, gates and noise, from any start.

    Parameters
    ----------
    x, y
        (n, d) inputs and (n,) responses; computed in JAX's default float dtype (float32 input
        is promoted to float64 when x64 mode is on).
    init
        Start: `MoEParams`, an `ExpertEstimate` (gates start at zero, i.e. a uniform gate), or a
        (k, d) experts array.
    link
        Expert link.
    noise
        Starting noise sd; default: ``init``'s noise if set, else the residual spread of the
        closest expert per point.
    intercepts
        Fit expert and gate intercepts too (starting from ``init``'s, or zero).
    fix_experts
        Hold the experts at ``init`` (EM over the gate and noise only: see `fit_gating`).
    max_iterations, tol
        Stop after ``max_iterations`` or when the mean log-likelihood per point changes by less
        than ``tol`` (floored at 8 float epsilons of the data's dtype, below which the change is
        rounding); hitting the cap warns (`ReliabilityWarning`).
    progress
        Show a progress bar (updated every 20 iterations).

    Returns
    -------
    EMResult
        The log-likelihood ``history`` never decreases (up to rounding).
    """
    x, y = _check_xy(x, y)
    link = resolve_link(link)
    params = as_params(init, "init", x.shape[1])
    _check_link_output(link, x, params)
    max_iterations = check_positive_int(max_iterations, "max_iterations")
    tol = check_positive(tol, "tol")
    params = normalize_gates(params._replace(noise=jnp.asarray(_starting_noise(params, noise, x, y, link))))
    return _em_fit(
        params, x, y, link, update_experts=not fix_experts, intercepts=intercepts,
        max_iterations=max_iterations, tol=tol, progress="EM" if progress else None,
    )


def minimize_adam(
    loss,
    variables,
    args=(),
    *,
    num_steps: int,
    learning_rate: float,
    cosine_decay: bool = False,
    static=(),
):
    """Minimise ``loss(variables, args, static)`` by ``num_steps`` Adam steps in one compiled scan.

    ``variables`` and ``args`` (the data) are PyTrees of arrays, passed to the compiled program
    rather than baked into it; ``loss`` and ``static`` (hashable settings such as the link) are
    its compile-time constants. With a module-level ``loss`` the program compiles once per shape
    and is reused by later calls. ``learning_rate`` is Adam's step size, held constant, or with
    ``cosine_decay`` decayed along a cosine from it to 1% of it over the run.

    Returns the final variables and the (num_steps,) loss values along the way.
    """
    return _adam_scan(
        variables, args, jnp.asarray(learning_rate), loss=loss, num_steps=num_steps,
        cosine_decay=cosine_decay, static=static,
    )


@partial(jax.jit, static_argnames=("loss", "num_steps", "cosine_decay", "static"))
def _adam_scan(variables, args, learning_rate, *, loss, num_steps, cosine_decay, static):
    if cosine_decay:
        learning_rate = optax.cosine_decay_schedule(learning_rate, num_steps, alpha=0.01)
    optimizer = optax.adam(learning_rate)

    def step(carry, _):
        variables, state = carry
        value, grads = jax.value_and_grad(loss)(variables, args, static)
        updates, state = optimizer.update(grads, state, variables)
        return (optax.apply_updates(variables, updates), state), value

    (variables, _), values = jax.lax.scan(step, (variables, optimizer.init(variables)), None, length=num_steps)
    return variables, values


def _unpack_descent(variables, experts, dtype, dim):
    """MoEParams from Adam's variables: free gate rows (last row zero) and log noise."""
    gates = jnp.concatenate([variables["gates"], jnp.zeros((1, dim), dtype)], axis=0)
    return MoEParams(variables.get("experts", experts), gates, jnp.exp(variables["log_noise"]))


def _negative_log_likelihood(variables, args, link):
    experts, x, y = args
    params = _unpack_descent(variables, experts, x.dtype, x.shape[1])
    return -jnp.mean(pointwise_log_likelihood(params, x, y, link))


def _likelihood_gd(params, x, y, link, *, num_steps, learning_rate, fix_experts):
    """Gradient descent (Adam) on the negative log-likelihood; returns (params, losses)."""
    experts = jnp.asarray(params.experts, x.dtype)
    variables = {
        "gates": jnp.asarray(params.gates[:-1] - params.gates[-1], x.dtype),
        "log_noise": jnp.log(jnp.asarray(params.noise, x.dtype)),
    }
    if not fix_experts:
        variables["experts"] = experts
    variables, values = minimize_adam(
        _negative_log_likelihood, variables, (experts, x, y), num_steps=num_steps,
        learning_rate=learning_rate, static=link,
    )
    return _unpack_descent(variables, experts, x.dtype, x.shape[1]), values


def fit_gating(
    x,
    y,
    experts,
    *,
    link: str | Link = "linear",
    method: str = "em",
    noise: float | None = None,
    key: jax.Array | None = None,
    intercepts: bool = False,
    max_iterations: int = 500,
    tol: float = 1e-8,
    num_steps: int = 2000,
    learning_rate: float = 0.01,
    progress: bool = False,
) -> MoEParams:
    """Learn the gate (and noise) with the experts held fixed.

    Parameters
    ----------
    x, y
        (n, d) inputs and (n,) responses.
    experts
        An `ExpertEstimate`, `MoEParams` (its gates are the start) or a (k, d) array.
    link
        Expert link.
    method
        ``"em"``: EM over the gate, each M-step a convex soft-label multinomial logistic
        regression solved by Newton's method (see `fit_em`; ``max_iterations``, ``tol``).
        ``"map"``: NumPyro SVI with AutoDelta on `moe_regression` with the experts conditioned
        (``handlers.condition``), so the priors count (``num_steps``, ``learning_rate``).
        ``"likelihood_gd"``: Adam on the AISTATS 2020 gating loss, the negative log-likelihood
        in W with the experts fixed (``num_steps``, ``learning_rate``).
    noise
        Starting (EM, gradient descent) or initial (MAP) noise sd; default as in `fit_em`.
    key
        PRNG key of the SVI run (``"map"`` only; None means ``jax.random.key(0)``).
    intercepts
        Learn gate intercepts too (EM and MAP).

    Returns
    -------
    MoEParams
        The experts as given, the learned gates (last row zero) and noise.
    """
    if method not in GATING_METHODS:
        raise ValueError(f"method: expected one of {GATING_METHODS}, got {method!r}")
    x, y = _check_xy(x, y)
    link = resolve_link(link)
    key = jax.random.key(0) if key is None else check_key(key)
    params = as_params(experts, "experts", x.shape[1])
    _check_link_output(link, x, params)
    params = normalize_gates(params._replace(noise=jnp.asarray(_starting_noise(params, noise, x, y, link))))
    if method == "em":
        return _em_fit(
            params, x, y, link, update_experts=False, intercepts=intercepts,
            max_iterations=check_positive_int(max_iterations, "max_iterations"),
            tol=check_positive(tol, "tol"), progress="gating EM" if progress else None,
        ).params
    num_steps = check_positive_int(num_steps, "num_steps")
    learning_rate = check_positive(learning_rate, "learning_rate")
    if method == "map":
        return fit_map(
            x, y, num_experts=params.num_experts, link=link, key=key, init=params, fix=("experts",),
            num_steps=num_steps, learning_rate=learning_rate, progress_bar=progress,
            intercepts=intercepts,
        ).params
    fitted, _ = _likelihood_gd(
        params, x, y, link, num_steps=num_steps, learning_rate=learning_rate, fix_experts=True
    )
    return fitted
