"""tutorials/papers_comparison.py runs top to bottom at smoke size and writes its figures."""

from tutorial_runner import run_tutorial


def test_papers_comparison_tutorial_runs_and_writes_its_figures(tmp_path):
    run_tutorial("papers_comparison", tmp_path)
