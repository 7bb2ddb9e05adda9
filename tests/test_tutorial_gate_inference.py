"""tutorials/gate_inference.py runs top to bottom at smoke size and writes its figures."""

from tutorial_runner import run_tutorial


def test_gate_inference_tutorial_runs_and_writes_its_figures(tmp_path):
    run_tutorial("gate_inference", tmp_path)
