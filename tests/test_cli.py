"""The end-to-end demo (`run_demo`) and the ``numpyro-moe`` command line."""

from __future__ import annotations

import json
import math
import os
import warnings

import arviz as az
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from numpyro_moe import (
    ReliabilityWarning,
    expert_error,
    gating_error,
    heldout_log_likelihood,
    mean_squared_error,
)
from numpyro_moe._bayes import diagnostic_extreme
from numpyro_moe._demo import COLUMNS, run_demo
from numpyro_moe._io import load_params
from numpyro_moe.cli import build_parser, main

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
SMALL = ["--num-samples", "500", "--dim", "4", "--experts", "2", "--restarts", "1", *TINY_NUTS]
SMOKE = {
    "num_samples": 500, "dim": 4, "num_experts": 2, "num_restarts": 1, "verbose": False,
    "nuts_samples": 200, "num_chains": 2, "num_warmup": 30, "num_draws": 30,
}


def _file(method: str) -> str:
    return method.replace("+", "_") + ".npz"


@pytest.fixture(autouse=True)
def keep_xla_flags(monkeypatch):
    # `numpyro-moe demo` sets XLA_FLAGS (host device count) for the process: restore it after.
    if "XLA_FLAGS" in os.environ:
        monkeypatch.setenv("XLA_FLAGS", os.environ["XLA_FLAGS"])
    else:
        monkeypatch.delenv("XLA_FLAGS", raising=False)


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


def test_demo_without_nuts_skips_it(tmp_path):
    out = tmp_path / "run"
    rows = run_demo(out, **{**SMOKE, "nuts": False})
    assert [row["method"] for row in rows] == EM_METHODS
    assert sorted(p.name for p in out.iterdir()) == sorted(EM_FILES)
    assert len((out / "results.txt").read_text().splitlines()) == 2 + len(EM_METHODS)


def test_demo_nuts_settings_are_checked_before_any_work(tmp_path):
    for setting, message in [({"num_chains": 0}, "^num_chains: "), ({"num_draws": 1.5}, "^num_draws: "),
                             ({"nuts_samples": -1}, "^nuts_samples: "), ({"num_warmup": 0}, "^num_warmup: ")]:
        with pytest.raises((ValueError, TypeError), match=message):
            run_demo(tmp_path / "run", **{**SMOKE, **setting})
    assert list(tmp_path.iterdir()) == []
    # Without NUTS its settings are unused and not checked.
    run_demo(tmp_path / "run", **{**SMOKE, "nuts": False, "num_chains": 0})


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
    lines = (out / "results.txt").read_text().splitlines()
    # The table, a blank line, then the NUTS note.
    assert len(lines) == 2 + len(rows) + 2 and lines[-2] == ""
    assert lines[0].split() == ["method", "expert", "err", "gate", "err", "loglik/pt", "MSE", "sec"]
    nuts = json.loads((out / "nuts.json").read_text())
    assert lines[-1].startswith(f"{NUTS_METHOD}: posterior mean of NUTS started at the joint-EM fit, 2 chains x "
                                "(30 warmup + 30 draws) on the first 200 training rows")
    assert f"max r_hat {nuts['max_r_hat']:.4f}, min bulk ESS {nuts['min_ess_bulk']:.0f}" in lines[-1]
    for line, row in zip(lines[2:-2], rows, strict=True):
        fields = line.split()
        assert fields[0] == row["method"]
        assert float(fields[1]) == pytest.approx(row["expert_error"], abs=1e-4)
        assert float(fields[3]) == pytest.approx(row["heldout_loglik"], abs=1e-4, nan_ok=True)


