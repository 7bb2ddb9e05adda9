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

from numpyro_moe._io import output_folder, save_params
from numpyro_moe._links import resolve_link
from numpyro_moe._params import MoEParams, gate_probabilities
from numpyro_moe._pipeline import fit_moe
from numpyro_moe._simulate import sample_response
from numpyro_moe._validation import check_positive_int

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
                raise ValueError(f"column {name!r}: line {row_number} holds {cell!r}; expected a finite number")
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
        lines.append(f"expert {i}," + ",".join(f"{float(v):.6g}" for v in params.experts[i]) + f",{intercept}")
    for i in range(params.num_experts):
        intercept = "" if params.gate_intercepts is None else f"{float(params.gate_intercepts[i]):.6g}"
        lines.append(f"gate {i}," + ",".join(f"{float(v):.6g}" for v in params.gates[i]) + f",{intercept}")
    lines.append(f"noise,{float(params.noise):.6g}")
    return "\n".join(lines) + "\n"


def _plot_gates(params: MoEParams, x: np.ndarray, feature_names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probabilities = np.asarray(gate_probabilities(params, x))
    # The features the gate leans on most, at most six.
    strength = np.abs(np.asarray(params.gates)).sum(axis=0)
    shown = np.argsort(-strength)[: min(6, x.shape[1])]
    figure, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3), squeeze=False, sharey=True)
    for axis, feature in zip(axes[0], shown, strict=True):
        for expert in range(probabilities.shape[1]):
            axis.scatter(x[:, feature], probabilities[:, expert], s=3, alpha=0.4, label=f"expert {expert}")
        axis.set_xlabel(f"{feature_names[feature]} (standardised)")
    axes[0, 0].set_ylabel("P(expert | x)")
    axes[0, -1].legend(markerscale=4, fontsize="small")
    figure.suptitle("Gate probabilities against the inputs")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _save_plot(collection, path: Path) -> None:
    """Save an ArviZ ``PlotCollection`` (matplotlib backend) and close its figure."""
    import matplotlib.pyplot as plt

    collection.savefig(path)
    plt.close(collection.get_viz("figure"))


MAX_TRACE_PANELS = 60


def _plot_trace(datatree, path: Path) -> None:
    """``az.plot_trace`` of every parameter, or of the first features when that is over 60 panels."""
    import arviz as az

    posterior = datatree["posterior"]
    per_feature = sum(
        int(np.prod([posterior.sizes[dim] for dim in value.dims if dim not in ("chain", "draw", "feature")]))
        for value in posterior.data_vars.values() if "feature" in value.dims
    )
    others = sum(
        int(np.prod([posterior.sizes[dim] for dim in value.dims if dim not in ("chain", "draw")]))
        for value in posterior.data_vars.values() if "feature" not in value.dims
    )
    features = posterior.sizes["feature"]
    if per_feature:
        features = max(1, min(features, (MAX_TRACE_PANELS - others) // per_feature))
    coords = {"feature": np.arange(features)} if features < posterior.sizes["feature"] else None
    with az.rc_context({"plot.max_subplots": others + per_feature * features}):
        _save_plot(az.plot_trace(datatree, coords=coords, backend="matplotlib"), path)


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
    num_restarts: int = 4,
    num_chains: int = 4,
    num_warmup: int = 500,
    num_samples: int = 500,
    overwrite: bool = False,
    verbose: bool = True,
) -> Path:
    """Fit a mixture of experts to a CSV file and write the results into the folder ``out``.

    Columns are standardised (mean 0, sd 1; the transform is saved in ``standardization.json``),
    the model has expert and gate intercepts, and the fit is `fit_moe` (tensor estimate among
    random starts, joint EM); with ``nuts``, `run_nuts` from that fit.

    Outputs: ``params.npz`` (point estimate, standardised units), ``parameters.csv``,
    ``standardization.json``, ``summary.txt``, ``gate_probabilities.png``, ``ppc.png``; with
    ``nuts`` also ``posterior.nc`` (the ArviZ DataTree), ``summary.csv`` (``az.summary``) and
    ``trace.png``.
    """
    import arviz as az

    link_name = resolve_link(link).name
    num_experts = check_positive_int(num_experts, "--experts")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"--out: {str(out)!r} already exists; choose another folder or pass --overwrite")
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
        say(f"read {n} rows, {d} features from {path}; fitting {num_experts} {link_name} experts")
        fit = fit_moe(x, y, num_experts=num_experts, key=fit_key, link=link, num_restarts=num_restarts,
                      intercepts=True, progress=verbose)
        params = fit.params
        save_params(staging / "params.npz", params)
        (staging / "parameters.csv").write_text(_parameter_table(params, data.feature_names))
        (staging / "standardization.json").write_text(json.dumps({
            "features": data.feature_names, "target": data.target,
            "feature_mean": x_mean.tolist(), "feature_scale": x_scale.tolist(),
            "target_mean": float(y_mean[0]), "target_scale": float(y_scale[0]),
        }, indent=2) + "\n")
        summary = [
            f"data: {path} ({n} rows, features {data.feature_names}, target {data.target!r}), standardised",
            f"model: {num_experts} experts, link {link_name}, expert and gate intercepts",
            f"fit: tensor method + {num_restarts} random starts, joint EM; start {fit.chosen_start} won "
            f"(0 = tensor estimate); mean log-likelihood per point {fit.em.log_likelihood:.4f}; "
            f"EM iterations {fit.em.iterations}, converged {fit.em.converged}",
        ]
        _plot_gates(params, x, data.feature_names, staging / "gate_probabilities.png")
        if nuts:
            say(f"NUTS: {num_chains} chains x ({num_warmup} warmup + {num_samples} draws)")
            result = _run_nuts(x, y, num_experts, fit, nuts_key, link, num_chains, num_warmup, num_samples)
            datatree = result.datatree
            datatree.to_netcdf(staging / "posterior.nc", engine="h5netcdf")
            table = az.summary(datatree)
            table.to_csv(staging / "summary.csv")
            summary.append("posterior summary (az.summary):\n" + table.to_string())
            _plot_trace(datatree, staging / "trace.png")
            _save_plot(az.plot_ppc_dist(datatree, backend="matplotlib"), staging / "ppc.png")
        else:
            # A plug-in predictive check: replicated y drawn from the point estimate.
            draws = np.stack([
                np.asarray(sample_response(draw_key, params, x, link=link))
                for draw_key in jax.random.split(check_key, 50)
            ])
            check = az.from_dict(
                {"posterior_predictive": {"y": draws[None]}, "observed_data": {"y": y}}, dims={"y": ["obs"]}
            )
            az.plot_ppc_dist(check, backend="matplotlib").savefig(staging / "ppc.png")
            summary.append("parameters (standardised units): see parameters.csv")
        (staging / "summary.txt").write_text("\n".join(summary) + "\n")
    say("\n".join(summary))
    say(f"outputs written to {out}/")
    return out


def _run_nuts(x, y, num_experts, fit, key, link, num_chains, num_warmup, num_samples):
    from numpyro_moe._bayes import run_nuts

    return run_nuts(
        x, y, num_experts=num_experts, init=fit, key=key, link=link, intercepts=True,
        num_chains=num_chains, num_warmup=num_warmup, num_samples=num_samples,
    )
