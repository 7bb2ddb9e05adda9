"""The end-to-end demo (`numpyro_moe.apps.demo.run_demo`) and the ``numpyro-moe`` command line."""

from __future__ import annotations

import inspect
import json
import math
import os
import warnings

import arviz as az
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from numpyro_moe import MoEParams, ReliabilityWarning
from numpyro_moe._bayes import _diagnostic_extreme
from numpyro_moe.apps import demo as demo_module
from numpyro_moe.apps.cli import build_parser, main
from numpyro_moe.apps.demo import COLUMNS, format_table, run_demo
from numpyro_moe.io import load_result
from numpyro_moe.metrics import expert_error, gating_error, heldout_log_likelihood, mean_squared_error

EM_METHODS = [
    "tensor_experts_only",
    "tensor+gating_em",
    "tensor+gating_em+joint_em",
    "baseline_em_1_random_start",
    "baseline_em_best_of_1",
    "oracle_em_from_truth",
]
NUTS_METHOD = "nuts_posterior_mean_n200"
METHODS = [*EM_METHODS, NUTS_METHOD]
EM_FILES = ["data.npz", "truth.npz", "results.json", "results.txt"] + [m.replace("+", "_") + ".npz" for m in EM_METHODS]
NUTS_FILES = ["posterior.nc", "summary.csv", "nuts.json", "ppc.png", "trace.png", "gate_probabilities.png",
              NUTS_METHOD + ".npz"]
PNG = b"\x89PNG\r\n\x1a\n"
# Tiny NUTS (2 chains x (30 warmup + 30 draws) on 200 rows): it checks the plumbing, not the posterior.
TINY_NUTS = ["--nuts-samples", "200", "--chains", "2", "--num-warmup", "30", "--num-draws", "30"]
SMALL = ["--num-samples", "500", "--dim", "4", "--experts", "2", "--starts", "1", *TINY_NUTS]
SMOKE = {
    "num_samples": 500, "dim": 4, "num_experts": 2, "num_starts": 1, "verbose": False,
    "nuts_samples": 200, "num_chains": 2, "num_warmup": 30, "num_draws": 30,
}
# The demo without NUTS, with another link than the default: the link must travel into every file.
NO_NUTS = {**SMOKE, "nuts": False, "link": "tanh"}


def _file(method: str) -> str:
    return method.replace("+", "_") + ".npz"



@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    parent = tmp_path_factory.mktemp("demo")
    out = parent / "run"
    with warnings.catch_warnings():
        # 2 chains x 30 draws do not reach r_hat < 1.01; the warning is tested in test_bayes.
        warnings.simplefilter("ignore", ReliabilityWarning)
        rows = run_demo(out, **SMOKE)
    return parent, out, rows


def test_demo_writes_every_output(demo):
    parent, out, _ = demo
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(EM_FILES + NUTS_FILES)
    assert sorted(p.name for p in parent.iterdir()) == ["run"]  # no partial folder left behind