def test_demo_files_reproduce_the_table(demo):
    _, out, rows = demo
    truth = load_params(out / "truth.npz")
    assert truth.experts.shape == (2, 4) and truth.gates.shape == (2, 4)
    np.testing.assert_allclose(np.linalg.norm(truth.experts, axis=1), 1.0, atol=1e-12)
    with np.load(out / "data.npz") as data:
        assert data["x"].shape == (500, 4) and data["y"].shape == (500,)
        # The held-out set has max(n // 4, 1000) points.
        assert data["x_test"].shape == (1000, 4) and data["y_test"].shape == (1000,)
        x, x_test, y_test = data["x"], data["x_test"], data["y_test"]
    assert not np.allclose(x_test[:500], x)
    for row in rows:
        fit = load_params(out / _file(row["method"]))
        assert row["expert_error"] == pytest.approx(expert_error(fit, truth), rel=1e-9)
        if row["method"] == METHODS[0]:
            continue
        assert row["gating_error"] == pytest.approx(gating_error(fit, truth, x_test), rel=1e-9)
        assert row["heldout_loglik"] == pytest.approx(heldout_log_likelihood(fit, x_test, y_test), rel=1e-9)
        assert row["heldout_mse"] == pytest.approx(mean_squared_error(fit, x_test, y_test), rel=1e-9)


def test_demo_posterior_file(demo):
    _, out, _ = demo
    with np.load(out / "data.npz") as data:
        x, y = data["x"], data["y"]
    mean = load_params(out / _file(NUTS_METHOD))
    joint_em = load_params(out / _file("tensor+gating_em+joint_em"))
    with xr.open_datatree(out / "posterior.nc", engine="h5netcdf") as tree:
        tree.load()
    assert set(tree.children) == {"posterior", "posterior_predictive", "log_likelihood", "sample_stats",
                                  "observed_data", "constant_data"}
    posterior = tree["posterior"]
    assert set(posterior.data_vars) == {"experts", "gates", "noise"}  # experts free, no intercepts
    assert posterior["experts"].dims == ("chain", "draw", "expert", "feature")
    assert posterior["experts"].shape == (2, 30, 2, 4)
    assert posterior["gates"].dims == ("chain", "draw", "gate", "feature")
    assert posterior["gates"].shape == (2, 30, 1, 4)
    assert tree["posterior_predictive"]["y"].shape == (2, 30, 200)
    # NUTS ran on the first 200 training rows.
    np.testing.assert_array_equal(tree["observed_data"]["y"], y[:200])
    np.testing.assert_array_equal(tree["constant_data"]["x"], x[:200])
    # The table's NUTS row is the posterior mean of these draws.
    np.testing.assert_allclose(mean.experts, posterior["experts"].mean(("chain", "draw")), rtol=1e-12)
    np.testing.assert_allclose(mean.gates[:-1], posterior["gates"].mean(("chain", "draw")), rtol=1e-12)
    np.testing.assert_array_equal(mean.gates[-1], 0)
    np.testing.assert_allclose(mean.noise, posterior["noise"].mean(), rtol=1e-12)
    # Draws are relabelled to the joint-EM start: the posterior mean experts are near it (posterior
    # sd ~0.01 at 200 rows); swapped labels would differ by O(1).
    np.testing.assert_allclose(mean.experts, joint_em.experts, atol=0.05)
    nuts = json.loads((out / "nuts.json").read_text())
    assert {key: nuts[key] for key in ("rows", "chains", "warmup", "draws")} == {
        "rows": 200, "chains": 2, "warmup": 30, "draws": 30,
    }
    assert nuts["max_r_hat"] == pytest.approx(diagnostic_extreme(az.rhat(tree), max), rel=1e-12)
    assert nuts["min_ess_bulk"] == pytest.approx(diagnostic_extreme(az.ess(tree), min), rel=1e-12)
    assert nuts["max_r_hat"] > 1 and 0 < nuts["min_ess_bulk"] <= 2 * 30 * 5  # plausible, not a placeholder
    assert nuts["divergences"] == int(tree["sample_stats"]["diverging"].sum())


