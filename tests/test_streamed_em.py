"""Out-of-core EM (`numpyro_moe._streamed`): the same fixed points as the in-memory EM, read from
NumPy memmaps, Dask arrays and chunk iterables alike, monotone, and compiled once per model
structure whatever n."""

from __future__ import annotations

import jax
import numpy as np
import numpyro
import pytest
from compilations import count_compilations

import numpyro_moe as moe
from numpyro_moe import _fit, metrics
from numpyro_moe.simulation import simulate

numpyro.enable_x64()

CHUNK = 512  # several blocks, the last one padded, at the sizes below


@pytest.fixture(scope="module")
def data():
    x, y, truth = simulate(key=jax.random.key(5), num_samples=1500, dim=4, num_experts=3, gate_scale=2.0)
    return np.asarray(x), np.asarray(y), truth


@pytest.fixture(scope="module")
def starts(data):
    x, y, _ = data
    return moe.random_starts(x, y, num_experts=3, num_starts=2, key=jax.random.key(2))


@pytest.fixture(scope="module")
def memmap(data, tmp_path_factory):
    x, y, _ = data
    folder = tmp_path_factory.mktemp("memmap")
    mapped_x = np.lib.format.open_memmap(folder / "x.npy", mode="w+", dtype=np.float64, shape=x.shape)
    mapped_y = np.lib.format.open_memmap(folder / "y.npy", mode="w+", dtype=np.float64, shape=y.shape)
    mapped_x[:], mapped_y[:] = x, y
    mapped_x.flush(), mapped_y.flush()
    return np.load(folder / "x.npy", mmap_mode="r"), np.load(folder / "y.npy", mmap_mode="r")


# Tolerances: both EMs stop when the objective per point changes by less than 1e-11; the objective
# is quadratic near the optimum, so parameters agree to about sqrt(1e-11) ~ 3e-6 times the
# curvature's condition (measured: at most 2e-5 in the gates, 1e-7 elsewhere at n = 4000).
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"shared_noise": True, "penalized": False},
        {"family": "student_t"},
        {"fix": ("experts",)},
        {"link": "tanh"},
    ],
    ids=["per-expert", "shared-ml", "student-t", "gate-only", "tanh"],
)
def test_streamed_em_reaches_the_in_memory_optimum(data, starts, options):
    x, y, _ = data
    options = dict(options)
    init = starts
    link = options.pop("link", None)
    if link is not None:  # a nonlinear link: damped Gauss-Newton steps for the experts
        x, y, _ = simulate(key=jax.random.key(6), num_samples=1500, dim=4, num_experts=3, link=link)
        x, y = np.asarray(x), np.asarray(y)
        init = moe.random_starts(x, y, num_experts=3, num_starts=2, key=jax.random.key(2), link=link)
    # Streamed EM takes plain EM steps: the in-memory fit on the same path (no SQUAREM).
    in_memory = moe.fit_em(x, y, init, tol=1e-11, max_iterations=3000, accelerate=False, **options)
    streamed = moe.fit_em(x, y, init, tol=1e-11, max_iterations=3000, streamed=True, chunk_size=CHUNK, **options)
    assert streamed.start == in_memory.start
    np.testing.assert_allclose(streamed.start_objectives, in_memory.start_objectives, atol=1e-8)
    assert abs(streamed.log_likelihood - in_memory.log_likelihood) < 1e-8
    for name in ("experts", "gates", "noise"):
        np.testing.assert_allclose(
            np.asarray(getattr(streamed.params, name)), np.asarray(getattr(in_memory.params, name)), atol=2e-4,
            err_msg=name,
        )
    # A generalised EM: the objective never decreases.
    assert np.min(np.diff(streamed.history)) > -1e-12
    np.testing.assert_allclose(streamed.expert_weights, in_memory.expert_weights, atol=1e-5)
    assert streamed.entropy == pytest.approx(in_memory.entropy, rel=1e-4)


