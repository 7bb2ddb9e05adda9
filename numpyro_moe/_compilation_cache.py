"""JAX's persistent compilation cache, turned on for the package and its command line.

A compiled XLA program is written to a directory keyed by the program and the platform, so a
second process that runs the same fits (same model structure, same array shapes) loads the
programs instead of compiling them again. The package turns this on when it is imported, unless
the user configured JAX's cache themselves or set ``NUMPYRO_MOE_CACHE=0``.

Where: ``$NUMPYRO_MOE_CACHE`` when it names a path, else ``$XDG_CACHE_HOME/numpyro-moe/jax``
(``~/.cache/numpyro-moe/jax``). Nothing here imports JAX: when JAX is not imported yet, JAX's own
environment variables are set (``JAX_COMPILATION_CACHE_DIR``, and
``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` unless set), which JAX reads when it is imported;
child processes inherit them and share the cache.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["CACHE_VARIABLE", "compilation_cache_dir", "use_compilation_cache"]

CACHE_VARIABLE = "NUMPYRO_MOE_CACHE"
"""Environment variable: a directory for the cache, or ``0``/``off``/``false``/``no`` for none."""

_OFF = ("0", "off", "false", "no")
# JAX caches only programs that took at least this long to compile (its default is 1 s). The
# package's EM, likelihood and prediction programs each compile in 10-300 ms on a CPU, and a fit
# runs about a hundred of them: cache them all, or a warm start still spends seconds compiling.
_MIN_COMPILE_TIME_SECS = 0.0
_JAX_DIR_VARIABLE = "JAX_COMPILATION_CACHE_DIR"
_JAX_MIN_TIME_VARIABLE = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"


def compilation_cache_dir() -> Path | None:
    """The package's cache directory: ``$NUMPYRO_MOE_CACHE`` when set to a path, ``None`` when it
    is ``0``/``off``/``false``/``no``, else ``$XDG_CACHE_HOME/numpyro-moe/jax``
    (``~/.cache/numpyro-moe/jax``)."""
    setting = os.environ.get(CACHE_VARIABLE, "").strip()
    if setting.lower() in _OFF:
        return None
    if setting:
        return Path(setting).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "numpyro-moe" / "jax"


def use_compilation_cache() -> Path | None:
    """Turn on JAX's persistent compilation cache in `compilation_cache_dir`.

    Does nothing, and returns ``None``, when ``NUMPYRO_MOE_CACHE`` is off or the user already
    chose a cache directory for JAX (``JAX_COMPILATION_CACHE_DIR`` or
    ``jax.config.update("jax_compilation_cache_dir", ...)``); that directory is then used as JAX
    uses it. JAX decides whether to use the cache at its first compilation, so this takes effect
    only if nothing was compiled before it ran (importing the package first is enough).

    Returns
    -------
    Path or None
        The directory now in use, or ``None`` when this call turned nothing on.
    """
    path = compilation_cache_dir()
    if path is None or os.environ.get(_JAX_DIR_VARIABLE):
        return None
    jax = sys.modules.get("jax")
    if jax is None:  # JAX reads its options from the environment when it is imported
        os.environ[_JAX_DIR_VARIABLE] = str(path)
        os.environ.setdefault(_JAX_MIN_TIME_VARIABLE, str(_MIN_COMPILE_TIME_SECS))
        return path
    if jax.config.jax_compilation_cache_dir is not None:
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    if _JAX_MIN_TIME_VARIABLE not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", _MIN_COMPILE_TIME_SECS)
    return path
