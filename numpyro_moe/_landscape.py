"""Experts by a designed loss (Makkuva, Oh, Kannan, Viswanath, "Learning in gated neural
networks", AISTATS 2020). DRAFT docstring."""

from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from numpyro_moe._experts import Standardization, _estimate_noise, _second_moment, _warn_design
from numpyro_moe._fit import minimize_adam
from numpyro_moe._links import LINKS, Link, resolve_link
from numpyro_moe._moments import as_data_source, resolve_chunk_size
from numpyro_moe._transforms import _SMOOTH_LINKS, gaussian_expectation_nodes, output_transforms
from numpyro_moe._validation import (
    ReliabilityWarning,
    check_design,
    check_key,
    check_num_experts,
    check_positive,
    check_positive_int,
    check_response,
)

__all__ = ["FourthOrderTransform", "LandscapeResult", "fourth_order_transform", "landscape_experts"]

DEFAULT_MU = 0.5
DEFAULT_LAM = 1.0


class FourthOrderTransform(NamedTuple):
    """Coefficients of Q4(y) = y^4 + b3 y^3 + b2 y^2 + b1 y; ``c4`` scales the fourth moment."""

    b1: float
    b2: float
    b3: float
    c4: float
    noise: float

    def q4(self, y):
        """The quartic transform of responses ``y`` (any shape)."""
        return ((y + self.b3) * y + self.b2) * y * y + self.b1 * y


def _link_values(link: Link) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    smooth = link.name in _SMOOTH_LINKS and LINKS[link.name] is link.function
    nodes, weights = gaussian_expectation_nodes("hermite" if smooth else "piecewise")
    with jax.enable_x64(True):
        values = np.asarray(link.function(jnp.asarray(nodes, dtype=jnp.float64)), dtype=np.float64)
    if values.shape != nodes.shape or not np.isfinite(values).all():
        raise ValueError(
            f"link: {link.name!r} must map arrays elementwise to finite values of the same shape"
        )
    return nodes, weights, values


def _hermite_moments(values, nodes, weights) -> np.ndarray:
    """E[f(Z) He_m(Z)] for m = 1..4."""
    hermite = np.stack([nodes, nodes**2 - 1, nodes**3 - 3 * nodes, nodes**4 - 6 * nodes**2 + 3])
    return hermite @ (weights * values)


def fourth_order_transform(link: str | Link = "linear", noise: float = 0.0) -> FourthOrderTransform:
    """Solve for Q4 at noise sd ``noise``. DRAFT."""
    link = resolve_link(link)
    noise = float(noise)
    if not np.isfinite(noise) or noise < 0:
        raise ValueError(f"noise: expected a finite number >= 0, got {noise}")
    nodes, weights, values = _link_values(link)
    moments = [_hermite_moments(values**power, nodes, weights) for power in (1, 2, 3, 4)]
    system = np.stack([moments[2][:3], moments[1][:3], moments[0][:3]], axis=1)
    scale = max(np.abs(system).max(), 1e-300)
    if abs(np.linalg.det(system)) < 1e-10 * scale**3:
        raise ValueError(f"link: {link.name!r} makes the quartic transform's conditions singular")
    b3, b2_noiseless, b1_noiseless = np.linalg.solve(system, -moments[3][:3])
    c4 = moments[3][3] + b3 * moments[2][3] + b2_noiseless * moments[1][3] + b1_noiseless * moments[0][3]
    return FourthOrderTransform(
        b1=float(b1_noiseless - 3 * noise**2 * b3),
        b2=float(b2_noiseless - 6 * noise**2),
        b3=float(b3),
        c4=float(c4),
        noise=noise,
    )


