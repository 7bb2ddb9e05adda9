"""Runs a tutorial script at smoke size and checks the figures it names (shared by the
``test_tutorial_*.py`` files: one file per tutorial, so pytest-xdist spreads them over workers).

The tutorials are jupytext percent scripts (``tutorials/*.py``): plain Python that a review can
read, which jupytext or mkdocs-jupyter turn into notebooks. Each one saves its figures through
``save_figure(figure, "name")`` into ``$TUTORIAL_FIGURES/<tutorial>/name.png``; the check reads
those names from the script's text, so a figure that stops being written fails.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = sorted((ROOT / "tutorials").glob("*.py"))
SAVED = re.compile(r"save_figure\(\s*[^\n]+?,\s*\"([\w-]+)\"\s*\)")


def figure_names(path: Path) -> list[str]:
    return SAVED.findall(path.read_text())


def run_tutorial(name: str, tmp_path: Path) -> None:
    """Run ``tutorials/<name>.py`` with the smoke switch on; fail unless it exits cleanly and
    writes every figure it names as a non-empty PNG."""
    path = ROOT / "tutorials" / f"{name}.py"
    names = figure_names(path)
    assert names, f'{path.name} saves no figure (expected save_figure(figure, "name") calls)'
    environment = {
        **os.environ,
        "CI": "true",  # the tutorials' smoke switch: small n, few draws
        "MPLBACKEND": "Agg",
        "TUTORIAL_FIGURES": str(tmp_path),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    # Run in tutorials/, as a notebook runs in its own folder (the real-data tutorial finds
    # benchmarks/data from there); the tutorials write nothing but their figures.
    result = subprocess.run(
        [sys.executable, str(path)],
        check=False,
        cwd=path.parent,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"{path.name} failed:\n{result.stderr[-4000:]}"
    written = tmp_path / path.stem
    for figure_name in names:
        figure = written / f"{figure_name}.png"
        assert figure.is_file(), f"{path.name} did not write {figure.name}"
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{figure.name} is not a PNG"
        assert figure.stat().st_size > 5_000, f"{figure.name} is nearly empty"
