"""The documentation site builds with `mkdocs build --strict` (any warning fails), and its pages hold
what they promise: every public name in the API reference, every command in the CLI reference,
every tutorial rendered.

The tutorials are rendered without being run here (mkdocs-jupyter ``execute: false``, the default
unless DOCS_EXECUTE is set): tests/test_tutorial_<name>.py already runs each one end to end, and running
them twice would cost CI minutes for no extra check. `make docs` runs them for the published site.
"""

import html
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import numpyro_moe

ROOT = Path(__file__).resolve().parent.parent
SUBMODULES = ["baselines", "experts", "io", "metrics", "simulation"]


def text(page: Path) -> str:
    """The page's text without its HTML tags (highlighted code is split into spans)."""
    return html.unescape(re.sub(r"<[^>]+>", "", page.read_text()))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    environment = {
        **os.environ,
        "DOCS_EXECUTE": "false",
        "NO_MKDOCS_2_WARNING": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml")]
    result = subprocess.run(
        [*command, "--site-dir", str(site)],
        check=False,
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, (
        f"mkdocs build --strict failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    )
    return site


def test_api_reference_documents_every_public_name(site):
    top = (site / "api" / "index.html").read_text()
    missing = [name for name in numpyro_moe.__all__ if f'id="numpyro_moe.{name}"' not in top]
    assert not missing, f"API reference lacks {missing}"
    for module in SUBMODULES:
        page = (site / "api" / module / "index.html").read_text()
        names = [
            name
            for name in getattr(numpyro_moe, module).__all__
            if callable(getattr(getattr(numpyro_moe, module), name))
        ]
        missing = [name for name in names if f'id="numpyro_moe.{module}.{name}"' not in page]
        assert not missing, f"API reference of {module} lacks {missing}"


def test_cli_reference_is_the_parsers_help(site):
    page = (site / "cli" / "index.html").read_text()
    for usage in [
        "usage: numpyro-moe [-h]",
        "usage: numpyro-moe fit",
        "usage: numpyro-moe predict",
        "usage: numpyro-moe demo",
        "usage: numpyro-moe models run",
    ]:
        assert usage in page, f"CLI reference lacks {usage!r}"
    assert "--target" in page and "--experts" in page


def test_every_tutorial_and_page_is_rendered(site):
    for script in sorted((ROOT / "tutorials").glob("*.py")):
        page = site / "tutorials" / script.stem / "index.html"
        assert page.is_file(), f"{script.name} is not rendered"
        title = script.read_text().splitlines()[1].removeprefix("# # ")
        assert title in text(page), f"{script.name}'s title is missing from its page"
        assert "import numpyro_moe" in text(page), f"{script.name}'s code is missing from its page"
    assert "make test" in text(site / "index.html")
    assert "Penalised EM" in text(site / "maths" / "index.html")


def test_readme_results_section_is_what_the_csvs_give():
    """The README's results section is generated (benchmarks/make_results.py) and up to date."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "make_results.py"), "--check"],
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert (
        "| motorcycle | 100 / 33 | 3 | least squares | 1 | -5.054 | 1426 |"
        in (ROOT / "README.md").read_text()
    )


def test_results_page_is_rendered_with_its_figure(site):
    page = text(site / "results" / "index.html")
    assert "flexmix (k by BIC)" in page and "-4.062" in page
    assert (site / "real_data.png").is_file()
