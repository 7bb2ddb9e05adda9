"""The house's shape: one direction of imports, a small public namespace, an honest package.

The direction is import-linter's layers contract in pyproject.toml (``[tool.importlinter]``): each
module may import only the modules listed below it, so an upward import or an import cycle
breaks it. These tests run that contract, show it catches a planted violation, and check what it
cannot see (every module is in a layer, nothing imports the package root from below, the
ready-made models and the applications stay out of the library).
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import grimp
import pytest

import numpyro_moe

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "numpyro_moe"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _layers() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = config["contracts"]
    return [layer.strip("()") for layer in contract["layers"]]


def _lint(package_parent: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=package_parent, env=environment, capture_output=True, text=True, timeout=120,
    )


def test_the_layers_contract_is_kept():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "planted"),
    [
        ("_params.py", "from numpyro_moe._fit import Fit\n"),  # an upward import
        ("_links.py", "def _late():\n    import numpyro_moe._params\n"),  # a lazy one, closing a cycle
    ],
)
def test_the_contract_catches_a_planted_upward_import(tmp_path, module, planted):
    copy = tmp_path / "numpyro_moe"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / module, "a") as handle:
        handle.write("\n" + planted)
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout


def test_every_module_of_the_package_is_in_a_layer():
    layers = _layers()
    modules = grimp.build_graph("numpyro_moe").modules - {"numpyro_moe"}
    outside = sorted(
        module for module in modules
        if not any(module == layer or module.startswith(layer + ".") for layer in layers)
    )
    assert not outside, f"modules in no layer of the import contract: {outside}"


def test_no_library_module_imports_the_package_root():
    graph = grimp.build_graph("numpyro_moe")
    importers = {
        module for module in graph.find_modules_that_directly_import("numpyro_moe")
        if not module.startswith("numpyro_moe.apps")
    }
    assert not importers, f"library modules importing numpyro_moe itself (an upward import): {importers}"


def _imports(path: Path) -> list[tuple[str, int]]:
    """(module, level) of every import statement in a file, lazy ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.module or "", node.level))
    return found


def test_the_library_never_imports_the_applications_or_the_models():
    for path in sorted(PACKAGE.glob("*.py")):
        for module, _ in _imports(path):
            assert not module.startswith(("numpyro_moe.apps", "numpyro_moe.models", "models")), (
                f"{path.name} imports {module}"
            )


def test_the_ready_made_models_use_only_the_public_api():
    for path in sorted((ROOT / "models").glob("*.py")):
        for module, level in _imports(path):
            if level:  # relative: a sibling model module
                continue
            assert module != "models" and not module.startswith("models."), f"{path.name} imports {module}"
            if module.startswith("numpyro_moe"):
                assert not any(part.startswith("_") for part in module.split(".")), (
                    f"{path.name} imports the private {module}"
                )


def test_the_top_level_namespace_is_small_sorted_and_resolves():
    names = numpyro_moe.__all__
    assert len(names) <= 30
    assert names == sorted(names)
    assert len(set(names)) == len(names)
    for name in names:
        assert hasattr(numpyro_moe, name), name
    for submodule in ("baselines", "experts", "io", "metrics", "simulation"):
        module = getattr(numpyro_moe, submodule)
        for name in module.__all__:
            assert hasattr(module, name), f"{submodule}.{name}"


@pytest.mark.slow
def test_the_wheel_installs_the_models_under_the_package_and_no_top_level_models(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("numpyro_moe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"numpyro_moe"}
    assert "numpyro_moe/models/__init__.py" in names
    assert "numpyro_moe/models/data/mcycle.csv" in names
    assert "numpyro_moe/apps/cli.py" in names
