"""Machine-readable results of a benchmark: one CSV row per printed figure.

Each benchmark script keeps what it prints and also records its figures here, in
``benchmarks/results/NAME.csv`` (``NAME-quick.csv`` under ``--quick``, so a smoke run never
overwrites the full figures). Columns:

- ``section``: the benchmark's part (``A``, ``B``, ... or ``1``, ``2``, ...),
- ``setting``: the data and method the figure is about, in words,
- ``n``: sample size, ``seeds``: how many seeds (or starts) the figure summarises (empty when
  the figure is one run),
- ``measure``: what the figure is (``median_expert_ratio``, ``successes``, ``seconds``, ...),
- ``value``: the figure, ``date``: when it was measured (UTC).

A run that writes only some sections (``--only``, ``--part``) replaces those sections' rows and
keeps the others, so the parts of a benchmark can be run one at a time (or side by side: the file
is read again before each write). The file is rewritten at every row: a long run stopped early
keeps what it measured.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = ["section", "setting", "n", "seeds", "measure", "value", "date"]


def results_path(name: str, quick: bool) -> Path:
    """``benchmarks/results/NAME.csv``, or ``NAME-quick.csv`` for a smoke run."""
    return RESULTS / f"{name}{'-quick' if quick else ''}.csv"


class ResultsCSV:
    """The CSV of one benchmark run.

    Parameters
    ----------
    name : str
        The benchmark's name (the file's stem), e.g. ``"em_pipeline"``.
    quick : bool
        Write ``NAME-quick.csv`` instead of ``NAME.csv``.
    """

    def __init__(self, name: str, quick: bool):
        self.path = results_path(name, quick)
        self.rows: list[dict] = []
        self.date = time.strftime("%Y-%m-%d", time.gmtime())

    def record(self, section: str, setting: str, measure: str, value, *, n=None, seeds=None) -> None:
        """Add one figure and rewrite the file (the rows of other sections in it are kept)."""
        if isinstance(value, float):
            value = f"{value:.6g}"
        self.rows.append({
            "section": section, "setting": setting, "n": "" if n is None else int(n),
            "seeds": "" if seeds is None else int(seeds), "measure": measure, "value": value,
            "date": self.date,
        })
        written = {row["section"] for row in self.rows}
        kept = [row for row in self._read() if row["section"] not in written]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(kept + self.rows)

    def _read(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        if rows and set(rows[0]) != set(FIELDS):
            return []  # another layout: this run's rows replace it
        return rows
