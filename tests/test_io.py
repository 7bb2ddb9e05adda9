"""Saving result records without loss (`moe.io.save_result` / `load_result`), and output
folders that never look complete when they are not (`numpyro_moe.apps.folders.output_folder`)."""

from __future__ import annotations

import dataclasses
import warnings
import zipfile
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpyro_moe as moe
from numpyro_moe import MixtureOfExperts, MoEParams
from numpyro_moe._links import LINKS, Link
from numpyro_moe.apps.folders import output_folder


def cubic(t):
    return t**3


def _params(intercepts: bool = False, dtype=jnp.float64, *, link="linear", noise=None) -> MoEParams:
    rng = np.random.default_rng(0)
    experts = jnp.asarray(rng.normal(size=(3, 5)), dtype=dtype)
    gates = jnp.asarray(np.vstack([rng.normal(size=(2, 5)), np.zeros((1, 5))]), dtype=dtype)
    noise = jnp.full(3, 0.1234567890123456789, dtype=dtype) if noise is None else noise
    if not intercepts:
        return MoEParams(experts, gates, noise, link=link)
    return MoEParams(
        experts, gates, noise,
        expert_intercepts=jnp.asarray([0.1, -np.pi, 1e-300], dtype=dtype),
        gate_intercepts=jnp.asarray([np.e, -2.0, 0.0], dtype=dtype),
        link=link,
    )


def _assert_same(original, loaded, where="result"):
    """Exact equality all the way down: the same record types, None where None, Python scalars of
    the same type, links of the same name and function, and arrays with the same dtype, shape
    and bits (JAX arrays come back as NumPy arrays)."""
    if isinstance(original, Link):
        assert isinstance(loaded, Link), where
        assert loaded.name == original.name, where
        assert loaded.function is original.function, where
        return
    if hasattr(original, "dtype") and not isinstance(original, np.generic):
        assert isinstance(loaded, np.ndarray), where
        assert loaded.dtype == original.dtype, where
        assert loaded.shape == original.shape, where
        np.testing.assert_array_equal(np.asarray(original), loaded, err_msg=where)
        return
    assert type(loaded) is type(original), where
    if original is None:
        return
    if dataclasses.is_dataclass(original):
        for field in dataclasses.fields(original):
            _assert_same(getattr(original, field.name), getattr(loaded, field.name), f"{where}.{field.name}")
    elif isinstance(original, tuple) and hasattr(original, "_fields"):
        for field in original._fields:
            _assert_same(getattr(original, field), getattr(loaded, field), f"{where}.{field}")
    elif isinstance(original, tuple | list):
        assert len(loaded) == len(original), where
        for index, (a, b) in enumerate(zip(original, loaded, strict=True)):
            _assert_same(a, b, f"{where}[{index}]")
    elif isinstance(original, str | bool | int | float):
        assert loaded == original or (isinstance(original, float) and np.isnan(original) and np.isnan(loaded)), where
    else:
        a, b = np.asarray(original), np.asarray(loaded)
        assert a.dtype == b.dtype, where
        np.testing.assert_array_equal(a, b, err_msg=where)


def _round_trip(tmp_path, result, name="result.npz", **load_kwargs):
    path = moe.io.save_result(tmp_path / name, result)
    assert path == tmp_path / name and path.is_file()
    return moe.io.load_result(path, **load_kwargs)


# --------------------------------------------------------------------------- MoEParams


@pytest.mark.parametrize(
    "params",
    [
        _params(False),
        _params(True),
        _params(True, link="tanh", noise=jnp.array([0.1, 0.25, 1e-200])),  # one noise per expert
        _params(False, link="relu", noise=jnp.asarray(0.3)),  # a scalar noise stays a scalar
    ],
    ids=["plain", "intercepts", "tanh-per-expert-noise", "relu-scalar-noise"],
)
def test_params_round_trip_is_exact(tmp_path, params):
    loaded = _round_trip(tmp_path, params)
    assert isinstance(loaded, MoEParams)
    _assert_same(params, loaded)
    assert loaded.link == params.link and loaded.link.function is LINKS[params.link.name]
    assert loaded.has_intercepts == params.has_intercepts
    # The loaded record is a working model: the same likelihood, bit for bit.
    x = jnp.asarray(np.random.default_rng(1).normal(size=(20, 5)))
    y = jnp.asarray(np.random.default_rng(2).normal(size=20))
    np.testing.assert_array_equal(
        MixtureOfExperts.from_params(loaded, x).log_prob(y), MixtureOfExperts.from_params(params, x).log_prob(y)
    )


