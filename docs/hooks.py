"""MkDocs hooks: the command-line reference page, generated from the parser's own help, and the
results page."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

from mkdocs.structure.files import File

# Each entry is the argv of one help screen, in the order the page shows them.
HELP_SCREENS = [
    [],
    ["demo"],
    ["fit"],
    ["predict"],
    ["models"],
    ["models", "list"],
    ["models", "run"],
]


def _help(argv: list[str]) -> str:
    """What ``numpyro-moe ARGV --help`` prints, at a fixed width so the page does not depend on the terminal."""
    from numpyro_moe.apps import cli

    buffer = io.StringIO()
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        with contextlib.redirect_stdout(buffer):
            try:
                cli.main([*argv, "--help"])
            except SystemExit as stop:
                if stop.code not in (0, None):
                    raise RuntimeError(
                        f"numpyro-moe {' '.join(argv)} --help exited with {stop.code}"
                    ) from None
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous
    return buffer.getvalue().rstrip()


def cli_reference() -> str:
    lines = [
        "# Command line",
        "",
        "The `numpyro-moe` command (installed with the package; from a clone, `.venv/bin/numpyro-moe`).",
        "This page is generated from the parser's `--help` output each time the site is built.",
        "",
    ]
    for argv in HELP_SCREENS:
        command = " ".join(["numpyro-moe", *argv])
        lines += [f"## `{command}`", "", "```text", _help(argv), "```", ""]
    return "\n".join(lines)


def _make_results():
    """benchmarks/make_results.py, which writes the README's results section from the CSVs."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "make_results.py"
    spec = importlib.util.spec_from_file_location("make_results", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def on_files(files, config):
    files.append(File.generated(config, "cli.md", content=cli_reference()))
    results = _make_results()
    files.append(File.generated(config, "results.md", content=results.docs_page()))
    if results.FIGURE.exists():
        files.append(File.generated(config, "real_data.png", abs_src_path=str(results.FIGURE)))
    return files
