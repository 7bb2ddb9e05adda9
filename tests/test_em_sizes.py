"""EM compiles once per model structure and size class, not for every n: the data are padded with
masked zero rows to a coarse ladder of sizes (`padded_size`), which must change no result."""

from __future__ import annotations

import collections

import jax
import numpy as np
import numpyro
import pytest
from compilations import count_compilations

import numpyro_moe as moe
from numpyro_moe import metrics
from numpyro_moe._em import padded_size
from numpyro_moe.simulation import simulate

numpyro.enable_x64()

EM_PROGRAMS = ("_em_block",)


def test_the_size_ladder_pads_by_at_most_a_quarter():
    sizes = [padded_size(n) for n in range(1, 20_000)]
    assert all(size >= n for n, size in enumerate(sizes, start=1))
    assert all(size <= max(16, 1.25 * n) for n, size in enumerate(sizes, start=1))
    assert sizes == sorted(sizes)  # monotone: a larger n never gets a smaller program
    # Few classes: 4 per doubling of n.
    assert len(set(sizes)) <= 4 * np.log2(20_000) + 1


@pytest.fixture(scope="module")
def data():
    x, y, truth = simulate(key=jax.random.key(21), num_samples=420, dim=3, num_experts=2)
    return np.asarray(x), np.asarray(y), truth


@pytest.mark.parametrize("intercepts", [False, True])
def test_padding_rows_change_nothing(data, intercepts):
    # 410 points run in a program of 448 rows: the likelihood, the expert weights and the entropy
    # EM reports are those of the 410 points alone, computed here without padding.
    x, y, truth = data
    x, y = x[:410], y[:410]
    assert padded_size(410) == 448
    start = moe.random_starts(x, y, num_experts=2, num_starts=2, key=jax.random.key(22), intercepts=intercepts)
    fit = moe.fit_em(x, y, start)
    assert fit.log_likelihood == pytest.approx(metrics.heldout_log_likelihood(fit.params, x, y), abs=1e-12)
    likelihood = moe.MixtureOfExperts.from_params(fit.params, x)
    responsibilities = np.asarray(likelihood.expert_probabilities(y))
    np.testing.assert_allclose(fit.expert_weights, responsibilities.mean(0), atol=1e-12)
    entropy = -np.sum(responsibilities * np.log(np.where(responsibilities > 0, responsibilities, 1.0)))
    assert fit.entropy == pytest.approx(entropy, rel=1e-10)


def test_a_new_n_in_the_same_size_class_compiles_nothing(data):
    x, y, truth = data
    moe.fit_em(x[:400], y[:400], truth, max_iterations=30)  # compiles EM for the class of 448 rows
    with count_compilations() as compiled:
        for n in (399, 410, 420):
            moe.fit_em(x[:n], y[:n], truth, max_iterations=30)
    # Nothing at all: EM's programs are the size class's, and the per-n work (validation, the
    # response's spread, the padding) runs on the host.
    assert compiled == [], collections.Counter(compiled)
    # A new size class compiles them (the counter sees EM's programs at all).
    with count_compilations() as compiled:
        moe.fit_em(x[:300], y[:300], truth, max_iterations=30)
    assert any(program in name for name in compiled for program in EM_PROGRAMS), compiled


def test_the_whole_fit_at_a_new_n_compiles_nothing(data):
    # fit_moe: the moment estimate (fixed-size chunks), the gate-only EM and joint EM from several
    # starts; measured 0.42 s at a new n against 0.47 s repeated (d = 5, k = 3, n = 1800 -> 1900).
    x, y, _ = data
    moe.fit_moe(x[:400], y[:400], num_experts=2, key=jax.random.key(23), num_starts=2)
    with count_compilations() as compiled:
        moe.fit_moe(x[:410], y[:410], num_experts=2, key=jax.random.key(23), num_starts=2)
    assert compiled == [], collections.Counter(compiled)
