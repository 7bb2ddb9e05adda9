"""The end-to-end demo (`run_demo`) and the ``numpyro-moe`` command line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from numpyro_moe import expert_error, gating_error, heldout_log_likelihood, mean_squared_error
from numpyro_moe._demo import COLUMNS, run_demo
from numpyro_moe._io import load_params
from numpyro_moe.cli import main

METHODS = [
    "tensor_experts_only",
    "tensor+gating_em",
    "tensor+gating_em+joint_em",
    "baseline_em_1_random_start",
    "baseline_em_best_of_1",
    "oracle_em_from_truth",
]
SMALL = ["--num-samples", "500", "--dim", "4", "--experts", "2", "--restarts", "1"]
SMOKE = {"num_samples": 500, "dim": 4, "num_experts": 2, "num_restarts": 1, "verbose": False}


def _file(method: str) -> str:
    return method.replace("+", "_") + ".npz"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    parent = tmp_path_factory.mktemp("demo")
    out = parent / "run"
    rows = run_demo(out, **SMOKE)
    return parent, out, rows


def test_demo_writes_every_output(demo):
    parent, out, _ = demo
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        ["data.npz", "truth.npz", "results.json", "results.txt"] + [_file(m) for m in METHODS]
    )
    assert sorted(p.name for p in parent.iterdir()) == ["run"]  # no partial folder left behind


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
    saved = json.loads((out / "results.json").read_text())
    assert [row["method"] for row in saved] == METHODS
    for row, back in zip(rows, saved, strict=True):
        for column in COLUMNS[1:]:
            assert back[column] == pytest.approx(row[column], rel=1e-15, nan_ok=True)


def test_demo_table_text(demo):
    _, out, rows = demo
    lines = (out / "results.txt").read_text().splitlines()
    assert len(lines) == 2 + len(rows)
    assert lines[0].split() == ["method", "expert", "err", "gate", "err", "loglik/pt", "MSE", "sec"]
    for line, row in zip(lines[2:], rows, strict=True):
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


def test_cli_argument_parsing_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--experts", "two"])
    assert info.value.code == 2
    assert "--experts" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


@pytest.mark.slow
def test_cli_demo_end_to_end(tmp_path, capsys):
    # The whole command, verbose, at smoke size (about 20 s on 2 CPU cores), hence slow.
    out = tmp_path / "run"
    out.mkdir()
    assert main(["demo", "--out", str(out), "--overwrite", *SMALL]) == 0
    captured = capsys.readouterr()
    assert "oracle_em_from_truth" in captured.out and str(out) in captured.out
    rows = json.loads((out / "results.json").read_text())
    assert [row["method"] for row in rows] == METHODS
    # n=500, d=4, k=2, noise 0.1: every EM fit reaches the experts (measured error ~0.016).
    assert all(row["expert_error"] < 0.1 for row in rows[2:])