def test_demo_summary_csv(demo):
    _, out, _ = demo
    table = pd.read_csv(out / "summary.csv", index_col=0)
    expected = [f"experts[{i}, {j}]" for i in range(2) for j in range(4)]
    expected += [f"gates[0, {j}]" for j in range(4)] + ["noise"]
    assert list(table.index) == expected
    assert {"mean", "sd", "ess_bulk", "r_hat"} <= set(table.columns)
    with xr.open_datatree(out / "posterior.nc", engine="h5netcdf") as tree:
        posterior = tree["posterior"].load()
    assert table.loc["noise", "mean"] == pytest.approx(float(posterior["noise"].mean()), rel=1e-9)
    assert table.loc["experts[1, 2]", "mean"] == pytest.approx(
        float(posterior["experts"].sel(expert=1, feature=2).mean()), rel=1e-9
    )
    assert (table["sd"] > 0).all()


def test_demo_plots_are_png(demo):
    _, out, _ = demo
    for name in ("ppc.png", "trace.png", "gate_probabilities.png"):
        content = (out / name).read_bytes()
        assert content.startswith(PNG) and len(content) > 5_000, name


def test_demo_is_quiet_when_not_verbose(demo, capsys):
    # The module fixture ran before this test's capture: re-check with a refusal, which must
    # also print nothing.
    _, out, _ = demo
    with pytest.raises(FileExistsError, match=r"^out: "):
        run_demo(out, **SMOKE)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_cli_refuses_an_existing_folder(tmp_path, capsys):
    existing = tmp_path / "taken"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    assert main(["demo", "--out", str(existing), *SMALL]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("numpyro-moe demo: error: out: ")
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
    assert "noise: expected a finite number > 0" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_bad_nuts_setting_names_the_argument(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "a"), *SMALL, "--chains", "0"]) == 2
    assert "num_chains: expected an integer >= 1, got 0" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_demo_nuts_flags(tmp_path, monkeypatch):
    import inspect

    import numpyro_moe._demo

    # The flags' defaults are run_demo's.
    args = build_parser().parse_args(["demo"])
    defaults = inspect.signature(run_demo).parameters
    assert args.nuts is True
    for flag, name in [("nuts_samples", "nuts_samples"), ("chains", "num_chains"),
                       ("num_warmup", "num_warmup"), ("num_draws", "num_draws")]:
        assert getattr(args, flag) == defaults[name].default, flag
    calls = []
    monkeypatch.setattr(numpyro_moe._demo, "run_demo", lambda out, **kwargs: calls.append((out, kwargs)))
    out = str(tmp_path / "run")
    assert main(["demo", "--out", out, "--no-nuts", "--chains", "3", "--num-warmup", "7", "--num-draws", "9",
                 "--nuts-samples", "11"]) == 0
    assert calls[0][0] == out
    assert {key: calls[0][1][key] for key in ("nuts", "num_chains", "num_warmup", "num_draws", "nuts_samples")} == {
        "nuts": False, "num_chains": 3, "num_warmup": 7, "num_draws": 9, "nuts_samples": 11,
    }
    # One host device per chain is requested before JAX starts (it has no effect once it runs).
    assert "--xla_force_host_platform_device_count=3" in os.environ["XLA_FLAGS"].split()


def test_cli_argument_parsing_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--experts", "two"])
    assert info.value.code == 2
    assert "--experts" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::numpyro_moe.ReliabilityWarning")  # 30 NUTS draws: r_hat > 1.01
def test_cli_demo_end_to_end(tmp_path, capsys):
    # The whole command, verbose, at smoke size with tiny NUTS (about 25 s on 2 CPU cores), hence slow.
    out = tmp_path / "run"
    out.mkdir()
    assert main(["demo", "--out", str(out), "--overwrite", *SMALL]) == 0
    captured = capsys.readouterr()
    assert "oracle_em_from_truth" in captured.out and str(out) in captured.out
    assert "posterior summary (az.summary" in captured.out and "max r_hat" in captured.out
    rows = json.loads((out / "results.json").read_text())
    assert [row["method"] for row in rows] == METHODS
    assert sorted(p.name for p in out.iterdir()) == sorted(EM_FILES + NUTS_FILES)
    # n=500, d=4, k=2, noise 0.1: every EM fit reaches the experts (measured error ~0.016).
    assert all(row["expert_error"] < 0.1 for row in rows[2:])
