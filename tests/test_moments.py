"""Streamed cross-moments of the tensor method (Makkuva, Kannan, Oh, Viswanath, ICML 2019) against
direct dense computations, and the chunked data path."""

from __future__ import annotations

import itertools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scipy_stats

from numpyro_moe import _second_moment, estimate_experts
from numpyro_moe._moments import (
    _RING,
    PILOT_ROWS,
    SHAPE_ROWS,
    _blocks,
    _first_pass_chunk,
    _third_moment_chunk,
    as_data_source,
    first_pass,
    p2_sketch,
    shape_rows,
    whitened_third_moment,
)
from numpyro_moe._second_moment import random_probes, second_moment, subspace_eigh
from numpyro_moe.experts import output_transforms
from numpyro_moe.simulation import simulate

NUM_SAMPLES, DIM, NUM_EXPERTS, NOISE = 3000, 6, 3, 0.1
# Smaller than n, not dividing it: the arrays are cut into several chunks, the last one padded.
CHUNK_SIZE = 700


@pytest.fixture(scope="module")
def data():
    # The first rows of a larger simulated set (its shapes are shared with tests/test_experts.py,
    # so the simulator compiles once for both).
    x, y, _ = simulate(
        key=jax.random.key(0), num_samples=50_000, dim=DIM, num_experts=NUM_EXPERTS, noise=NOISE
    )
    x, y = x[:NUM_SAMPLES], y[:NUM_SAMPLES]
    return np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)


def inverse_sqrt(matrix):
    values, vectors = np.linalg.eigh(matrix)
    return (vectors / np.sqrt(values)) @ vectors.T


def standardized(x):
    mean = x.mean(axis=0)
    covariance = np.cov(x, rowvar=False, bias=True)
    return (x - mean) @ inverse_sqrt(covariance)


def dense_t2(x, y, transforms):
    """E[(P2(y) - mean P2) z z^T] / c2 in standardised coordinates, directly."""
    z = standardized(x)
    p2 = transforms.p2(y)
    return np.einsum("n,na,nb->ab", p2 - p2.mean(), z, z) / len(y) / transforms.c2


def dense_third_moment(x, y, transforms):
    """The full d x d x d tensor E[(P3(y) - mean P3) S3(z)], S3(z) = z^{(x)3} - sym(z (x) I)."""
    z = standardized(x)
    p3 = transforms.p3(y)
    centred = p3 - p3.mean()
    d = z.shape[1]
    eye = np.eye(d)
    cubes = np.einsum("na,nb,nc->nabc", z, z, z)
    corrections = (
        np.einsum("na,bc->nabc", z, eye)
        + np.einsum("nb,ac->nabc", z, eye)
        + np.einsum("nc,ab->nabc", z, eye)
    )
    return np.einsum("n,nabc->abc", centred, cubes - corrections) / len(y)


