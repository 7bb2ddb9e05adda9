"""Output transforms P2, P3 of the tensor method for any link (Makkuva et al., ICML 2019).

For ``Z ~ N(0, 1)`` and ``h(t) = E_eps[P(g(t) + noise * eps)]``, Stein's identity
``E[h^(m)(Z)] = E[h(Z) He_m(Z)]`` turns the conditions on the transforms into Gaussian
expectations of powers of the link::

    P2(y) = y^2 + gamma y              with E[h2'(Z)] = 0,          c2 = E[h2''(Z)]
    P3(y) = y^3 + alpha y^2 + beta y   with E[h3'] = E[h3''] = 0,   c3 = E[h3'''(Z)]

Since ``E[(g + s eps)^2] = g^2 + s^2`` and ``E[(g + s eps)^3] = g^3 + 3 s^2 g``, the noise only
shifts ``beta`` by ``-3 s^2``; ``alpha``, ``gamma``, ``c2``, ``c3`` do not depend on it. Then, with
unit-norm experts and every gate row orthogonal to every expert,
``E[P2(y) S2(x)] = c2 sum_i pi_i a_i a_i^T`` and ``E[P3(y) S3(x)] = c3 sum_i pi_i a_i^{(x)3}``.

The expectations use Gauss-Hermite quadrature for the built-in smooth links. A kink defeats
Gauss-Hermite (a 200-node rule is off by 4e-3 in c3 for relu), so relu and user callables,
which may have kinks, use composite Gauss-Legendre on [-12, 12] with a panel edge at 0: exact for
kinks at 0 and accurate to about 1e-8 elsewhere.
"""

from __future__ import annotations

import warnings
from functools import cache
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpy.polynomial.hermite_e import hermegauss
from numpy.polynomial.legendre import leggauss

from numpyro_moe._links import LINKS, Link, resolve_link
from numpyro_moe._validation import ReliabilityWarning, check_nonnegative

__all__ = [
    "OutputTransforms",
    "gaussian_expectation_nodes",
    "hermite_moments",
    "link_at_nodes",
    "output_transforms",
]

_SMOOTH_LINKS = ("linear", "sigmoid", "tanh")


class OutputTransforms(NamedTuple):
    """Coefficients of P2(y) = y^2 + gamma y and P3(y) = y^3 + alpha y^2 + beta y.

    ``beta = beta_noiseless - 3 noise^2``; ``c2``, ``c3`` scale the second and third moments.
    """

    alpha: float
    beta: float
    gamma: float
    c2: float
    c3: float
    beta_noiseless: float
    noise: float

    def p2(self, y):
        """The quadratic transform of responses ``y`` (any shape)."""
        return y * y + self.gamma * y

    def p3(self, y):
        """The cubic transform of responses ``y`` (any shape)."""
        return y * y * y + self.alpha * y * y + self.beta * y


