"""Decomposition of orthogonally decomposable symmetric tensors (robust tensor power method of
Anandkumar, Ge, Hsu, Kakade, Telgarsky, JMLR 2014, and TensorLy's implementation)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from numpyro_moe._tensor import _robust_power_method
from numpyro_moe.experts import decompose_symmetric_tensor


def odeco_tensor(seed: int, k: int, signs=None):
    """sum_i lambda_i v_i^{(x)3} with random orthonormal v_i (rows) and lambda_i in [0.5, 3]."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(k, k)))
    vectors = q.T
    values = rng.uniform(0.5, 3.0, size=k)
    if signs is not None:
        values = values * np.asarray(signs)
    tensor = np.einsum("i,ia,ib,ic->abc", values, vectors, vectors, vectors)
    return tensor, values, vectors


def sorted_by_value(values, vectors):
    order = np.argsort(-values)
    return values[order], vectors[order]


@pytest.mark.parametrize("method", ["power", "tensorly"])
@pytest.mark.parametrize("k", [3, 4, 5])
def test_recovers_exact_odeco_tensor(k, method):
    tensor, values, vectors = odeco_tensor(k, k)
    result = decompose_symmetric_tensor(tensor, k, key=jax.random.key(0), method=method)
    assert result.eigenvalues.shape == (k,)
    assert result.eigenvectors.shape == (k, k)
    # Components come back ordered by decreasing (positive) eigenvalue.
    assert np.all(np.diff(result.eigenvalues) <= 0)
    expected_values, expected_vectors = sorted_by_value(values, vectors)
    np.testing.assert_allclose(result.eigenvalues, expected_values, atol=1e-8)
    np.testing.assert_allclose(result.eigenvectors, expected_vectors, atol=1e-8)
    np.testing.assert_allclose(np.linalg.norm(result.eigenvectors, axis=1), 1.0, atol=1e-12)
    assert result.residual < 1e-10


def test_negative_components_are_flipped_to_positive_eigenvalues():
    # (-lambda, -v) is the same rank-one term as (lambda, v): the result reports lambda > 0.
    tensor, values, vectors = odeco_tensor(7, 4, signs=[1, -1, 1, -1])
    result = decompose_symmetric_tensor(tensor, 4, key=jax.random.key(1))
    expected_values, expected_vectors = sorted_by_value(
        np.abs(values), vectors * np.sign(values)[:, None]
    )
    np.testing.assert_allclose(result.eigenvalues, expected_values, atol=1e-8)
    np.testing.assert_allclose(result.eigenvectors, expected_vectors, atol=1e-8)
    assert result.residual < 1e-10


def test_power_and_tensorly_agree():
    tensor, _, _ = odeco_tensor(11, 5)
    power = decompose_symmetric_tensor(tensor, 5, key=jax.random.key(2), method="power")
    other = decompose_symmetric_tensor(tensor, 5, key=jax.random.key(2), method="tensorly")
    np.testing.assert_allclose(power.eigenvalues, other.eigenvalues, atol=1e-8)
    np.testing.assert_allclose(power.eigenvectors, other.eigenvectors, atol=1e-8)


@pytest.mark.parametrize("method", ["power", "tensorly"])
def test_same_key_gives_identical_results_whatever_numpy_global_state(method):
    tensor, _, _ = odeco_tensor(5, 4)
    # A tensor that is not exactly decomposable, so the random starts actually matter.
    tensor = tensor + 0.05 * np.random.default_rng(9).normal(size=tensor.shape)
    tensor = (
        tensor + tensor.transpose(0, 2, 1) + tensor.transpose(1, 0, 2)
        + tensor.transpose(1, 2, 0) + tensor.transpose(2, 0, 1) + tensor.transpose(2, 1, 0)
    ) / 6
    np.random.seed(1)
    first = decompose_symmetric_tensor(tensor, 4, key=jax.random.key(3), method=method)
    np.random.seed(2)
    second = decompose_symmetric_tensor(tensor, 4, key=jax.random.key(3), method=method)
    np.testing.assert_array_equal(first.eigenvalues, second.eigenvalues)
    np.testing.assert_array_equal(first.eigenvectors, second.eigenvectors)
    assert first.residual == second.residual


def test_tensorly_path_restores_numpy_global_state():
    tensor, _, _ = odeco_tensor(6, 3)
    np.random.seed(12345)
    np.random.random_sample(7)  # a state part-way through the stream
    before = np.random.get_state()
    decompose_symmetric_tensor(tensor, 3, key=jax.random.key(4), method="tensorly")
    after = np.random.get_state()
    assert before[0] == after[0]
    np.testing.assert_array_equal(before[1], after[1])
    assert before[2:] == after[2:]


def test_unknown_method_is_refused():
    tensor, _, _ = odeco_tensor(0, 3)
    with pytest.raises(ValueError, match="decomposition"):
        decompose_symmetric_tensor(tensor, 3, key=jax.random.key(0), method="als")


def test_power_method_compiles_once_per_shape():
    # A configuration no other test uses, so the first call must compile exactly once. One
    # component of a rank-three tensor also checks the residual: the two terms left over.
    settings = {"num_restarts": 7, "num_iterations": 23}
    before = _robust_power_method._cache_size()
    results = []
    for seed in (20, 21):
        tensor, values, _ = odeco_tensor(seed, 3)
        result = decompose_symmetric_tensor(tensor, 1, key=jax.random.key(seed), **settings)
        assert _robust_power_method._cache_size() == before + 1
        ascending = np.sort(values)
        remainder = np.sqrt(np.sum(ascending[:2] ** 2) / np.sum(values**2))
        assert result.eigenvalues == pytest.approx([ascending[2]], abs=1e-8)
        assert result.residual == pytest.approx(remainder, rel=1e-8)
        results.append(result)
    # Both calls did real, different work.
    assert results[0].eigenvalues[0] != results[1].eigenvalues[0]
