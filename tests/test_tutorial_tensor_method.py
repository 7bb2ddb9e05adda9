"""tutorials/tensor_method.py runs top to bottom at smoke size and writes its figures."""

from tutorial_runner import run_tutorial


def test_tensor_method_tutorial_runs_and_writes_its_figures(tmp_path):
    run_tutorial("tensor_method", tmp_path)
