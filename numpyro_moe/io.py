"""Saving result records without loss, and loading them back.

Any record of the package (`MoEParams`, an expert estimate, a `Fit`, simulated data, their
diagnostics: NamedTuples and dataclasses of arrays, numbers, strings, tuples, None and links) is
written to one ``.npz`` file with its class's import path, so no registry of types is kept and a
new record type saves without changes here. Links are saved by name. (ArviZ DataTrees save with
their own ``to_netcdf``.)
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import zipfile
from pathlib import Path

import numpy as np

from numpyro_moe._links import LINKS, Link, resolve_link

__all__ = ["load_result", "save_result"]

_PACKAGE = "numpyro_moe"


def _class_path(value) -> str:
    kind = type(value)
    if not kind.__module__.startswith(_PACKAGE):
        raise TypeError(f"result: expected a record of {_PACKAGE}, got {kind.__module__}.{kind.__qualname__}")
    return f"{kind.__module__}:{kind.__qualname__}"


def _fields(value) -> list[tuple[str, object]]:
    if dataclasses.is_dataclass(value):
        return [(field.name, getattr(value, field.name)) for field in dataclasses.fields(value)]
    return [(name, getattr(value, name)) for name in value._fields]


def _flatten(value, prefix: str, arrays: dict) -> None:
    if value is None:
        arrays[f"{prefix}#none"] = np.array(True)
    elif isinstance(value, Link):
        arrays[f"{prefix}#link"] = np.array(value.name)
    elif (isinstance(value, tuple) and hasattr(value, "_fields")) or (
        dataclasses.is_dataclass(value) and not isinstance(value, type)
    ):
        arrays[f"{prefix}#class"] = np.array(_class_path(value))
        for name, field in _fields(value):
            _flatten(field, f"{prefix}/{name}", arrays)
    elif isinstance(value, tuple | list):
        arrays[f"{prefix}#{type(value).__name__}"] = np.array(len(value))
        for index, item in enumerate(value):
            _flatten(item, f"{prefix}/{index}", arrays)
    elif isinstance(value, str):
        arrays[f"{prefix}#str"] = np.array(value)
    elif isinstance(value, bool | int | float):
        arrays[f"{prefix}#{type(value).__name__}"] = np.array(value)
    else:
        try:
            arrays[prefix] = np.asarray(value)
        except (TypeError, ValueError) as error:
            raise TypeError(f"result: cannot save a {type(value).__name__} at {prefix!r}") from error
        if arrays[prefix].dtype == object:
            raise TypeError(
                f"result: cannot save a {type(value).__name__} at {prefix!r} (not a numeric array)"
            )


def _load_class(path: str):
    """The record class named ``module:qualname`` in a saved file, only from this package."""
    module_name, _, qualname = path.partition(":")
    if module_name != _PACKAGE and not module_name.startswith(_PACKAGE + "."):
        raise ValueError(f"path: the file names a class outside {_PACKAGE} ({path!r}); refusing to load it")
    try:
        target = importlib.import_module(module_name)
        for part in qualname.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError):
        raise ValueError(f"path: the file names a class {path!r} that {_PACKAGE} does not have") from None
    record = isinstance(target, type) and (
        dataclasses.is_dataclass(target) or (issubclass(target, tuple) and hasattr(target, "_fields"))
    )
    if not record:
        raise ValueError(f"path: the file names {path!r}, which is not a result record of {_PACKAGE}")
    return target


def _defaults(kind) -> dict:
    """The fields of a record class that have defaults."""
    if dataclasses.is_dataclass(kind):
        return {
            field.name
            for field in dataclasses.fields(kind)
            if field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
        }
    return set(kind._field_defaults)


def _present(data: dict, prefix: str) -> bool:
    """Whether the file holds an entry for ``prefix`` (a value, a marker or nested fields)."""
    return prefix in data or any(name.startswith((f"{prefix}#", f"{prefix}/")) for name in data)


def _unflatten(data: dict, prefix: str, links: dict):
    if f"{prefix}#none" in data:
        return None
    if f"{prefix}#link" in data:
        name = str(data[f"{prefix}#link"])
        if name in links:
            return resolve_link(links[name]) if not isinstance(links[name], Link) else links[name]
        if name in LINKS:
            return resolve_link(name)
        raise ValueError(
            f"links: the result was saved with the link {name!r}, which is not built in ({sorted(LINKS)}); "
            f"pass links={{{name!r}: your_function}}"
        )
    if f"{prefix}#class" in data:
        kind = _load_class(str(data[f"{prefix}#class"]))
        names = (
            [field.name for field in dataclasses.fields(kind)]
            if dataclasses.is_dataclass(kind)
            else kind._fields
        )
        defaults = _defaults(kind)
        # A field the file lacks and the class defaults (added since the file was written, e.g.
        # MoEParams.df) takes its default, so older files keep loading.
        values = {
            name: _unflatten(data, f"{prefix}/{name}", links)
            for name in names
            if name not in defaults or _present(data, f"{prefix}/{name}")
        }
        return kind(**values)
    for kind in (tuple, list):
        if f"{prefix}#{kind.__name__}" in data:
            length = int(data[f"{prefix}#{kind.__name__}"])
            return kind(_unflatten(data, f"{prefix}/{index}", links) for index in range(length))
    if f"{prefix}#str" in data:
        return str(data[f"{prefix}#str"])
    for name, convert in (("bool", bool), ("int", int), ("float", float)):
        if f"{prefix}#{name}" in data:
            return convert(data[f"{prefix}#{name}"])
    return data[prefix]


def save_result(path: str | os.PathLike, result, *, overwrite: bool = False) -> Path:
    """Write a result record to an ``.npz`` file, exactly; returns the path.

    Arrays keep their values and dtypes; Python numbers, strings, tuples and None keep their
    types; links are saved by name. Reload with `load_result`.

    Raises
    ------
    TypeError
        If ``result`` is not a record of this package, or holds something that is not data.
    FileNotFoundError
        If the folder of ``path`` does not exist.
    FileExistsError
        If ``path`` exists and ``overwrite`` is False.
    """
    if not ((isinstance(result, tuple) and hasattr(result, "_fields")) or dataclasses.is_dataclass(result)):
        raise TypeError(f"result: expected a result record of {_PACKAGE}, got {type(result).__name__}")
    arrays: dict = {}
    _flatten(result, "result", arrays)
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"path: the folder {str(path.parent)!r} does not exist; create it first")
    if path.exists() and not overwrite:
        raise FileExistsError(f"path: {str(path)!r} exists; choose another path or pass overwrite=True")
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    return path


def load_result(path: str | os.PathLike, *, links: dict | None = None):
    """Read a record written by `save_result`.

    ``links`` maps the names of user-defined links (callables) to their functions; built-in
    links are restored by name.

    Raises
    ------
    FileNotFoundError
        If ``path`` is not a file.
    ValueError
        If it is not an ``.npz`` file written by `save_result`, or names an unknown link.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no such file {str(path)!r}")
    try:
        with np.load(path, allow_pickle=False) as data:
            contents = {name: data[name] for name in data.files}
    except (ValueError, OSError, EOFError, AttributeError, TypeError, zipfile.BadZipFile) as error:
        raise ValueError(f"path: {str(path)!r} is not an .npz file written by save_result") from error
    if "result#class" not in contents:
        raise ValueError(f"path: {str(path)!r} was not written by save_result")
    try:
        return _unflatten(contents, "result", dict(links or {}))
    except KeyError as error:
        raise ValueError(f"path: {str(path)!r} is damaged: the entry {error} is missing") from None
