"""Counting the XLA programs JAX compiles: a guard against recompiling what should be reused."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax

__all__ = ["BACKEND_COMPILE_EVENT", "count_compilations"]

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
"""JAX's monitoring event for one XLA compilation (recorded also when its persistent cache
supplies the program: the process still had no compiled program for it)."""


@contextlib.contextmanager
def count_compilations() -> Iterator[list[str]]:
    """Collect the names of the XLA programs compiled inside the ``with`` block.

    Yields a list that fills as JAX compiles, one function name per compilation; a call that finds
    its program in JAX's in-memory caches adds nothing.
    """
    names: list[str] = []

    def listen(event: str, duration: float, **metadata) -> None:
        if event == BACKEND_COMPILE_EVENT:
            names.append(str(metadata.get("fun_name", "?")))

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
