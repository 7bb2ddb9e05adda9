"""Output folders that never look complete when they are not, and the checks of the paths the
applications read and write (standard library only: the command line runs them before importing
JAX)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["existing_file", "existing_fit_folder", "output_folder", "refuse_existing"]


def existing_file(path: str | os.PathLike, flag: str) -> Path:
    """``path`` as a `Path`, or a FileNotFoundError naming ``flag`` when it is not a file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag}: no such file {str(path)!r}")
    return path


def existing_fit_folder(path: str | os.PathLike) -> Path:
    """``path`` as a `Path`, or a FileNotFoundError (``FIT_DIR``) when it is not a folder."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"FIT_DIR: no such folder {str(path)!r}; expected a folder of numpyro-moe fit")
    return path


def refuse_existing(path: str | os.PathLike, *, overwrite: bool) -> None:
    """A FileExistsError (``--out``) when ``path`` exists and ``overwrite`` is False."""
    if Path(path).exists() and not overwrite:
        raise FileExistsError(f"--out: {str(path)!r} already exists; choose another folder or pass --overwrite")


@contextlib.contextmanager
def output_folder(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Write into a temporary sibling folder and rename it to ``path`` only on success.

    An interrupted run leaves at most a hidden ``.<name>.partial-*`` folder, never a ``path``
    that looks complete. An existing ``path`` is an error unless ``overwrite`` is True.
    """
    path = Path(path)
    refuse_existing(path, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path)
    os.replace(staging, path)
