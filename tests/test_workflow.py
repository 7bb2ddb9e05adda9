"""Fitting a CSV file end to end: reading, standardising, writing results, and ``numpyro-moe fit``."""

from __future__ import annotations

import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pytest
import xarray as xr

import numpyro_moe as moe
from numpyro_moe import _workflow
from numpyro_moe._io import load_params
from numpyro_moe.cli import main

numpyro.enable_x64()

FEATURES = ["age", "dose", "weight"]
PNG = b"\x89PNG\r\n\x1a\n"
SMOKE = {"target": "y", "num_experts": 2, "num_restarts": 1, "verbose": False}


def _write(path, text):
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def table():
    """Two linear experts in three features of very different scales and offsets."""
    truth = moe.true_params(jax.random.key(0), dim=3, num_experts=2, noise=0.2)
    x, y = moe.sample_data(jax.random.key(1), truth, num_samples=400)
    x = np.asarray(x) * np.array([10.0, 0.5, 20.0]) + np.array([50.0, 2.0, 70.0])
    return x, 5 + 3 * np.asarray(y)


@pytest.fixture(scope="module")
def csv_file(table, tmp_path_factory):
    x, y = table
    lines = ["age,y,dose,weight"]  # the target between features
    lines += [",".join(repr(float(v)) for v in (a, t, b, c)) for (a, b, c), t in zip(x, y, strict=True)]
    return _write(tmp_path_factory.mktemp("data") / "table.csv", "\n".join(lines) + "\n")


def _written(folder):
    return sorted(path.name for path in folder.iterdir())


# ---------------------------------------------------------------------------------------------
# read_csv


def test_read_csv_columns_names_and_order(csv_file, table):
    x, y = table
    data = moe.read_csv(csv_file, target="y")
    assert data.feature_names == FEATURES and data.target == "y"
    assert data.x.shape == (400, 3) and data.y.shape == (400,)
    np.testing.assert_array_equal(data.x, x)  # repr() round-trips floats exactly
    np.testing.assert_array_equal(data.y, y)
    chosen = moe.read_csv(csv_file, target="y", features=["weight", "age"])
    assert chosen.feature_names == ["weight", "age"]
    np.testing.assert_array_equal(chosen.x, x[:, [2, 0]])
    # Any column can be the target.
    other = moe.read_csv(csv_file, target="dose")
    assert other.feature_names == ["age", "y", "weight"]
    np.testing.assert_array_equal(other.y, x[:, 1])


def test_read_csv_tolerates_spaces_and_blank_lines(tmp_path):
    path = _write(tmp_path / "d.csv", " a , y\n1, 2\n\n  \n3 ,4.5e0\n\n")
    data = moe.read_csv(path, target="y")
    assert data.feature_names == ["a"]
    np.testing.assert_array_equal(data.x, [[1.0], [3.0]])
    np.testing.assert_array_equal(data.y, [2.0, 4.5])


@pytest.mark.parametrize(
    ("text", "kwargs", "match"),
    [
        ("a,b,y\n1,2,3\n", {"target": "z"},
         r"^--target: column 'z' is not in .*columns are \['a', 'b', 'y'\]"),
        ("a,b,y\n1,2,3\n", {"target": "y", "features": ["a", "q"]},
         r"^--features: columns \['q'\] are not in"),
        ("a,b,y\n1,2,3\n4,abc,6\n", {"target": "y"},
         r"^column 'b': line 3 holds 'abc', which is not numeric"),
        ("a,b,y\n1,2,3\n4,,6\n", {"target": "y"}, r"^column 'b': line 3 holds '', which is not numeric"),
        ("a,b,y\n1,2,3\n4,5,nan\n", {"target": "y"},
         r"^column 'y': line 3 holds 'nan'; expected a finite number"),
        ("a,b,y\n1,2,3\n-inf,5,6\n", {"target": "y"}, r"^column 'a': line 3 holds '-inf'; expected a finite"),
        # A blank line does not shift the line numbers reported.
        ("a,b,y\n1,2,3\n\n4,x,6\n", {"target": "y"}, r"^column 'b': line 4 holds 'x'"),
        ("a,b,y\n1,2,3\n4,5\n", {"target": "y"}, r"^DATA: line 3 has 2 fields, expected 3"),
        ("a,b,y\n1,2,3\n\n4,5,6,7\n", {"target": "y"}, r"^DATA: line 4 has 4 fields, expected 3"),
        ("a,b,y\n", {"target": "y"}, r"^DATA: .* has a header but no data rows"),
        ("a,b,y\n\n\n", {"target": "y"}, r"^DATA: .* has a header but no data rows"),
        ("", {"target": "y"}, r"^DATA: .* is empty; expected a header row"),
        ("y\n1\n2\n", {"target": "y"}, r"^DATA: .* has no feature columns besides the target 'y'"),
    ],
)
def test_read_csv_errors_name_what_is_wrong(tmp_path, text, kwargs, match):
    path = _write(tmp_path / "bad.csv", text)
    with pytest.raises(ValueError, match=match):
        moe.read_csv(path, **kwargs)


