"""Fitting a CSV file end to end (`numpyro_moe.apps.csv_workflow`): reading, standardising,
writing results, and ``numpyro-moe fit``."""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pytest
import xarray as xr

import numpyro_moe as moe
from numpyro_moe import Fit, MixtureOfExperts, MoEParams, ReliabilityWarning
from numpyro_moe.apps import csv_workflow
from numpyro_moe.apps.cli import build_parser, main
from numpyro_moe.apps.csv_workflow import CsvData, _binding_prior_note, _nuts_line, fit_csv, read_csv
from numpyro_moe.apps.plots import MAX_TRACE_PANELS, plot_trace
from numpyro_moe.io import load_result
from numpyro_moe.simulation import sample_data, true_params

numpyro.enable_x64()

FEATURES = ["age", "dose", "weight"]
PNG = b"\x89PNG\r\n\x1a\n"
# Two EM starts: the tensor estimate and one random start, so the summary has a choice to report.
SMOKE = {"target": "y", "num_experts": 2, "num_starts": 2, "verbose": False}
OUTPUTS = ["fit.npz", "parameters.csv", "model.json", "summary.txt", "gate_probabilities.png", "ppc.png"]


def _write(path, text):
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def table():
    """Two linear experts in three features of very different scales and offsets."""
    truth = true_params(key=jax.random.key(0), dim=3, num_experts=2, noise=0.2)
    x, y = sample_data(truth, key=jax.random.key(1), num_samples=400)
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


@pytest.fixture
def keep_xla_flags(monkeypatch):
    # `numpyro-moe fit` sets XLA_FLAGS (host device count) for the process: restore it after.
    if "XLA_FLAGS" in os.environ:
        monkeypatch.setenv("XLA_FLAGS", os.environ["XLA_FLAGS"])
    else:
        monkeypatch.delenv("XLA_FLAGS", raising=False)


# ---------------------------------------------------------------------------------------------
# read_csv


def test_read_csv_columns_names_and_order(csv_file, table):
    x, y = table
    data = read_csv(csv_file, target="y")
    assert isinstance(data, CsvData)
    assert data.feature_names == FEATURES and data.target == "y"
    assert data.x.shape == (400, 3) and data.y.shape == (400,)
    np.testing.assert_array_equal(data.x, x)  # repr() round-trips floats exactly
    np.testing.assert_array_equal(data.y, y)
    chosen = read_csv(csv_file, target="y", features=["weight", "age"])
    assert chosen.feature_names == ["weight", "age"]
    np.testing.assert_array_equal(chosen.x, x[:, [2, 0]])
    # Any column can be the target.
    other = read_csv(csv_file, target="dose")
    assert other.feature_names == ["age", "y", "weight"]
    np.testing.assert_array_equal(other.y, x[:, 1])


def test_read_csv_tolerates_spaces_and_blank_lines(tmp_path):
    path = _write(tmp_path / "d.csv", " a , y\n1, 2\n\n  \n3 ,4.5e0\n\n")
    data = read_csv(path, target="y")
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
        ("a,b,y\n1,2,3\n", {"target": "y", "features": ["a", "y"]},
         r"^--features: the target 'y' cannot also be a feature"),
        ("a,a,y\n1,2,3\n4,5,6\n", {"target": "y"}, r"^DATA: .*repeats the column names \['a'\]"),
        ("a,b,y\n1,2,3\n4,abc,6\n", {"target": "y"},
         r"^column 'b': line 3 holds 'abc', which is not numeric"),
        # Missing values (empty, NA, nan, ...) are refused by default, naming the columns and lines.
        ("a,b,y\n1,2,3\n4,,6\n", {"target": "y"},
         r"^DATA: 1 of 2 rows has missing values \(column 'b': 1 row; line 3\); pass --missing drop"),
        ("a,b,y\n1,2,3\n4,5,nan\n", {"target": "y"},
         r"^DATA: 1 of 2 rows has missing values \(column 'y': 1 row; line 3\); pass --missing drop"),
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
        read_csv(path, **kwargs)