def test_round_trip_keeps_single_precision_and_mixed_dtypes(tmp_path):
    params = _params(True).replace(
        experts=np.asarray(_params(True).experts, dtype=np.float32),
        noise=np.full(3, 0.25, dtype=np.float32),
    )
    loaded = _round_trip(tmp_path, params, "p32.npz")
    assert loaded.experts.dtype == np.float32 and loaded.noise.dtype == np.float32
    assert loaded.gates.dtype == np.float64
    _assert_same(params, loaded)


def test_save_result_accepts_a_string_path_without_suffix(tmp_path):
    params = _params(False)
    path = moe.io.save_result(str(tmp_path / "truth"), params)
    assert path.name == "truth"  # no suffix added behind the caller's back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["truth"]
    _assert_same(params, moe.io.load_result(str(path)))


# --------------------------------------------------------------------------- custom links


def test_a_custom_link_needs_its_function_on_load(tmp_path):
    params = _params(True, link=cubic)
    path = moe.io.save_result(tmp_path / "cubic.npz", params)
    with pytest.raises(ValueError, match=r"^links: .*'cubic'.*links=") as info:
        moe.io.load_result(path)
    assert "links" in str(info.value)
    loaded = moe.io.load_result(path, links={"cubic": cubic})
    _assert_same(params, loaded)
    assert loaded.link.function is cubic
    # A resolved Link works as well as the bare function.
    assert moe.io.load_result(path, links={"cubic": Link("cubic", cubic)}).link.function is cubic
    # Links are matched by name: an unrelated entry does not help.
    with pytest.raises(ValueError, match=r"^links:"):
        moe.io.load_result(path, links={"square": lambda t: t * t})


def test_links_argument_overrides_a_built_in_name(tmp_path):
    # The saved name is all a file holds; the caller decides what it means.
    path = moe.io.save_result(tmp_path / "tanh.npz", _params(link="tanh"))
    assert moe.io.load_result(path).link.function is jnp.tanh
    assert moe.io.load_result(path, links={"tanh": cubic}).link.function is cubic


def test_a_custom_link_inside_a_nested_record(tmp_path):
    fit = moe.Fit(
        params=_params(link=cubic), log_likelihood=-1.25, history=np.array([-2.0, -1.25]),
        iterations=2, converged=False, method="em",
    )
    path = moe.io.save_result(tmp_path / "fit.npz", fit)
    with pytest.raises(ValueError, match=r"^links:"):
        moe.io.load_result(path)
    _assert_same(fit, moe.io.load_result(path, links={"cubic": cubic}))


# --------------------------------------------------------------------------- the package's records


def _simulated():
    return moe.simulation.simulate(key=jax.random.key(21), num_samples=400, dim=3, num_experts=2, noise=0.1)


@pytest.fixture(scope="module")
def records():
    """A small simulated data set, its moment estimate and an EM fit from the estimate (about 11 s
    of CPU, mostly compiling: the tests using it are marked slow)."""
    data = _simulated()
    with warnings.catch_warnings():
        # Few power iterations and EM steps keep this fast; convergence is not the point here.
        warnings.simplefilter("ignore", moe.ReliabilityWarning)
        estimate = moe.estimate_experts(
            data.x, data.y, num_experts=2, key=jax.random.key(22), num_power_restarts=2, num_power_iterations=10
        )
        fit = moe.fit_em(data.x, data.y, estimate.to_params(intercepts=True), max_iterations=5)
    return data, estimate, fit


def test_simulated_data_round_trip_is_exact(tmp_path):
    data = _simulated()
    loaded = _round_trip(tmp_path, data)
    assert isinstance(loaded, moe.simulation.SimulatedData)
    _assert_same(data, loaded)
    _x, _y, truth = loaded  # still unpacks
    assert isinstance(truth, MoEParams) and truth.link.name == "linear"