def test_demo_without_nuts_skips_it_and_keeps_the_link(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("from an earlier run")
    rows = run_demo(out, overwrite=True, **NO_NUTS)
    assert [row["method"] for row in rows] == EM_METHODS
    # overwrite=True replaces the folder as a whole: the earlier run's file is gone.
    assert sorted(p.name for p in out.iterdir()) == sorted(EM_FILES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert len((out / "results.txt").read_text().splitlines()) == 2 + len(EM_METHODS)
    # Every saved record is MoEParams carrying the demo's link, truth included.
    for name in ["truth.npz"] + [_file(m) for m in EM_METHODS]:
        params = load_result(out / name)
        assert isinstance(params, MoEParams), name
        assert params.link.name == "tanh", name
        assert params.experts.shape == (2, 4) and np.shape(params.noise) == (2,), name
    # EM from the truth on tanh data at n=500 stays near it; it would not if the link were lost.
    by_method = {row["method"]: row for row in rows}
    assert by_method["oracle_em_from_truth"]["expert_error"] < 0.1


def test_demo_nuts_settings_are_checked_before_any_work(tmp_path):
    for setting, message in [({"num_chains": 0}, "^--chains: "), ({"num_draws": 1.5}, "^--num-draws: "),
                             ({"nuts_samples": -1}, "^--nuts-samples: "), ({"num_warmup": 0}, "^--num-warmup: "),
                             ({"num_chains": True}, "^--chains: ")]:
        with pytest.raises(ValueError, match=message + "expected an integer >= 1"):
            run_demo(tmp_path / "run", **{**SMOKE, **setting})
    assert list(tmp_path.iterdir()) == []
    # Without NUTS its settings are unused and not checked.
    run_demo(tmp_path / "run", **{**NO_NUTS, "num_chains": 0})
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted(EM_FILES)


def test_demo_rows_are_complete_and_finite(demo):
    _, out, rows = demo
    assert [row["method"] for row in rows] == METHODS
    for row in rows:
        assert tuple(row) == COLUMNS
        # The experts-only stage has no gate, so its gate and held-out columns are NaN by design.
        columns = ("expert_error", "seconds") if row["method"] == METHODS[0] else COLUMNS[1:]
        for column in columns:
            assert isinstance(row[column], float) and math.isfinite(row[column]), (row, column)
        assert row["expert_error"] >= 0 and row["seconds"] >= 0
    assert all(math.isnan(rows[0][c]) for c in ("gating_error", "heldout_loglik", "heldout_mse"))
    for row in rows[1:]:
        assert 0 <= row["gating_error"] <= 1 and row["heldout_mse"] > 0
    by_method = {row["method"]: row for row in rows}
    # EM over the gate keeps the tensor estimate's experts.
    assert by_method["tensor+gating_em"]["expert_error"] == pytest.approx(
        by_method["tensor_experts_only"]["expert_error"], rel=1e-12
    )
    # The oracle is EM started at the truth: at n=500 it stays near it (it measures ~0.016).
    assert by_method["oracle_em_from_truth"]["expert_error"] < 0.1
    # NUTS from the joint-EM fit on 200 rows: its posterior mean stays near the truth too.
    assert by_method[NUTS_METHOD]["expert_error"] < 0.1
    nuts = json.loads((out / "nuts.json").read_text())
    assert by_method[NUTS_METHOD]["seconds"] == nuts["seconds"] > 0
    saved = json.loads((out / "results.json").read_text())
    assert [row["method"] for row in saved] == METHODS
    for row, back in zip(rows, saved, strict=True):
        for column in COLUMNS[1:]:
            assert back[column] == pytest.approx(row[column], rel=1e-15, nan_ok=True)


def test_demo_table_text(demo):
    _, out, rows = demo
    text = (out / "results.txt").read_text()
    lines = text.splitlines()
    # The table, a blank line, then the NUTS note.
    assert len(lines) == 2 + len(rows) + 2 and lines[-2] == ""
    assert "\n".join(lines[: 2 + len(rows)]) == format_table(rows)
    assert lines[0].split() == ["method", "expert", "err", "gate", "err", "loglik/pt", "MSE", "sec"]
    nuts = json.loads((out / "nuts.json").read_text())
    assert lines[-1].startswith(f"{NUTS_METHOD}: posterior mean of NUTS started at the joint-EM fit, 2 chains x "
                                "(30 warmup + 30 draws) on the first 200 training rows")
    assert f"max r_hat {nuts['max_r_hat']:.4f}, min bulk ESS {nuts['min_ess_bulk']:.0f}" in lines[-1]
    assert f"{nuts['divergences']} divergent transitions." in lines[-1]
    for line, row in zip(lines[2:-2], rows, strict=True):
        fields = line.split()
        assert fields[0] == row["method"]
        assert float(fields[1]) == pytest.approx(row["expert_error"], abs=1e-4)
        assert float(fields[3]) == pytest.approx(row["heldout_loglik"], abs=1e-4, nan_ok=True)


def test_demo_files_reproduce_the_table(demo):
    _, out, rows = demo
    truth = load_result(out / "truth.npz")
    assert isinstance(truth, MoEParams) and truth.link.name == "linear"
    assert truth.experts.shape == (2, 4) and truth.gates.shape == (2, 4)
    np.testing.assert_allclose(truth.noise, [0.1, 0.1], rtol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(truth.experts, axis=1), 1.0, atol=1e-12)
    with np.load(out / "data.npz") as data:
        assert data["x"].shape == (500, 4) and data["y"].shape == (500,)
        # The held-out set has max(n // 4, 1000) points.
        assert data["x_test"].shape == (1000, 4) and data["y_test"].shape == (1000,)
        x, x_test, y_test = data["x"], data["x_test"], data["y_test"]
    assert not np.allclose(x_test[:500], x)
    for row in rows:
        fit = load_result(out / _file(row["method"]))
        assert isinstance(fit, MoEParams) and fit.link.name == "linear", row["method"]
        assert row["expert_error"] == pytest.approx(expert_error(fit, truth), rel=1e-9)
        if row["method"] == METHODS[0]:
            np.testing.assert_array_equal(fit.gates, 0)  # the experts-only stage: a uniform gate
            continue
        assert row["gating_error"] == pytest.approx(gating_error(fit, truth, x_test), rel=1e-9)
        assert row["heldout_loglik"] == pytest.approx(heldout_log_likelihood(fit, x_test, y_test), rel=1e-9)
        assert row["heldout_mse"] == pytest.approx(mean_squared_error(fit, x_test, y_test), rel=1e-9)
    # EM over the gate kept the tensor experts exactly.
    np.testing.assert_array_equal(load_result(out / _file("tensor+gating_em")).experts,
                                  load_result(out / _file("tensor_experts_only")).experts)


def test_demo_posterior_file(demo):
    _, out, _ = demo
    with np.load(out / "data.npz") as data:
        y = data["y"]
    mean = load_result(out / _file(NUTS_METHOD))
    joint_em = load_result(out / _file("tensor+gating_em+joint_em"))
    assert isinstance(mean, MoEParams) and mean.link.name == "linear"
    with xr.open_datatree(out / "posterior.nc", engine="h5netcdf") as tree:
        tree.load()
    assert set(tree.children) == {"posterior", "posterior_predictive", "log_likelihood", "sample_stats",
                                  "observed_data"}
    assert tree.attrs["moe_link"] == "linear"
    posterior = tree["posterior"]
    assert set(posterior.data_vars) == {"experts", "gates", "noise"}  # experts free, no intercepts
    assert posterior["experts"].dims == ("chain", "draw", "expert", "feature")
    assert posterior["experts"].shape == (2, 30, 2, 4)
    assert posterior["gates"].dims == ("chain", "draw", "gate", "feature")
    assert posterior["gates"].shape == (2, 30, 1, 4)
    assert posterior["noise"].dims == ("chain", "draw", "expert")  # the default: a noise per expert
    assert tree["posterior_predictive"]["y"].shape == (2, 30, 200)
    # NUTS ran on the first 200 training rows.
    np.testing.assert_array_equal(tree["observed_data"]["y"], y[:200])
    # Every draw carries the permutation that relabelled it.
    permutations = np.asarray(tree["sample_stats"]["expert_permutation"])
    assert permutations.shape == (2, 30, 2)
    np.testing.assert_array_equal(np.sort(permutations, axis=-1), np.broadcast_to([0, 1], (2, 30, 2)))
    # The table's NUTS row is the posterior mean of these draws.
    np.testing.assert_allclose(mean.experts, posterior["experts"].mean(("chain", "draw")), rtol=1e-12)
    np.testing.assert_allclose(mean.gates[:-1], posterior["gates"].mean(("chain", "draw")), rtol=1e-12)
    np.testing.assert_array_equal(mean.gates[-1], 0)
    assert np.shape(mean.noise) == (2,)
    np.testing.assert_allclose(mean.noise, posterior["noise"].mean(("chain", "draw")), rtol=1e-12)
    # Draws are relabelled to the joint-EM start: the posterior mean experts are near it (posterior
    # sd ~0.01 at 200 rows); swapped labels would differ by O(1).
    np.testing.assert_allclose(mean.experts, joint_em.experts, atol=0.05)
    nuts = json.loads((out / "nuts.json").read_text())
    assert {key: nuts[key] for key in ("rows", "chains", "warmup", "draws")} == {
        "rows": 200, "chains": 2, "warmup": 30, "draws": 30,
    }
    assert nuts["max_r_hat"] == pytest.approx(_diagnostic_extreme(az.rhat(tree), max), rel=1e-12)
    assert nuts["min_ess_bulk"] == pytest.approx(_diagnostic_extreme(az.ess(tree, method="bulk"), min), rel=1e-12)
    assert nuts["max_r_hat"] > 1 and 0 < nuts["min_ess_bulk"] <= 2 * 30 * 5  # plausible, not a placeholder
    assert nuts["divergences"] == int(tree["sample_stats"]["diverging"].sum())


def test_demo_summary_csv(demo):
    _, out, _ = demo
    table = pd.read_csv(out / "summary.csv", index_col=0)
    expected = [f"experts[{i}, {j}]" for i in range(2) for j in range(4)]
    expected += [f"gates[0, {j}]" for j in range(4)] + ["noise[0]", "noise[1]"]
    assert list(table.index) == expected
    assert {"mean", "sd", "ess_bulk", "r_hat"} <= set(table.columns)
    with xr.open_datatree(out / "posterior.nc", engine="h5netcdf") as tree:
        posterior = tree["posterior"].load()
    assert table.loc["noise[1]", "mean"] == pytest.approx(float(posterior["noise"].sel(expert=1).mean()), rel=1e-9)
    assert table.loc["experts[1, 2]", "mean"] == pytest.approx(
        float(posterior["experts"].sel(expert=1, feature=2).mean()), rel=1e-9
    )
    assert (table["sd"] > 0).all()


def test_demo_plots_are_png(demo):
    _, out, _ = demo
    for name in ("ppc.png", "trace.png", "gate_probabilities.png"):
        content = (out / name).read_bytes()
        assert content.startswith(PNG) and len(content) > 5_000, name


def test_demo_never_overwrites_and_is_quiet_when_not_verbose(demo, capsys):
    # The module fixture ran before this test's capture: re-check with a refusal, which must
    # also print nothing and leave the finished run as it was.
    parent, out, _ = demo
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError, match=r"^--out: .*already exists.*--overwrite"):
        run_demo(out, **SMOKE)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in parent.iterdir()) == ["run"]


