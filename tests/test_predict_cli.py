"""The fit folder of ``numpyro-moe fit`` on a CSV file as users have it, and ``numpyro-moe predict``
on new data (`numpyro_moe.apps.predict`): model.json, choosing k, predictions in the target's
units against the library, the posterior path, rows outside the training inputs, errors, --quiet.

One fit (k = 1 and 2 compared) serves the whole module; the other fits reuse its compiled shapes.
"""

from __future__ import annotations

import csv
import json
import math
import shutil

import arviz as az
import jax
import numpy as np
import pytest
import xarray as xr
from cli_helpers import run_cli

import numpyro_moe as moe
from numpyro_moe import Fit, ReliabilityWarning
from numpyro_moe.apps.predict import OUTSIDE_MARGIN, predict_csv
from numpyro_moe.io import load_result

N = 300  # complete training rows; three more have a missing value
DROPPED_LINES = [5, 50, 200]
# New data: 40 rows of the training table (every prediction has this size: one compile).
ROWS = np.arange(100, 140)





def _read(path):
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    return rows[0], rows[1:]


def _column(rows, header, name):
    index = header.index(name)
    return np.array([float(row[index]) if row[index] else np.nan for row in rows])


@pytest.fixture(scope="module")
def table():
    """Two linear experts in (a, b) switched by a, a text column `color` shifting the response,
    on scales far from standard; a few cells missing."""
    rng = np.random.default_rng(0)
    n = N + len(DROPPED_LINES)
    a, b = rng.normal(size=n), rng.normal(size=n)
    color = rng.choice(["red", "blue"], size=n)
    y = np.where(a > 0, 2 * b, -b) + 0.5 * (color == "red") + 0.2 * rng.normal(size=n)
    return 40 + 8 * a, 3 + 0.5 * b, color, 100 + 10 * y


def _lines_r(rows, header):
    """R's write.csv: a quoted header whose first cell is empty, quoted row names."""
    text = ",".join(f'"{name}"' for name in ["", *header]) + "\n"
    return text + "".join(f'"{i + 1}",' + ",".join(row) + "\n" for i, row in enumerate(rows))


@pytest.fixture(scope="module")
def data(table, tmp_path_factory):
    a, b, color, y = table
    cells = [[repr(float(a[i])), f'"{color[i]}"', repr(float(b[i])), repr(float(y[i]))] for i in range(len(y))]
    # Missing values on three lines (the header is line 1): NA in a, an empty b, NA in y.
    for line, column, value in zip(DROPPED_LINES, (0, 2, 3), ("NA", "", "NA"), strict=True):
        cells[line - 2][column] = value
    path = tmp_path_factory.mktemp("data") / "train.csv"
    path.write_text(_lines_r(cells, ["a", "color", "b", "y"]))
    keep = np.ones(len(y), dtype=bool)
    keep[[line - 2 for line in DROPPED_LINES]] = False
    x = np.column_stack([a, color == "red", b])[keep].astype(float)
    return path, x, y[keep], color[keep]


FIT = ["--target", "y", "--one-hot", "color", "--missing", "drop", "--starts", "2"]


@pytest.fixture(scope="module")
def fitted(data, tmp_path_factory):
    path, _, _, _ = data
    out = tmp_path_factory.mktemp("fit") / "result"
    # BIC by name: the default ("auto") cross-validates on data this small (see test_workflow).
    code, stdout, stderr = run_cli(["fit", str(path), *FIT, "--experts", "1-2", "--criterion", "bic", "--out", str(out)])
    assert code == 0, stderr
    return out, stdout, stderr


def test_fit_compares_k_prints_the_table_and_keeps_the_best(fitted):
    out, stdout, stderr = fitted
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["k", "loglik/pt"])
    assert lines[header].split() == ["k", "loglik/pt", "params", "BIC", "ICL", "min", "weight", "converged"]
    rows = [line.split() for line in lines[header + 2 : header + 4]]
    # Two experts fit far better than one line: k = 2 is chosen and marked.
    assert rows[0][0] == "1" and rows[1][:2] == ["*", "2"]
    assert "k = 2 chosen: the lowest BIC" in stdout
    assert "comparing k = 1, 2 experts by BIC" in stdout and "fitted 2 linear experts" in stdout
    # The library's warning, in the command's words.
    assert "numpyro-moe fit: warning: --experts: BIC chose k=2, the largest tried; try larger k too\n" in stderr
    model = json.loads((out / "model.json").read_text())
    table = model["selection"]["table"]
    assert model["selection"]["criterion"] == "bic" and model["selection"]["candidates"] == [1, 2]
    assert [row["num_experts"] for row in table] == [1, 2]
    assert table[1]["bic"] < table[0]["bic"]
    for row, printed in zip(table, rows, strict=True):
        assert float(printed[-6]) == pytest.approx(row["log_likelihood"], abs=1e-4)
        assert int(printed[-5]) == row["num_parameters"]
        assert float(printed[-4]) == pytest.approx(row["bic"], abs=0.01)
        assert float(printed[-3]) == pytest.approx(row["icl"], abs=0.01)
        assert float(printed[-2]) == pytest.approx(row["smallest_weight"], abs=1e-3)
    assert table[0]["smallest_weight"] == 1
    fit = load_result(out / "fit.npz")
    assert isinstance(fit, Fit) and fit.params.num_experts == 2
    assert fit.log_likelihood == pytest.approx(table[1]["log_likelihood"], rel=1e-12)