@pytest.mark.slow
def test_expert_estimate_round_trip_is_exact(tmp_path, records):
    _, estimate, _ = records
    loaded = _round_trip(tmp_path, estimate)
    assert isinstance(loaded, moe.ExpertEstimate)
    assert isinstance(loaded.diagnostics, moe.experts.ExpertDiagnostics)
    assert isinstance(loaded.standardization, moe.experts.Standardization)
    _assert_same(estimate, loaded)
    # Its methods work on the loaded copy and give the same record.
    _assert_same(estimate.to_params(intercepts=True), loaded.to_params(intercepts=True))


@pytest.mark.slow
def test_fit_round_trip_is_exact(tmp_path, records):
    _, _, fit = records
    assert fit.method == "em" and fit.params.has_intercepts
    loaded = _round_trip(tmp_path, fit)
    assert isinstance(loaded, moe.Fit)
    _assert_same(fit, loaded)
    assert type(loaded.start_labels) is tuple and loaded.start_labels == fit.start_labels
    assert type(loaded.converged) is bool and type(loaded.iterations) is int


# --------------------------------------------------------------------------- overwriting


def test_save_result_refuses_to_overwrite_unless_asked(tmp_path):
    path = moe.io.save_result(tmp_path / "p.npz", _params(False))
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match=r"^path: .*p\.npz.* exists; .*overwrite=True"):
        moe.io.save_result(path, _params(True))
    assert path.read_bytes() == before  # untouched
    _assert_same(_params(False), moe.io.load_result(path))
    assert moe.io.save_result(path, _params(True), overwrite=True) == path
    _assert_same(_params(True), moe.io.load_result(path))


def test_save_result_needs_an_existing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^path: the folder .*missing.* does not exist"):
        moe.io.save_result(tmp_path / "missing" / "p.npz", _params())
    assert not (tmp_path / "missing").exists()  # nothing created behind the caller's back


# --------------------------------------------------------------------------- refusals and bad files


class ForeignRecord(NamedTuple):
    value: float


@dataclasses.dataclass
class ForeignDataclass:
    value: float


def test_save_result_refuses_records_from_outside_the_package(tmp_path):
    with pytest.raises(TypeError, match=r"^result: expected a record of numpyro_moe, got .*ForeignRecord"):
        moe.io.save_result(tmp_path / "a.npz", ForeignRecord(1.0))
    with pytest.raises(TypeError, match=r"^result: expected a record of numpyro_moe, got .*ForeignDataclass"):
        moe.io.save_result(tmp_path / "b.npz", ForeignDataclass(1.0))
    # ... also nested inside one of the package's records.
    nested = moe.Fit(params=ForeignRecord(1.0), log_likelihood=0.0, history=np.zeros(1), iterations=1,
                     converged=True, method="em")
    with pytest.raises(TypeError, match=r"^result: expected a record of numpyro_moe"):
        moe.io.save_result(tmp_path / "c.npz", nested)
    assert list(tmp_path.iterdir()) == []


def test_save_result_refuses_what_is_not_a_record_or_not_data(tmp_path):
    with pytest.raises(TypeError, match=r"^result: expected a result record of numpyro_moe, got dict"):
        moe.io.save_result(tmp_path / "x.npz", {"experts": 1})
    with pytest.raises(TypeError, match=r"^result: expected a result record"):
        moe.io.save_result(tmp_path / "y.npz", np.zeros(3))
    with pytest.raises(TypeError, match=r"^result: cannot save a object at 'result/history'"):
        moe.io.save_result(tmp_path / "z.npz", moe.Fit(_params(), 0.0, object(), 1, True, "em"))
    assert list(tmp_path.iterdir()) == []


def test_load_result_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^path: no such file"):
        moe.io.load_result(tmp_path / "missing.npz")
    with pytest.raises(FileNotFoundError, match=r"^path: no such file"):
        moe.io.load_result(tmp_path)  # a folder
    np.savez(tmp_path / "other.npz", a=np.arange(3))
    with pytest.raises(ValueError, match=r"^path: .*other\.npz.* was not written by save_result"):
        moe.io.load_result(tmp_path / "other.npz")
    (tmp_path / "text.npz").write_text("not a zip file\n")
    with pytest.raises(ValueError, match=r"^path: .*text\.npz.* is not an \.npz file written by save_result"):
        moe.io.load_result(tmp_path / "text.npz")
    # A truncated zip.
    path = moe.io.save_result(tmp_path / "good.npz", _params())
    (tmp_path / "cut.npz").write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"^path: .*cut\.npz.* is not an \.npz file"):
        moe.io.load_result(tmp_path / "cut.npz")