def test_read_csv_missing_file_names_data(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(FileNotFoundError, match=r"^DATA: no such file") as info:
        moe.read_csv(missing, target="y")
    assert str(missing) in str(info.value)
    with pytest.raises(FileNotFoundError, match=r"^DATA: "):  # a folder is not a file either
        moe.read_csv(tmp_path, target="y")


# ---------------------------------------------------------------------------------------------
# fit_csv without NUTS


@pytest.fixture(scope="module")
def fitted(csv_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("fit") / "result"
    returned = moe.fit_csv(csv_file, out=out, **SMOKE)
    return returned, out


def test_fit_csv_writes_every_output(fitted):
    returned, out = fitted
    assert returned == out
    assert _written(out) == sorted(["params.npz", "parameters.csv", "standardization.json", "summary.txt",
                                    "gate_probabilities.png", "ppc.png"])
    # Written into a hidden staging folder, then renamed: nothing else is left beside it.
    assert _written(out.parent) == ["result"]
    for name in ("gate_probabilities.png", "ppc.png"):
        content = (out / name).read_bytes()
        assert content.startswith(PNG) and len(content) > 5000


def test_fit_csv_standardises_and_saves_a_consistent_fit(fitted, table):
    _, out = fitted
    x, y = table
    meta = json.loads((out / "standardization.json").read_text())
    assert meta["features"] == FEATURES and meta["target"] == "y"
    np.testing.assert_allclose(meta["feature_mean"], x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(meta["feature_scale"], x.std(axis=0), rtol=1e-12)
    assert meta["target_mean"] == pytest.approx(y.mean(), rel=1e-12)
    assert meta["target_scale"] == pytest.approx(y.std(), rel=1e-12)
    params = load_params(out / "params.npz")
    assert params.experts.shape == (2, 3) and params.gates.shape == (2, 3)
    assert params.expert_intercepts.shape == (2,) and params.gate_intercepts.shape == (2,)
    np.testing.assert_array_equal(params.gates[-1], 0)
    # The saved parameters, on the data standardised as recorded, give the likelihood reported.
    z = (x - np.array(meta["feature_mean"])) / np.array(meta["feature_scale"])
    t = (y - meta["target_mean"]) / meta["target_scale"]
    log_likelihood = float(jnp.mean(moe.pointwise_log_likelihood(params, z, t)))
    summary = (out / "summary.txt").read_text()
    assert f"mean log-likelihood per point {log_likelihood:.4f}" in summary
    assert "2 experts, link linear, expert and gate intercepts" in summary
    # Two experts with noise 0.2 on responses of sd ~1 fit far better than one line:
    # a Gaussian with the standardised target's unit variance scores -1.42 per point.
    assert log_likelihood > -1.0
    # The table holds the same numbers (6 significant digits).
    rows = (out / "parameters.csv").read_text().splitlines()
    assert rows[0] == "parameter,age,dose,weight,intercept"
    assert [row.split(",")[0] for row in rows[1:]] == ["expert 0", "expert 1", "gate 0", "gate 1", "noise"]
    expert = [float(value) for value in rows[2].split(",")[1:]]
    np.testing.assert_allclose(expert, [*params.experts[1], params.expert_intercepts[1]], rtol=1e-5)
    assert float(rows[-1].split(",")[1]) == pytest.approx(float(params.noise), rel=1e-5)


def test_fit_csv_refuses_an_existing_folder_unless_overwrite(csv_file, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"^--out: .*already exists.*--overwrite") as info:
        moe.fit_csv(csv_file, out=out, **SMOKE)
    assert str(out) in str(info.value)
    assert _written(out) == ["keep.txt"]
    moe.fit_csv(csv_file, out=out, overwrite=True, **SMOKE)
    assert "keep.txt" not in _written(out) and "params.npz" in _written(out)
    assert _written(tmp_path) == ["taken"]


def test_fit_csv_is_reproducible_for_a_seed(csv_file, fitted, tmp_path):
    _, out = fitted
    again = moe.fit_csv(csv_file, out=tmp_path / "again", **SMOKE)
    first, second = load_params(out / "params.npz"), load_params(again / "params.npz")
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("text", "kwargs", "error", "match"),
    [
        ("a,y\n" + "".join(f"{i},{i % 3}\n" for i in range(15)), {}, ValueError,
         r"^DATA: too few rows: 15 rows for 2 experts on 1 features \(8 parameters\); need at least 16"),
        ("a,c,y\n" + "".join(f"{i},7,{i % 3}\n" for i in range(40)), {}, ValueError,
         r"^columns \['c'\] are constant; remove them"),
        ("a,y\n" + "".join(f"{i},1\n" for i in range(40)), {}, ValueError, r"^columns \['y'\] are constant"),
        ("a,y\n1,2\n", {"num_experts": 0}, ValueError, r"^--experts: "),
        ("a,y\n1,2\n", {"link": "cubic"}, ValueError, r"^link: unknown link 'cubic'"),
        ("a,y\n1,2\n", {"target": "z"}, ValueError, r"^--target: "),
    ],
)
def test_fit_csv_bad_inputs_write_nothing(tmp_path, text, kwargs, error, match):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    path = _write(data_dir / "d.csv", text)
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        moe.fit_csv(path, out=out, **{**SMOKE, **kwargs})
    assert _written(tmp_path) == ["data"]  # no output folder, not even a partial one


def test_interrupted_fit_leaves_no_folder(csv_file, tmp_path, monkeypatch):
    reached = []

    def interrupt(*args, **kwargs):
        # By now params.npz and friends are in the staging folder, not in out.
        reached.append(sorted(path.name for path in tmp_path.iterdir()))
        raise KeyboardInterrupt

    monkeypatch.setattr(_workflow, "_plot_gates", interrupt)
    out = tmp_path / "result"
    with pytest.raises(KeyboardInterrupt):
        moe.fit_csv(csv_file, out=out, **SMOKE)
    assert len(reached) == 1 and len(reached[0]) == 1 and reached[0][0].startswith(".result.partial-")
    assert not out.exists()
    assert os.listdir(tmp_path) == []  # the hidden staging folder is cleaned up too


# ---------------------------------------------------------------------------------------------
# fit_csv with NUTS (tiny)


@pytest.fixture(scope="module")
def fitted_nuts(csv_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("nuts") / "result"
    with warnings.catch_warnings():
        # 2 chains x 50 draws rarely reach r_hat < 1.01; the warning is tested in test_bayes.
        warnings.simplefilter("ignore", moe.ReliabilityWarning)
        moe.fit_csv(csv_file, out=out, nuts=True, num_chains=2, num_warmup=50, num_samples=50, **SMOKE)
    return out


@pytest.mark.slow
def test_fit_csv_with_nuts_writes_the_posterior(fitted_nuts, fitted):
    # Slow for a NUTS compile of the model with intercepts (~15 s); run_nuts itself is
    # covered by test_bayes in the default suite.
    out = fitted_nuts
    assert _written(out) == sorted(["params.npz", "parameters.csv", "standardization.json", "summary.txt",
                                    "gate_probabilities.png", "ppc.png", "posterior.nc", "summary.csv",
                                    "trace.png"])
    with xr.open_datatree(out / "posterior.nc", engine="h5netcdf") as tree:
        assert set(tree.children) == {"posterior", "posterior_predictive", "log_likelihood", "sample_stats",
                                      "observed_data", "constant_data"}
        posterior = tree["posterior"]
        # The CSV model has intercepts.
        assert set(posterior.data_vars) == {"experts", "gates", "noise", "expert_intercepts",
                                            "gate_intercepts"}
        assert posterior["experts"].shape == (2, 50, 2, 3)
        assert posterior["expert_intercepts"].dims == ("chain", "draw", "expert")
        assert posterior["gate_intercepts"].dims == ("chain", "draw", "gate")
        assert tree.attrs["intercepts"] == 1 and tree.attrs["link"] == "linear"
        assert tree["observed_data"]["y"].shape == (400,)
        # Standardised units: the observed target has mean 0 and sd 1.
        assert float(tree["observed_data"]["y"].mean()) == pytest.approx(0, abs=1e-12)
        assert float(tree["observed_data"]["y"].std()) == pytest.approx(1, rel=1e-12)
        # Relabelled to the point fit's labels, the posterior mean experts are near it: they
        # differ by O(1/n) plus Monte Carlo error (posterior sd ~0.02 / sqrt(ESS)); swapped
        # labels would differ by O(1).
        point = load_params(fitted[1] / "params.npz")
        np.testing.assert_allclose(posterior["experts"].mean(("chain", "draw")), point.experts, atol=0.05)
    header = (out / "summary.csv").read_text().splitlines()[0].split(",")
    assert {"mean", "sd", "r_hat", "ess_bulk"} <= set(header)
    assert "posterior summary (az.summary)" in (out / "summary.txt").read_text()
    for name in ("trace.png", "ppc.png"):
        assert (out / name).read_bytes().startswith(PNG)


# ---------------------------------------------------------------------------------------------
# numpyro-moe fit


@pytest.fixture
def keep_xla_flags(monkeypatch):
    # `numpyro-moe fit` sets XLA_FLAGS (host device count) for the process: restore it after.
    if "XLA_FLAGS" in os.environ:
        monkeypatch.setenv("XLA_FLAGS", os.environ["XLA_FLAGS"])
    else:
        monkeypatch.delenv("XLA_FLAGS", raising=False)


def test_cli_fit_writes_outputs(csv_file, tmp_path, capsys, keep_xla_flags):
    devices = jax.local_device_count()
    out = tmp_path / "cli"
    code = main(["fit", str(csv_file), "--target", "y", "--experts", "2", "--out", str(out),
                 "--restarts", "1"])
    assert code == 0
    assert {"params.npz", "parameters.csv", "summary.txt", "ppc.png"} <= set(_written(out))
    captured = capsys.readouterr()
    assert f"outputs written to {out}/" in captured.out
    assert "read 400 rows, 3 features" in captured.out
    # JAX had started, so the host device count request has no effect (and does not fail).
    assert jax.local_device_count() == devices
    features = json.loads((out / "standardization.json").read_text())["features"]
    assert features == FEATURES


def test_cli_fit_features_option(csv_file, tmp_path, keep_xla_flags):
    out = tmp_path / "two"
    # Three features as in the other fits (so no new compile), in another order.
    assert main(["fit", str(csv_file), "--target", "y", "--experts", "2", "--out", str(out),
                 "--restarts", "1", "--features", "weight,age,dose"]) == 0
    assert json.loads((out / "standardization.json").read_text())["features"] == ["weight", "age", "dose"]
    assert (out / "parameters.csv").read_text().splitlines()[0] == "parameter,weight,age,dose,intercept"


def test_cli_fit_refuses_an_existing_folder(csv_file, tmp_path, capsys, keep_xla_flags):
    out = tmp_path / "taken"
    out.mkdir()
    args = ["fit", str(csv_file), "--target", "y", "--experts", "2", "--out", str(out)]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("numpyro-moe fit: error: --out: ")
    assert str(out) in captured.err and "--overwrite" in captured.err
    assert _written(out) == []


def test_cli_fit_errors_name_the_option(csv_file, tmp_path, capsys, keep_xla_flags):
    out = tmp_path / "new"
    assert main(["fit", str(csv_file), "--target", "income", "--experts", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("numpyro-moe fit: error: --target: column 'income' is not in")
    assert main(["fit", str(csv_file), "--target", "y", "--experts", "2", "--out", str(out),
                 "--features", "age,height"]) == 2
    assert "--features: columns ['height']" in capsys.readouterr().err
    missing = str(tmp_path / "none.csv")
    assert main(["fit", missing, "--target", "y", "--experts", "2", "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("numpyro-moe fit: error: DATA: no such file")
    assert main(["fit", str(csv_file), "--target", "y", "--experts", "0", "--out", str(out)]) == 2
    assert "--experts: expected an integer >= 1" in capsys.readouterr().err
    assert _written(tmp_path) == []
    with pytest.raises(SystemExit) as info:  # argparse: --target is required
        main(["fit", str(csv_file), "--experts", "2"])
    assert info.value.code == 2
    assert "--target" in capsys.readouterr().err


def test_read_csv_refuses_the_target_as_a_feature_and_repeated_names(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("a,b,y\n1,2,3\n4,5,6\n")
    with pytest.raises(ValueError, match="--features: the target 'y' cannot also be a feature"):
        moe.read_csv(path, target="y", features=["a", "y"])
    path.write_text("a,a,y\n1,2,3\n4,5,6\n")
    with pytest.raises(ValueError, match=r"DATA: .*repeats the column names \['a'\]"):
        moe.read_csv(path, target="y")


def test_trace_plot_handles_more_panels_than_arviz_default(tmp_path):
    """k (2d + 2) - 1 > 40 panels: ArviZ refuses by default; the trace plot raises its limit, and
    above 60 panels keeps the first features."""
    import arviz as az

    from numpyro_moe._bayes import DIMS
    from numpyro_moe._workflow import MAX_TRACE_PANELS, _plot_trace

    rng = np.random.default_rng(0)
    for dim in (8, 15):
        posterior = {
            "experts": rng.normal(size=(2, 10, 3, dim)),
            "gates": rng.normal(size=(2, 10, 2, dim)),
            "noise": rng.uniform(0.1, 0.2, size=(2, 10)),
        }
        datatree = az.from_dict({"posterior": posterior}, dims=DIMS)
        path = tmp_path / f"trace{dim}.png"
        _plot_trace(datatree, path)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    assert 5 * 8 + 1 <= MAX_TRACE_PANELS < 5 * 15 + 1
