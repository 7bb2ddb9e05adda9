"""Predicting new rows of a CSV file from a fit folder of ``numpyro-moe fit``.

Used by ``numpyro-moe predict``. ``model.json`` says which columns to read, how to encode and
standardise them and how to return to the target's units; ``posterior.nc`` (the posterior draws)
is the source when present, else ``fit.npz`` (the point fit).
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

import numpyro_moe
from numpyro_moe import ReliabilityWarning
from numpyro_moe.apps.csv_workflow import FORMAT, READABLE_FORMATS
from numpyro_moe.apps.folders import existing_fit_folder
from numpyro_moe.apps.tables import read_new_csv
from numpyro_moe.io import load_result

__all__ = ["OUTSIDE_MARGIN", "PredictionSummary", "predict_csv", "read_fit_folder"]

OUTSIDE_MARGIN = 1.0
"""A row is outside the training inputs when a feature lies more than this many training standard
deviations beyond the feature's training range [min, max]. Within the range the gate and experts
were fitted on data; a training sample's range already spans about +-2 to 3 sd, so one sd past
its edge is where no data constrained the fit: the gate there keeps the edge's expert and that
expert's line is extrapolated, which the data cannot vouch for."""

_KEYS = ("columns", "one_hot", "features", "target", "standardization", "training_range", "num_experts")


class PredictionSummary(NamedTuple):
    """What `predict_csv` did: the output file, rows predicted, the source (``"posterior"`` or
    ``"point"``), rows outside the training inputs, and with the target present the mean
    log predictive density per point and the MSE (original units; else None)."""

    out: Path
    rows: int
    source: str
    outside: int
    log_density: float | None
    mean_squared_error: float | None


def read_fit_folder(fit_dir: str | os.PathLike) -> dict:
    """``model.json`` of a fit folder, checked for this package's format.

    Raises
    ------
    FileNotFoundError
        If ``fit_dir`` is not a folder.
    ValueError
        If it is not a fit folder, or its ``model.json`` is damaged or of another format version.
    """
    fit_dir = existing_fit_folder(fit_dir)
    path = fit_dir / "model.json"
    if not path.is_file():
        older = " (it has fit.npz but no model.json: made by an older numpyro-moe; refit with this version)"
        raise ValueError(
            f"FIT_DIR: {str(fit_dir)!r} is not a fit folder of numpyro-moe fit: it has no model.json"
            + (older if (fit_dir / "fit.npz").is_file() else "")
        )
    try:
        model = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"FIT_DIR: {str(path)!r} is not valid JSON ({error}); refit") from None
    if not isinstance(model, dict) or "format" not in model:
        raise ValueError(
            f"FIT_DIR: {str(path)!r} has no format version; it was not written by numpyro-moe fit"
        )
    if model["format"] not in READABLE_FORMATS:
        raise ValueError(
            f"FIT_DIR: {str(path)!r} has format version {model['format']!r} (written by numpyro-moe "
            f"{model.get('version', '?')}); this numpyro-moe ({numpyro_moe.__version__}) reads formats "
            f"{', '.join(map(str, READABLE_FORMATS))} (writes {FORMAT}): refit with this version"
        )
    absent = [key for key in _KEYS if key not in model]
    if absent:
        raise ValueError(f"FIT_DIR: {str(path)!r} lacks the entries {absent}; refit")
    model.setdefault("expert_features", model["features"])  # format 1: every feature feeds both
    model.setdefault("gate_features", None)
    unknown = sorted(
        (set(model["expert_features"]) | set(model["gate_features"] or [])) - set(model["features"])
    )
    if unknown:
        raise ValueError(f"FIT_DIR: {str(path)!r} names features {unknown} that its columns do not encode; refit")
    return model


def _outside(x: np.ndarray, model: dict) -> np.ndarray:
    """(n, d) True where a feature is more than `OUTSIDE_MARGIN` training sds beyond its range."""
    scale = np.asarray(model["standardization"]["feature_scale"])
    low = np.asarray(model["training_range"]["feature_min"]) - OUTSIDE_MARGIN * scale
    high = np.asarray(model["training_range"]["feature_max"]) + OUTSIDE_MARGIN * scale
    with np.errstate(invalid="ignore"):
        return (x < low) | (x > high)


def _number(value: float) -> str:
    return "" if not math.isfinite(value) else f"{value:.12g}"


