r"""Experts by a designed loss (Makkuva, Oh, Kannan, Viswanath, "Learning in gated neural
networks", AISTATS 2020), with the landscape design of Ge, Lee & Ma (ICLR 2018).

Transform. ``Q4(y) = y^4 + b3 y^3 + b2 y^2 + b1 y`` with ``h4(t) = E_eps[Q4(g(t) + s eps)]`` and
``E[h4'(Z)] = E[h4''(Z)] = E[h4'''(Z)] = 0`` for ``Z ~ N(0, 1)``; by Stein's identity these are
``E[h4(Z) He_m(Z)] = 0``, m = 1, 2, 3, three linear equations solved by the quadrature of
`numpyro_moe._transforms`. Expanding the noise,
``h4 = g^4 + b3 g^3 + (b2 + 6 s^2) g^2 + (b1 + 3 s^2 b3) g + const``, so ``b3`` and
``c4 = E[h4''''(Z)] = E[h4 He_4]`` do not depend on the noise, ``b2`` shifts by ``-6 s^2`` and ``b1``
by ``-3 s^2 b3``. Linear link: ``Q4(y) = y^4 - 6 (1 + s^2) y^2``, ``c4 = 24``. With z ~ N(0, I),
unit-norm experts and every gate row orthogonal to every expert (the gate derivatives then meet
only ``E[h4^(m)] = 0`` for m < 4, and ``E[h4]`` multiplies ``sum_i softmax_i = 1``)::

    E[Q4(y) H4(z)[u, u, v, v]] = c4 sum_i pi_i (a_i . u)^2 (a_i . v)^2,
    H4(z)[u, u, v, v] = (u.z)^2 (v.z)^2 - |u|^2 (v.z)^2 - |v|^2 (u.z)^2 - 4 (u.v)(u.z)(v.z)
                        + |u|^2 |v|^2 + 2 (u.v)^2.

``T4(u, u, v, v)`` is the sample mean of ``(Q4(y) - mean Q4) H4(z)[u, u, v, v] / c4``: subtracting
the mean keeps the expectation (``E[H4] = 0``) and, measured per sample at n = 400k, changes the
variance by a factor 0.93-1.05 (linear), 0.39-0.78 (tanh), 1.00 (relu).

Loss::

    L4(B) = sum_{j != l} T4(b_j, b_j, b_l, b_l) - mu sum_j T4(b_j, b_j, b_j, b_j)
            + lam sum_j (|b_j|^2 - 1)^2,        B = (b_1 .. b_k) in R^{k x d}.

Choice of ``mu`` and ``lam`` (orthonormal experts, population T4, ``c_ji = b_j . a_i``)::

    L4 = sum_i pi_i [sum_{j != l} c_ji^2 c_li^2 - mu sum_j c_ji^4] + lam sum_j (|b_j|^2 - 1)^2.

- Bounded below iff ``lam > mu max_i pi_i`` (the quartic part is at least
  ``(lam - mu pi_max) sum_j |b_j|^4``, and ``b_j = s a_argmax`` attains it). The weights are
  unknown but at most 1, so ``lam > mu`` is required.
- Minima: ``b_j = +-sqrt(t_i) a_sigma(j)`` for a permutation sigma, with
  ``t_i = lam / (lam - mu pi_i)`` (minimise ``-mu pi t^2 + lam (t - 1)^2``) and value
  ``-sum_i lam mu pi_i / (lam - mu pi_i)``. The norms depend on ``pi_i``, so the result is
  normalised to unit norm; ``pi_i`` is then read off as ``T4(a_i, a_i, a_i, a_i)``. They are
  strict local minima for any ``mu > 0``: the Hessian's eigenvalues are ``8 lam`` (radial),
  ``4 (pi_m t_m + mu pi_j t_j)`` (row j towards expert m) and ``4 mu pi_j t_j`` (out of the
  experts' span).
- Two rows on one expert (``b_j = s_j a_i``, ``b_l = s_l a_i``): turning ``b_l`` by an angle
  theta towards an uncovered expert changes L4 by ``2 pi_i s_l^2 (mu s_l^2 - s_j^2) theta^2``,
  negative for the shorter row whenever ``mu < 1``: a saddle for ``mu < 1``, a spurious local
  minimum for ``mu > 1``. A zero row next to rows on experts is never a minimum (curvature
  ``-4 lam`` towards an expert they leave uncovered).
- Measured in the reduced problem (k = d, below), Adam from 200 random starts per setting,
  k = 3, 5, 8, weights uniform or as skewed as (0.85, 0.1, 0.05): every start reached the
  experts for every mu in [0.25, 0.9] and lam in {1.05 mu pi_max, 0.5, 1, 4}; mu = 0.1 missed
  up to 1% in 1000 steps (the pull towards an expert scales with mu); mu = 1.1 and 1.5 left two
  rows on one expert from up to 42% and 72% of the starts (every failure was such a pair).

Hence ``mu = 0.5``: the middle of (0, 1), a factor 2 from the threshold at which duplicated
experts become local minima, and far enough from 0 that the landscape is not flat. ``lam = 1``:
above ``mu`` for any weights, minimiser norms ``t_i = 1 / (1 - pi_i / 2)`` in (1, 2], and a
radial curvature (8 lam) that does not dwarf the angular ones. At n = 50k the expert error does
not depend on them (mean 0.061-0.066 over mu in [0.25, 0.9], lam in {0.6, 1, 4}).

Span restriction. For d > k, a row orthogonal to every expert has zero T4 terms, and turning it
towards an uncovered expert lowers L4 only at fourth order (``-mu pi_m sin^4 theta``): no local
minimum, but a flat region where gradient descent crawls (for k = d it does not exist). From
random starts in R^6 (k = 3) Adam reached the experts from 84% of 50 starts in 2000 steps (98% in
10000), in R^10 from 10-15 of 20 in 1000 steps (17 of 20 in 5000); the rest held a row nearly
orthogonal to every expert. Starting in the experts' span is not enough: Adam scales each
coordinate separately, so its steps leave the span (93% success from such starts at d = 10).
So L4 is minimised over ``B = C U^T``, C (k, k), U (d, k) the top-k eigenvectors of
``T2 = E[P2(y) S2(z)] / c2 = sum_i pi_i a_i a_i^T`` (DESIGN section 2), which span the experts:
the k = d problem, with the same minimisers when the experts lie in span(U). Freeing B in R^d afterwards was tried and made the error 2-3 times
worse (0.17-0.22 against 0.05-0.075 at n = 50k, five data sets): the fourth moment resolves directions outside
the span far worse than T2 does.

Cost. In the reduced coordinates ``w = U^T z`` (k of them) every term of L4 is a contraction of
``mean q (w w^T)^{(x)2}`` (p x p over the p = k (k + 1) / 2 products ``w_a w_b``) and
``mean q w w^T``: one O(n (d k + p^2)) pass, after which a loss and gradient evaluation costs
O(k p^2 + k^3), independent of n; all starts run together in one jitted Adam scan.

Limits (measured, d = 10, k = 3, noise 0.1). Accuracy is that of a fourth moment: expert error
0.08-0.14 at n = 20k, 0.05-0.09 at 50k, 0.026-0.054 at 200k, 0.017-0.021 at 800k (the tensor
method of `estimate_experts` on the same data: 0.046-0.064, 0.021-0.031, 0.011-0.014). relu is far noisier (its Q4 has large
coefficients and c4 = 0.50): 0.17-0.27 at 200k, 0.04 at 1M. Unit-norm experts that are not
orthogonal (`simulate`'s default, overlaps up to 0.37) bias the minima, since the cross terms no
longer vanish at the truth: 0.13-0.24 at 200k against 0.02-0.03 for the tensor method.
Whitening by T2 as well (rows ``U L^{-1/2} c``, so the experts become orthonormal with weights
``L_min / pi_i``) removed that bias at 200k (0.03-0.05) but failed on one of three data sets at
50k (the weakest direction's noise is amplified), so it is not done. Either way the estimate is
a starting point that EM refines.

Sign. L4 is even in each row; each expert's sign is chosen so that ``a_i . E[(y - ybar) z]``
has the sign of ``E[g'(Z)]``: by Stein, ``E[y z] = E[g'(Z)] sum_j pi_j a_j`` plus gate terms
orthogonal to the experts, so ``a_i . E[y z] = E[g'(Z)] pi_i`` for orthonormal experts.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_moe._links import Link, resolve_link
from numpyro_moe._moments import as_data_source, resolve_chunk_size
from numpyro_moe._optim import minimize_adam
from numpyro_moe._second_moment import Standardization, estimate_noise, second_moment, warn_design
from numpyro_moe._transforms import hermite_moments, link_at_nodes, output_transforms
from numpyro_moe._validation import (
    ReliabilityWarning,
    check_design,
    check_key,
    check_num_experts,
    check_positive,
    check_positive_int,
    check_response,
)

__all__ = [
    "FourthMoments",
    "FourthOrderTransform",
    "LandscapeResult",
    "fourth_moments",
    "fourth_order_transform",
    "landscape_experts",
    "landscape_loss",
    "minimize_landscape",
    "orient_experts",
    "pairwise_fourth_moment",
]

DEFAULT_MU = 0.5
DEFAULT_LAM = 1.0
# Rows per block of the data pass: bounds the (rows, p) product features in memory.
_BLOCK_ROWS = 1 << 16


class FourthOrderTransform(NamedTuple):
    """Coefficients of ``Q4(y) = y^4 + b3 y^3 + b2 y^2 + b1 y`` at noise sd ``noise``.

    ``c4 = E[h4''''(Z)]`` scales the fourth moment; ``b3`` and ``c4`` do not depend on the noise.
    """

    b1: float
    b2: float
    b3: float
    c4: float
    noise: float

    def q4(self, y):
        """The quartic transform of responses ``y`` (any shape)."""
        return ((y + self.b3) * y + self.b2) * y * y + self.b1 * y


def fourth_order_transform(link: str | Link = "linear", noise: float = 0.0) -> FourthOrderTransform:
    """Solve for the quartic transform Q4 of the expert loss for ``link`` at noise sd ``noise``.

    Parameters
    ----------
    link
        Expert link: name or callable (see `resolve_link`).
    noise
        Noise standard deviation, finite and >= 0.

    Returns
    -------
    FourthOrderTransform
        With ``E[h4^(m)(Z)] = 0`` for m = 1, 2, 3 and ``c4 = E[h4''''(Z)]`` (module docstring).

    Raises
    ------
    ValueError
        For a negative or non-finite noise, or a link that makes the three conditions singular
        (an even link: its odd Hermite moments vanish, so the fourth moment carries no signed
        information about the experts).
    """
    link = resolve_link(link)
    noise = float(noise)
    if not np.isfinite(noise) or noise < 0:
        raise ValueError(f"noise: expected a finite number >= 0, got {noise}")
    nodes, weights, values = link_at_nodes(link)
    # moments[p - 1][m - 1] = E[g^p He_m]
    moments = [hermite_moments(values**power, nodes, weights) for power in (1, 2, 3, 4)]
    system = np.stack([moments[2][:3], moments[1][:3], moments[0][:3]], axis=1)
    scale = max(np.abs(system).max(), 1e-300)
    if abs(np.linalg.det(system)) < 1e-10 * scale**3:
        raise ValueError(f"link: {link.name!r} makes the quartic transform's conditions singular")
    # Noiseless coefficients of h4 = g^4 + b3 g^3 + b2' g^2 + b1' g + const.
    b3, b2_noiseless, b1_noiseless = np.linalg.solve(system, -moments[3][:3])
    c4 = moments[3][3] + b3 * moments[2][3] + b2_noiseless * moments[1][3] + b1_noiseless * moments[0][3]
    if abs(c4) < 1e-6:
        warnings.warn(
            f"link {link.name!r}: the fourth-moment constant c4 = {c4:.2e} is nearly zero; the "
            "expert loss will be dominated by sampling noise",
            ReliabilityWarning,
            stacklevel=2,
        )
    return FourthOrderTransform(
        b1=float(b1_noiseless - 3 * noise**2 * b3),
        b2=float(b2_noiseless - 6 * noise**2),
        b3=float(b3),
        c4=float(c4),
        noise=noise,
    )


class FourthMoments(NamedTuple):
    """Weighted moments of reduced inputs w (n, m) with weights q (n,), m coordinates.

    ``quartic`` (p, p): mean q (w_a w_b)(w_c w_e) over the p = m (m + 1) / 2 pairs a <= b;
    ``quadratic`` (m, m): mean q w w^T; ``mean`` (): mean q.
    """

    quartic: jax.Array
    quadratic: jax.Array
    mean: jax.Array


def _pairs(dim: int):
    first, second = np.triu_indices(dim)
    # (u . w)^2 = sum_{a <= b} multiplicity_ab u_a u_b w_a w_b
    multiplicity = np.where(first == second, 1.0, 2.0)
    return first, second, multiplicity


@jax.jit
def _block_moments(w, q):
    first, second, _ = _pairs(w.shape[1])
    products = w[:, first] * w[:, second]
    return products.T @ (q[:, None] * products), w.T @ (q[:, None] * w), jnp.sum(q)


def fourth_moments(w, q) -> FourthMoments:
    """Accumulate `FourthMoments` of w (n, m) weighted by q (n,) over row blocks."""
    n = w.shape[0]
    totals = None
    for start in range(0, n, _BLOCK_ROWS):
        parts = _block_moments(w[start : start + _BLOCK_ROWS], q[start : start + _BLOCK_ROWS])
        totals = parts if totals is None else [t + p for t, p in zip(totals, parts, strict=True)]
    return FourthMoments(*(total / n for total in totals))


def pairwise_fourth_moment(vectors, moments: FourthMoments):
    """(k, k) matrix ``T[j, l] = mean q H4(w)[v_j, v_j, v_l, v_l]`` for the rows v_j of ``vectors``.

    ``vectors`` is (k, m) in the coordinates of the w that ``moments`` came from.
    """
    first, second, multiplicity = _pairs(vectors.shape[1])
    squares = vectors[:, first] * vectors[:, second] * multiplicity  # (k, p)
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


def landscape_loss(vectors, pairwise, *, mu: float, lam: float):
    """L4 of the module docstring for rows ``vectors`` (k, m); ``pairwise(vectors)`` gives T4."""
    t = pairwise(vectors)
    norms = jnp.sum(vectors**2, axis=1)
    return jnp.sum(t) - (1 + mu) * jnp.trace(t) + lam * jnp.sum((norms - 1) ** 2)


def minimize_landscape(pairwise, starts, *, mu: float, lam: float, num_steps: int, learning_rate: float):
    """Adam on L4 from every start (S, k, m) at once, with a cosine-decayed learning rate.

    The per-start losses are summed: Adam acts entrywise, so the runs stay independent. Returns
    the final rows (S, k, m), their losses (S,) and gradient norms (S,).
    """
    per_start = jax.vmap(lambda vectors: landscape_loss(vectors, pairwise, mu=mu, lam=lam))
    # Decaying to 1% lets Adam settle into the minimum instead of hovering at the step size.
    final, _ = minimize_adam(
        lambda vectors, args, static: jnp.sum(per_start(vectors)), starts, num_steps=num_steps,
        learning_rate=learning_rate, cosine_decay=True,
    )

    @jax.jit  # one compiled program instead of one per eager operation
    def losses_and_gradient_norms(vectors):
        gradients = jax.grad(lambda v: jnp.sum(per_start(v)))(vectors)
        return per_start(vectors), jnp.sqrt(jnp.sum(gradients**2, axis=(1, 2)))

    return final, *losses_and_gradient_norms(final)


def orient_experts(directions, first_moment, slope_sign: float):
    """Flip rows of ``directions`` (..., k, d) so ``direction . first_moment`` has ``slope_sign``."""
    signs = jnp.where(directions @ first_moment * slope_sign < 0, -1.0, 1.0)
    return directions * signs[..., None]


class LandscapeResult(NamedTuple):
    """Experts from the expert loss L4 (module docstring), best of ``num_starts`` random starts.

    Attributes
    ----------
    experts
        (k, d) experts in the units of x, unit norm in standardised units (as `estimate_experts`).
    weights
        (k,) mean gate probabilities ``pi_i``, read off as ``T4(a_i, a_i, a_i, a_i)`` and
        normalised to sum 1.
    loss
        () final L4 of the best start (at its minimiser, before normalisation).
    start_losses
        (num_starts,) final L4 of every start; ``experts`` is the row of the smallest.
    start_experts
        (num_starts, k, d) the experts every start reached, normalised and signed like ``experts``.
    starts
        (num_starts, k, d) the random starting experts, in the units of x (unit norm in
        standardised units), e.g. to start another method from the same points.
    gradient_norms
        (num_starts,) Frobenius norm of L4's gradient at every start's end point (0 at a
        critical point).
    noise
        () noise sd used in Q4 (given or estimated).
    noise_source
        ``"given"`` or ``"moments"`` (estimated as in `estimate_experts`).
    transform
        `FourthOrderTransform` used.
    mu, lam
        The loss's constants.
    subspace_eigenvalues
        (d,) eigenvalues of T2 / c2 in standardised coordinates, descending; the experts are
        sought in the span of the top k eigenvectors.
    subspace_noise_floor
        () size below which a T2 eigenvalue is indistinguishable from sampling noise (as in
        `ExpertDiagnostics`); the k-th eigenvalue should clear the (k+1)-th by more.
    expert_intercepts
        (k,) offsets ``-a_i . mean(x)`` from centring x, or None without standardisation.
    standardization
        `Standardization` applied to x.
    skewness, excess_kurtosis
        (d,) marginal sample skewness and excess kurtosis of x (0 for a Gaussian design).
    """

    experts: np.ndarray
    weights: np.ndarray
    loss: float
    start_losses: np.ndarray
    start_experts: np.ndarray
    starts: np.ndarray
    gradient_norms: np.ndarray
    noise: float
    noise_source: str
    transform: FourthOrderTransform
    mu: float
    lam: float
    subspace_eigenvalues: np.ndarray
    subspace_noise_floor: float
    expert_intercepts: np.ndarray | None
    standardization: Standardization
    skewness: np.ndarray
    excess_kurtosis: np.ndarray


def _check_constants(mu, lam) -> tuple[float, float]:
    mu = DEFAULT_MU if mu is None else check_positive(mu, "mu")
    lam = DEFAULT_LAM if lam is None else check_positive(lam, "lam")
    if lam <= mu:
        raise ValueError(
            f"lam: expected lam > mu={mu} so that the loss is bounded below for any gate weights "
            f"(it needs lam > mu * max_i pi_i), got {lam}"
        )
    if mu >= 1:
        warnings.warn(
            f"mu={mu} >= 1: two experts on one true expert become local minima of the loss; "
            "random starts may end there (mu < 1 rules that out)",
            ReliabilityWarning,
            stacklevel=3,
        )
    return mu, lam


def landscape_experts(
    x,
    y,
    *,
    num_experts: int,
    key: jax.Array,
    link: str | Link = "linear",
    noise: float | None = None,
    num_starts: int = 1,
    num_steps: int = 1000,
    learning_rate: float = 0.02,
    mu: float | None = None,
    lam: float | None = None,
    standardize: bool = True,
) -> LandscapeResult:
    """Estimate the experts by gradient descent on the AISTATS 2020 expert loss L4.

    Parameters
    ----------
    x, y
        Inputs (n, d) and responses (n,). Computed in float64 whatever JAX's x64 setting.
    num_experts
        k <= d.
    link
        Expert link: name or callable (see `resolve_link`); Q4 comes from `fourth_order_transform`.
    noise
        Noise standard deviation > 0, or None to estimate it as `estimate_experts` does,
        ``s^2 = mean(y^2) - E[g(Z)^2]`` (valid under the design assumptions below).
    key
        PRNG key of the random starts: Gaussian rows in the span of T2's top k eigenvectors,
        normalised.
    num_starts
        Random starts, run together; the one with the smallest final loss is returned.
    num_steps, learning_rate
        Adam steps per start and initial learning rate (cosine-decayed to 1% of it).
    mu, lam
        The loss's constants; None gives ``mu = 0.5``, ``lam = 1`` (see the module docstring).
        ``lam > mu`` is required; ``mu >= 1`` warns.
    standardize
        Centre and whiten x by its sample mean and covariance first (keep it on for real data).
        Off: x is taken to be N(0, I) as it is.

    Returns
    -------
    LandscapeResult

    Notes
    -----
    One pass over the data for T2 and the noise (shared with `estimate_experts`), one for the
    reduced fourth moments; then every loss evaluation costs O(k^5), independent of n. The
    minima are the experts under a Gaussian design with orthonormal experts (in standardised
    units) and every gate row orthogonal to every expert; when the assumptions fail the estimate
    is biased and serves as a starting point for EM, MAP or NUTS. A `ReliabilityWarning` is
    issued for a non-Gaussian-looking x, an unresolved T2 eigen-gap at k, an impossible noise
    estimate, or a start that ends far from a critical point.

    Raises
    ------
    ValueError
        For bad shapes, non-finite data, k > d, an unknown link, a non-positive noise, ``mu``
        or ``lam``, ``lam <= mu``, too few samples or linearly dependent columns of x.
    """
    # Inside the x64 context from the start, so float64 data are not cut to float32 on the way in.
    with jax.enable_x64(True):
        x = np.asarray(check_design(x), dtype=np.float64)
        y = np.asarray(check_response(y, x.shape[0]), dtype=np.float64)
        key = check_key(key)
        link = resolve_link(link)
        dim = x.shape[1]
        num_experts = check_num_experts(num_experts, dim, require_k_le_d=True)
        if noise is not None:
            noise = check_positive(noise, "noise")
        num_starts = check_positive_int(num_starts, "num_starts")
        num_steps = check_positive_int(num_steps, "num_steps")
        learning_rate = check_positive(learning_rate, "learning_rate")
        mu, lam = _check_constants(mu, lam)

        moment = second_moment(
            as_data_source(x, y), output_transforms(link, 0.0), standardize, resolve_chunk_size(None, dim)
        )
        warn_design(moment)
        noise_source = "given"
        if noise is None:
            noise, noise_source = estimate_noise(moment.stats, link), "moments"
        transform = fourth_order_transform(link, noise)
        _warn_subspace(moment, num_experts)

        standardization = moment.standardization
        basis = jnp.asarray(moment.eigenvectors[:, :num_experts])  # U (d, k), z-coordinates
        z = jnp.asarray(standardization.transform(x))
        responses = jnp.asarray(y)
        q = transform.q4(responses)
        q = (q - jnp.mean(q)) / transform.c4
        moments = fourth_moments(z @ basis, q)

        def pairwise(vectors):
            return pairwise_fourth_moment(vectors, moments)

        starts = jax.random.normal(key, (num_starts, num_experts, num_experts), dtype=jnp.float64)
        starts = starts / jnp.linalg.norm(starts, axis=-1, keepdims=True)
        final, losses, gradient_norms = minimize_landscape(
            pairwise, starts, mu=mu, lam=lam, num_steps=num_steps, learning_rate=learning_rate
        )
        directions, fourth = _finish(final, moments, basis, z, responses, _slope_sign(link))

        losses = np.asarray(losses)
        best = int(np.argmin(losses))
        whitening = np.asarray(standardization.whitening)
        start_experts = np.asarray(directions) @ whitening.T
        start_points = np.asarray(starts @ basis.T) @ whitening.T
        gradient_norms = np.asarray(gradient_norms)
        weights = np.asarray(fourth[best])
    _warn_convergence(gradient_norms[best], num_steps)
    experts = start_experts[best]
    return LandscapeResult(
        experts=experts,
        weights=weights / weights.sum(),
        loss=float(losses[best]),
        start_losses=losses,
        start_experts=start_experts,
        starts=start_points,
        gradient_norms=gradient_norms,
        noise=float(noise),
        noise_source=noise_source,
        transform=transform,
        mu=mu,
        lam=lam,
        subspace_eigenvalues=moment.eigenvalues,
        subspace_noise_floor=moment.noise_floor,
        expert_intercepts=-experts @ standardization.mean if standardize else None,
        standardization=standardization,
        skewness=moment.skewness,
        excess_kurtosis=moment.excess_kurtosis,
    )


@jax.jit
def _finish(final, moments: FourthMoments, basis, z, responses, slope_sign):
    """Unit rows in z-coordinates, signed (S, k, d), and their T4(a, a, a, a) (S, k)."""
    directions = final / jnp.maximum(jnp.linalg.norm(final, axis=-1, keepdims=True), 1e-300)
    fourth = jax.vmap(lambda vectors: jnp.diag(pairwise_fourth_moment(vectors, moments)))(directions)
    first_moment = z.T @ (responses - jnp.mean(responses)) / z.shape[0]
    return orient_experts(directions @ basis.T, first_moment, slope_sign), fourth


def _slope_sign(link: Link) -> float:
    """sign E[g'(Z)] = sign E[g(Z) Z]; nonzero for any link the quartic transform accepts."""
    nodes, weights, values = link_at_nodes(link)
    return 1.0 if weights @ (values * nodes) >= 0 else -1.0


def _warn_subspace(moment, num_experts: int) -> None:
    values = moment.eigenvalues
    next_value = values[num_experts] if num_experts < values.size else 0.0
    gap = values[num_experts - 1] - next_value
    if values[num_experts - 1] <= 0 or gap < moment.noise_floor:
        warnings.warn(
            f"num_experts: T2's eigenvalue {num_experts} ({values[num_experts - 1]:.3g}) is not "
            f"separated from the next ({next_value:.3g}) by more than the sampling-noise floor "
            f"({moment.noise_floor:.3g}); the span searched for the experts is not resolved: use "
            "more data or fewer experts",
            ReliabilityWarning,
            stacklevel=3,
        )


def _warn_convergence(gradient_norm: float, num_steps: int) -> None:
    # The loss is O(1) near its minima, so a gradient this large means Adam has not settled.
    if gradient_norm > 1e-3:
        warnings.warn(
            f"the best start ended with gradient norm {gradient_norm:.2e} after num_steps={num_steps}; "
            "it may not have converged: raise num_steps",
            ReliabilityWarning,
            stacklevel=3,
        )