@cache
def gaussian_expectation_nodes(rule: str) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights (float64) with ``sum(w f(t)) ~= E[f(Z)]``, ``Z ~ N(0, 1)``.

    ``rule="hermite"``: 120-node Gauss-Hermite (probabilists'), exact for polynomials of degree
    < 240, for smooth integrands. ``rule="piecewise"``: composite 16-point Gauss-Legendre on 480
    panels of [-12, 12] with an edge at 0, for integrands with kinks.
    """
    if rule == "hermite":
        nodes, weights = hermegauss(120)
        return nodes, weights / np.sqrt(2 * np.pi)
    if rule == "piecewise":
        base_nodes, base_weights = leggauss(16)
        edges = np.linspace(-12.0, 12.0, 481)
        half = np.diff(edges)[:, None] / 2
        nodes = (edges[:-1, None] + half * (base_nodes + 1)).ravel()
        weights = (half * base_weights).ravel() * np.exp(-0.5 * nodes**2) / np.sqrt(2 * np.pi)
        return nodes, weights
    raise ValueError(f"rule: expected 'hermite' or 'piecewise', got {rule!r}")


def hermite_moments(values: np.ndarray, nodes, weights) -> np.ndarray:
    """E[f(Z) He_m(Z)] for m = 1, 2, 3, 4, given f at the quadrature nodes."""
    hermite = np.stack([nodes, nodes**2 - 1, nodes**3 - 3 * nodes, nodes**4 - 6 * nodes**2 + 3])
    return hermite @ (weights * values)


def link_at_nodes(link: Link) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quadrature nodes, weights and the link at the nodes (float64).

    Gauss-Hermite for the built-in smooth links, piecewise Gauss-Legendre otherwise.

    Raises
    ------
    TypeError
        If the link is a callable that fails on a jax array.
    ValueError
        If it does not map arrays elementwise to finite values.
    """
    smooth = link.name in _SMOOTH_LINKS and LINKS[link.name] is link.function
    nodes, weights = gaussian_expectation_nodes("hermite" if smooth else "piecewise")
    try:
        with jax.enable_x64(True):
            values = np.asarray(link.function(jnp.asarray(nodes, dtype=jnp.float64)), dtype=np.float64)
    except Exception as error:  # a user callable that does not take a jax array
        raise TypeError(
            f"link: {link.name!r} must map a jax array elementwise to an array of the same shape; "
            f"calling it on a 1-d array raised {type(error).__name__}: {error}"
        ) from error
    if values.shape != nodes.shape or not np.isfinite(values).all():
        raise ValueError(
            f"link: {link.name!r} must map arrays elementwise to finite values of the same shape"
        )
    return nodes, weights, values


def output_transforms(link: str | Link = "linear", noise: float = 0.0) -> OutputTransforms:
    """Solve for the transforms of the tensor method for ``link`` at noise sd ``noise``.

    Raises
    ------
    TypeError
        If ``noise`` is not a number, or ``link`` is a callable that fails on a jax array.
    ValueError
        If ``noise`` is negative or not finite, if the link does not act elementwise, or if it
        makes the conditions singular (e.g. an even link, for which E[g'(Z)] = 0:
        the moments then carry no first-order information about the experts).
    """
    link = resolve_link(link)
    noise = check_nonnegative(noise, "noise")
    nodes, weights, values = link_at_nodes(link)
    m_g = hermite_moments(values, nodes, weights)
    m_g2 = hermite_moments(values**2, nodes, weights)
    m_g3 = hermite_moments(values**3, nodes, weights)

    scale = max(abs(m_g[0]), 1e-300)
    if abs(m_g[0]) < 1e-8:
        raise ValueError(
            f"link: {link.name!r} has E[g'(Z)] = {m_g[0]:.2e} ~ 0 under Z ~ N(0,1); the quadratic "
            "transform is undefined and the moments do not identify the experts"
        )
    gamma = -m_g2[0] / m_g[0]
    c2 = m_g2[1] + gamma * m_g[1]

    system = np.array([[m_g2[0], m_g[0]], [m_g2[1], m_g[1]]])
    if abs(np.linalg.det(system)) < 1e-10 * scale:
        raise ValueError(f"link: {link.name!r} makes the cubic transform's conditions singular")
    alpha, beta_noiseless = np.linalg.solve(system, -m_g3[:2])
    c3 = m_g3[2] + alpha * m_g2[2] + beta_noiseless * m_g[2]
    for name, value in (("c2", c2), ("c3", c3)):
        if abs(value) < 1e-6:
            warnings.warn(
                f"link {link.name!r}: the moment constant {name} = {value:.2e} is nearly zero; the "
                "tensor estimate will be dominated by sampling noise",
                ReliabilityWarning,
                stacklevel=2,
            )
    return OutputTransforms(
        alpha=float(alpha),
        beta=float(beta_noiseless - 3 * noise**2),
        gamma=float(gamma),
        c2=float(c2),
        c3=float(c3),
        beta_noiseless=float(beta_noiseless),
        noise=noise,
    )
