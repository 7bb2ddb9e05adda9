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

__all__ = ["load_params", "load_result", "output_folder", "save_params", "save_result"]

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


def _result_types() -> dict[str, type]:
    # Imported here: the result types live downstream of this module.
    from numpyro_moe._em import EMResult
    from numpyro_moe._experts import ExpertDiagnostics, ExpertEstimate, Standardization
    from numpyro_moe._pipeline import MoEFit

    types = (MoEParams, EMResult, ExpertDiagnostics, ExpertEstimate, Standardization, MoEFit)
    return {kind.__name__: kind for kind in types}


def _flatten(value, prefix: str, arrays: dict) -> None:
    if value is None:
        arrays[f"{prefix}#none"] = np.array(True)
    elif isinstance(value, tuple) and hasattr(value, "_fields"):
        arrays[f"{prefix}#class"] = np.array(type(value).__name__)
        for field in value._fields:
            _flatten(getattr(value, field), f"{prefix}/{field}", arrays)
    elif isinstance(value, str):
        arrays[f"{prefix}#str"] = np.array(value)
    elif isinstance(value, bool | int | float):
        arrays[f"{prefix}#{type(value).__name__}"] = np.array(value)
    else:
        arrays[prefix] = np.asarray(value)


def _unflatten(data, prefix: str, types: dict):
    if f"{prefix}#none" in data:
        return None
    if f"{prefix}#class" in data:
        kind = types[str(data[f"{prefix}#class"])]
        return kind(*(_unflatten(data, f"{prefix}/{field}", types) for field in kind._fields))
    if f"{prefix}#str" in data:
        return str(data[f"{prefix}#str"])
    for name, convert in (("bool", bool), ("int", int), ("float", float)):
        if f"{prefix}#{name}" in data:
            return convert(data[f"{prefix}#{name}"])
    return data[prefix]


def save_result(path: str | os.PathLike, result) -> Path:
    """Write a result (`MoEParams`, `ExpertEstimate`, `EMResult`, `MoEFit`) to ``.npz``, exactly.

    Arrays keep their values and dtypes; Python numbers, strings and None keep their types.
    Reload with `load_result`. (DataTrees save with their own ``to_netcdf``.)
    """
    types = _result_types()
    if type(result).__name__ not in types or not isinstance(result, types[type(result).__name__]):
        raise TypeError(f"result: expected one of {sorted(types)}, got {type(result).__name__}")
    arrays: dict = {}
    _flatten(result, "result", arrays)
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"path: the folder {str(path.parent)!r} does not exist")
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    return path


def load_result(path: str | os.PathLike):
    """Read a result written by `save_result`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no such file {str(path)!r}")
    try:
        with np.load(path, allow_pickle=False) as data:
            contents = {name: data[name] for name in data.files}
    except (ValueError, OSError) as error:
        raise ValueError(f"path: {str(path)!r} is not an .npz file written by save_result") from error
    if "result#class" not in contents:
        raise ValueError(f"path: {str(path)!r} was not written by save_result")
    return _unflatten(contents, "result", _result_types())
