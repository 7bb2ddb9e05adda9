"""Output folders that never look complete when they are not."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["output_folder"]


@contextlib.contextmanager
def output_folder(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Write into a temporary sibling folder and rename it to ``path`` only on success.

    An interrupted run leaves at most a hidden ``.<name>.partial-*`` folder, never a ``path``
    that looks complete. An existing ``path`` is an error unless ``overwrite`` is True.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"--out: {str(path)!r} already exists; choose another folder or pass --overwrite"
        )
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
