"""Saving results without loss, and output folders that never look complete when they are not."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from numpyro_moe._params import MoEParams

__all__ = ["load_params", "output_folder", "save_params"]

_FIELDS = MoEParams._fields


def save_params(path: str | os.PathLike, params: MoEParams) -> Path:
    """Write `MoEParams` to an ``.npz`` file, exactly (values and dtypes); returns the path.

    Raises
    ------
    TypeError
        If ``params`` is not `MoEParams`.
    FileNotFoundError
        If the folder of ``path`` does not exist.
    """
    if not isinstance(params, MoEParams):
        raise TypeError(f"params: expected MoEParams, got {type(params).__name__}")
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"path: the folder {str(path.parent)!r} does not exist; create it first")
    arrays = {
        name: np.asarray(value) for name, value in zip(_FIELDS, params, strict=True) if value is not None
    }
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    return path


def load_params(path: str | os.PathLike) -> MoEParams:
    """Read `MoEParams` written by `save_params`.

    Raises
    ------
    FileNotFoundError
        If ``path`` is not a file.
    ValueError
        If it is not an ``.npz`` file holding at least experts, gates and noise.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no such file {str(path)!r}")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"path: {str(path)!r} is not a saved MoEParams (expected an .npz file): {error}") from error
    if not hasattr(data, "files"):  # np.load gives an array for a .npy file
        raise ValueError(f"path: {str(path)!r} is not a saved MoEParams (expected an .npz file, got one array)")
    with data:
        missing = {"experts", "gates", "noise"} - set(data.files)
        if missing:
            raise ValueError(f"path: {str(path)!r} is not a saved MoEParams (missing {sorted(missing)})")
        return MoEParams(**{name: data[name] if name in data.files else None for name in _FIELDS})


@contextlib.contextmanager
def output_folder(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Write into a temporary sibling folder and rename it to ``path`` only on success.

    An interrupted run leaves at most a hidden ``.<name>.partial-*`` folder, never a ``path``
    that looks complete. An existing ``path`` is an error unless ``overwrite`` is True.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"out: {str(path)!r} already exists; choose another folder or pass --overwrite"
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