def test_cli_refuses_an_existing_folder(tmp_path, capsys):
    existing = tmp_path / "taken"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    assert main(["demo", "--out", str(existing), *SMALL]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("numpyro-moe demo: error: --out: ")
    assert str(existing) in captured.err
    assert "already exists" in captured.err and "--overwrite" in captured.err
    assert (existing / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_cli_unknown_link_names_link(tmp_path, capsys):
    out = tmp_path / "new"
    assert main(["demo", "--out", str(out), *SMALL, "--link", "nope"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("numpyro-moe demo: error: link: unknown link 'nope'")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # not even a partial folder


def test_cli_bad_sizes_name_the_argument(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "a"), "--num-samples", "500", "--dim", "2",
                 "--experts", "3"]) == 2
    assert "num_experts: expected at most dim=2" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "b"), *SMALL, "--noise", "-1"]) == 2
    assert "--noise: expected a number > 0, got -1.0" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "c"), *SMALL, "--starts", "0"]) == 2
    assert "--starts: expected an integer >= 1, got 0" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_bad_nuts_setting_names_the_flag(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "a"), *SMALL, "--chains", "0"]) == 2
    assert capsys.readouterr().err.startswith(
        "numpyro-moe demo: error: --chains: expected an integer >= 1, got 0"
    )
    assert main(["demo", "--out", str(tmp_path / "b"), *SMALL, "--num-draws", "-3"]) == 2
    assert "--num-draws: expected an integer >= 1, got -3" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_demo_flags_reach_run_demo(tmp_path, monkeypatch):
    # The flags' defaults are run_demo's.
    args = build_parser().parse_args(["demo"])
    defaults = inspect.signature(run_demo).parameters
    assert args.nuts is True
    for flag, name in [("nuts_samples", "nuts_samples"), ("chains", "num_chains"),
                       ("num_warmup", "num_warmup"), ("num_draws", "num_draws"), ("starts", "num_starts"),
                       ("seed", "seed"), ("num_samples", "num_samples"), ("dim", "dim"),
                       ("experts", "num_experts"), ("noise", "noise"), ("link", "link"),
                       ("overwrite", "overwrite")]:
        assert getattr(args, flag) == defaults[name].default, flag
    assert args.quiet is (not defaults["verbose"].default) is False
    calls = []
    monkeypatch.setattr(demo_module, "run_demo", lambda out, **kwargs: calls.append((out, kwargs)))
    out = str(tmp_path / "run")
    assert main(["demo", "--out", out, "--no-nuts", "--chains", "3", "--num-warmup", "7", "--num-draws", "9",
                 "--nuts-samples", "11", "--starts", "4", "--link", "relu", "--overwrite", "--quiet"]) == 0
    assert len(calls) == 1 and calls[0][0] == out
    assert {key: calls[0][1][key] for key in ("nuts", "num_chains", "num_warmup", "num_draws", "nuts_samples",
                                              "num_starts", "link", "overwrite", "verbose")} == {
        "nuts": False, "num_chains": 3, "num_warmup": 7, "num_draws": 9, "nuts_samples": 11,
        "num_starts": 4, "link": "relu", "overwrite": True, "verbose": False,
    }
    # One host device per chain is requested before JAX starts (it has no effect once it runs).
    assert "--xla_force_host_platform_device_count=3" in os.environ["XLA_FLAGS"].split()