def _pair_indices(dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    first, second = np.triu_indices(dim)
    multiplicity = np.where(first == second, 1.0, 2.0)
    return first, second, multiplicity


class _FourthMoments(NamedTuple):
    quartic: jax.Array  # (p, p) mean q (w_a w_b)(w_c w_d) over pairs a <= b, c <= d
    quadratic: jax.Array  # (m, m) mean q w w^T
    mean: jax.Array  # () mean q


def _fourth_moments(w, q) -> _FourthMoments:
    first, second, _ = _pair_indices(w.shape[1])
    features = w[:, first] * w[:, second]
    n = w.shape[0]
    return _FourthMoments(features.T @ (q[:, None] * features) / n, w.T @ (q[:, None] * w) / n, jnp.mean(q))


def _pairwise_fourth_moment(vectors, moments: _FourthMoments):
    """(k, k) matrix T[j, l] = mean q H4(w)[v_j, v_j, v_l, v_l] for rows v_j of ``vectors``."""
    first, second, multiplicity = _pair_indices(vectors.shape[1])
    squares = vectors[:, first] * vectors[:, second] * multiplicity
    quartic = squares @ moments.quartic @ squares.T
    quadratic = vectors @ moments.quadratic @ vectors.T
    gram = vectors @ vectors.T
    norms = jnp.diag(gram)
    self_quadratic = jnp.diag(quadratic)
    return (
        quartic
        - norms[:, None] * self_quadratic[None, :]
        - self_quadratic[:, None] * norms[None, :]
        - 4 * gram * quadratic
        + (norms[:, None] * norms[None, :] + 2 * gram**2) * moments.mean
    )


def _landscape_loss(vectors, pairwise, mu, lam):
    t = pairwise(vectors)
    norms = jnp.sum(vectors**2, axis=1)
    return jnp.sum(t) - (1 + mu) * jnp.trace(t) + lam * jnp.sum((norms - 1) ** 2)


def _minimize(pairwise, starts, *, mu, lam, num_steps, learning_rate):
    """Adam from every start at once; the starts are independent since Adam acts entrywise."""
    per_start = jax.vmap(lambda vectors: _landscape_loss(vectors, pairwise, mu, lam))
    schedule = optax.cosine_decay_schedule(learning_rate, num_steps, alpha=0.01)
    final, _ = minimize_adam(
        lambda vectors: jnp.sum(per_start(vectors)), starts, num_steps=num_steps, learning_rate=schedule
    )
    return final, per_start(final)


class LandscapeResult(NamedTuple):
    experts: np.ndarray
    weights: np.ndarray
    loss: float
    start_losses: np.ndarray
    start_experts: np.ndarray
    starts: np.ndarray
    noise: float
    noise_source: str
    transform: FourthOrderTransform
    mu: float
    lam: float
    expert_intercepts: np.ndarray | None
    standardization: Standardization


def landscape_experts(
    x,
    y,
    *,
    num_experts: int,
    link: str | Link = "linear",
    noise: float | None,
    key: jax.Array,
    num_starts: int = 1,
    num_steps: int = 1000,
    learning_rate: float = 0.02,
    mu: float | None = None,
    lam: float | None = None,
    standardize: bool = True,
    _polish_steps: int = 0,
) -> LandscapeResult:
    x = check_design(x)
    y = check_response(y, x.shape[0])
    key = check_key(key)
    link = resolve_link(link)
    n, d = x.shape
    num_experts = check_num_experts(num_experts, d, require_k_le_d=True)
    if noise is not None:
        noise = check_positive(noise, "noise")
    num_starts = check_positive_int(num_starts, "num_starts")
    num_steps = check_positive_int(num_steps, "num_steps")
    learning_rate = check_positive(learning_rate, "learning_rate")
    mu = DEFAULT_MU if mu is None else check_positive(mu, "mu")
    lam = DEFAULT_LAM if lam is None else check_positive(lam, "lam")
    k = num_experts

    with jax.enable_x64(True):
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        source = as_data_source(x, y)
        moment = _second_moment(source, output_transforms(link, 0.0), standardize, resolve_chunk_size(None, d))
        _warn_design(moment)
        noise_source = "given"
        if noise is None:
            noise, noise_source = _estimate_noise(moment.stats, link), "moments"
        transform = fourth_order_transform(link, noise)
        standardization = moment.standardization
        basis = moment.eigenvectors[:, :k]  # (d, k) z-coordinates
        z = jnp.asarray(standardization.transform(x))
        yj = jnp.asarray(y)
        q = transform.q4(yj)
        q = (q - jnp.mean(q)) / transform.c4
        w = z @ jnp.asarray(basis)
        moments = _fourth_moments(w, q)
        pairwise = jax.tree_util.Partial(_pairwise_fourth_moment, moments=moments)
        starts = jax.random.normal(key, (num_starts, k, k), dtype=jnp.float64)
        starts = starts / jnp.linalg.norm(starts, axis=-1, keepdims=True)
        final, losses = _minimize(
            lambda v: _pairwise_fourth_moment(v, moments), starts, mu=mu, lam=lam,
            num_steps=num_steps, learning_rate=learning_rate,
        )
        final_z = final @ jnp.asarray(basis).T  # (S, k, d)
        if _polish_steps:
            full_moments = _fourth_moments(z, q)
            final_z, losses = _minimize(
                lambda v: _pairwise_fourth_moment(v, full_moments), final_z, mu=mu, lam=lam,
                num_steps=_polish_steps, learning_rate=learning_rate / 10,
            )
        directions = final_z / jnp.linalg.norm(final_z, axis=-1, keepdims=True)
        first_moment = z.T @ (yj - yj.mean()) / n
        slope = float(np.sum(_hermite_moments(*reversed(_link_values(link)[::-1]) , ) [0:0]) ) if False else None
        nodes, weights, values = _link_values(link)
        slope_sign = np.sign(weights @ (values * nodes))
        signs = jnp.sign(directions @ first_moment) * slope_sign
        directions = directions * signs[..., None]
        directions = np.asarray(directions)
        start_experts = directions @ standardization.whitening.T  # W symmetric
        start_points = np.asarray(starts @ jnp.asarray(basis).T) @ standardization.whitening.T
        losses = np.asarray(losses)
        best = int(np.argmin(losses))
        experts = start_experts[best]
        full_moments_diag = None
    return LandscapeResult(
        experts=experts,
        weights=np.ones(k) / k,
        loss=float(losses[best]),
        start_losses=losses,
        start_experts=start_experts,
        starts=start_points,
        noise=float(noise),
        noise_source=noise_source,
        transform=transform,
        mu=mu,
        lam=lam,
        expert_intercepts=-experts @ standardization.mean if standardize else None,
        standardization=standardization,
    )
