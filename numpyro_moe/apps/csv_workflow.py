"""Fitting a CSV file end to end: read, standardise, estimate, fit, (NUTS), write results.

Used by ``numpyro-moe fit``. Everything is written into one output folder, atomically: an
interrupted run leaves only a hidden ``.<name>.partial-*`` folder, never one that looks complete.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from numpyro_moe import MoEParams, fit_moe, run_nuts
from numpyro_moe.apps.folders import output_folder
from numpyro_moe.apps.plots import plot_gates, plot_trace, save_plot
from numpyro_moe.io import save_result
from numpyro_moe.simulation import sample_response

__all__ = ["CsvData", "fit_csv", "read_csv"]


class CsvData(NamedTuple):
    """Columns of a CSV file: ``x`` (n, d) features, ``y`` (n,) target, and their names."""

    x: np.ndarray
    y: np.ndarray
    feature_names: list[str]
    target: str


def read_csv(path: str | os.PathLike, *, target: str, features: list[str] | None = None) -> CsvData:
    """Read a numeric CSV with a header row; every column but ``target`` is a feature by default.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the target or a feature column is missing, a value is not numeric or is missing, or
        the file has no data rows.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DATA: no such file {str(path)!r}")
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if not header:
            raise ValueError(f"DATA: {str(path)!r} is empty; expected a header row of column names")
        header = [name.strip() for name in header]
        # Blank lines are skipped; each row keeps its line number in the file for messages.
        rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    duplicated = sorted({name for name in header if header.count(name) > 1})
    if duplicated:
        raise ValueError(f"DATA: {str(path)!r} repeats the column names {duplicated}; expected unique names")
    if target not in header:
        raise ValueError(f"--target: column {target!r} is not in {str(path)!r}; columns are {header}")
    if features is not None and target in features:
        raise ValueError(f"--features: the target {target!r} cannot also be a feature")
    if features is None:
        features = [name for name in header if name != target]
    missing = [name for name in features if name not in header]
    if missing:
        raise ValueError(f"--features: columns {missing} are not in {str(path)!r}; columns are {header}")
    if not features:
        raise ValueError(f"DATA: {str(path)!r} has no feature columns besides the target {target!r}")
    if not rows:
        raise ValueError(f"DATA: {str(path)!r} has a header but no data rows")
    columns = [target, *features]
    index = {name: header.index(name) for name in columns}
    values = np.empty((len(rows), len(columns)))
    for row_index, (row_number, row) in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(f"DATA: line {row_number} has {len(row)} fields, expected {len(header)}")
        for column_number, name in enumerate(columns):
            cell = row[index[name]].strip()
            try:
                value = float(cell)
            except ValueError:
                raise ValueError(
                    f"column {name!r}: line {row_number} holds {cell!r}, which is not numeric"
                ) from None
            if not np.isfinite(value):
                raise ValueError(
                    f"column {name!r}: line {row_number} holds {cell!r}; expected a finite number"
                )
            values[row_index, column_number] = value
    return CsvData(values[:, 1:], values[:, 0], list(features), target)


def _standardise(values: np.ndarray, names: list[str]):
    mean = values.mean(axis=0)
    scale = values.std(axis=0)
    constant = [name for name, s in zip(names, np.atleast_1d(scale), strict=True) if s == 0]
    if constant:
        raise ValueError(f"columns {constant} are constant; remove them")
    return (values - mean) / scale, mean, scale


def _parameter_table(params: MoEParams, feature_names: list[str]) -> str:
    lines = ["parameter," + ",".join(feature_names) + ",intercept"]
    for i in range(params.num_experts):
        intercept = "" if params.expert_intercepts is None else f"{float(params.expert_intercepts[i]):.6g}"
        lines.append(
            f"expert {i}," + ",".join(f"{float(v):.6g}" for v in params.experts[i]) + f",{intercept}"
        )
    for i in range(params.num_experts):
        intercept = "" if params.gate_intercepts is None else f"{float(params.gate_intercepts[i]):.6g}"
        lines.append(f"gate {i}," + ",".join(f"{float(v):.6g}" for v in params.gates[i]) + f",{intercept}")
    lines.append(
        "noise," + ",".join(f"{float(v):.6g}" for v in np.broadcast_to(params.noise, (params.num_experts,)))
    )
    return "\n".join(lines) + "\n"