def test_read_csv_missing_file_names_data(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(FileNotFoundError, match=r"^DATA: no such file") as info:
        read_csv(missing, target="y")
    assert str(missing) in str(info.value)
    with pytest.raises(FileNotFoundError, match=r"^DATA: "):  # a folder is not a file either
        read_csv(tmp_path, target="y")


# ---------------------------------------------------------------------------------------------
# fit_csv without NUTS


@pytest.fixture(scope="module")
def fitted(csv_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("fit") / "result"
    returned = fit_csv(csv_file, out=out, **SMOKE)
    return returned, out


def test_fit_csv_writes_every_output(fitted):
    returned, out = fitted
    assert returned == out
    assert _written(out) == sorted(OUTPUTS)
    # Written into a hidden staging folder, then renamed: nothing else is left beside it.
    assert _written(out.parent) == ["result"]
    for name in ("gate_probabilities.png", "ppc.png"):
        content = (out / name).read_bytes()
        assert content.startswith(PNG) and len(content) > 5000


def test_fit_csv_saves_the_whole_fit_with_its_link_and_intercepts(fitted, table):
    _, out = fitted
    x, y = table
    fit = load_result(out / "fit.npz")
    assert isinstance(fit, Fit) and fit.method == "em"
    params = fit.params
    assert isinstance(params, MoEParams) and params.link.name == "linear"
    assert params.experts.shape == (2, 3) and params.gates.shape == (2, 3)
    assert params.expert_intercepts.shape == (2,) and params.gate_intercepts.shape == (2,)
    assert np.shape(params.noise) == (2,)
    np.testing.assert_array_equal(params.gates[-1], 0)
    assert params.gate_intercepts[-1] == 0
    # Two starts: the tensor estimate first, then one random start; the best one won.
    assert fit.start_labels == ("tensor", "random")
    assert fit.start_log_likelihoods.shape == (2,)
    # The best start wins; on a tie (within the EM tolerance, 1e-8) the first of them.
    assert fit.start == int(np.argmax(fit.start_log_likelihoods >= fit.start_log_likelihoods.max() - 1e-8))
    assert fit.log_likelihood == pytest.approx(float(np.max(fit.start_log_likelihoods)), rel=1e-12)
    assert fit.iterations >= 1 and fit.history.shape[0] >= 1
    # The saved parameters, on the data standardised as recorded, give the likelihood reported.
    meta = json.loads((out / "model.json").read_text())["standardization"]
    z = (x - np.array(meta["feature_mean"])) / np.array(meta["feature_scale"])
    t = (y - meta["target_mean"]) / meta["target_scale"]
    log_likelihood = float(np.mean(MixtureOfExperts.from_params(params, z).log_prob(t)))
    assert log_likelihood == pytest.approx(fit.log_likelihood, rel=1e-9)
    # Two experts with noise 0.2 on responses of sd ~1 fit far better than one line:
    # a Gaussian with the standardised target's unit variance scores -1.42 per point.
    assert log_likelihood > -1.0


def test_fit_csv_model_json_standardization(fitted, table):
    _, out = fitted
    x, y = table
    model = json.loads((out / "model.json").read_text())
    assert model["features"] == FEATURES and model["target"] == "y"
    meta = model["standardization"]
    np.testing.assert_allclose(meta["feature_mean"], x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(meta["feature_scale"], x.std(axis=0), rtol=1e-12)
    assert meta["target_mean"] == pytest.approx(y.mean(), rel=1e-12)
    assert meta["target_scale"] == pytest.approx(y.std(), rel=1e-12)


def test_fit_csv_design_reaches_the_tensor_start_and_model_json(fitted, csv_file, tmp_path, monkeypatch):
    # The default: the Gaussian moments, recorded.
    assert json.loads((fitted[1] / "model.json").read_text())["design"] == "gaussian"
    # --design mixture: the moment estimate of the tensor start reads the fitted design's scores.
    seen = []
    estimate = moe._fit.estimate_experts

    def spy(*args, **kwargs):
        result = estimate(*args, **kwargs)
        seen.append((kwargs["design"], result.diagnostics.design))
        return result

    monkeypatch.setattr(moe._fit, "estimate_experts", spy)
    out = fit_csv(csv_file, out=tmp_path / "mixture", **{**SMOKE, "design": "mixture"})
    assert seen == [("mixture", "mixture")]
    assert json.loads((out / "model.json").read_text())["design"] == "mixture"
    assert load_result(out / "fit.npz").start_labels[0] == "tensor"


def test_fit_csv_summary_names_the_starts_and_the_winner(fitted, csv_file):
    _, out = fitted
    fit = load_result(out / "fit.npz")
    summary = (out / "summary.txt").read_text()
    assert f"data: {csv_file} (400 rows, features {FEATURES}, target 'y'), standardised" in summary
    assert "model: 2 experts, link linear, a noise sd per expert, expert and gate intercepts" in summary
    label = fit.start_labels[fit.start]
    assert (f"fit: 2 EM starts (tensor, random); start {fit.start} ({label}) won; "
            f"mean log-likelihood per point {fit.log_likelihood:.4f}; "
            f"EM iterations {fit.iterations}, converged {fit.converged}") in summary
    # Where the moment start ended, in the summary and in model.json (the start's objectives).
    record = json.loads((out / "model.json").read_text())["fit"]
    assert record["start_labels"] == ["tensor", "random"]
    np.testing.assert_allclose(record["start_objectives"], fit.start_objectives, rtol=1e-12)
    assert record["tensor_gap"] == pytest.approx(fit.start_objectives[fit.start] - fit.start_objectives[0], abs=1e-12)
    if fit.start == 0:
        assert "; the tensor start won" in summary and record["tensor_gap"] == 0
    else:
        assert f"; the tensor start ended {record['tensor_gap']:.3g} per point below the winner" in summary
    assert "parameters (standardised units): see parameters.csv" in summary


def test_fit_csv_finishes_a_fit_stopped_by_the_iteration_cap(csv_file, fitted, tmp_path, capsys):
    """EM capped at 3 iterations: the chosen fit continues by SQUAREM to convergence, the point
    fit the uncapped command reaches (the same start wins), and the folder says so."""
    _, uncapped = fitted
    out = tmp_path / "capped"
    with pytest.warns(ReliabilityWarning, match="max-iterations=3"):
        fit_csv(csv_file, out=out, **{**SMOKE, "max_iterations": 3, "verbose": True})
    record = json.loads((out / "model.json").read_text())["fit"]
    fit, reference = load_result(out / "fit.npz"), load_result(uncapped / "fit.npz")
    assert record["converged"] is True and fit.converged
    assert record["accelerated_iterations"] == fit.iterations - 3 > 0
    assert json.loads((uncapped / "model.json").read_text())["fit"]["accelerated_iterations"] == 0
    assert fit.start == reference.start
    # Both stop where an iteration gains less than tol = 1e-8 per point, so they agree to about that
    # in the objective (EM's log posterior) and less in the log-likelihood (measured 1.7e-6).
    assert fit.start_objectives[fit.start] == pytest.approx(reference.start_objectives[fit.start], abs=1e-6)
    assert fit.log_likelihood == pytest.approx(reference.log_likelihood, abs=2e-5)
    assert np.min(np.diff(fit.history)) > -1e-12
    summary = (out / "summary.txt").read_text()
    assert (f"EM iterations {fit.iterations} (the last {fit.iterations - 3} SQUAREM-accelerated, after the "
            "3-iteration cap), converged True") in summary
    assert "SQUAREM-accelerated EM continued the chosen fit: converged after" in capsys.readouterr().out


def test_fit_csv_parameter_table(fitted):
    _, out = fitted
    params = load_result(out / "fit.npz").params
    # The table holds the saved numbers (6 significant digits).
    rows = [row.split(",") for row in (out / "parameters.csv").read_text().splitlines()]
    assert rows[0] == ["parameter", *FEATURES, "intercept"]
    assert [row[0] for row in rows[1:]] == ["expert 0", "expert 1", "gate 0", "gate 1", "noise"]
    for i in range(2):
        np.testing.assert_allclose([float(v) for v in rows[1 + i][1:]],
                                   [*params.experts[i], params.expert_intercepts[i]], rtol=1e-5, atol=1e-12)
        np.testing.assert_allclose([float(v) for v in rows[3 + i][1:]],
                                   [*params.gates[i], params.gate_intercepts[i]], rtol=1e-5, atol=1e-12)
    # The noise row lists one sd per expert.
    assert len(rows[-1]) == 1 + 2
    np.testing.assert_allclose([float(v) for v in rows[-1][1:]], params.noise, rtol=1e-5)


def test_fit_csv_refuses_an_existing_folder_unless_overwrite(csv_file, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"^--out: .*already exists.*--overwrite") as info:
        fit_csv(csv_file, out=out, **SMOKE)
    assert str(out) in str(info.value)
    assert _written(out) == ["keep.txt"]
    fit_csv(csv_file, out=out, overwrite=True, **SMOKE)
    assert _written(out) == sorted(OUTPUTS)  # replaced as a whole: keep.txt is gone
    assert _written(tmp_path) == ["taken"]


def test_fit_csv_is_reproducible_for_a_seed(csv_file, fitted, tmp_path):
    _, out = fitted
    again = fit_csv(csv_file, out=tmp_path / "again", **SMOKE)
    first, second = load_result(out / "fit.npz"), load_result(again / "fit.npz")
    assert first.params.link == second.params.link
    for a, b in zip(jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(second), strict=True):
        np.testing.assert_array_equal(a, b)
    assert (out / "parameters.csv").read_text() == (again / "parameters.csv").read_text()


def test_fit_csv_defaults():
    # The command's defaults are the function's: 20 EM starts of which 5 continue after a short
    # EM, k chosen among 1-5 by BIC, the experts' prior sd 1 widened to 3 and 10 while it binds
    # (None; cross-validation on request), a noise per expert, missing values refused.
    defaults = inspect.signature(fit_csv).parameters
    assert defaults["num_starts"].default == 20 and defaults["num_finalists"].default == 5
    assert defaults["expert_prior_scale"].default is None and csv_workflow.AUTO_PRIOR_SCALES == (1.0, 3.0, 10.0)
    assert csv_workflow.WIDER_PRIOR_SCALES == (3.0, 10.0) and csv_workflow.BINDING_PRIOR_SDS == 2.0
    assert defaults["num_experts"].default == "auto" and csv_workflow.AUTO_EXPERTS == (1, 2, 3, 4, 5)
    # NUTS's draws while the chains disagree: 2,000,000 rows x draws, in rounds, 4 to 20 of them.
    assert defaults["max_samples"].default is None and csv_workflow.ROW_DRAWS == 2_000_000
    assert [csv_workflow.default_max_draws(n, 500) for n in (42, 100, 380, 1000, 5389)] == [
        10_000, 10_000, 5_000, 2_000, 2_000
    ]
    assert csv_workflow.default_max_draws(380, 100) == 2_000  # at most 20 rounds of 100
    args = build_parser().parse_args(["fit", "d.csv", "--target", "y"])
    for flag, name in [("starts", "num_starts"), ("link", "link"), ("seed", "seed"), ("nuts", "nuts"),
                       ("chains", "num_chains"), ("num_warmup", "num_warmup"), ("num_draws", "num_samples"),
                       ("overwrite", "overwrite"), ("experts", "num_experts"), ("criterion", "criterion"),
                       ("missing", "missing"), ("shared_noise", "shared_noise"), ("max_draws", "max_samples"),
                       ("max_iterations", "max_iterations"), ("expert_prior_scale", "expert_prior_scale"),
                       ("finalists", "num_finalists"), ("design", "design")]:
        assert getattr(args, flag) == defaults[name].default, flag
    assert args.quiet is (not defaults["verbose"].default) is False
    assert args.one_hot is None and defaults["one_hot"].default == ()
    # The command line lists --design's choices before importing the library: the same as its own.
    from numpyro_moe._design import DESIGNS

    for design in DESIGNS:
        assert build_parser().parse_args(["fit", "d.csv", "--target", "y", "--design", design]).design == design
    with pytest.raises(SystemExit):
        build_parser().parse_args(["fit", "d.csv", "--target", "y", "--design", "normal"])


def test_cli_fit_flags_reach_fit_csv(monkeypatch, tmp_path, keep_xla_flags):
    calls = []
    monkeypatch.setattr(csv_workflow, "fit_csv", lambda path, **kwargs: calls.append((path, kwargs)))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dir").mkdir()
    for name in ("dir/d.csv", "d.csv"):  # the command checks that the file is there
        _write(tmp_path / name, "a,y\n1,2\n")
    assert main(["fit", "dir/d.csv", "--target", "y", "--experts", "1-3", "--criterion", "icl", "--one-hot",
                 "a, b", "--missing", "drop", "--shared-noise", "--quiet", "--features", "a, b,c", "--max-draws",
                 "800", "--max-iterations", "900", "--expert-prior-scale", "5", "--finalists", "3",
                 "--design", "auto", "--target-accept", "0.95"]) == 0
    assert main(["fit", "d.csv", "--target", "y", "--experts", "3", "--one-hot", "all"]) == 0
    assert main(["fit", "d.csv", "--target", "y", "--experts", "2,4"]) == 0
    (path, first), (_, second), (_, third) = calls
    assert path == "dir/d.csv"
    assert {key: first[key] for key in ("num_experts", "criterion", "one_hot", "missing", "shared_noise",
                                        "verbose", "features", "out", "max_samples", "max_iterations",
                                        "expert_prior_scale", "num_finalists", "design", "target_accept_prob")} == {
        "num_experts": (1, 2, 3), "criterion": "icl", "one_hot": ["a", "b"], "missing": "drop",
        "shared_noise": True, "verbose": False, "features": ["a", "b", "c"], "out": "d-moe", "max_samples": 800,
        "max_iterations": 900, "expert_prior_scale": 5.0, "num_finalists": 3, "design": "auto",
        "target_accept_prob": 0.95,
    }
    assert second["expert_prior_scale"] is None and second["num_finalists"] == 5
    assert second["target_accept_prob"] == 0.8  # NumPyro's default
    assert second["design"] == "gaussian"
    # One k keeps it in the default folder's name.
    assert second["num_experts"] == 3 and second["out"] == "d-moe-k3" and second["one_hot"] == "all"
    assert second["verbose"] is True and second["shared_noise"] is False
    assert third["num_experts"] == (2, 4) and third["out"] == "d-moe"


def test_fit_csv_with_several_k_needs_rows_for_each(tmp_path):
    # k = 1 and 2 fit in 40 rows of one feature (4 parameters per expert, 16 for k = 2 needs 16
    # rows); explicit k the rows cannot support are refused, auto leaves them out.
    path = _write(tmp_path / "d.csv", "a,y\n" + "".join(f"{i},{i % 3}\n" for i in range(20)))
    with pytest.raises(ValueError, match=r"^DATA: too few rows: 20 rows for 3 experts on 1 features"):
        fit_csv(path, out=tmp_path / "o", **{**SMOKE, "num_experts": (1, 3)})
    with pytest.raises(ValueError, match=r"^--experts: expected 'auto', an integer or a list of integers >= 1, "
                                         r"got 'many'"):
        fit_csv(path, out=tmp_path / "o", **{**SMOKE, "num_experts": "many"})
    with pytest.raises(ValueError, match=r"^--experts: expected an integer >= 1, got 0"):
        fit_csv(path, out=tmp_path / "o", **{**SMOKE, "num_experts": (2, 0)})
    with pytest.raises(ValueError, match=r"^--criterion: expected one of \['auto', 'bic', 'icl', 'cv'\], got 'aic'"):
        fit_csv(path, out=tmp_path / "o", **{**SMOKE, "criterion": "aic"})
    assert _written(tmp_path) == ["d.csv"]


def test_fit_csv_auto_leaves_out_the_k_the_rows_cannot_support(tmp_path, monkeypatch, capsys):
    # 20 rows of one feature support k = 1 and 2 (need 8 and 16 rows), not 3-5.
    path = _write(tmp_path / "d.csv", "a,y\n" + "".join(f"{i},{i % 3}\n" for i in range(20)))
    seen = []

    class Stop(Exception):
        pass

    def select(x, y, **kwargs):
        seen.append(kwargs)
        raise Stop

    monkeypatch.setattr(moe, "select_num_experts", select)
    with pytest.raises(Stop):
        fit_csv(path, out=tmp_path / "o", **{**SMOKE, "num_experts": "auto", "verbose": True})
    # The default criterion, "auto", is cross-validation on these 20 rows (BIC above 2,000).
    assert seen[0]["num_experts"] == (1, 2) and seen[0]["criterion"] == "cv"
    assert seen[0]["shared_noise"] is False and seen[0]["intercepts"] is True and seen[0]["progress_bar"] is False
    out = capsys.readouterr().out
    assert "--experts auto: k = 3, 4, 5 left out: too few rows (20) for them" in out
    assert "comparing k = 1, 2 experts by CV" in out
    assert _written(tmp_path) == ["d.csv"]


ENOUGH = "a,y\n" + "".join(f"{i},{i % 3}\n" for i in range(40))


@pytest.mark.parametrize(
    ("text", "kwargs", "error", "match"),
    [
        ("a,y\n" + "".join(f"{i},{i % 3}\n" for i in range(15)), {}, ValueError,
         r"^DATA: too few rows: 15 rows for 2 experts on 1 features \(8 parameters\); need at least 16"),
        ("a,c,y\n" + "".join(f"{i},7,{i % 3}\n" for i in range(40)), {}, ValueError,
         r"^columns \['c'\] are constant; remove them"),
        ("a,y\n" + "".join(f"{i},1\n" for i in range(40)), {}, ValueError, r"^columns \['y'\] are constant"),
        ("a,y\n1,2\n", {"num_experts": 0}, ValueError, r"^--experts: expected an integer >= 1, got 0"),
        ("a,y\n1,2\n", {"num_experts": 2.0}, ValueError, r"^--experts: expected an integer >= 1, got 2.0"),
        ("a,y\n1,2\n", {"num_starts": 0}, ValueError, r"^--starts: expected an integer >= 1, got 0"),
        ("a,y\n1,2\n", {"num_starts": True}, ValueError, r"^--starts: expected an integer >= 1, got True"),
        ("a,y\n1,2\n", {"nuts": True, "num_samples": 50, "max_samples": 20}, ValueError,
         r"^--max-draws: expected at least --num-draws \(50\), got 20"),
        ("a,y\n1,2\n", {"nuts": True, "max_samples": 0}, ValueError, r"^--max-draws: expected an integer >= 1, got 0"),
        ("a,y\n1,2\n", {"nuts": True, "target_accept_prob": 1.0}, ValueError,
         r"^--target-accept: expected a number strictly between 0 and 1, got 1.0"),
        ("a,y\n1,2\n", {"max_iterations": 0}, ValueError, r"^--max-iterations: expected an integer >= 1, got 0"),
        ("a,y\n1,2\n", {"design": "normal"}, ValueError, r"^--design: expected one of \['gaussian', 'mixture', 'auto'\], got 'normal'"),
        (ENOUGH, {"link": "cubic"}, ValueError, r"^link: unknown link 'cubic'"),
        ("a,y\n1,2\n", {"target": "z"}, ValueError, r"^--target: "),
        ("a,y\n1,2\n", {"features": ["b"]}, ValueError, r"^--features: columns \['b'\] are not in"),
        ("a,y\n1,2\n3,x\n", {}, ValueError, r"^column 'y': line 3 holds 'x'"),
        ("a,y\n1,2\n3\n", {}, ValueError, r"^DATA: line 3 has 1 fields, expected 2"),
    ],
)
def test_fit_csv_bad_inputs_write_nothing(tmp_path, text, kwargs, error, match):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    path = _write(data_dir / "d.csv", text)
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        fit_csv(path, out=out, **{**SMOKE, **kwargs})
    assert _written(tmp_path) == ["data"]  # no output folder, not even a partial one


def test_interrupted_fit_leaves_no_folder(csv_file, tmp_path, monkeypatch):
    reached = []

    def interrupt(params, x, feature_names, path):
        # By now fit.npz and friends are in the staging folder, not in out.
        staging = path.parent
        reached.append((_written(tmp_path), _written(staging)))
        raise KeyboardInterrupt

    monkeypatch.setattr(csv_workflow, "plot_gates", interrupt)
    out = tmp_path / "result"
    with pytest.raises(KeyboardInterrupt):
        fit_csv(csv_file, out=out, **SMOKE)
    assert len(reached) == 1
    beside, staged = reached[0]
    assert len(beside) == 1 and beside[0].startswith(".result.partial-")
    assert staged == ["fit.npz", "model.json", "parameters.csv"]
    assert not out.exists()
    assert os.listdir(tmp_path) == []  # the hidden staging folder is cleaned up too


def test_interrupted_overwrite_keeps_the_old_folder(csv_file, tmp_path, monkeypatch):
    out = tmp_path / "result"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(csv_workflow, "plot_gates", interrupt)
    with pytest.raises(KeyboardInterrupt):
        fit_csv(csv_file, out=out, overwrite=True, **SMOKE)
    assert _written(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert _written(tmp_path) == ["result"]


# ---------------------------------------------------------------------------------------------
# fit_csv with NUTS (tiny)


@pytest.fixture(scope="module")
def fitted_nuts(csv_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("nuts") / "result"
    with warnings.catch_warnings():
        # 2 chains x 50 draws rarely reach r_hat < 1.01; the warning is tested in test_bayes.
        warnings.simplefilter("ignore", moe.ReliabilityWarning)
        fit_csv(csv_file, out=out, nuts=True, num_chains=2, num_warmup=50, num_samples=50, max_samples=50, **SMOKE)
    return out


@pytest.mark.slow
def test_fit_csv_with_nuts_writes_the_posterior(fitted_nuts, fitted):
    # Slow for a NUTS compile of the model with intercepts; run_nuts itself is covered by
    # test_bayes in the default suite.
    out = fitted_nuts
    assert _written(out) == sorted([*OUTPUTS, "posterior.nc", "summary.csv", "trace.png"])
    point = load_result(out / "fit.npz")
    # The NUTS stage does not change the point fit: the same seed gives the same fit.npz.
    np.testing.assert_array_equal(point.params.experts, load_result(fitted[1] / "fit.npz").params.experts)
    with xr.open_datatree(out / "posterior.nc", engine="h5netcdf") as tree:
        assert set(tree.children) == {"posterior", "posterior_predictive", "log_likelihood", "sample_stats",
                                      "observed_data"}
        assert tree.attrs["moe_link"] == "linear"
        posterior = tree["posterior"]
        # The CSV model has intercepts.
        assert set(posterior.data_vars) == {"experts", "gates", "noise", "expert_intercepts",
                                            "gate_intercepts"}
        assert posterior["experts"].shape == (2, 50, 2, 3)
        assert posterior["expert_intercepts"].dims == ("chain", "draw", "expert")
        assert posterior["gate_intercepts"].dims == ("chain", "draw", "gate")
        assert tree["observed_data"]["y"].shape == (400,)
        # Standardised units: the observed target has mean 0 and sd 1.
        assert float(tree["observed_data"]["y"].mean()) == pytest.approx(0, abs=1e-12)
        assert float(tree["observed_data"]["y"].std()) == pytest.approx(1, rel=1e-12)
        # Relabelled to the point fit's labels, the posterior mean experts are near it: they
        # differ by O(1/n) plus Monte Carlo error (posterior sd ~0.02 / sqrt(ESS)); swapped
        # labels would differ by O(1).
        np.testing.assert_allclose(posterior["experts"].mean(("chain", "draw")), point.params.experts, atol=0.05)
    header = (out / "summary.csv").read_text().splitlines()[0].split(",")
    assert {"mean", "sd", "r_hat", "ess_bulk"} <= set(header)
    text = (out / "summary.txt").read_text()
    assert "posterior summary (az.summary)" in text
    recorded = json.loads((out / "model.json").read_text())["nuts"]
    assert f"max r_hat {recorded['max_r_hat']:.3f}" in text
    assert ("Not to be trusted" in text) == (not recorded["max_r_hat"] <= 1.01 or recorded["divergences"] > 0)
    for name in ("trace.png", "ppc.png"):
        assert (out / name).read_bytes().startswith(PNG)


def test_the_summary_says_when_the_experts_prior_holds_a_coefficient_back():
    # The motorcycle set's k = 3 fit at S = 1: expert 0's coefficient on time was 2.57.
    experts = jnp.asarray([[2.57113, 1.36916, -0.532276], [0.27, 0.41, -0.42], [0.30, 0.11, -0.09]])
    params = MoEParams(experts, jnp.zeros((3, 3)), jnp.full(3, 0.3), expert_intercepts=jnp.asarray([0.45, 0.12, 0.79]))
    names = ["time", "time2", "time3"]
    note = _binding_prior_note(params, 1.0, names)
    assert note.startswith("note: expert 0's time coefficient is 2.57 (standardised), 2.6 sd of the experts' "
                           "Normal(0, 1) prior")
    assert "--expert-prior-scale auto" in note
    # Within 2 sd of the prior (S = 1.5 puts 2.57 at 1.7 sd), or a negative intercept beyond it.
    assert _binding_prior_note(params, 1.5, names) is None
    small = params.replace(experts=experts / 2)
    assert _binding_prior_note(small, 1.0, names) is None
    far = small.replace(expert_intercepts=jnp.asarray([0.1, -2.4, 0.0]))
    assert _binding_prior_note(far, 1.0, names).startswith("note: expert 1's intercept coefficient is -2.4")


def _cubic_basis_csv(path):
    """The motorcycle data (models/data/mcycle.csv) on a cubic basis of standardised time: strongly
    correlated columns whose experts need large coefficients."""
    data = np.genfromtxt(Path(__file__).parent.parent / "models" / "data" / "mcycle.csv", delimiter=",", names=True)
    t = (data["times"] - data["times"].mean()) / data["times"].std()
    rows = [f"{a!r},{a * a!r},{a**3!r},{b!r}" for a, b in zip(t.tolist(), data["accel"].tolist(), strict=True)]
    return _write(path, "time,time2,time3,accel\n" + "\n".join(rows) + "\n")


@pytest.mark.parametrize(
    ("deviances", "scale", "widened"),
    [
        ({1.0: 200.0, 3.0: 150.0, 10.0: 180.0}, 3.0, [(1.0, 3.0)]),  # 10 predicts worse than 3: kept at 3
        ({1.0: 150.0, 3.0: 150.0, 10.0: 100.0}, 1.0, []),  # 3 no better than 1: kept at 1
    ],
)
def test_the_default_experts_prior_widens_only_where_cross_validation_agrees(
    tmp_path, monkeypatch, deviances, scale, widened
):
    path = _cubic_basis_csv(tmp_path / "cubic.csv")
    asked = []

    def deviance(x, y, gate_x, key, k, value, folds, priors, options):
        asked.append(value)
        return deviances[value]

    monkeypatch.setattr(csv_workflow, "_prior_scale_deviance", deviance)
    out = fit_csv(path, out=tmp_path / "out", target="accel", num_experts=3, num_starts=5, verbose=False)
    model = json.loads((out / "model.json").read_text())
    assert model["expert_prior_scale"] == scale
    assert [(step["from"], step["to"]) for step in model["expert_prior_scale_widened"] or []] == widened
    kept = model["expert_prior_scale_kept"]
    wider = 10.0 if scale == 3.0 else 3.0
    assert (kept["from"], kept["to"]) == (scale, wider) and abs(kept["value"]) > 2 * scale
    assert kept["cv_deviance"] == {"from": deviances[scale], "to": deviances[wider]}
    assert sorted(set(asked)) == sorted({1.0, 3.0, wider}) and len(asked) == len(set(asked))  # each once
    summary = (out / "summary.txt").read_text()
    assert (
        f"experts' prior Normal(0, {scale:g})" in summary
        and f"(kept: Normal(0, {wider:g}) predicted held-out rows no better, 5-fold cross-validated deviance "
        f"{deviances[wider]:.2f} against {deviances[scale]:.2f})" in summary
    )
    assert "note: expert " not in summary  # the binding note's advice is what was just tried
    # Beyond AUTO_PRIOR_SCALE_ROWS rows the likelihood outweighs the prior: the steps are taken
    # without cross-validation.
    asked.clear()
    monkeypatch.setattr(csv_workflow, "AUTO_PRIOR_SCALE_ROWS", 50)
    large = fit_csv(path, out=tmp_path / "large", target="accel", num_experts=3, num_starts=5, verbose=False)
    model = json.loads((large / "model.json").read_text())
    assert not asked and model["expert_prior_scale_kept"] is None
    assert model["expert_prior_scale_widened"] and "cv_deviance" not in model["expert_prior_scale_widened"][0]


def test_the_default_experts_prior_widens_while_it_binds(tmp_path, fitted):
    path = _cubic_basis_csv(tmp_path / "cubic.csv")
    options = {"target": "accel", "num_experts": 3, "num_starts": 5, "verbose": False}
    out = fit_csv(path, out=tmp_path / "default", **options)
    model = json.loads((out / "model.json").read_text())
    steps, kept = model["expert_prior_scale_widened"] or [], model["expert_prior_scale_kept"]
    # The cubic basis binds at sd 1: a step is taken, or refused on the evidence. Each step: a
    # coefficient beyond 2 sd of the prior it left, the next sd of 3 and 10, and a lower
    # cross-validated deviance with the wider prior (133 rows: at most AUTO_PRIOR_SCALE_ROWS).
    assert steps or kept
    assert [(step["from"], step["to"]) for step in steps] == [(1.0, 3.0), (3.0, 10.0)][: len(steps)]
    assert all(abs(step["value"]) > 2 * step["from"] for step in steps)
    assert all(step["cv_deviance"]["to"] < step["cv_deviance"]["from"] for step in steps)
    scale = model["expert_prior_scale"]
    assert scale == (steps[-1]["to"] if steps else 1.0)
    fit = load_result(out / "fit.npz")
    largest = max(np.abs(np.asarray(fit.params.experts)).max(), np.abs(np.asarray(fit.params.expert_intercepts)).max())
    # It stops once nothing binds, at the widest, or where the wider prior predicts no better.
    assert largest <= 2 * scale or scale == 10.0 or (kept["from"] == scale and abs(kept["value"]) > 2 * scale)
    if kept is not None:
        assert kept["cv_deviance"]["to"] >= kept["cv_deviance"]["from"]
    summary = (out / "summary.txt").read_text()
    if steps:
        assert f"experts' prior Normal(0, {scale:g}) (widened from Normal(0, 1): {steps[0]['coefficient']}" in summary
    # A given sd is kept, and the summary says that it binds.
    given = fit_csv(path, out=tmp_path / "given", expert_prior_scale=1.0, **options)
    model = json.loads((given / "model.json").read_text())
    assert model["expert_prior_scale"] == 1.0 and model["expert_prior_scale_widened"] is None
    assert "note: expert " in (given / "summary.txt").read_text()
    # Where nothing binds (the simulated data of the other tests), the default stays at 1.
    model = json.loads((fitted[1] / "model.json").read_text())
    assert model["expert_prior_scale"] == 1.0 and model["expert_prior_scale_widened"] is None


def test_the_summary_says_when_the_chains_cannot_be_trusted():
    agreeing = {"max_r_hat": 1.004, "min_ess_bulk": 812.4, "divergences": 0, "draws": 500}
    line = _nuts_line(agreeing, 4, 500)
    assert line == (
        "NUTS: 4 chains x 500 draws (500 warmup); max r_hat 1.004, min bulk ESS 812, 0 divergent transitions"
    )
    # Chains in different modes (the Boston data at k = 3 measured 1.457): what is wrong, and what to do.
    apart = _nuts_line({**agreeing, "max_r_hat": 1.457, "min_ess_bulk": 8.1}, 4, 500)
    assert apart.startswith("NUTS: 4 chains x 500 draws (500 warmup); max r_hat 1.457, min bulk ESS 8,")
    assert "the chains disagree (max r_hat above 1.01)" in apart and "--max-draws" in apart
    assert "diverged" not in apart and "log density" not in apart
    # With the chains' mean log densities (run_nuts records them), the lowest chain is named, and
    # where to see it in the saved posterior.
    heights = _nuts_line({**agreeing, "max_r_hat": 1.33, "chain_log_density": [-10.0, -2.5, -2.0, -3.0]}, 4, 500)
    assert ("(mean log density by chain: -10.0, -2.5, -2.0, -3.0; chain 0 is 8.0 below the highest: see "
            "az.plot_trace(az.from_netcdf('posterior.nc'), var_names='lp', group='sample_stats'))") in heights
    diverged = _nuts_line({**agreeing, "divergences": 3}, 4, 500)
    assert "3 transitions diverged" in diverged and "disagree" not in diverged and "--max-draws" not in diverged
    # Warmup run again with smaller steps: said.
    raised = _nuts_line({**agreeing, "accept_raised": True, "target_accept_prob": 0.95}, 4, 500)
    assert raised.endswith("; too many transitions diverged at first, so warmup ran again with target acceptance 0.95")
    assert "warmup ran again" not in _nuts_line({**agreeing, "accept_raised": False, "target_accept_prob": 0.8}, 4, 500)
    # Draws dropped because only the later ones agreed: said, and no warning.
    late = _nuts_line({**agreeing, "burn_in": 1000}, 4, 500)
    assert late.endswith("; the first 1000 draws of each chain were dropped as warmup (only the later ones agreed)")
    assert "dropped" not in _nuts_line({**agreeing, "burn_in": 0}, 4, 500) and "dropped" not in line
    # Chains that never moved have a NaN r_hat: not trusted either.
    assert "disagree" in _nuts_line({**agreeing, "max_r_hat": float("nan")}, 4, 500)
    # One chain has no r_hat to judge.
    assert "Not to be trusted" not in _nuts_line({**agreeing, "max_r_hat": float("nan")}, 1, 500)


# ---------------------------------------------------------------------------------------------
# numpyro-moe fit


def test_cli_fit_writes_outputs(csv_file, fitted, tmp_path, capsys, keep_xla_flags):
    devices = jax.local_device_count()
    out = tmp_path / "cli"
    code = main(["fit", str(csv_file), "--target", "y", "--experts", "2", "--out", str(out), "--starts", "2"])
    assert code == 0
    assert _written(out) == sorted(OUTPUTS)
    captured = capsys.readouterr()
    assert f"outputs written to {out}/" in captured.out
    assert "read 400 rows, 3 features" in captured.out and "fitted 2 linear experts" in captured.out
    assert "2 EM starts (tensor, random)" in captured.out
    # JAX had started, so the host device count request has no effect (and does not fail).
    assert jax.local_device_count() == devices
    features = json.loads((out / "model.json").read_text())["features"]
    assert features == FEATURES
    # The command is fit_csv with the same seed: the same fit.
    cli_fit, function_fit = load_result(out / "fit.npz"), load_result(fitted[1] / "fit.npz")
    assert isinstance(cli_fit, Fit)
    np.testing.assert_array_equal(cli_fit.params.experts, function_fit.params.experts)
    assert cli_fit.log_likelihood == function_fit.log_likelihood


def test_cli_fit_features_option(csv_file, tmp_path, keep_xla_flags):
    out = tmp_path / "two"
    # Three features as in the other fits (so no new compile), in another order.
    assert main(["fit", str(csv_file), "--target", "y", "--experts", "2", "--out", str(out),
                 "--starts", "2", "--features", "weight,age,dose"]) == 0
    assert json.loads((out / "model.json").read_text())["features"] == ["weight", "age", "dose"]
    assert (out / "parameters.csv").read_text().splitlines()[0] == "parameter,weight,age,dose,intercept"


def test_cli_fit_refuses_an_existing_folder_unless_overwrite(csv_file, tmp_path, capsys, keep_xla_flags):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["fit", str(csv_file), "--target", "y", "--experts", "2", "--out", str(out), "--starts", "2"]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("numpyro-moe fit: error: --out: ")
    assert str(out) in captured.err and "--overwrite" in captured.err
    assert _written(out) == ["keep.txt"]
    assert main([*args, "--overwrite"]) == 0
    assert _written(out) == sorted(OUTPUTS)
    assert _written(tmp_path) == ["taken"]


def test_cli_fit_advice_names_the_flags(csv_file, tmp_path, capsys, keep_xla_flags):
    # EM stopped after 2 iterations: the warning's advice names the command's flag, not the argument.
    out = tmp_path / "early"
    assert main(["fit", str(csv_file), "--target", "y", "--experts", "2", "--out", str(out), "--max-iterations", "2"]) == 0
    err = capsys.readouterr().err
    assert "numpyro-moe fit: warning: EM hit --max-iterations=2 before" in err and "raise --max-iterations" in err
    assert "max_iterations" not in err


def test_cli_fit_errors_name_the_option(csv_file, tmp_path, capsys, keep_xla_flags):
    out = tmp_path / "new"
    base = ["--experts", "2", "--out", str(out)]
    assert main(["fit", str(csv_file), "--target", "income", *base]) == 2
    err = capsys.readouterr().err
    assert err.startswith("numpyro-moe fit: error: --target: column 'income' is not in")
    assert main(["fit", str(csv_file), "--target", "y", *base, "--features", "age,height"]) == 2
    assert "--features: columns ['height']" in capsys.readouterr().err
    assert main(["fit", str(csv_file), "--target", "y", *base, "--features", "age,y"]) == 2
    assert "--features: the target 'y' cannot also be a feature" in capsys.readouterr().err
    missing = str(tmp_path / "none.csv")
    assert main(["fit", missing, "--target", "y", *base]) == 2
    assert capsys.readouterr().err.startswith("numpyro-moe fit: error: DATA: no such file")
    assert main(["fit", str(csv_file), "--target", "y", "--experts", "0", "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("numpyro-moe fit: error: --experts: expected an integer >= 1")
    for starts in ("0", "-2"):
        assert main(["fit", str(csv_file), "--target", "y", *base, "--starts", starts]) == 2
        assert capsys.readouterr().err.startswith(
            f"numpyro-moe fit: error: --starts: expected an integer >= 1, got {starts}"
        )
    ragged = _write(tmp_path / "ragged.csv", "a,b,y\n1,2,3\n4,5\n")
    assert main(["fit", str(ragged), "--target", "y", *base]) == 2
    assert capsys.readouterr().err.startswith("numpyro-moe fit: error: DATA: line 3 has 2 fields, expected 3")
    assert _written(tmp_path) == ["ragged.csv"]
    with pytest.raises(SystemExit) as info:  # argparse: --target is required
        main(["fit", str(csv_file), "--experts", "2"])
    assert info.value.code == 2
    assert "--target" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # --restarts was renamed --starts
        main(["fit", str(csv_file), "--target", "y", "--experts", "2", "--restarts", "1"])
    assert info.value.code == 2
    assert "--restarts" in capsys.readouterr().err


def test_cli_reports_a_missing_file_or_a_taken_folder_before_importing_jax(csv_file, tmp_path):
    # A fresh process, as a user meets it: the errors come before JAX and NumPyro are imported
    # (which takes seconds), with the same messages as fit_csv's and predict_csv's.
    import subprocess
    import sys

    taken = tmp_path / "taken"
    taken.mkdir()
    script = (
        "import sys\nfrom numpyro_moe.apps.cli import main\nrc = main(sys.argv[1:])\n"
        "print(rc, 'jax' in sys.modules, 'numpyro' in sys.modules)"
    )
    cases = [
        (["fit", str(tmp_path / "none.csv"), "--target", "y"], "numpyro-moe fit: error: DATA: no such file"),
        (["fit", str(csv_file), "--target", "y", "--out", str(taken)], "numpyro-moe fit: error: --out: "),
        (["fit", str(csv_file), "--target", "y", "--experts", "two"], "numpyro-moe fit: error: --experts: "),
        (["fit", str(csv_file), "--target", "y", "--expert-prior-scale", "wide"],
         "numpyro-moe fit: error: --expert-prior-scale: "),
        (["predict", str(tmp_path / "nofit"), str(csv_file)], "numpyro-moe predict: error: FIT_DIR: no such folder"),
        (["predict", str(taken), str(tmp_path / "none.csv")], "numpyro-moe predict: error: DATA: no such file"),
    ]
    for argv, message in cases:
        result = subprocess.run(
            [sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=60, cwd=tmp_path
        )
        assert result.stdout.split() == ["2", "False", "False"], (argv, result.stdout, result.stderr)
        assert result.stderr.startswith(message), (argv, result.stderr)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["taken"]


def test_trace_plot_handles_more_panels_than_arviz_default(tmp_path):
    """k (2d + 2) - 1 > 40 panels: ArviZ refuses by default; the trace plot raises its limit, and
    above 60 panels keeps the first features."""
    import arviz as az

    rng = np.random.default_rng(0)
    dims = {"experts": ["expert", "feature"], "gates": ["gate", "feature"]}
    for dim in (8, 15):
        posterior = {
            "experts": rng.normal(size=(2, 10, 3, dim)),
            "gates": rng.normal(size=(2, 10, 2, dim)),
            "noise": rng.uniform(0.1, 0.2, size=(2, 10)),
        }
        datatree = az.from_dict({"posterior": posterior}, dims=dims)
        path = tmp_path / f"trace{dim}.png"
        plot_trace(datatree, path)
        assert path.read_bytes()[:8] == PNG and path.stat().st_size > 10_000
    assert 5 * 8 + 1 <= MAX_TRACE_PANELS < 5 * 15 + 1


def test_fit_csv_chooses_k_by_cross_validation(tmp_path, capsys):
    # Two lines in x (y = x and y = -x, each half of 120 rows, small noise): one expert cannot
    # follow both, so k = 2's held-out deviance is far below k = 1's; the table shows a CV column
    # and model.json keeps it.
    rng = np.random.default_rng(3)
    x = rng.normal(size=120)
    y = np.where(np.arange(120) % 2 == 0, x, -x) + 0.05 * rng.normal(size=120)
    path = _write(tmp_path / "d.csv", "a,y\n" + "".join(f"{a:.6f},{b:.6f}\n" for a, b in zip(x, y, strict=True)))
    out = tmp_path / "o"
    fit_csv(path, out=out, **{**SMOKE, "num_experts": (1, 2), "criterion": "cv", "verbose": True})
    printed = capsys.readouterr().out
    assert "comparing k = 1, 2 experts by CV" in printed and "k = 2 chosen: the lowest CV" in printed
    header = next(line for line in printed.splitlines() if line.split()[:2] == ["k", "loglik/pt"])
    assert header.split() == ["k", "loglik/pt", "params", "BIC", "ICL", "CV", "min", "weight", "converged"]
    selection = json.loads((out / "model.json").read_text())["selection"]
    assert selection["criterion"] == "cv"
    assert selection["table"][1]["cv"] < selection["table"][0]["cv"]


def test_fit_csv_chooses_the_expert_prior_scale_by_cross_validation(tmp_path, monkeypatch):
    # "auto": at the chosen k the sds 1, 3 and 10 are compared by 5-fold CV and the
    # one-standard-error rule; on columns that nearly cancel (least-squares coefficients +-9 in
    # standardised units) the prior sd 1 loses (see test_penalized's test of the function).
    rng = np.random.default_rng(0)
    z = rng.standard_normal(300)
    u, v = z + 0.1 * rng.standard_normal(300), rng.standard_normal(300)
    y = 10 * z - 10 * u + 0.5 * v + 0.3 * rng.standard_normal(300)
    path = _write(tmp_path / "d.csv", "a,b,c,y\n" + "".join(f"{r[0]},{r[1]},{r[2]},{r[3]}\n" for r in zip(z, u, v, y)))
    fit_csv(path, out=tmp_path / "auto", **{**SMOKE, "num_experts": 1, "expert_prior_scale": "auto"})
    model = json.loads((tmp_path / "auto" / "model.json").read_text())
    table = model["expert_prior_scale_selection"]["table"]
    assert [row["scale"] for row in table] == list(csv_workflow.AUTO_PRIOR_SCALES)
    deviance = {row["scale"]: row["cv"] for row in table}
    best = min(deviance, key=deviance.get)
    within = [row["scale"] for row in table if row["cv"] - deviance[best] <= row["cv_se_difference"]]
    assert model["expert_prior_scale"] == min(within) != 1.0
    fit = load_result(tmp_path / "auto" / "fit.npz")
    assert abs(float(fit.params.experts[0][0])) > 8.5  # not shrunk towards b's coefficient
    summary = (tmp_path / "auto" / "summary.txt").read_text()
    assert f"experts' prior Normal(0, {model['expert_prior_scale']:g}) (chosen by cross-validation)" in summary
    assert "CV deviance" in summary
    # Beyond AUTO_PRIOR_SCALE_ROWS rows the likelihood outweighs the prior: sd 1, no CV.
    monkeypatch.setattr(csv_workflow, "AUTO_PRIOR_SCALE_ROWS", 299)
    fit_csv(path, out=tmp_path / "large", **{**SMOKE, "num_experts": 1, "expert_prior_scale": "auto"})
    model = json.loads((tmp_path / "large" / "model.json").read_text())
    assert model["expert_prior_scale"] == 1.0 and model["expert_prior_scale_selection"] is None

def test_fit_csv_expert_prior_scale_reaches_the_fits(tmp_path, monkeypatch):
    # The scale becomes the Normal prior of the experts' coefficients and intercepts in the point
    # fit (and NUTS: the same `priors`), is recorded in model.json, and bad values are refused.
    path = _write(tmp_path / "d.csv", ENOUGH)
    seen = []
    fit_moe = csv_workflow.fit_moe

    def spy(x, y, **kwargs):
        seen.append(kwargs["priors"])
        return fit_moe(x, y, **kwargs)

    monkeypatch.setattr(csv_workflow, "fit_moe", spy)
    fit_csv(path, out=tmp_path / "wide", **{**SMOKE, "expert_prior_scale": 5})
    fit_csv(path, out=tmp_path / "one", **{**SMOKE, "expert_prior_scale": 1.0})
    wide, one = seen
    assert one is None
    assert set(wide) == {"experts", "expert_intercepts"}
    assert all(isinstance(prior, numpyro.distributions.Normal) and float(prior.scale) == 5.0 for prior in wide.values())
    for name, scale in (("wide", 5.0), ("one", 1.0)):
        model = json.loads((tmp_path / name / "model.json").read_text())
        assert model["expert_prior_scale"] == scale and model["expert_prior_scale_selection"] is None
    for bad in (0, -1.0, float("nan"), float("inf"), "5", True, "automatic"):
        with pytest.raises(ValueError, match=r"^--expert-prior-scale: expected a positive number"):
            fit_csv(path, out=tmp_path / "bad", **{**SMOKE, "expert_prior_scale": bad})