def test_fit_reads_r_row_names_missing_values_and_text(fitted, data):
    out, stdout, _ = fitted
    path, x, y, _ = data
    model = json.loads((out / "model.json").read_text())
    assert model["format"] == 2 and model["package"] == "numpyro-moe" and model["version"] == moe.__version__
    assert model["columns"] == ["a", "color", "b"]
    assert model["one_hot"] == {"color": ["blue", "red"]}
    assert model["features"] == ["a", "color=red", "b"] and model["target"] == "y"
    assert model["rows"] == N and model["missing"] == "drop"
    assert {key: model[key] for key in ("num_experts", "link", "noise", "shared_noise", "intercepts", "seed")} == {
        "num_experts": 2, "link": "linear", "noise": "normal", "shared_noise": False, "intercepts": True, "seed": 0,
    }
    assert model["data"] == str(path) and model["nuts"] is None
    # The row names were not a feature; the three rows with a missing value were left out.
    assert len(model["notes"]) == 2
    assert "row names" in model["notes"][0]
    assert "3 of 303 rows have missing values" in model["notes"][1] and "lines 5, 50, 200" in model["notes"][1]
    for note in model["notes"]:
        assert note in stdout
    standard = model["standardization"]
    np.testing.assert_allclose(standard["feature_mean"], x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(standard["feature_scale"], x.std(axis=0), rtol=1e-12)
    assert standard["target_mean"] == pytest.approx(y.mean(), rel=1e-12)
    assert standard["target_scale"] == pytest.approx(y.std(), rel=1e-12)
    np.testing.assert_array_equal(model["training_range"]["feature_min"], x.min(axis=0))
    np.testing.assert_array_equal(model["training_range"]["feature_max"], x.max(axis=0))
    # The saved fit, on the data standardised as recorded, has the likelihood reported.
    fit = load_result(out / "fit.npz")
    z = (x - np.array(standard["feature_mean"])) / np.array(standard["feature_scale"])
    t = (y - standard["target_mean"]) / standard["target_scale"]
    log_likelihood = float(np.mean(moe.MixtureOfExperts.from_params(fit.params, z).log_prob(t)))
    assert log_likelihood == pytest.approx(model["fit"]["log_likelihood"], rel=1e-9)
    assert (out / "parameters.csv").read_text().splitlines()[0] == "parameter,a,color=red,b,intercept"


def _new_csv(path, table, rows, *, target=True, shift=None):
    """Rows of the training table as new data: columns reordered, an extra column, no row names."""
    a, b, color, y = table
    a = a.copy()
    if shift is not None:
        a[shift] += 100.0
    header = ["note", "b", "color", "a", *(["y"] if target else [])]
    lines = [",".join(header)]
    for i in rows:
        lines.append(",".join(["x", repr(float(b[i])), color[i], repr(float(a[i])),
                               *([repr(float(y[i]))] if target else [])]))
    path.write_text("\n".join(lines) + "\n")
    x = np.column_stack([a[rows], color[rows] == "red", b[rows]]).astype(float)
    return path, x, y[rows]


def _direct(source, model, x, y, seed=0):
    """The library's prediction at x (original units in, standardised out)."""
    standard = model["standardization"]
    z = (x - np.array(standard["feature_mean"])) / np.array(standard["feature_scale"])
    t = None if y is None else (y - standard["target_mean"]) / standard["target_scale"]
    return moe.predict(source, z, key=jax.random.key(seed), y=t, interval=0.9)


def test_predict_point_fit_in_original_units_matches_the_library(fitted, table, tmp_path):
    out, _, _ = fitted
    new, x, y = _new_csv(tmp_path / "new.csv", table, ROWS)
    code, stdout, stderr = run_cli(["predict", str(out), str(new), "--seed", "3"])
    assert code == 0 and stderr == ""
    written = tmp_path / "new-predictions.csv"  # the default: beside the new file
    header, lines = _read(written)
    assert header == ["mean", "lower", "upper", "gate_0", "gate_1", "outside_training", "log_density"]
    assert len(lines) == 40 and {row[5] for row in lines} == {"false"}
    model = json.loads((out / "model.json").read_text())
    standard = model["standardization"]
    scale, centre = standard["target_scale"], standard["target_mean"]
    direct = _direct(load_result(out / "fit.npz"), model, x, y, seed=3)
    np.testing.assert_allclose(_column(lines, header, "mean"), centre + scale * direct.mean, rtol=1e-10)
    np.testing.assert_allclose(_column(lines, header, "lower"), centre + scale * direct.lower, rtol=1e-10)
    np.testing.assert_allclose(_column(lines, header, "upper"), centre + scale * direct.upper, rtol=1e-10)
    for i in range(2):
        np.testing.assert_allclose(_column(lines, header, f"gate_{i}"), direct.gate_probabilities[:, i],
                                   rtol=1e-10, atol=1e-14)
    # The density of y in its own units: the standardised one over the target's sd.
    log_density = _column(lines, header, "log_density")
    np.testing.assert_allclose(log_density, direct.log_density - math.log(scale), rtol=1e-10)
    mse = float(np.mean((_column(lines, header, "mean") - y) ** 2))
    # The units are right: the intervals hold most of the responses and the error is near the
    # experts' noise (0.2 on y, times 10).
    inside = (_column(lines, header, "lower") <= y) & (y <= _column(lines, header, "upper"))
    assert inside.mean() > 0.75 and mse < 4 * 2.0**2
    assert stdout.splitlines() == [
        f"predicted 40 rows of {new} from the point fit (fit.npz)",
        (f"target 'y' present in 40 rows: mean log predictive density per point {log_density.mean():.4f} "
         f"(in y's units), MSE {mse:.6g}"),
        f"predictions written to {written}",
    ]
    # Never overwritten without --overwrite.
    before = written.read_text()
    code, _, stderr = run_cli(["predict", str(out), str(new)])
    assert code == 2 and stderr.startswith("numpyro-moe predict: error: --out: ") and "--overwrite" in stderr
    assert written.read_text() == before
    assert run_cli(["predict", str(out), str(new), "--overwrite", "--seed", "3", "--quiet"])[1:] == ("", "")
    assert written.read_text() == before  # same seed, same predictions
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new-predictions.csv", "new.csv"]


def _posterior_folder(out, tmp_path):
    """A copy of the fit folder with posterior draws around the point fit (2 chains x 30 draws), as
    `run_nuts` writes them: the predict path, without the cost of NUTS."""
    folder = tmp_path / "with-posterior"
    shutil.copytree(out, folder)
    sites = moe.params_to_sites(load_result(out / "fit.npz").params)
    rng = np.random.default_rng(1)
    posterior = {}
    for name, value in sites.items():
        value = np.asarray(value)
        noise = 0.05 * rng.normal(size=(2, 30, *value.shape))
        posterior[name] = value * np.exp(noise) if name == "noise" else value + noise
    dims = {"experts": ["expert", "feature"], "gates": ["gate", "feature"], "noise": ["expert"],
            "expert_intercepts": ["expert"], "gate_intercepts": ["gate"]}
    tree = az.from_dict({"posterior": posterior}, dims=dims)
    tree.attrs["moe_link"] = "linear"
    tree.to_netcdf(folder / "posterior.nc", engine="h5netcdf")
    return folder


def test_predict_uses_the_posterior_draws_unless_point(fitted, table, tmp_path):
    out, _, _ = fitted
    folder = _posterior_folder(out, tmp_path)
    new, x, y = _new_csv(tmp_path / "new.csv", table, ROWS)
    code, stdout, stderr = run_cli(["predict", str(folder), str(new), "--out", str(tmp_path / "p.csv")])
    assert code == 0 and stderr == ""
    assert "from posterior draws (2 chains x 30 draws, posterior.nc)" in stdout
    header, lines = _read(tmp_path / "p.csv")
    model = json.loads((folder / "model.json").read_text())
    standard = model["standardization"]
    with xr.open_datatree(folder / "posterior.nc", engine="h5netcdf") as tree:
        direct = _direct(tree.load(), model, x, y)
    np.testing.assert_allclose(_column(lines, header, "mean"),
                               standard["target_mean"] + standard["target_scale"] * direct.mean, rtol=1e-10)
    np.testing.assert_allclose(_column(lines, header, "log_density"),
                               direct.log_density - math.log(standard["target_scale"]), rtol=1e-10)
    # --point: the point fit, though the folder has draws.
    code, stdout, _ = run_cli(["predict", str(folder), str(new), "--out", str(tmp_path / "q.csv"), "--point"])
    assert code == 0 and "from the point fit (fit.npz)" in stdout
    point = _direct(load_result(folder / "fit.npz"), model, x, y)
    header, lines = _read(tmp_path / "q.csv")
    np.testing.assert_allclose(_column(lines, header, "gate_0"), point.gate_probabilities[:, 0], rtol=1e-10,
                               atol=1e-14)
    # The draws differ from the point fit, so the two predictions do too.
    assert not np.allclose(direct.mean, point.mean, rtol=1e-6)


def test_predict_flags_rows_outside_the_training_inputs(fitted, table, tmp_path):
    out, _, _ = fitted
    # Rows 3 and 7 move a far beyond its training range (+100 = 12 training sd).
    new, _, _ = _new_csv(tmp_path / "far.csv", table, ROWS, target=False, shift=ROWS[[3, 7]])
    code, stdout, stderr = run_cli(["predict", str(out), str(new), "--quiet"])
    assert code == 0 and stdout == ""
    assert stderr == (
        "numpyro-moe predict: warning: 2 of 40 rows lie outside the training inputs (lines 5, 9; columns ['a']: "
        f"more than {OUTSIDE_MARGIN:g} training sd beyond the training range): the experts' linear extrapolation "
        "there is not trustworthy (column outside_training)\n"
    )
    header, lines = _read(tmp_path / "far-predictions.csv")
    assert "log_density" not in header  # no target column
    assert [row[header.index("outside_training")] for row in lines] == [
        "true" if i in (3, 7) else "false" for i in range(40)
    ]
    # The Python function warns as the library does.
    with pytest.warns(ReliabilityWarning, match=r"^2 of 40 rows lie outside the training inputs"):
        summary = predict_csv(out, new, out=tmp_path / "again.csv", verbose=False)
    assert summary.outside == 2 and summary.source == "point" and summary.log_density is None


def test_predict_missing_values_leave_empty_rows(fitted, table, tmp_path):
    out, _, _ = fitted
    # 41 rows, one with a missing value: 40 predicted, the shape the other tests compiled.
    new, _, _ = _new_csv(tmp_path / "gaps.csv", table, np.arange(41))
    text = new.read_text().splitlines()
    fields = text[2].split(",")
    fields[1] = "NA"  # b is missing on line 3
    text[2] = ",".join(fields)
    new.write_text("\n".join(text) + "\n")
    code, _, stderr = run_cli(["predict", str(out), str(new)])
    assert code == 2
    assert stderr == (
        "numpyro-moe predict: error: NEW.csv: 1 of 41 rows has missing values (column 'b': 1 row; line 3); pass "
        "--missing drop to leave their predictions empty\n"
    )
    code, stdout, _ = run_cli(["predict", str(out), str(new), "--missing", "drop"])
    assert code == 0 and "predicted 40 rows" in stdout
    _, lines = _read(tmp_path / "gaps-predictions.csv")
    assert len(lines) == 41 and set(lines[1]) == {""} and all(lines[i][0] for i in (0, 2, 3))


def test_predict_errors_name_what_is_wrong(fitted, table, tmp_path):
    out, _, _ = fitted
    new, _, _ = _new_csv(tmp_path / "new.csv", table, np.arange(5))
    # A column the model needs is absent.
    lacking = tmp_path / "lacking.csv"
    lacking.write_text("a,y\n1,2\n")
    code, _, stderr = run_cli(["predict", str(out), str(lacking)])
    assert code == 2 and stderr.startswith("numpyro-moe predict: error: NEW.csv: ")
    assert "lacks the columns ['color', 'b'] that the model needs" in stderr
    # A level the model never saw.
    unseen = tmp_path / "unseen.csv"
    unseen.write_text("a,b,color\n40,3,red\n41,3,green\n")
    code, _, stderr = run_cli(["predict", str(out), str(unseen)])
    assert code == 2 and "column 'color': 1 row hold levels not seen in training ['green'] (lines 3)" in stderr
    # Not a fit folder: missing, empty, or an older folder without model.json.
    code, _, stderr = run_cli(["predict", str(tmp_path / "nowhere"), str(new)])
    assert code == 2 and stderr.startswith("numpyro-moe predict: error: FIT_DIR: no such folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, stderr = run_cli(["predict", str(empty), str(new)])
    assert code == 2 and "FIT_DIR: " in stderr and "is not a fit folder of numpyro-moe fit: it has no model.json" in stderr
    older = tmp_path / "older"
    older.mkdir()
    shutil.copy(out / "fit.npz", older / "fit.npz")
    code, _, stderr = run_cli(["predict", str(older), str(new)])
    assert code == 2 and "made by an older numpyro-moe; refit with this version" in stderr
    # Another format version.
    future = tmp_path / "future"
    shutil.copytree(out, future)
    model = json.loads((future / "model.json").read_text())
    (future / "model.json").write_text(json.dumps({**model, "format": 3, "version": "9.0"}))
    code, _, stderr = run_cli(["predict", str(future), str(new)])
    assert code == 2
    assert f"has format version 3 (written by numpyro-moe 9.0); this numpyro-moe ({moe.__version__}) reads " \
           "formats 1, 2 (writes 2): refit with this version" in stderr
    (future / "model.json").write_text("{not json")
    assert "is not valid JSON" in run_cli(["predict", str(future), str(new)])[2]
    code, _, stderr = run_cli(["predict", str(out), str(new), "--interval", "1.5"])
    assert code == 2 and "--interval: expected a probability in (0, 1), got 1.5" in stderr
    # No prediction file was written by any of these.
    assert not any(p.name.endswith("-predictions.csv") for p in tmp_path.iterdir())


def test_fit_quiet_prints_nothing_and_names_its_folder(data, fitted, tmp_path, monkeypatch):
    path, _, _, _ = data
    monkeypatch.chdir(tmp_path)
    # One k: no table; the default folder keeps k in its name. Same shapes as the module's fit.
    assert run_cli(["fit", str(path), *FIT, "--experts", "2", "--quiet"]) == (0, "", "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-moe-k2"]
    model = json.loads((tmp_path / "train-moe-k2" / "model.json").read_text())
    assert model["selection"] is None and model["num_experts"] == 2


def test_fit_flags_and_errors(data, tmp_path):
    path, _, _, _ = data
    code, _, stderr = run_cli(["fit", str(path), "--target", "y", "--missing", "drop", "--out", str(tmp_path / "o")])
    assert code == 2 and stderr.startswith("numpyro-moe fit: error: DATA: columns ['color'] hold text")
    assert "--one-hot color" in stderr
    code, _, stderr = run_cli(["fit", str(path), *FIT, "--experts", "3-1", "--out", str(tmp_path / "o")])
    assert code == 2 and "--experts: expected auto, K, A-B or K1,K2,... (integers >= 1), got '3-1'" in stderr
    code, _, stderr = run_cli(["fit", str(path), "--target", "y", "--one-hot", "color", "--out", str(tmp_path / "o")])
    assert code == 2 and "pass --missing drop to leave those rows out" in stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::numpyro_moe.ReliabilityWarning")  # 30 NUTS draws: r_hat > 1.01
def test_fit_with_nuts_then_predict_from_the_posterior(data, table, tmp_path):
    # Slow for the NUTS compile of the model with intercepts; the predict path itself is covered
    # above with draws written the same way.
    path, _, _, _ = data
    out = tmp_path / "nuts"
    code, _, stderr = run_cli(["fit", str(path), *FIT, "--experts", "2", "--nuts", "--chains", "2", "--num-warmup",
                            "30", "--num-draws", "30", "--max-draws", "30", "--out", str(out), "--quiet"])
    assert code == 0, stderr
    assert stderr == "" or all(line.startswith("numpyro-moe fit: warning: ") for line in stderr.splitlines())
    model = json.loads((out / "model.json").read_text())
    assert {key: model["nuts"][key] for key in ("chains", "warmup", "draws")} == {"chains": 2, "warmup": 30,
                                                                                 "draws": 30}
    assert model["nuts"]["divergences"] >= 0 and model["nuts"]["min_ess_bulk"] > 0
    new, x, y = _new_csv(tmp_path / "new.csv", table, ROWS)
    code, stdout, _ = run_cli(["predict", str(out), str(new)])
    assert code == 0 and "from posterior draws (2 chains x 30 draws, posterior.nc)" in stdout
    header, lines = _read(tmp_path / "new-predictions.csv")
    with xr.open_datatree(out / "posterior.nc", engine="h5netcdf") as tree:
        direct = _direct(tree.load(), model, x, y)
    np.testing.assert_allclose(_column(lines, header, "log_density"),
                               direct.log_density - math.log(model["standardization"]["target_scale"]), rtol=1e-10)