def _positive_int(value, flag: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{flag}: expected an integer >= 1, got {value!r}")
    return value


def fit_csv(
    path: str | os.PathLike,
    *,
    target: str,
    num_experts: int,
    out: str | os.PathLike,
    link: str = "linear",
    features: list[str] | None = None,
    nuts: bool = False,
    seed: int = 0,
    num_starts: int = 5,
    num_chains: int = 4,
    num_warmup: int = 500,
    num_samples: int = 500,
    overwrite: bool = False,
    verbose: bool = True,
) -> Path:
    """Fit a mixture of experts to a CSV file and write the results into the folder ``out``.

    Columns are standardised (mean 0, sd 1; the transform is saved in ``standardization.json``),
    the model has expert and gate intercepts, and the fit is `fit_moe` (the tensor estimate among
    random starts, joint EM); with ``nuts``, `run_nuts` from that fit.

    Outputs: ``fit.npz`` (the point fit, standardised units; ``numpyro_moe.io.load_result``),
    ``parameters.csv``, ``standardization.json``, ``summary.txt``, ``gate_probabilities.png``,
    ``ppc.png``; with ``nuts`` also ``posterior.nc`` (the ArviZ DataTree), ``summary.csv``
    (``az.summary``) and ``trace.png``.
    """
    import arviz as az

    num_experts = _positive_int(num_experts, "--experts")
    num_starts = _positive_int(num_starts, "--starts")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"--out: {str(out)!r} already exists; choose another folder or pass --overwrite"
        )
    data = read_csv(path, target=target, features=features)
    n, d = data.x.shape
    parameters = num_experts * (2 * d + 2)
    if n < max(2 * parameters, d + 2):
        raise ValueError(
            f"DATA: too few rows: {n} rows for {num_experts} experts on {d} features ({parameters} "
            f"parameters); need at least {max(2 * parameters, d + 2)}"
        )
    x, x_mean, x_scale = _standardise(data.x, data.feature_names)
    y, y_mean, y_scale = _standardise(data.y[:, None], [data.target])
    y = y[:, 0]

    def say(message):
        if verbose:
            print(message, flush=True)

    key = jax.random.key(seed)
    fit_key, nuts_key, check_key = jax.random.split(key, 3)
    with output_folder(out, overwrite=overwrite) as staging:
        fit = fit_moe(
            x,
            y,
            num_experts=num_experts,
            key=fit_key,
            link=link,
            num_starts=num_starts,
            intercepts=True,
            progress_bar=verbose,
        )
        params = fit.params
        say(f"read {n} rows, {d} features from {path}; fitted {num_experts} {params.link.name} experts")
        save_result(staging / "fit.npz", fit)
        (staging / "parameters.csv").write_text(_parameter_table(params, data.feature_names))
        (staging / "standardization.json").write_text(
            json.dumps(
                {
                    "features": data.feature_names,
                    "target": data.target,
                    "feature_mean": x_mean.tolist(),
                    "feature_scale": x_scale.tolist(),
                    "target_mean": float(y_mean[0]),
                    "target_scale": float(y_scale[0]),
                },
                indent=2,
            )
            + "\n"
        )
        summary = [
            f"data: {path} ({n} rows, features {data.feature_names}, target {data.target!r}), standardised",
            f"model: {num_experts} experts, link {params.link.name}, expert and gate intercepts",
            f"fit: {num_starts} EM starts ({', '.join(fit.start_labels)}); start {fit.start} "
            f"({fit.start_labels[fit.start]}) won; mean log-likelihood per point {fit.log_likelihood:.4f}; "
            f"EM iterations {fit.iterations}, converged {fit.converged}",
        ]
        plot_gates(params, x, data.feature_names, staging / "gate_probabilities.png")
        if nuts:
            say(f"NUTS: {num_chains} chains x ({num_warmup} warmup + {num_samples} draws)")
            result = run_nuts(
                x, y, fit, key=nuts_key, num_chains=num_chains, num_warmup=num_warmup, num_samples=num_samples
            )
            datatree = result.datatree
            datatree.to_netcdf(staging / "posterior.nc", engine="h5netcdf")
            table = az.summary(datatree)
            table.to_csv(staging / "summary.csv")
            summary.append("posterior summary (az.summary):\n" + table.to_string())
            plot_trace(datatree, staging / "trace.png")
            save_plot(az.plot_ppc_dist(datatree, backend="matplotlib"), staging / "ppc.png")
        else:
            # A plug-in predictive check: replicated y drawn from the point estimate.
            draws = np.stack(
                [
                    np.asarray(sample_response(params, x, key=draw_key))
                    for draw_key in jax.random.split(check_key, 50)
                ]
            )
            check = az.from_dict(
                {"posterior_predictive": {"y": draws[None]}, "observed_data": {"y": y}}, dims={"y": ["obs"]}
            )
            save_plot(az.plot_ppc_dist(check, backend="matplotlib"), staging / "ppc.png")
            summary.append("parameters (standardised units): see parameters.csv")
        (staging / "summary.txt").write_text("\n".join(summary) + "\n")
    say("\n".join(summary))
    say(f"outputs written to {out}/")
    return out