def test_cli_argument_parsing_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--experts", "two"])
    assert info.value.code == 2
    assert "--experts" in capsys.readouterr().err
    # --restarts was renamed --starts.
    with pytest.raises(SystemExit) as info:
        main(["demo", "--restarts", "3"])
    assert info.value.code == 2
    assert "--restarts" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::numpyro_moe.ReliabilityWarning")  # 30 NUTS draws: r_hat > 1.01
def test_cli_demo_end_to_end(tmp_path, capsys):
    # The whole command, verbose, at smoke size with tiny NUTS, hence slow.
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("replaced")
    assert main(["demo", "--out", str(out), "--overwrite", *SMALL]) == 0
    captured = capsys.readouterr()
    assert "oracle_em_from_truth" in captured.out and str(out) in captured.out
    assert "posterior summary (az.summary" in captured.out and "max r_hat" in captured.out
    rows = json.loads((out / "results.json").read_text())
    assert [row["method"] for row in rows] == METHODS
    assert sorted(p.name for p in out.iterdir()) == sorted(EM_FILES + NUTS_FILES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    # n=500, d=4, k=2, noise 0.1: every EM fit reaches the experts (measured error ~0.016).
    assert all(row["expert_error"] < 0.1 for row in rows[2:])
    # The command and the function give the same fits for the same seed.
    truth = load_result(out / "truth.npz")
    joint = load_result(out / _file("tensor+gating_em+joint_em"))
    assert rows[2]["expert_error"] == pytest.approx(expert_error(joint, truth), rel=1e-12)
