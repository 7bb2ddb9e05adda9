"""Reading CSV files as users have them, for ``numpyro-moe fit`` and ``numpyro-moe predict``.

What is accepted, and what each case becomes:

- A header row of column names; blank lines are skipped (line numbers in messages are the file's);
  a UTF-8 byte-order mark (Excel) is ignored.
- Row names: a first column without a name (R's ``write.csv``, pandas' ``to_csv``), rows with one
  more field than the header (R's ``write.table``), or a first column named like an index
  (`INDEX_NAMES`) that holds exactly 1..n or 0..n-1 is dropped with a note, never used as a
  feature (name such a column in ``--features`` to keep it).
- Missing values: a cell that is, ignoring case and surrounding spaces, one of `MISSING_VALUES`.
  ``missing="error"`` (the default) refuses them, naming the columns, the number of rows and the
  first lines; ``missing="drop"`` leaves those rows out with a note.
- Text columns (no value is a number): refused, naming the columns and ``--one-hot``; with
  ``one_hot`` they become 0/1 indicator columns ``name=level`` for every level but the first
  (the reference; levels are sorted, numbers by value), and the levels are recorded so that new
  data are encoded identically (`read_new_csv`; an unseen level is an error). A text target is
  always an error.
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from numpyro_moe.apps.folders import existing_file

__all__ = [
    "INDEX_NAMES",
    "MISSING_POLICIES",
    "MISSING_VALUES",
    "CsvData",
    "NewData",
    "read_csv",
    "read_new_csv",
]

MISSING_VALUES = ("", "NA", "N/A", "NaN", "NULL", "None", "?", "#N/A")
"""Cells read as missing, compared ignoring case and surrounding spaces (so also ``nan``, ``null``)."""
MISSING_POLICIES = ("error", "drop")
INDEX_NAMES = ("Unnamed: 0", "index", "rownames", "row.names", "row_names", "...1")
"""Names (ignoring case) of a first column taken for row names when it holds exactly 1..n or 0..n-1."""
_MISSING = frozenset(value.lower() for value in MISSING_VALUES)
_INDEX = frozenset(name.lower() for name in INDEX_NAMES)
_SHOWN = 5  # line numbers quoted in a message


class CsvData(NamedTuple):
    """A CSV file read for fitting.

    Attributes
    ----------
    x, y
        (n, d) features (one-hot columns expanded) and (n,) target, rows with missing values left
        out under ``missing="drop"``.
    feature_names
        The d names of x's columns; a one-hot column ``c`` gives ``c=level`` for each level but the
        first.
    target
        The target's name.
    columns
        The raw feature columns read from the file, in order (before one-hot encoding).
    levels
        ``{column: levels}`` of the one-hot columns, the reference level (without a column) first.
    lines
        (n,) the file's line number of each row.
    notes
        What was done that the user should hear about (row names dropped, rows left out).
    """

    x: np.ndarray
    y: np.ndarray
    feature_names: list[str]
    target: str
    columns: list[str]
    levels: dict[str, list[str]]
    lines: np.ndarray
    notes: list[str]


class NewData(NamedTuple):
    """A CSV file read for prediction with a fitted model's columns (`read_new_csv`).

    ``x`` (n, d) features encoded as in training (NaN rows where ``complete`` is False); ``complete``
    (n,) rows with every feature; ``y`` (n,) the target where the file has its column (NaN where
    missing), else None; ``lines`` (n,) line numbers; ``notes`` as in `CsvData`.
    """

    x: np.ndarray
    complete: np.ndarray
    y: np.ndarray | None
    lines: np.ndarray
    notes: list[str]


class _Table(NamedTuple):
    header: list[str]
    lines: np.ndarray
    cells: list[list[str]] | None  # stripped cells per row, row names removed (None: see values)
    notes: list[str]
    # A file of finite numbers only, read at once: its values, and its data lines for the cells.
    values: np.ndarray | None = None
    raw: list[str] | None = None


class _Cells(Sequence):
    """One column's stripped cells of a table read as numbers, split from its lines on demand
    (only text work, such as --one-hot levels, needs them)."""

    def __init__(self, raw: list[str], index: int):
        self.raw, self.index = raw, index

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, row):
        if isinstance(row, slice):
            return [self[i] for i in range(*row.indices(len(self)))]
        return self.raw[row].split(",")[self.index].strip()


class _Column(NamedTuple):
    values: np.ndarray  # float, NaN where missing or not a number
    missing: np.ndarray  # bool
    text: list[tuple[int, str]]  # (line, cell) of the non-missing cells that are not numbers
    cells: list[str]


def _lines(lines) -> str:
    lines = [int(line) for line in lines]
    shown = ", ".join(str(line) for line in lines[:_SHOWN])
    return shown + (", ..." if len(lines) > _SHOWN else "")


def _rows(count: int) -> str:
    return f"{count} row" + ("" if count == 1 else "s")


def _is_index(cells: list[str]) -> bool:
    try:
        values = [float(cell) for cell in cells]
    except ValueError:
        return False
    n = len(values)
    return n > 0 and (values == list(range(1, n + 1)) or values == list(range(n)))


def _numeric_table(text: str, keep: set[str]) -> _Table | None:
    """The table of a CSV file's ``text`` when it is plain numbers: a header of distinct names (no
    row-name column), then lines of as many finite numbers, unquoted, with no blank line. NumPy's
    C parser reads them at once (at 200,000 rows x 11 columns, 0.2 s where reading cell by cell
    takes 2 s); anything else returns None, for `_read_table`'s general path."""
    head, _, body = text.partition("\n")
    header = [name.strip() for name in next(csv.reader([head.rstrip("\r")]), [])]
    first = header[0] if header else ""
    if (
        len(header) < 2 or "" in header or len(set(header)) < len(header) or '"' in body
        or (first.lower() in _INDEX and first not in keep)
    ):
        return None
    lines = body.splitlines()
    if not lines:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # NumPy warns of lines it reads as empty
            values = np.loadtxt(lines, delimiter=",", dtype=float, ndmin=2, comments=None)
    except (ValueError, UserWarning):
        return None
    # A blank line would be skipped (the rows' line numbers then differ): the general path.
    if values.shape != (len(lines), len(header)) or not np.isfinite(values).all():
        return None
    return _Table(header, np.arange(2, len(lines) + 2), None, [], values, lines)


