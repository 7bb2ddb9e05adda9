"""The tutorials' shared rules: percent scripts, no stored notebooks, and one test file each
(``tests/test_tutorial_<name>.py`` runs it at smoke size, see ``tests/tutorial_runner.py``)."""

from tutorial_runner import ROOT, TUTORIALS


def test_tutorials_are_percent_scripts():
    assert TUTORIALS, "tutorials/ holds no tutorial script"
    for path in TUTORIALS:
        assert path.read_text().startswith("# %% [markdown]\n# # "), (
            f"{path.name} must open with a markdown title cell"
        )
    assert not list((ROOT / "tutorials").glob("*.ipynb")), (
        "the .py scripts are the source: keep no .ipynb beside them"
    )


def test_every_tutorial_has_its_test_file():
    for path in TUTORIALS:
        test_file = ROOT / "tests" / f"test_tutorial_{path.stem}.py"
        assert test_file.is_file(), f"{path.name} is run by no test: add {test_file.name} (see tests/tutorial_runner.py)"
        assert f'run_tutorial("{path.stem}"' in test_file.read_text(), f"{test_file.name} does not run {path.name}"
