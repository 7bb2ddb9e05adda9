"""Shared test set-up: double precision everywhere, so tolerances can be tight.

Rank promotion. ``jax.config.update("jax_numpy_rank_promotion", "raise")`` was tried and is
deliberately NOT enabled: NumPyro itself relies on implicit rank promotion under parallel
enumeration (``Normal.log_prob`` broadcasts the observed ``y`` of shape (n,) against the
enumerated means of shape (k, n)), so `moe_regression_enumerated`, ``infer_discrete`` and
``numpyro.contrib.funsor.log_density`` all fail under it. The package also uses intended
row-wise broadcasting ((k, d) - (d,) in `normalize_gates`, (n, k) + (k,) for intercepts).
Shapes are instead asserted explicitly in the tests.
"""

from __future__ import annotations

import os

# The tests measure the code, not what a cache holds: the package's persistent compilation cache
# stays off in the test processes and in the subprocesses they start (tests/test_compilation_cache.py
# turns it on in its own subprocesses). With it on and cold, JAX (0.12, CPU) aborted serialising
# the README's NUTS program for the cache in a process that had run a dozen test files before,
# which took the worker down. Set NUMPYRO_MOE_CACHE yourself to run the tests with a cache.
os.environ.setdefault("NUMPYRO_MOE_CACHE", "0")

import numpyro  # noqa: E402
import pytest

numpyro.enable_x64()


@pytest.fixture(autouse=True)
def keep_xla_flags(monkeypatch):
    # The command line (demo, fit, models) sets XLA_FLAGS (host device count) for the process:
    # every test gets it back as it was.
    if "XLA_FLAGS" in os.environ:
        monkeypatch.setenv("XLA_FLAGS", os.environ["XLA_FLAGS"])
    else:
        monkeypatch.delenv("XLA_FLAGS", raising=False)