def test_first_pass_sums_match_direct_sums(data):
    x, y = data
    transforms = output_transforms("linear", 0.0)
    source = as_data_source(x, y, chunk_size=CHUNK_SIZE)
    sums = first_pass(source, transforms, CHUNK_SIZE, shifts=(x[:10].mean(0), 0.5))
    # Sums of the shifted data: x - x_shift and P2(y) - p2_shift.
    np.testing.assert_allclose(sums.x_shift, x[:10].mean(0))
    assert sums.p2_shift == 0.5 and sums.precision == "float64"
    shifted, p2 = x - sums.x_shift, transforms.p2(y) - 0.5
    assert sums.count == NUM_SAMPLES
    np.testing.assert_allclose(sums.sum_x, shifted.sum(0), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(sums.sum_xx, shifted.T @ shifted, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(sums.sum_p2x, p2 @ shifted, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(sums.sum_p2xx, (p2[:, None] * shifted).T @ shifted, rtol=1e-10, atol=1e-10)
    # Chunks of 700 rows are below SHAPE_ROWS: every row enters the power sums.
    assert sums.shape_count == NUM_SAMPLES
    np.testing.assert_allclose(sums.shape_sums, [(shifted**m).sum(0) for m in range(1, 5)], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(sums.sum_y, [(y**m).sum() for m in range(1, 5)], rtol=1e-10)
    assert sums.sum_p2sq == pytest.approx(p2 @ p2, rel=1e-10)


def test_first_pass_defaults_and_power_sums_of_chunk_heads(data):
    x, y = data
    transforms = output_transforms("linear", 0.0)
    source = as_data_source(x, y, chunk_size=2048)
    sums = first_pass(source, transforms, 2048)
    # Default shifts: the means over the first PILOT_ROWS rows (all 3000 here).
    np.testing.assert_allclose(sums.x_shift, x[:PILOT_ROWS].mean(0), rtol=1e-12)
    assert sums.p2_shift == pytest.approx(transforms.p2(y[:PILOT_ROWS]).mean(), rel=1e-12)
    # The skewness/kurtosis sums take the first 1024 rows of each 2048-row chunk.
    assert shape_rows(2048) == SHAPE_ROWS == 1024 and shape_rows(700) == 700 and shape_rows(2**14) == 2048
    head = np.concatenate([x[:SHAPE_ROWS], x[2048 : 2048 + SHAPE_ROWS]]) - sums.x_shift
    assert sums.shape_count == len(head)
    np.testing.assert_allclose(sums.shape_sums, [(head**m).sum(0) for m in range(1, 5)], rtol=1e-10, atol=1e-10)


def test_mixed_precision_sums_agree_with_float64_to_float32_rounding(data):
    x, y = data
    transforms = output_transforms("linear", 0.0)
    # A large offset of x and of y: the shifts keep the float32 products accurate.
    x, y = x + 1e3, y + 10.0
    source = as_data_source(x, y, chunk_size=CHUNK_SIZE)
    exact = first_pass(source, transforms, CHUNK_SIZE)
    mixed = first_pass(source, transforms, CHUNK_SIZE, precision="mixed")
    assert mixed.precision == "mixed"
    for name in ("sum_x", "sum_xx", "sum_p2x", "sum_p2xx"):
        value, reference = getattr(mixed, name), getattr(exact, name)
        # float32 has a 6e-8 unit roundoff; 700-row chunk sums stay within 1e-6 of the scale.
        scale = np.max(np.abs(reference)) if name.endswith("xx") else np.sqrt(NUM_SAMPLES * np.abs(np.diag(exact.sum_xx)).max())
        assert np.max(np.abs(value - reference)) < 1e-6 * scale * (1 + np.abs(transforms.p2(y)).mean()), name
    # x + 1e3 is rounded to float32 (steps of 6e-5) before the shift: a noise of 2e-5 per entry,
    # far below the sampling error of the power sums (about sqrt(n) = 55 for the odd ones).
    np.testing.assert_allclose(mixed.shape_sums, exact.shape_sums, rtol=1e-4, atol=NUM_SAMPLES * 1e-4)
    # Unshifted float32 products of x + 1e3 would lose about 1e-7 * 1e6: the covariance itself.
    centred = exact.sum_xx / NUM_SAMPLES - np.outer(exact.sum_x, exact.sum_x) / NUM_SAMPLES**2
    centred_mixed = mixed.sum_xx / NUM_SAMPLES - np.outer(mixed.sum_x, mixed.sum_x) / NUM_SAMPLES**2
    np.testing.assert_allclose(centred_mixed, centred, atol=1e-5)


def test_matrix_free_sums_match_direct_sums(data):
    x, y = data
    transforms = output_transforms("sigmoid", 0.0)
    source = as_data_source(x, y, chunk_size=CHUNK_SIZE)
    probes = np.random.default_rng(1).normal(size=(DIM, 2))
    p2 = transforms.p2(y)
    shifts = (x[:5].mean(0), 0.25)
    shifted, p2 = x - shifts[0], p2 - shifts[1]
    expected = (p2[:, None] * shifted).T @ shifted @ probes
    sums = first_pass(source, transforms, CHUNK_SIZE, probes, shifts=shifts)
    np.testing.assert_allclose(sums.sum_p2xx, expected, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(sums.sum_xx, shifted.T @ shifted, rtol=1e-10, atol=1e-10)
    sketch = p2_sketch(source, transforms, probes, CHUNK_SIZE, shifts)
    np.testing.assert_allclose(sketch, expected, rtol=1e-10, atol=1e-10)


def test_subspace_iteration_is_exact_for_low_rank_and_accurate_with_noise():
    rng = np.random.default_rng(0)
    d, k, p = 40, 3, 8
    basis = np.linalg.qr(rng.normal(size=(d, k)))[0]
    low_rank = (basis * np.array([3.0, 2.0, 1.0])) @ basis.T
    noise = rng.normal(size=(d, d)) * 0.01
    # Exact for rank <= p. With noise (spectral norm ~0.18, so lambda_{p+1} / lambda_k ~ 0.15),
    # two power iterations leave angles ~0.15^2 and Ritz-value errors ~lambda 0.15^4 ~ 5e-4
    # (measured 8e-4); Rayleigh-Ritz on the first sketch alone misses by up to 6e-2.
    for matrix, power_iterations, atol in [(low_rank, 1, 1e-12), (low_rank + noise + noise.T, 2, 2e-3)]:
        probes = rng.normal(size=(d, p))
        values, vectors = subspace_eigh(
            matrix @ probes, lambda v, matrix=matrix: matrix @ v, power_iterations
        )
        exact_values, exact_vectors = np.linalg.eigh(matrix)
        np.testing.assert_allclose(values[:k], exact_values[::-1][:k], atol=atol)
        # The top-k eigenvectors, up to sign.
        cosines = np.abs(np.sum(vectors[:, :k] * exact_vectors[:, ::-1][:, :k], axis=0))
        np.testing.assert_allclose(cosines, 1.0, atol=atol)
        assert values.shape == (p,) and vectors.shape == (d, p)


def test_randomized_second_moment_matches_dense_top_eigenspace():
    # Large d relative to k: the top-k T2 eigenspace by subspace iteration (three passes) agrees
    # with the dense d x d matrix to far below the sampling error (T2's (k+1)-th eigenvalue here
    # is 0.052, the top-k 0.48 and 0.53, the noise floor 0.050; measured agreement: eigenvalues
    # to 7e-6 relative, eigenvectors to 1 - |cos| = 4e-6).
    x, y, _ = simulate(key=jax.random.key(4), num_samples=20_000, dim=24, num_experts=2, noise=NOISE)
    transforms = output_transforms("linear", 0.0)
    source = as_data_source(np.asarray(x), np.asarray(y), chunk_size=4096)
    dense = second_moment(source, transforms, True, 4096)
    probes = random_probes(jax.random.key(0), 24, 2, "randomized")
    assert probes.shape == (24, 12)
    sketched = second_moment(source, transforms, True, 4096, probes)
    np.testing.assert_allclose(sketched.eigenvalues[:2], dense.eigenvalues[:2], rtol=1e-3)
    cosines = np.abs(np.sum(sketched.eigenvectors[:, :2] * dense.eigenvectors[:, :2], axis=0))
    assert np.all(cosines > 1 - 1e-3), cosines
    # Ritz values never exceed the eigenvalues they approximate.
    assert np.all(sketched.eigenvalues <= dense.eigenvalues[:12] + 1e-12)


@pytest.mark.parametrize("link", ["linear", "sigmoid"])
def test_second_moment_matches_dense_computation(data, link):
    x, y = data
    transforms = output_transforms(link, 0.0)
    source = as_data_source(x, y, chunk_size=CHUNK_SIZE)
    moment = second_moment(source, transforms, True, CHUNK_SIZE)
    expected = dense_t2(x, y, transforms)
    rebuilt = (moment.eigenvectors * moment.eigenvalues) @ moment.eigenvectors.T
    np.testing.assert_allclose(rebuilt, expected, atol=1e-10)
    np.testing.assert_allclose(moment.eigenvalues, np.linalg.eigvalsh(expected)[::-1], atol=1e-10)
    assert np.all(np.diff(moment.eigenvalues) <= 0)
    # The standardisation is the sample mean and the symmetric inverse square root of the
    # (biased) sample covariance.
    np.testing.assert_allclose(moment.standardization.mean, x.mean(0), atol=1e-12)
    np.testing.assert_allclose(
        moment.standardization.whitening, inverse_sqrt(np.cov(x, rowvar=False, bias=True)), atol=1e-10
    )
    np.testing.assert_allclose(moment.skewness, scipy_stats.skew(x, axis=0), atol=1e-10)
    np.testing.assert_allclose(moment.excess_kurtosis, scipy_stats.kurtosis(x, axis=0), atol=1e-10)


@pytest.mark.parametrize("whitening", ["from_t2", "random"])
def test_whitened_third_moment_matches_dense_tensor(data, whitening):
    x, y = data
    transforms = output_transforms("linear", NOISE)
    source = as_data_source(x, y, chunk_size=CHUNK_SIZE)
    moment = second_moment(source, output_transforms("linear", 0.0), True, CHUNK_SIZE)
    if whitening == "from_t2":
        # The M of the estimator: top-k eigenvectors of T2 scaled by eigenvalue^{-1/2}.
        whiten = moment.eigenvectors[:, :NUM_EXPERTS] / np.sqrt(moment.eigenvalues[:NUM_EXPERTS])
    else:
        whiten = np.random.default_rng(3).normal(size=(DIM, NUM_EXPERTS))
    standardization = moment.standardization
    result = whitened_third_moment(
        source,
        transforms,
        standardization.mean,
        standardization.whitening @ whiten,
        whiten.T @ whiten,
        moment.stats,
        CHUNK_SIZE,
    )
    dense = dense_third_moment(x, y, transforms)
    expected = np.einsum("abc,ai,bj,ck->ijk", dense, whiten, whiten, whiten)
    assert result.shape == (NUM_EXPERTS,) * 3
    np.testing.assert_allclose(result, expected, atol=1e-10 * max(1.0, np.abs(expected).max()))
    # Not a vacuous comparison: the tensor is far from zero.
    assert np.abs(expected).max() > 0.1


def uneven_chunks(x, y):
    bounds = [0, 400, 1100, 1150, 2300, NUM_SAMPLES]
    return [(x[start:stop], y[start:stop]) for start, stop in itertools.pairwise(bounds)]


@pytest.fixture(scope="module")
def in_memory_estimate(data):
    x, y = data
    return estimate_experts(x, y, num_experts=NUM_EXPERTS, key=jax.random.key(1))


def assert_same_estimate(first, second, atol=1e-12):
    np.testing.assert_allclose(first.experts, second.experts, atol=atol)
    np.testing.assert_allclose(first.weights, second.weights, atol=atol)
    np.testing.assert_allclose(first.noise, second.noise, atol=atol)
    np.testing.assert_allclose(first.expert_intercepts, second.expert_intercepts, atol=atol)
    np.testing.assert_allclose(
        first.diagnostics.t2_eigenvalues, second.diagnostics.t2_eigenvalues, atol=atol
    )
    assert first.diagnostics.num_samples == second.diagnostics.num_samples


@pytest.mark.parametrize("chunk_size", [500, 777])
def test_chunked_sources_match_in_memory_arrays(data, in_memory_estimate, chunk_size, caplog):
    x, y = data
    chunks = uneven_chunks(x, y)
    # float64 products (the in-memory default for data this small) for an exact comparison.
    kwargs = {"num_experts": NUM_EXPERTS, "key": jax.random.key(1), "chunk_size": chunk_size, "precision": "float64"}
    _first_pass_chunk.clear_cache()  # so that the first source must compile each kernel
    _third_moment_chunk.clear_cache()
    with jax.log_compiles(True), caplog.at_level(logging.WARNING, logger="jax"):
        from_list = estimate_experts(chunks, **kwargs)
        after_first = compilations(caplog)
        from_callable = estimate_experts(lambda: (pair for pair in chunks), **kwargs)
        from_arrays = estimate_experts(x, y, **kwargs)
        after_all = compilations(caplog)
    assert_same_estimate(from_list, in_memory_estimate)
    assert_same_estimate(from_callable, in_memory_estimate)
    assert_same_estimate(from_arrays, in_memory_estimate)
    # Uneven chunks are re-cut and padded to chunk_size rows: each pass compiles once
    # for a chunk_size (unpadded, these chunks would have 4 or more distinct lengths), and
    # never again for other chunk sources with the same chunk_size.
    assert after_first == (1, 1)
    assert after_all == after_first


def compilations(caplog):
    """XLA compilations of the two pass kernels among the log records so far."""
    messages = [record.getMessage() for record in caplog.records]
    return tuple(
        sum(message.startswith(f"Finished XLA compilation of jit({kernel.__name__})") for message in messages)
        for kernel in (_first_pass_chunk, _third_moment_chunk)
    )


def test_chunk_source_of_unknown_size_uses_mixed_products_and_agrees(data, in_memory_estimate):
    # precision="auto" cannot know n for a chunk source, so it takes float32 products (summed in
    # float64) when the design is well conditioned; they agree with float64 to rounding.
    x, y = data
    estimate = estimate_experts(
        uneven_chunks(x, y), num_experts=NUM_EXPERTS, key=jax.random.key(1), chunk_size=500
    )
    assert estimate.diagnostics.precision == "mixed"
    assert in_memory_estimate.diagnostics.precision == "float64"  # n d^2 is small: no gain
    assert_same_estimate(estimate, in_memory_estimate, atol=1e-5)


def test_blocks_fill_across_small_chunks_and_pad_only_the_last(data):
    # 300 rows in chunks of 30 (and one JAX chunk in between), blocks of 64 rows: the staging
    # buffers are filled across chunk boundaries, so only the block before the JAX chunk and the
    # last one are short. Each block is read before the next is made (a staging buffer is
    # refilled _RING blocks later).
    x, y = data
    x, y = x[:300], y[:300]
    shift = x[:50].mean(axis=0)
    projection = np.random.default_rng(0).normal(size=(DIM, 2))
    pieces = [(x[i : i + 30], y[i : i + 30]) for i in range(0, 150, 30)]
    pieces += [(jnp.asarray(x[150:200]), jnp.asarray(y[150:200]))]
    pieces += [(x[i : i + 30], y[i : i + 30]) for i in range(200, 300, 30)]
    source = as_data_source(pieces)
    expected_rows = [64, 64, 22, 50, 64, 36]
    for kwargs, expected in (
        ({"shift": shift}, x - shift),
        ({"shift": shift, "projection": projection}, (x - shift) @ projection),
    ):
        rows_seen, xs, ys = [], [], []
        for index, (xb, yb, rows) in enumerate(_blocks(source, 64, **kwargs)):
            xb, yb = np.array(xb), np.array(yb)  # copies: a block may alias its staging buffer
            assert xb.shape == (64, expected.shape[1]) and yb.shape == (64,)
            assert not xb[rows:].any() and not yb[rows:].any()  # zero padding
            rows_seen.append(rows)
            xs.append(xb[:rows])
            ys.append(yb[:rows])
        assert rows_seen == expected_rows
        assert len(rows_seen) > _RING  # the staging buffers were reused
        np.testing.assert_allclose(np.concatenate(xs), expected, atol=1e-12)
        np.testing.assert_array_equal(np.concatenate(ys), y)


def test_jax_arrays_match_numpy_arrays(data, in_memory_estimate):
    x, y = data
    kwargs = {"num_experts": NUM_EXPERTS, "key": jax.random.key(1), "precision": "float64"}
    on_device = estimate_experts(jnp.asarray(x), jnp.asarray(y), **kwargs)
    assert_same_estimate(on_device, in_memory_estimate)
    device_chunks = [(jnp.asarray(xc), jnp.asarray(yc)) for xc, yc in uneven_chunks(x, y)]
    assert_same_estimate(estimate_experts(device_chunks, chunk_size=500, **kwargs), in_memory_estimate)


def test_one_shot_iterator_is_refused(data):
    x, y = data
    chunks = uneven_chunks(x, y)
    with pytest.raises(TypeError, match="^x: with y=None, expected a re-iterable"):
        estimate_experts((pair for pair in chunks), num_experts=NUM_EXPERTS, key=jax.random.key(0))
    with pytest.raises(TypeError, match="^x: with y=None, expected a re-iterable"):
        estimate_experts(iter(chunks), num_experts=NUM_EXPERTS, key=jax.random.key(0))
    # An in-memory x needs its y.
    with pytest.raises(TypeError, match="^y: expected an \\(n,\\) array of responses"):
        estimate_experts(x, num_experts=NUM_EXPERTS, key=jax.random.key(0))


def test_chunk_with_other_columns_is_refused(data):
    x, y = data
    chunks = uneven_chunks(x, y)
    chunks[2] = (chunks[2][0][:, :-1], chunks[2][1])
    with pytest.raises(ValueError, match=r"^x \(chunk 2\): expected 6 columns like chunk 0"):
        estimate_experts(chunks, num_experts=NUM_EXPERTS, key=jax.random.key(0))


def test_chunk_that_is_not_a_pair_is_refused(data):
    x, _y = data
    with pytest.raises(TypeError, match=r"^x: chunk 0 is not an \(x_chunk, y_chunk\) pair"):
        estimate_experts([x[:100]], num_experts=NUM_EXPERTS, key=jax.random.key(0))


def test_chunk_with_nan_is_refused(data):
    x, y = data
    chunks = uneven_chunks(x, y)
    bad = chunks[1][1].copy()
    bad[5] = np.nan
    chunks[1] = (chunks[1][0], bad)
    # Values are checked inside the compiled pass, so the message names y, not the chunk.
    with pytest.raises(ValueError, match="^y: expected finite values, found 1 NaN"):
        estimate_experts(chunks, num_experts=NUM_EXPERTS, key=jax.random.key(0))


def test_overflowing_values_are_refused(data):
    x, y = data
    # Finite entries whose fourth powers overflow float64: the sums turn inf, and no NaN is found.
    with pytest.raises(ValueError, match="^x, y: values too large"):
        estimate_experts(x * 1e100, y, num_experts=NUM_EXPERTS, key=jax.random.key(0))


def test_empty_chunk_source_is_refused():
    with pytest.raises(ValueError, match="^x: the chunk source yielded no chunks"):
        estimate_experts([], num_experts=NUM_EXPERTS, key=jax.random.key(0))


def test_precision_argument_is_checked(data):
    x, y = data
    with pytest.raises(ValueError, match="^precision: expected one of"):
        estimate_experts(x, y, num_experts=NUM_EXPERTS, precision="half", key=jax.random.key(0))


def test_auto_precision_takes_float32_products_only_where_their_rounding_is_negligible(data, monkeypatch):
    x, y = data
    kwargs = {"num_experts": NUM_EXPERTS, "key": jax.random.key(1)}
    exact = estimate_experts(x, y, precision="float64", **kwargs)
    monkeypatch.setattr(_second_moment, "MIXED_MIN_WORK", 0)  # as if n d^2 were large
    mixed = estimate_experts(x, y, **kwargs)
    assert mixed.diagnostics.precision == "mixed" and exact.diagnostics.precision == "float64"
    np.testing.assert_allclose(mixed.experts, exact.experts, atol=1e-5)
    # A nearly collinear design (correlation condition number ~1e8): whitening would magnify the
    # float32 rounding past the sampling error, so "auto" keeps float64 products, whether the
    # pilot rows show it or, failing that, the check after pass 1.
    collinear = x.copy()
    collinear[:, 1] = x[:, 0] + 1e-4 * x[:, 1]
    transforms = output_transforms("linear", 0.0)
    stats = first_pass(as_data_source(collinear, y, chunk_size=CHUNK_SIZE), transforms, CHUNK_SIZE, precision="mixed")
    assert _second_moment.mixed_rounding_bound(stats, transforms) > 1e-2
    assert estimate_experts(collinear, y, **kwargs).diagnostics.precision == "float64"
    monkeypatch.setattr(_second_moment, "_mixed_may_pay", lambda *args: True)
    assert estimate_experts(collinear, y, **kwargs).diagnostics.precision == "float64"
    assert estimate_experts(x, y, **kwargs).diagnostics.precision == "mixed"
