"""JAX's persistent compilation cache, as the package turns it on.

JAX reads its cache settings once per process, so each case runs in a fresh subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from numpyro_moe._compilation_cache import CACHE_VARIABLE, compilation_cache_dir

ROOT = Path(__file__).resolve().parent.parent

# The cache directory JAX ends up with, whatever was imported first.
SHOW_DIR = "import {first}, {second}; print(jax.config.jax_compilation_cache_dir)"

# A small joint EM fit on simulated data; prints what JAX compiled and what it loaded.
FIT = """
import json
import jax
from jax import monitoring
events = {}
monitoring.register_event_listener(lambda event, **_: events.__setitem__(event, events.get(event, 0) + 1))
compiles = []
monitoring.register_event_duration_secs_listener(
    lambda event, seconds, **_: compiles.append(seconds) if event == "/jax/core/compile/backend_compile_duration"
    else None
)
jax.config.update("jax_enable_x64", True)
import numpyro_moe as moe
from numpyro_moe.simulation import simulate

x, y, truth = simulate(key=jax.random.key(0), num_samples=300, dim=3, num_experts=2)
fit = moe.fit_em(x, y, truth, max_iterations=20)
print(json.dumps({
    "compiles": len(compiles),
    "hits": events.get("/jax/compilation_cache/cache_hits", 0),
    "log_likelihood": float(fit.log_likelihood),
}))
"""


def _run(code: str, **variables: str) -> str:
    environment = {
        name: value
        for name, value in os.environ.items()
        if name not in (CACHE_VARIABLE, "JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
    }
    environment.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", **variables)
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, env=environment, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_the_directory_follows_the_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(CACHE_VARIABLE, raising=False)
    assert compilation_cache_dir() == tmp_path / "xdg" / "numpyro-moe" / "jax"
    monkeypatch.setenv(CACHE_VARIABLE, str(tmp_path / "mine"))
    assert compilation_cache_dir() == tmp_path / "mine"
    for off in ("0", "off", "False", " no "):
        monkeypatch.setenv(CACHE_VARIABLE, off)
        assert compilation_cache_dir() is None


@pytest.mark.parametrize(("first", "second"), [("numpyro_moe", "jax"), ("jax", "numpyro_moe")])
def test_importing_the_package_turns_the_cache_on_before_or_after_jax(tmp_path, first, second):
    # Imported before JAX, the package sets JAX's environment variable; after it, JAX's config.
    shown = _run(SHOW_DIR.format(first=first, second=second), **{CACHE_VARIABLE: str(tmp_path / "cache")})
    assert shown == str(tmp_path / "cache")
    shown = _run(SHOW_DIR.format(first=first, second=second), XDG_CACHE_HOME=str(tmp_path / "xdg"))
    assert shown == str(tmp_path / "xdg" / "numpyro-moe" / "jax")


def test_the_variable_turns_the_cache_off(tmp_path):
    assert _run(SHOW_DIR.format(first="numpyro_moe", second="jax"), **{CACHE_VARIABLE: "0"}) == "None"


def test_a_cache_the_user_configured_is_left_alone(tmp_path):
    mine = tmp_path / "users-own"
    theirs = {CACHE_VARIABLE: str(tmp_path / "package")}
    by_environment = _run(
        SHOW_DIR.format(first="numpyro_moe", second="jax"), JAX_COMPILATION_CACHE_DIR=str(mine), **theirs
    )
    assert by_environment == str(mine)
    by_config = _run(
        f"import jax; jax.config.update('jax_compilation_cache_dir', {str(mine)!r}); "
        + SHOW_DIR.format(first="numpyro_moe", second="jax"),
        **theirs,
    )
    assert by_config == str(mine)
    assert not (tmp_path / "package").exists()


def test_a_second_process_compiles_nothing_the_first_compiled(tmp_path):
    cache = tmp_path / "cache"
    first = json.loads(_run(FIT, **{CACHE_VARIABLE: str(cache)}))
    entries = sorted(path.name for path in cache.iterdir())
    second = json.loads(_run(FIT, **{CACHE_VARIABLE: str(cache)}))
    # Every program the first process compiled was written (none is too quick to keep); a
    # program compiled twice with the same code was loaded the second time...
    assert first["compiles"] > 10
    assert len(entries) == first["compiles"] - first["hits"] > 0
    # ...and the second loads each of them: no compilation, no new entry, the same fit.
    assert second["hits"] == second["compiles"] == first["compiles"]
    assert sorted(path.name for path in cache.iterdir()) == entries
    assert second["log_likelihood"] == first["log_likelihood"]
