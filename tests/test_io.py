"""Saving parameters without loss, and output folders that never look complete when they are not."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpyro_moe as moe
from numpyro_moe import MoEParams
from numpyro_moe._io import load_params, output_folder, save_params


def _params(intercepts: bool, dtype=jnp.float64) -> MoEParams:
    rng = np.random.default_rng(0)
    experts = jnp.asarray(rng.normal(size=(3, 5)), dtype=dtype)
    gates = jnp.asarray(np.vstack([rng.normal(size=(2, 5)), np.zeros((1, 5))]), dtype=dtype)
    noise = jnp.asarray(0.1234567890123456789, dtype=dtype)
    if not intercepts:
        return MoEParams(experts, gates, noise)
    return MoEParams(
        experts, gates, noise,
        expert_intercepts=jnp.asarray([0.1, -np.pi, 1e-300], dtype=dtype),
        gate_intercepts=jnp.asarray([np.e, -2.0, 0.0], dtype=dtype),
    )


def _assert_identical(loaded: MoEParams, original: MoEParams) -> None:
    assert isinstance(loaded, MoEParams)
    for field, a, b in zip(MoEParams._fields, loaded, original, strict=True):
        if b is None:
            assert a is None, field
            continue
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype, field
        assert a.shape == b.shape, field
        np.testing.assert_array_equal(a, b, err_msg=field)


@pytest.mark.parametrize("intercepts", [False, True])
def test_save_load_round_trip_is_exact(tmp_path, intercepts):
    params = _params(intercepts)
    path = save_params(tmp_path / "params.npz", params)
    assert path == tmp_path / "params.npz" and path.is_file()
    loaded = load_params(path)
    _assert_identical(loaded, params)
    assert np.asarray(loaded.noise).shape == ()


def test_round_trip_keeps_single_precision(tmp_path):
    params = _params(True)._replace(
        experts=np.asarray(_params(True).experts, dtype=np.float32),
        noise=np.float32(0.25),
    )
    loaded = load_params(save_params(tmp_path / "p32.npz", params))
    assert np.asarray(loaded.experts).dtype == np.float32
    assert np.asarray(loaded.gates).dtype == np.float64
    _assert_identical(loaded, params)


def test_save_params_accepts_a_string_path_without_suffix(tmp_path):
    params = _params(False)
    path = save_params(str(tmp_path / "truth"), params)
    assert path.name == "truth"  # no suffix added behind the caller's back
    _assert_identical(load_params(str(path)), params)


def test_save_params_rejects_other_types(tmp_path):
    with pytest.raises(TypeError, match=r"^params: expected MoEParams"):
        save_params(tmp_path / "x.npz", {"experts": np.zeros((2, 2))})
    assert not (tmp_path / "x.npz").exists()


def test_load_params_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^path: no such file"):
        load_params(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", experts=np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"^path: .* is not a saved MoEParams \(missing \['gates', 'noise'\]\)"):
        load_params(tmp_path / "other.npz")


# --------------------------------------------------------------------------- output folders


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name)


def test_output_folder_appears_only_on_success(tmp_path):
    target = tmp_path / "run"
    with output_folder(target) as staging:
        assert staging != target and staging.parent == tmp_path and staging.is_dir()
        assert not target.exists()  # nothing looks complete while writing
        (staging / "result.txt").write_text("done\n")
    assert target.is_dir()
    assert (target / "result.txt").read_text() == "done\n"
    assert not staging.exists()
    assert _leftovers(tmp_path) == []


def test_output_folder_creates_missing_parents(tmp_path):
    target = tmp_path / "a" / "b" / "run"
    with output_folder(target) as staging:
        (staging / "f").write_text("x")
    assert (target / "f").read_text() == "x"


def test_output_folder_leaves_nothing_when_the_body_raises(tmp_path):
    target = tmp_path / "run"
    with pytest.raises(RuntimeError, match="boom"), output_folder(target) as staging:
        (staging / "half.txt").write_text("partial")
        raise RuntimeError("boom")
    assert not target.exists()
    assert not staging.exists()
    assert list(tmp_path.iterdir()) == []


def test_output_folder_refuses_an_existing_folder(tmp_path):
    target = tmp_path / "run"
    target.mkdir()
    (target / "old.txt").write_text("keep me")
    with (
        pytest.raises(FileExistsError, match=r"^out: .*run.* already exists") as info,
        output_folder(target),
    ):
        pytest.fail("the body must not run")
    assert str(target) in str(info.value)
    assert (target / "old.txt").read_text() == "keep me"
    assert _leftovers(tmp_path) == []


def test_output_folder_overwrite_replaces_the_folder(tmp_path):
    target = tmp_path / "run"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with output_folder(target, overwrite=True) as staging:
        assert (target / "old.txt").exists()  # the old folder stays until success
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert _leftovers(tmp_path) == []


def test_output_folder_overwrite_keeps_the_old_folder_when_the_body_raises(tmp_path):
    target = tmp_path / "run"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), output_folder(target, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
        raise KeyboardInterrupt
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert _leftovers(tmp_path) == []


def _assert_same(left, right, where="result"):
    if hasattr(left, "dtype") and not isinstance(left, np.generic):
        # Arrays (NumPy or JAX) come back as NumPy arrays with the same dtype and bits.
        assert isinstance(right, np.ndarray), where
        assert left.dtype == right.dtype, where
        np.testing.assert_array_equal(np.asarray(left), right, err_msg=where)
        return
    assert type(left) is type(right), where
    if left is None:
        return
    if isinstance(left, tuple) and hasattr(left, "_fields"):
        for field in left._fields:
            _assert_same(getattr(left, field), getattr(right, field), f"{where}.{field}")
    elif isinstance(left, str | bool | int | float):
        assert left == right, where
    else:
        left, right = np.asarray(left), np.asarray(right)
        assert left.dtype == right.dtype, where
        np.testing.assert_array_equal(left, right, err_msg=where)


def test_results_save_and_reload_exactly(tmp_path):
    x, y, truth = moe.simulate(jax.random.key(21), num_samples=3000, dim=5, num_experts=2)
    estimate = moe.estimate_experts(x, y, num_experts=2)
    fit = moe.fit_moe(x, y, num_experts=2, key=jax.random.key(22), num_restarts=1)
    for name, result in (("estimate", estimate), ("em", fit.em), ("fit", fit), ("params", truth)):
        path = moe.save_result(tmp_path / f"{name}.npz", result)
        reloaded = moe.load_result(path)
        # Exact: same types all the way down (nested NamedTuples, None, str, float, int, bool)
        # and bit-identical arrays with their dtypes.
        _assert_same(result, reloaded)
    assert isinstance(moe.load_result(tmp_path / "fit.npz").estimate, moe.ExpertEstimate)


def test_save_result_refuses_other_objects_and_load_result_foreign_files(tmp_path):
    with pytest.raises(TypeError, match=r"^result: expected one of"):
        moe.save_result(tmp_path / "x.npz", {"experts": 1})
    np.savez(tmp_path / "other.npz", a=np.arange(3))
    with pytest.raises(ValueError, match=r"^path: .*was not written by save_result"):
        moe.load_result(tmp_path / "other.npz")
    with pytest.raises(FileNotFoundError, match=r"^path: no such file"):
        moe.load_result(tmp_path / "missing.npz")
