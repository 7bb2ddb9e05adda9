"""How often the fits compile: a repeated fit compiles nothing (a new n in the same size class
compiles no EM program either: tests/test_em_sizes.py).

`compilations.count_compilations` counts XLA compilations through JAX's monitoring events. A
fit at a data size the process has seen must reuse every program.
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compilations import count_compilations

import numpyro_moe as moe
from numpyro_moe._em import padded_size
from numpyro_moe._fit import _normal_draws
from numpyro_moe.simulation import simulate


@pytest.fixture(scope="module")
def warm():
    """Data, a start, and a process that has fitted EM once at n = 400."""
    x, y, truth = simulate(key=jax.random.key(11), num_samples=400, dim=3, num_experts=2)
    x, y = np.asarray(x), np.asarray(y)
    first = moe.fit_em(x, y, truth, max_iterations=30)
    return x, y, truth, first


def test_the_counter_sees_a_new_shape_and_not_a_repeat():
    total = jax.jit(lambda v: jnp.sin(v).sum())
    values = np.ones(5)
    total(values)
    with count_compilations() as repeated:
        total(values)
    with count_compilations() as reshaped:
        total(np.ones(6))
    assert repeated == []
    assert "jit(<lambda>)" in reshaped


def test_a_repeated_em_fit_compiles_nothing(warm):
    x, y, truth, first = warm
    with count_compilations() as compiled:
        again = moe.fit_em(x, y, truth, max_iterations=30)
    assert compiled == [], collections.Counter(compiled)
    assert float(again.log_likelihood) == float(first.log_likelihood)


def test_a_first_fit_compiles_its_programs_not_its_set_up():
    # A structure the process has not fitted (d = 7, k = 3, intercepts): fit_moe compiles its EM
    # programs (one for the screen and the finalists, whose widths match, and the tensor start's
    # gate EM, each with its final pass inside), the moment passes and the decomposition, and a
    # handful of small ones (random draws, host-to-device staging): 10 in a fresh process. The set-up between them (starts, priors,
    # padding, the state) runs on the host: op by op in jax.numpy it compiled about 100 one-op
    # programs more (110 in all), each a few tens of ms in a fresh process.
    x, y, _ = simulate(key=jax.random.key(5), num_samples=700, dim=7, num_experts=3)
    x, y = np.asarray(x), np.asarray(y)
    with count_compilations() as compiled:
        moe.fit_moe(x, y, num_experts=3, key=jax.random.key(1), intercepts=True, num_starts=20, num_finalists=5)
    assert len(compiled) <= 14, collections.Counter(compiled)
    assert collections.Counter(compiled)["jit(_em_block)"] == 2, collections.Counter(compiled)


def test_cross_validation_folds_run_the_full_fits_programs():
    # n = 400 pads to 448 rows; a fold's 320 training rows would pad to 320, a size class of its
    # own, and compile every EM program again (about a second each in a fresh process). The folds
    # are padded to the full data's class instead, and each fold's fit scores all rows in one
    # compiled pass: after the fit to all the data, cross-validation compiles no EM program and
    # one scoring program.
    x, y, _ = simulate(key=jax.random.key(8), num_samples=400, dim=4, num_experts=2)
    x, y = np.asarray(x), np.asarray(y)
    assert padded_size(400) != padded_size(320)
    options = dict(num_experts=[2], intercepts=True, num_starts=6, num_finalists=3)
    moe.select_num_experts(x, y, key=jax.random.key(2), criterion="bic", **options)
    with count_compilations() as compiled:
        selection = moe.select_num_experts(x, y, key=jax.random.key(2), criterion="cv", **options)
    counts = collections.Counter(compiled)
    assert counts["jit(_em_block)"] == 0, counts
    assert counts["jit(_log_densities)"] == 1, counts
    assert np.isfinite(selection.table[0]["cv"])


@pytest.mark.parametrize("shape", [(20, 3, 13), (5, 1, 2), (1, 1, 1), (7, 8, 40)])
def test_the_random_starts_draws_equal_jaxs_draw_of_their_shape(shape):
    # The flat, rounded-up draw keeps the values of jax.random.normal(key, shape) (partitionable
    # threefry, JAX's default): the random starts are what they were before the change.
    key = jax.random.key(17)
    for dtype in (jnp.float64, jnp.float32):
        expected = np.asarray(jax.random.normal(key, shape, dtype))
        np.testing.assert_array_equal(_normal_draws(key, shape, dtype), expected)


def test_random_starts_for_a_new_number_of_experts_compile_no_sampler():
    x, y, _ = simulate(key=jax.random.key(4), num_samples=200, dim=6, num_experts=2)
    x, y = np.asarray(x), np.asarray(y)
    moe.random_starts(x, y, num_experts=2, num_starts=20, key=jax.random.key(0))
    with count_compilations() as compiled:
        starts = moe.random_starts(x, y, num_experts=5, num_starts=20, key=jax.random.key(1))
    assert "jit(_normal)" not in compiled, collections.Counter(compiled)
    assert starts.experts.shape == (20, 5, 6)
    np.testing.assert_allclose(np.linalg.norm(starts.experts, axis=-1), 1.0, rtol=1e-12)
