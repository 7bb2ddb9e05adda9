"""benchmarks/make_results.py: the README's results section is built from the benchmarks' CSVs.

The section's main table takes every figure from a CSV, a missing file or figure is an error that
names the file and the command that writes it, and ``--quick`` reads the smoke runs' files and
leaves README.md alone. The checks run on copies of the committed CSVs in a temporary folder.
"""

import csv
import importlib.util
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def results(tmp_path, monkeypatch):
    """make_results, reading copies of the committed CSVs (full and as the quick files) in tmp_path."""
    spec = importlib.util.spec_from_file_location("make_results", ROOT / "benchmarks" / "make_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    folder = tmp_path / "results"
    folder.mkdir()
    for full, quick, _ in module.SOURCES.values():
        shutil.copy(ROOT / "benchmarks" / "results" / full, folder / full)
        shutil.copy(ROOT / "benchmarks" / "results" / full, folder / quick)
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)
    monkeypatch.setattr(module, "RESULTS", folder)
    monkeypatch.setattr(module, "README", readme)
    monkeypatch.setattr(module, "FIGURE", folder / "real_data.png")
    return module


def rewrite(path: Path, measure: str, value: str) -> None:
    """Set the value of every row of ``measure`` in a benchmark CSV."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        if row["measure"] == measure:
            row["value"] = value
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_main_table_heads_the_section_with_one_row_per_claim(results):
    text = results.section()
    table = text[: text.index("Held-out prediction")]
    assert "| what | setting | numpyro-moe | baseline(s) | target | source |" in table
    for claim in ("Expert error / oracle's", "Success in a hard regime", "`x.T @ x`", "against flexmix",
                  "NumPyro's default init", "Real data", "AISTATS 2020 loss"):
        assert claim in table, claim
    for name in ("tensor_estimator", "em_pipeline", "speed-C", "nuts_workflow", "landscape", "real_data"):
        assert f"`benchmarks/results/{results.SOURCES[name][0]}`" in table, name


def test_a_figure_of_the_main_table_is_the_csvs(results):
    rewrite(results.RESULTS / "em_pipeline.csv", "expert_ratio_median", "1.2345")
    assert "tensor → EM: median 1.2345," in results.section()


def test_a_missing_csv_names_the_file_and_the_command_that_writes_it(results):
    (results.RESULTS / "nuts_workflow.csv").unlink()
    with pytest.raises(SystemExit, match=r"nuts_workflow\.csv is missing; `python benchmarks/nuts_workflow\.py"):
        results.section()


def test_a_missing_figure_names_the_file(results):
    path = results.RESULTS / "em_pipeline.csv"
    with open(path, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["measure"] != "speedup_warm"]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(SystemExit, match=r"em_pipeline\.csv has no row for section C, measure 'speedup_warm'"):
        results.section()


def test_quick_reads_the_quick_files_and_leaves_the_readme_alone(results, tmp_path):
    before = results.README.read_text()
    rewrite(results.RESULTS / "em_pipeline-quick.csv", "expert_ratio_median", "1.5")
    out = tmp_path / "quick.md"
    assert results.main(["--quick", "--out", str(out)]) == 0
    assert results.README.read_text() == before
    text = out.read_text()
    assert "tensor → EM: median 1.5000," in text
    assert "`benchmarks/results/em_pipeline-quick.csv`" in text
    (results.RESULTS / "speed-quick-C.csv").unlink()
    with pytest.raises(SystemExit, match=r"speed-quick-C\.csv is missing; `python benchmarks/speed\.py --quick --only C`"):
        results.main(["--quick"])


def test_a_benchmark_run_replaces_its_sections_rows_and_keeps_the_others(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("results_csv", ROOT / "benchmarks" / "results_csv.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RESULTS", tmp_path)
    assert module.results_path("bench", quick=True) == tmp_path / "bench-quick.csv"
    first = module.ResultsCSV("bench", quick=False)
    first.record("A", "setting a", "successes", 3, n=2000, seeds=5)
    first.record("B", "setting b", "seconds", 1.23456789)
    second = module.ResultsCSV("bench", quick=False)  # a later run of part B alone
    second.record("B", "setting b", "seconds", 2.5)
    with open(tmp_path / "bench.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["section"], row["value"]) for row in rows] == [("A", "3"), ("B", "2.5")]
    assert rows[0]["n"] == "2000" and rows[0]["seeds"] == "5" and rows[1]["n"] == ""


def test_a_real_data_run_without_flexmix_is_compared_with_flexmixs_saved_figures(results, tmp_path):
    # The quick mode runs real_data.py --skip-flexmix: its CSV has no flexmix rows, and the main
    # table compares the package with flexmix's saved figures (real_data_flexmix.csv, k by BIC).
    path = results.RESULTS / "real_data_quick.csv"
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    kept = [row for row in rows if not row["method"].startswith("flexmix")]
    assert len(kept) < len(rows)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    out = tmp_path / "quick.md"
    assert results.main(["--quick", "--out", str(out)]) == 0
    full = "\n".join(results.main_table())
    quick = "\n".join(results.main_table(quick=True))
    # The same verdicts as with flexmix's rows in the file (the saved figures are those rows').
    line = next(line for line in full.splitlines() if line.startswith("| Real data"))
    assert line.replace("real_data.csv", "real_data_quick.csv") in quick