def _read_table(path: str | os.PathLike, flag: str, keep: set[str]) -> _Table:
    """Header and stripped cells of a CSV file, blank lines skipped and row names dropped.

    ``keep`` are columns the caller names: never taken for row names.
    """
    path = existing_file(path, flag)
    with open(path, newline="", encoding="utf-8-sig") as handle:
        text = handle.read()
    numeric = _numeric_table(text, keep)
    if numeric is not None:
        return numeric
    with io.StringIO(text, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if not header:
            raise ValueError(f"{flag}: {str(path)!r} is empty; expected a header row of column names")
        header = [name.strip() for name in header]
        # Blank lines are skipped; each row keeps its line number in the file for messages.
        rows = [
            (reader.line_num, [cell.strip() for cell in row]) for row in reader if any(c.strip() for c in row)
        ]
    if len(header) == 1:
        for separator, name in ((";", "semicolons"), ("\t", "tabs")):
            if separator in header[0]:
                raise ValueError(
                    f"{flag}: {str(path)!r} has a single column {header[0]!r}: its values look separated by "
                    f"{name}; expected comma-separated values (save the file as CSV with commas)"
                )
    notes = []
    if rows and all(len(row) == len(header) + 1 for _, row in rows):
        # R's write.table: a header without a cell above the row names.
        rows = [(line, row[1:]) for line, row in rows]
        notes.append(
            f"{flag}: the rows have one field more than the header: the first is taken for row names"
        )
    for line, row in rows:
        if len(row) != len(header):
            raise ValueError(f"{flag}: line {line} has {len(row)} fields, expected {len(header)}")
    if len(header) > 1 and header[0] == "":
        header, rows = header[1:], [(line, row[1:]) for line, row in rows]
        notes.append(
            f"{flag}: the first column has no name: taken for row names (as R's write.csv writes them)"
        )
    elif (
        len(header) > 1
        and header[0].lower() in _INDEX
        and header[0] not in keep
        and _is_index([row[0] for _, row in rows])
    ):
        notes.append(
            f"{flag}: the first column {header[0]!r} holds the row numbers 1..n or 0..n-1: taken for row "
            "names (name it in --features to keep it as a feature)"
        )
        header, rows = header[1:], [(line, row[1:]) for line, row in rows]
    unnamed = [number for number, name in enumerate(header, start=1) if name == ""]
    if unnamed:
        raise ValueError(f"{flag}: {str(path)!r} has columns without a name (numbers {unnamed}); name them")
    duplicated = sorted({name for name in header if header.count(name) > 1})
    if duplicated:
        raise ValueError(
            f"{flag}: {str(path)!r} repeats the column names {duplicated}; expected unique names"
        )
    return _Table(header, np.array([line for line, _ in rows], dtype=int), [row for _, row in rows], notes)


def _column(table: _Table, name: str) -> _Column:
    index = table.header.index(name)
    if table.values is not None:
        values = table.values[:, index]
        return _Column(values, np.zeros(len(values), dtype=bool), [], _Cells(table.raw, index))
    cells = [row[index] for row in table.cells]
    # Fast path: every cell a number (NumPy parses them in C). A NaN may be a missing-value marker
    # ("NaN", "nan"), and any cell NumPy cannot parse may be text or missing: the loop below sorts
    # those out, cell by cell.
    try:
        parsed = np.asarray(cells, dtype=float)
    except ValueError:
        parsed = None
    if parsed is not None and not np.isnan(parsed).any():
        return _Column(parsed, np.zeros(len(cells), dtype=bool), [], cells)
    values = np.full(len(cells), np.nan)
    missing = np.zeros(len(cells), dtype=bool)
    text = []
    for row, cell in enumerate(cells):
        if cell.lower() in _MISSING:
            missing[row] = True
            continue
        try:
            values[row] = float(cell)
        except ValueError:
            text.append((int(table.lines[row]), cell))
    return _Column(values, missing, text, cells)


def _is_text(column: _Column) -> bool:
    """A column none of whose values is a number (and that has some)."""
    return bool(column.text) and len(column.text) == int((~column.missing).sum())


def _check_finite(name: str, column: _Column, lines: np.ndarray) -> None:
    bad = np.flatnonzero(~column.missing & ~np.isnan(column.values) & ~np.isfinite(column.values))
    if bad.size:
        row = int(bad[0])
        raise ValueError(
            f"column {name!r}: line {lines[row]} holds {column.cells[row]!r}; expected a finite number"
        )


def _missing_message(flag: str, columns: dict[str, _Column], lines: np.ndarray) -> tuple[np.ndarray, str]:
    """Rows with a missing value in any of ``columns``, and what to say about them."""
    rows = np.zeros(len(lines), dtype=bool)
    counts = []
    for name, column in columns.items():
        if column.missing.any():
            rows |= column.missing
            counts.append(f"{name!r}: {_rows(int(column.missing.sum()))}")
    count = int(rows.sum())
    message = (
        f"{flag}: {count} of {len(lines)} rows {'has' if count == 1 else 'have'} missing values "
        f"({'column' if len(counts) == 1 else 'columns'} {', '.join(counts)}; "
        f"{'line' if count == 1 else 'lines'} {_lines(lines[rows])})"
    )
    return rows, message


def _level_order(level: str):
    try:
        return (0, float(level), level)
    except ValueError:
        return (1, 0.0, level)


def _indicators(name: str, cells: list[str], levels: list[str]) -> np.ndarray:
    """(n, len(levels) - 1) 0/1 columns, one per level but the reference (the first)."""
    return np.array([[cell == level for level in levels[1:]] for cell in cells], dtype=float).reshape(
        len(cells), len(levels) - 1
    )


def _one_hot_columns(one_hot, features: list[str], target: str) -> list[str] | str:
    if isinstance(one_hot, str):
        if one_hot == "all":
            return "all"
        one_hot = [one_hot]
    chosen = list(one_hot)
    if target in chosen:
        raise ValueError(f"--one-hot: {target!r} is the target; the response must be numeric")
    unknown = [name for name in chosen if name not in features]
    if unknown:
        raise ValueError(f"--one-hot: columns {unknown} are not among the features {features}")
    return chosen


def read_csv(
    path: str | os.PathLike,
    *,
    target: str,
    features: list[str] | None = None,
    missing: str = "error",
    one_hot: str | list[str] = (),
) -> CsvData:
    """Read a CSV file with a header row for fitting; every column but ``target`` is a feature by
    default. See the module's docstring for row names, missing values and text columns.

    Parameters
    ----------
    path
        The file.
    target
        The response column (numeric).
    features
        Feature columns, in this order (default: all but the target).
    missing
        ``"error"`` or ``"drop"`` (rows with a missing value in the target or a feature).
    one_hot
        Text columns to encode as indicator columns, or ``"all"`` for every text feature.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the target or a feature column is missing, a value is not numeric, missing (with
        ``missing="error"``) or infinite, a feature holds text and is not in ``one_hot``, or the
        file has no data rows.
    """
    if missing not in MISSING_POLICIES:
        raise ValueError(f"--missing: expected one of {list(MISSING_POLICIES)}, got {missing!r}")
    table = _read_table(path, "DATA", {target, *(features or [])})
    path, header = str(path), table.header
    if target not in header:
        raise ValueError(f"--target: column {target!r} is not in {path!r}; columns are {header}")
    if features is not None and target in features:
        raise ValueError(f"--features: the target {target!r} cannot also be a feature")
    if features is None:
        features = [name for name in header if name != target]
    absent = [name for name in features if name not in header]
    if absent:
        raise ValueError(f"--features: columns {absent} are not in {path!r}; columns are {header}")
    if not features:
        raise ValueError(f"DATA: {path!r} has no feature columns besides the target {target!r}")
    if not len(table.lines):
        raise ValueError(f"DATA: {path!r} has a header but no data rows")
    chosen = _one_hot_columns(one_hot, features, target)
    columns = {name: _column(table, name) for name in [target, *features]}
    if _is_text(columns[target]):
        line, cell = columns[target].text[0]
        raise ValueError(
            f"--target: column {target!r} holds text, not numbers ({cell!r} on line {line}); the response "
            "must be numeric"
        )
    if chosen == "all":
        chosen = [name for name in features if _is_text(columns[name])]
    text = [name for name in features if name not in chosen and _is_text(columns[name])]
    if text:
        line, cell = columns[text[0]].text[0]
        raise ValueError(
            f"DATA: columns {text} hold text, not numbers ({cell!r} on line {line}); pass --one-hot "
            f"{','.join(text)} (or --one-hot all) to encode them as 0/1 indicator columns, or leave them out "
            "with --features"
        )
    for name, column in columns.items():
        if name not in chosen and column.text:
            line, cell = column.text[0]
            advice = "" if name == target else f", or pass --one-hot {name} if the column is categorical"
            raise ValueError(
                f"column {name!r}: line {line} holds {cell!r}, which is not numeric; correct it, write NA if "
                f"it is missing{advice}"
            )
        if name not in chosen:
            _check_finite(name, column, table.lines)
    notes = list(table.notes)
    keep = np.ones(len(table.lines), dtype=bool)
    if any(column.missing.any() for column in columns.values()):
        in_file_order = {name: columns[name] for name in header if name in columns}
        dropped, message = _missing_message("DATA", in_file_order, table.lines)
        if missing == "error":
            raise ValueError(f"{message}; pass --missing drop to leave those rows out")
        if dropped.all():
            raise ValueError(f"{message}: no rows are left without them")
        keep = ~dropped
        notes.append(f"{message}: left out (--missing drop)")
    levels, blocks, names = {}, [], []
    for name in features:
        column = columns[name]
        if name in chosen:
            cells = [cell for cell, kept in zip(column.cells, keep, strict=True) if kept]
            found = sorted(set(cells), key=_level_order)
            if len(found) < 2:
                raise ValueError(
                    f"--one-hot: column {name!r} has the one level {found[0]!r}: it carries no information; "
                    "leave it out with --features"
                )
            levels[name] = found
            blocks.append(_indicators(name, cells, found))
            names += [f"{name}={level}" for level in found[1:]]
        else:
            blocks.append(column.values[keep, None])
            names.append(name)
    clashes = sorted({name for name in names if names.count(name) > 1} | (set(names) & {target}))
    if clashes:
        raise ValueError(
            f"--one-hot: the indicator columns {clashes} clash with other column names; rename them"
        )
    return CsvData(
        np.concatenate(blocks, axis=1),
        columns[target].values[keep],
        names,
        target,
        list(features),
        levels,
        table.lines[keep],
        notes,
    )


def read_new_csv(
    path: str | os.PathLike,
    *,
    columns: list[str],
    levels: dict[str, list[str]],
    target: str,
    missing: str = "error",
    flag: str = "NEW.csv",
) -> NewData:
    """Read new data for a fitted model: its raw ``columns`` (others are ignored), one-hot encoded
    with the training ``levels``; the ``target`` column is optional.

    With ``missing="drop"`` rows missing a feature are kept with ``complete`` False; a missing
    target is never an error (``y`` is NaN there).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If a needed column is absent, a numeric column holds text, a one-hot column holds a level
        not seen in training, a feature is missing (with ``missing="error"``), or there are no rows.
    """
    if missing not in MISSING_POLICIES:
        raise ValueError(f"--missing: expected one of {list(MISSING_POLICIES)}, got {missing!r}")
    table = _read_table(path, flag, {*columns, target})
    path = str(path)
    absent = [name for name in columns if name not in table.header]
    if absent:
        raise ValueError(
            f"{flag}: {path!r} lacks the columns {absent} that the model needs (it was fitted on {columns}); "
            f"columns are {table.header}"
        )
    if not len(table.lines):
        raise ValueError(f"{flag}: {path!r} has a header but no data rows")
    parsed = {name: _column(table, name) for name in columns}
    for name, column in parsed.items():
        if name in levels:
            known = set(levels[name])
            unseen = [
                (int(line), cell)
                for line, cell, gone in zip(table.lines, column.cells, column.missing, strict=True)
                if not gone and cell not in known
            ]
            if unseen:
                values = sorted({cell for _, cell in unseen}, key=_level_order)
                raise ValueError(
                    f"column {name!r}: {_rows(len(unseen))} hold levels not seen in training {values} (lines "
                    f"{_lines(line for line, _ in unseen)}); the model knows {levels[name]} and cannot predict "
                    "for others"
                )
        elif column.text:
            line, cell = column.text[0]
            raise ValueError(
                f"column {name!r}: line {line} holds {cell!r}, which is not numeric; the model was fitted on it "
                "as a number"
            )
        else:
            _check_finite(name, column, table.lines)
    notes = list(table.notes)
    complete = np.ones(len(table.lines), dtype=bool)
    if any(column.missing.any() for column in parsed.values()):
        in_file_order = {name: parsed[name] for name in table.header if name in parsed}
        incomplete, message = _missing_message(flag, in_file_order, table.lines)
        if missing == "error":
            raise ValueError(f"{message}; pass --missing drop to leave their predictions empty")
        complete = ~incomplete
        notes.append(f"{message}: their predictions are left empty (--missing drop)")
    blocks = []
    for name in columns:
        column = parsed[name]
        if name in levels:
            block = _indicators(name, column.cells, levels[name])
        else:
            block = column.values[:, None]
        blocks.append(np.where(complete[:, None], block, np.nan))
    y = None
    if target in table.header:
        response = _column(table, target)
        if response.text:
            line, cell = response.text[0]
            raise ValueError(
                f"column {target!r} (the target): line {line} holds {cell!r}, which is not numeric"
            )
        _check_finite(target, response, table.lines)
        y = response.values
    return NewData(np.concatenate(blocks, axis=1), complete, y, table.lines, notes)