def test_memmaps_dask_arrays_and_chunk_lists_are_read_alike(data, starts, memmap, monkeypatch):
    dask_array = pytest.importorskip("dask.array")
    x, y, _ = data
    mapped_x, mapped_y = memmap
    reference = moe.fit_em(mapped_x, mapped_y, starts, chunk_size=CHUNK, max_iterations=30)
    # The same blocks, so the same sums: identical fits.
    chunks = [(x[start : start + 200], y[start : start + 200]) for start in range(0, len(y), 200)]
    from_list = moe.fit_em(chunks, None, starts, chunk_size=CHUNK, max_iterations=30)
    from_dask = moe.fit_em(
        dask_array.from_array(x, chunks=(300, 4)), dask_array.from_array(y, chunks=300), starts, chunk_size=CHUNK,
        max_iterations=30,
    )
    forced = moe.fit_em(x, y, starts, chunk_size=CHUNK, max_iterations=30, streamed=True)
    for fit in (from_list, from_dask, forced):
        np.testing.assert_allclose(np.asarray(fit.params.experts), np.asarray(reference.params.experts), atol=1e-12)
        np.testing.assert_allclose(fit.history, reference.history, atol=1e-12)
    # A memmap is streamed by default (the streamed EM runs), an in-memory array is not.
    calls = []
    streamed_em = _fit.streamed_em
    monkeypatch.setattr(_fit, "streamed_em", lambda *args, **kwargs: calls.append(1) or streamed_em(*args, **kwargs))
    moe.fit_em(mapped_x, mapped_y, starts, chunk_size=CHUNK, max_iterations=2)
    assert len(calls) == 1
    moe.fit_em(x, y, starts, max_iterations=2)
    assert len(calls) == 1


def test_fit_moe_out_of_core_recovers_the_experts(data, memmap):
    x, y, truth = data
    mapped_x, mapped_y = memmap
    in_memory = moe.fit_moe(x, y, num_experts=3, key=jax.random.key(0), num_starts=3)
    streamed = moe.fit_moe(mapped_x, mapped_y, num_experts=3, key=jax.random.key(0), num_starts=3, chunk_size=CHUNK)
    assert streamed.start_labels == in_memory.start_labels
    # Same starts (the moments read the same data either way), same optimum.
    assert abs(streamed.log_likelihood - in_memory.log_likelihood) < 1e-6
    error = metrics.expert_error(streamed.params.experts, truth.experts)
    assert error == pytest.approx(metrics.expert_error(in_memory.params.experts, truth.experts), abs=1e-4)
    assert error < 0.05


@pytest.mark.filterwarnings("ignore:EM hit max_iterations")
def test_a_new_n_compiles_nothing(data):
    x, y, _ = data
    init = moe.random_starts(x, y, num_experts=3, num_starts=2, key=jax.random.key(3))
    moe.fit_em(x[:1100], y[:1100], init, streamed=True, chunk_size=CHUNK, max_iterations=5)
    with count_compilations() as compiled:
        moe.fit_em(x[:1337], y[:1337], init, streamed=True, chunk_size=CHUNK, max_iterations=5)
    assert compiled == []


def test_bad_streamed_input_meets_clear_errors(data, starts):
    x, y, _ = data
    with pytest.raises(ValueError, match="gate_x: streamed"):
        moe.fit_em(x, y, starts, streamed=True, gate_x=x[:, :2])
    with pytest.raises(ValueError, match="streamed: False needs arrays"):
        moe.fit_em([(x, y)], None, starts, streamed=False)
    with pytest.raises(TypeError, match="streamed: expected True, False or None"):
        moe.fit_em(x, y, starts, streamed="yes")
    broken = y.copy()
    broken[[3, 700]] = np.nan
    with pytest.raises(ValueError, match="2 rows hold NaN"):
        moe.fit_em(x, broken, starts, streamed=True, chunk_size=CHUNK)
    with pytest.raises(ValueError, match="chunk_size"):
        moe.fit_em(x, y, starts, streamed=True, chunk_size=0)
