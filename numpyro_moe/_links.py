"""The expert link functions g, in one registry that every module resolves through."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["LINKS", "Link", "resolve_link"]


class Link(NamedTuple):
    """A resolved link: its name (for messages and files) and a vectorised jnp function."""

    name: str
    function: Callable[[jax.Array], jax.Array]


LINKS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "linear": lambda t: t,
    "sigmoid": jax.nn.sigmoid,
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
}


def resolve_link(link: str | Callable | Link) -> Link:
    """Turn a link name or a user callable into a `Link`.

    Parameters
    ----------
    link
        One of ``"linear"``, ``"sigmoid"``, ``"relu"``, ``"tanh"``, or a callable mapping a
        jax array elementwise to an array of the same shape (it must be jax-traceable).

    Raises
    ------
    ValueError
        If ``link`` is a string that is not a registered name.
    TypeError
        If ``link`` is neither a string nor a callable.
    """
    if isinstance(link, Link):
        return link
    if isinstance(link, str):
        if link not in LINKS:
            raise ValueError(
                f"link: unknown link {link!r}; expected one of {sorted(LINKS)} or a callable"
            )
        return Link(link, LINKS[link])
    if callable(link):
        name = getattr(link, "__name__", None) or type(link).__name__
        return Link(name, link)
    raise TypeError(
        f"link: expected a link name {sorted(LINKS)} or a callable, got {type(link).__name__}"
    )