def _write_rows(out: Path, header: list[str], rows: list[list[str]], overwrite: bool) -> None:
    """Write the CSV next to its place and rename it there: never a half-written file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{out.name}.partial-", dir=out.parent)
    try:
        with os.fdopen(handle, "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(header)
            writer.writerows(rows)
        if out.exists() and not overwrite:  # appeared meanwhile
            raise FileExistsError(
                f"--out: {str(out)!r} already exists; choose another file or pass --overwrite"
            )
        os.replace(staging, out)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


def predict_csv(
    fit_dir: str | os.PathLike,
    path: str | os.PathLike,
    *,
    out: str | os.PathLike | None = None,
    point: bool = False,
    interval: float = 0.9,
    seed: int = 0,
    missing: str = "error",
    overwrite: bool = False,
    verbose: bool = True,
) -> PredictionSummary:
    """Predict the rows of a CSV file from a fit folder and write the predictions as CSV.

    The file needs the model's raw columns (others are ignored; the target's is optional) and is
    read as for fitting (row names, missing values, one-hot levels of training;
    `numpyro_moe.apps.tables.read_new_csv`), then standardised as in training. The source is the
    posterior draws (``posterior.nc``) when the folder has them and not ``point``, else the point
    fit (``fit.npz``).

    The output (default ``<NEW stem>-predictions.csv`` beside the file; never overwritten without
    ``overwrite``) has one row per data row of the file, in the target's original units: ``mean``
    (predictive mean), ``lower``/``upper`` (central ``interval`` of the predictive distribution),
    ``gate_<i>`` (expert i's gate probability), ``outside_training`` (see `OUTSIDE_MARGIN`) and,
    when the file has the target, ``log_density`` (the predictive log density of the observed
    target, in its units: the standardised one minus log(target sd)). Rows left out for missing
    values (``missing="drop"``) have empty cells.

    Warns
    -----
    ReliabilityWarning
        When rows lie outside the training inputs.
    """
    import xarray as xr

    model = read_fit_folder(fit_dir)
    fit_dir, path = Path(fit_dir), Path(path)
    if not 0 < interval < 1:
        raise ValueError(f"--interval: expected a probability in (0, 1), got {interval}")
    if out is None:
        out = path.with_name(f"{path.stem}-predictions.csv")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"--out: {str(out)!r} already exists; choose another file or pass --overwrite")
    if out.is_dir():
        raise ValueError(f"--out: {str(out)!r} is a folder; expected a file name")
    target = model["target"]
    data = read_new_csv(
        path, columns=model["columns"], levels=model["one_hot"], target=target, missing=missing
    )
    if data.x.shape[1] != len(model["features"]):
        raise ValueError(
            f"FIT_DIR: model.json lists {len(model['features'])} features but its columns encode to "
            f"{data.x.shape[1]}; refit"
        )
    standard = model["standardization"]
    y_mean, y_scale = standard["target_mean"], standard["target_scale"]
    rows = np.flatnonzero(data.complete)
    if not rows.size:
        raise ValueError(f"NEW.csv: no row of {str(path)!r} has every feature; nothing to predict")
    standardised = (data.x[rows] - np.asarray(standard["feature_mean"])) / np.asarray(standard["feature_scale"])
    position = {name: index for index, name in enumerate(model["features"])}
    z = standardised[:, [position[name] for name in model["expert_features"]]]
    gate_z = None
    if model["gate_features"] is not None:
        gate_z = standardised[:, [position[name] for name in model["gate_features"]]]
    observed = None if data.y is None else data.y[rows]
    # Rows without the target still get predictions; their log density is dropped below.
    t = None if observed is None else np.nan_to_num((observed - y_mean) / y_scale)
    key = jax.random.key(seed)
    posterior = fit_dir / "posterior.nc"
    use_posterior = posterior.is_file() and not point
    if use_posterior:
        with xr.open_datatree(posterior, engine="h5netcdf") as tree:
            sizes = tree["posterior"].sizes
            described = f"posterior draws ({sizes['chain']} chains x {sizes['draw']} draws, posterior.nc)"
            prediction = numpyro_moe.predict(tree, z, key=key, y=t, gate_x=gate_z, interval=interval)
    else:
        fit = load_result(fit_dir / "fit.npz")
        described = "the point fit (fit.npz)"
        prediction = numpyro_moe.predict(fit, z, key=key, y=t, gate_x=gate_z, interval=interval)
    k = int(np.shape(prediction.gate_probabilities)[1])
    columns = ["mean", "lower", "upper", *[f"gate_{i}" for i in range(k)], "outside_training"]
    n = len(data.lines)
    values = np.full((n, 3 + k), np.nan)
    values[rows, 0] = y_mean + y_scale * np.asarray(prediction.mean)
    values[rows, 1] = y_mean + y_scale * np.asarray(prediction.lower)
    values[rows, 2] = y_mean + y_scale * np.asarray(prediction.upper)
    values[rows, 3:] = np.asarray(prediction.gate_probabilities)
    far = np.zeros((n, data.x.shape[1]), dtype=bool)
    far[rows] = _outside(data.x[rows], model)
    outside = far.any(axis=1)
    log_density = None
    if observed is not None:
        columns.append("log_density")
        log_density = np.full(n, np.nan)
        log_density[rows] = np.asarray(prediction.log_density) - math.log(y_scale)
        log_density[rows[np.isnan(observed)]] = np.nan
    lines = []
    for row in range(n):
        cells = [_number(value) for value in values[row]]
        cells.append(("true" if outside[row] else "false") if data.complete[row] else "")
        if log_density is not None:
            cells.append(_number(log_density[row]))
        lines.append(cells)
    _write_rows(out, columns, lines, overwrite)

    def say(message):
        if verbose:
            print(message, flush=True)

    for note in data.notes:
        say(note)
    say(f"predicted {len(rows)} rows of {path} from {described}")
    mean_log_density = mse = None
    if observed is not None:
        scored = rows[~np.isnan(observed)]
        if scored.size:
            mean_log_density = float(np.mean(log_density[scored]))
            mse = float(np.mean((values[scored, 0] - data.y[scored]) ** 2))
            say(
                f"target {target!r} present in {scored.size} rows: mean log predictive density per point "
                f"{mean_log_density:.4f} (in {target}'s units), MSE {mse:.6g}"
            )
    if outside.any():
        names = [model["features"][j] for j in np.flatnonzero(far.any(axis=0))]
        shown = ", ".join(str(int(line)) for line in data.lines[outside][:5]) + (
            ", ..." if outside.sum() > 5 else ""
        )
        warnings.warn(
            f"{int(outside.sum())} of {len(rows)} rows lie outside the training inputs (lines {shown}; columns "
            f"{names}: more than {OUTSIDE_MARGIN:g} training sd beyond the training range): the experts' "
            f"{'linear ' if model.get('link') == 'linear' else ''}extrapolation there is not trustworthy (column "
            "outside_training)",
            ReliabilityWarning,
            stacklevel=2,
        )
    say(f"predictions written to {out}")
    return PredictionSummary(
        out, len(rows), "posterior" if use_posterior else "point", int(outside.sum()), mean_log_density, mse
    )
