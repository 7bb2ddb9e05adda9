"""Several devices and several processes (`numpyro_moe._moments`): the moments, EM and the whole
fit split by rows over 4 (host) devices, or over two processes under ``jax.distributed``, equal
the single-device fit. Each check runs in fresh processes, since JAX fixes its devices and its
distributed runtime at start-up."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

import numpyro_moe as moe

ROOT = Path(__file__).resolve().parent.parent

# The data are simulated in each process once JAX is set up (under jax.distributed, after
# `jax.distributed.initialize`, which must come before any computation).
DATA = """
import json, sys
import jax
jax.config.update("jax_enable_x64", True)
import numpy as np
import numpyro_moe as moe
from numpyro_moe.simulation import simulate

CHUNK = 512


def load():
    x, y, _ = simulate(key=jax.random.key(3), num_samples=2001, dim=5, num_experts=3)
    return np.asarray(x), np.asarray(y)


def values(fit):
    return [np.asarray(fit.params.experts), np.asarray(fit.params.gates), np.asarray(fit.params.noise)]
"""

FOUR_DEVICES = DATA + """
from numpyro_moe._moments import _blocks, as_data_source

assert len(jax.devices()) == 4, jax.devices()
x, y = load()
blocks = list(_blocks(as_data_source(x, y, devices="all"), CHUNK))
split = all(len(xb.sharding.device_set) == 4 and len(yb.sharding.device_set) == 4 for xb, yb, _ in blocks)


def gap(first, second):
    return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(first, second, strict=True))


one = moe.estimate_experts(x, y, num_experts=3, key=jax.random.key(0), chunk_size=CHUNK)
four = moe.estimate_experts(x, y, num_experts=3, key=jax.random.key(0), chunk_size=CHUNK, devices="all")
moments = gap([one.experts, one.diagnostics.t2_eigenvalues], [four.experts, four.diagnostics.t2_eigenvalues])
starts = moe.random_starts(x, y, num_experts=3, num_starts=2, key=jax.random.key(1))
single = moe.fit_em(x, y, starts, streamed=True, chunk_size=CHUNK, max_iterations=40)
sharded = moe.fit_em(x, y, starts, chunk_size=CHUNK, max_iterations=40, devices=4)
em = gap(values(single) + [single.history], values(sharded) + [sharded.history])
single = moe.fit_moe(x, y, num_experts=3, key=jax.random.key(2), num_starts=2, streamed=True, chunk_size=CHUNK)
sharded = moe.fit_moe(x, y, num_experts=3, key=jax.random.key(2), num_starts=2, chunk_size=CHUNK, devices="all")
print(json.dumps({"split": split, "moments": moments, "em": em, "fit": gap(values(single), values(sharded))}))
"""

ONE_OF_TWO = DATA + """
jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, process = sys.argv[1], int(sys.argv[2])
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process)
x, y = load()
rows = slice(0, 1000) if process == 0 else slice(1000, None)  # each process holds its own rows
fit = moe.fit_moe(x[rows], y[rows], num_experts=3, key=jax.random.key(2), num_starts=2, chunk_size=CHUNK)
print(json.dumps([value.tolist() for value in values(fit)] + [fit.log_likelihood, jax.process_count()]))
"""

SINGLE = DATA + """
x, y = load()
fit = moe.fit_moe(x, y, num_experts=3, key=jax.random.key(2), num_starts=2, chunk_size=CHUNK, streamed=True)
print(json.dumps([value.tolist() for value in values(fit)] + [fit.log_likelihood, jax.process_count()]))
"""


def run_script(source: str, tmp_path: Path, *args: str, environment: dict | None = None) -> subprocess.Popen:
    script = tmp_path / f"script_{abs(hash(source))}.py"
    script.write_text(textwrap.dedent(source))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    env.pop("XLA_FLAGS", None)  # one device unless asked
    env.update(environment or {})
    return subprocess.Popen(
        [sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def result_of(process: subprocess.Popen):
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-4000:]
    return json.loads(stdout.strip().splitlines()[-1])


def test_four_devices_give_the_single_device_moments_em_and_fit(tmp_path):
    figures = result_of(
        run_script(FOUR_DEVICES, tmp_path, environment={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    )
    assert figures["split"], "the blocks were not split over the 4 devices"
    # Sums in another order: float64 rounding only.
    assert figures["moments"] < 1e-10
    assert figures["em"] < 1e-10
    assert figures["fit"] < 1e-10


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def test_two_processes_fit_the_model_of_all_their_rows(tmp_path):
    port = str(_free_port())
    processes = [run_script(ONE_OF_TWO, tmp_path, port, str(index)) for index in range(2)]
    reference = run_script(SINGLE, tmp_path)
    first, second = (result_of(process) for process in processes)
    single = result_of(reference)
    assert first[-1] == second[-1] == 2 and single[-1] == 1
    for part in range(4):  # experts, gates, noise, log-likelihood
        np.testing.assert_allclose(np.asarray(first[part]), np.asarray(single[part]), rtol=0, atol=1e-8)
        np.testing.assert_allclose(np.asarray(second[part]), np.asarray(first[part]), rtol=0, atol=0)


def test_bad_devices_meet_clear_errors():
    x, y = np.ones((50, 3)), np.ones(50)
    with pytest.raises(ValueError, match="devices: expected None, 'all'"):
        moe.estimate_experts(x, y, num_experts=2, key=jax.random.key(0), devices="gpus")
    with pytest.raises(ValueError, match=r"devices: expected 1 to \d+"):
        moe.estimate_experts(x, y, num_experts=2, key=jax.random.key(0), devices=len(jax.local_devices()) + 1)
    with pytest.raises(TypeError, match="devices: expected None"):
        moe.estimate_experts(x, y, num_experts=2, key=jax.random.key(0), devices=2.5)
    start = moe.random_starts(x, y, num_experts=2, num_starts=1, key=jax.random.key(0))
    with pytest.raises(ValueError, match="streamed: False fits in memory on one device"):
        moe.fit_em(x, y, start, streamed=False, devices="all")
