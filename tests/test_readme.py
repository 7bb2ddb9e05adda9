"""The README's Python examples run as written (in a scratch folder)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:  # one session, in order, as a reader would paste them
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["prediction"].mean.shape == (5,)
    assert namespace["expert_error"](namespace["fit"], namespace["truth"]) < 0.05
    assert (tmp_path / "fit.npz").is_file()