def test_load_result_never_unpickles(tmp_path):
    np.savez(
        tmp_path / "pickled.npz",
        **{"result#class": np.array("numpyro_moe._params:MoEParams"), "result/experts": np.array([object()])},
    )
    with pytest.raises(ValueError, match=r"^path: .* is not an \.npz file written by save_result"):
        moe.io.load_result(tmp_path / "pickled.npz")


def _forged(tmp_path, class_path, name="forged.npz"):
    path = tmp_path / name
    np.savez(path, **{"result#class": np.array(class_path), "result/value#float": np.array(1.0)})
    return path


@pytest.mark.parametrize("class_path", ["collections:OrderedDict", "os:system", "builtins:dict"])
def test_load_result_refuses_a_class_from_outside_the_package(tmp_path, class_path):
    with pytest.raises(ValueError, match=r"^path: the file names a class outside numpyro_moe .*refusing to load"):
        moe.io.load_result(_forged(tmp_path, class_path))


@pytest.mark.parametrize(
    "class_path",
    [
        # A sibling package whose name merely starts with the package's: must be refused.
        "numpyro_moe_extras:Record",
        # Not a record: a function or a plain class reached through a module of the package.
        "numpyro_moe.io:os.system",
        "numpyro_moe.io:Path",
        # A module or class the package does not have.
        "numpyro_moe.nope:Record",
        "numpyro_moe.io:Nope",
    ],
)
def test_load_result_forged_class_paths_are_value_errors(tmp_path, class_path):
    with pytest.raises(ValueError, match=r"^path: "):
        moe.io.load_result(_forged(tmp_path, class_path))


def test_load_result_a_file_missing_a_field_is_a_value_error(tmp_path):
    path = moe.io.save_result(tmp_path / "full.npz", _params())
    with np.load(path) as data:
        contents = {name: data[name] for name in data.files if name != "result/experts"}
    np.savez(tmp_path / "partial.npz", **contents)
    with pytest.raises(ValueError, match=r"^path: "):
        moe.io.load_result(tmp_path / "partial.npz")


def test_saved_file_is_a_plain_npz_archive(tmp_path):
    # Readable without this package (and without pickle): one entry per array.
    path = moe.io.save_result(tmp_path / "p.npz", _params(True, link="tanh"))
    assert zipfile.is_zipfile(path)
    with np.load(path, allow_pickle=False) as data:
        assert str(data["result#class"]) == "numpyro_moe._params:MoEParams"
        np.testing.assert_array_equal(data["result/experts"], _params(True).experts)
        assert str(data["result/link#link"]) == "tanh"


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
        pytest.raises(FileExistsError, match=r"^--out: .*run.* already exists") as info,
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


# --------------------------------------------------------------------------- every other record


def _other_records():
    data = _simulated()
    point = moe.MoEParams(data.truth.experts, data.truth.gates, data.truth.noise, link="tanh")
    tensor = np.einsum("i,ia,ib,ic->abc", np.array([2.0, 1.0]), np.eye(2), np.eye(2), np.eye(2))
    return {
        "Prediction": moe.predict(point, data.x[:7], key=jax.random.key(1), num_draws=20),
        "TensorDecomposition": moe.experts.decompose_symmetric_tensor(tensor, 2, key=jax.random.key(2)),
        "OutputTransforms": moe.experts.output_transforms("tanh", 0.2),
        "FourthOrderTransform": moe.experts.fourth_order_transform("sigmoid", 0.1),
        "ExpertMatch": moe.metrics.match_experts(point.experts[::-1], point.experts),
        "NumExpertsSuggestion": moe.experts.suggest_num_experts(data.x, data.y),
    }


def test_every_other_result_record_round_trips_exactly(tmp_path):
    for name, record in _other_records().items():
        loaded = _round_trip(tmp_path, record, name=f"{name}.npz")
        assert type(loaded).__name__ == name
        _assert_same(record, loaded, name)
