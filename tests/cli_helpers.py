"""Running the command line in the test process, with its output captured."""

from __future__ import annotations

import contextlib
import io

from numpyro_moe.apps.cli import main

__all__ = ["run_cli"]


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """``numpyro-moe ARGS`` in this process: its exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()
