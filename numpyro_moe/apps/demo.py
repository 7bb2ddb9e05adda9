"""The end-to-end demo on simulated data in the papers' setting: fit, then compare to the truth.

`run_demo` (behind ``numpyro-moe demo`` and ``make demo``) runs the whole pipeline: the tensor
method of moments for the experts -> EM over the gate -> joint EM, beside random-start EM
baselines and the oracle; then a small NUTS run started at the joint-EM fit on a subsample of the
training data, with its ArviZ summary, diagnostics (max r_hat, min bulk ESS, divergences) and
plots (posterior predictive check, trace, gate probabilities against the inputs).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from numpyro_moe import MoEParams, estimate_experts, fit_em, posterior_params, random_starts, run_nuts
from numpyro_moe.apps.folders import output_folder
from numpyro_moe.apps.plots import plot_gates, plot_trace, save_plot
from numpyro_moe.io import save_result
from numpyro_moe.metrics import expert_error, gating_error, heldout_log_likelihood, mean_squared_error
from numpyro_moe.simulation import sample_data, simulate

__all__ = ["format_table", "run_demo"]

COLUMNS = ("method", "expert_error", "gating_error", "heldout_loglik", "heldout_mse", "seconds")


def _say(message: str, verbose: bool) -> None:
    if verbose:
        print(message, flush=True)


def format_table(rows: list[dict]) -> str:
    """Plain-text table of result rows (dicts keyed by `COLUMNS`)."""
    header = f"{'method':<30}{'expert err':>11}{'gate err':>10}{'loglik/pt':>11}{'MSE':>9}{'sec':>8}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['method']:<30}{row['expert_error']:>11.4f}{row['gating_error']:>10.4f}"
            f"{row['heldout_loglik']:>11.4f}{row['heldout_mse']:>9.4f}{row['seconds']:>8.2f}"
        )
    return "\n".join(lines)


def _row(method: str, params: MoEParams, seconds: float, truth: MoEParams, x_test, y_test) -> dict:
    # The experts-only stage has no gate: its gate and held-out columns are NaN by design.
    experts_only = method == "tensor_experts_only"
    nan = float("nan")
    return {
        "method": method,
        "expert_error": expert_error(params, truth),
        "gating_error": nan if experts_only else gating_error(params, truth, x_test),
        "heldout_loglik": nan if experts_only else heldout_log_likelihood(params, x_test, y_test),
        "heldout_mse": nan if experts_only else mean_squared_error(params, x_test, y_test),
        "seconds": seconds,
    }


def _nuts_stage(
    staging: Path, x, y, *, start: MoEParams, key: jax.Array, num_chains: int, num_warmup: int, num_draws: int
) -> tuple[MoEParams, float, object, dict]:
    """NUTS from ``start`` on (x, y); writes posterior.nc, summary.csv and the three plots.

    Returns the posterior-mean parameters, the NUTS seconds, the ``az.summary`` table and the
    diagnostics.
    """
    import arviz as az
    import matplotlib

    matplotlib.use("Agg")

    began = time.perf_counter()
    result = run_nuts(
        x, y, start, key=key, num_chains=num_chains, num_warmup=num_warmup, num_samples=num_draws
    )
    seconds = time.perf_counter() - began
    datatree = result.datatree
    # Draws are relabelled to the start's expert labels, so their mean is a point estimate.
    mean = jax.tree_util.tree_map(lambda value: value.mean(axis=0), posterior_params(datatree))
    table = az.summary(datatree)
    diagnostics = {
        "rows": int(x.shape[0]),
        "chains": num_chains,
        "warmup": num_warmup,
        "draws": num_draws,
        "seconds": seconds,
        **result.diagnostics,  # max r_hat (NaN for one chain), min bulk ESS, divergences
    }
    datatree.to_netcdf(staging / "posterior.nc", engine="h5netcdf")
    table.to_csv(staging / "summary.csv")
    plot_gates(mean, np.asarray(x), [f"x{i}" for i in range(x.shape[1])], staging / "gate_probabilities.png")
    save_plot(az.plot_ppc_dist(datatree, backend="matplotlib"), staging / "ppc.png")
    plot_trace(datatree, staging / "trace.png")
    return mean, seconds, table, diagnostics


def _nuts_note(method: str, diagnostics: dict) -> str:
    return (
        f"{method}: posterior mean of NUTS started at the joint-EM fit, {diagnostics['chains']} chains x "
        f"({diagnostics['warmup']} warmup + {diagnostics['draws']} draws) on the first {diagnostics['rows']} "
        f"training rows (experts free, draws relabelled to the start); max r_hat "
        f"{diagnostics['max_r_hat']:.4f}, min bulk ESS {diagnostics['min_ess_bulk']:.0f}, "
        f"{diagnostics['divergences']} divergent transitions."
    )


def run_demo(
    out: str | Path,
    *,
    seed: int = 0,
    num_samples: int = 20_000,
    dim: int = 10,
    num_experts: int = 3,
    noise: float = 0.1,
    link: str = "linear",
    num_starts: int = 10,
    nuts: bool = True,
    nuts_samples: int = 2000,
    num_chains: int = 2,
    num_warmup: int = 1000,
    num_draws: int = 1000,
    overwrite: bool = False,
    verbose: bool = True,
) -> list[dict]:
    """Simulate the papers' setting, fit, and write a recovery table against the truth.

    Fits, on the same data: the tensor method of moments (ICML 2019) for the experts, then EM over
    the gate with those experts fixed, then joint EM from there; beside it, joint EM from one
    random start, the best of ``num_starts`` random-start EM runs, and the oracle (joint EM
    started at the truth).

    With ``nuts`` (the default), then runs `run_nuts` (experts free) with ``num_chains`` chains
    of ``num_warmup`` warmup + ``num_draws`` draws, started at the joint-EM fit, on the first
    ``min(num_samples, nuts_samples)`` training rows, and adds the row
    ``nuts_posterior_mean_n<rows>``: the posterior mean of the (relabelled) draws, scored like
    the other fits. Its ``seconds`` is the NUTS run (compilation, sampling, predictive).

    Writes into ``out`` (atomically; an existing folder is refused unless ``overwrite``):
    ``data.npz`` (train and held-out x, y), ``truth.npz`` and one ``<method>.npz`` per fit
    (``numpyro_moe.io.load_result`` reads them), ``results.json`` and ``results.txt``; with ``nuts`` also
    ``posterior.nc`` (the `run_nuts` DataTree, netCDF), ``summary.csv`` (``az.summary``),
    ``nuts.json`` (settings, seconds, max r_hat, min bulk ESS, divergences), ``ppc.png``
    (posterior predictive check), ``trace.png`` and ``gate_probabilities.png`` (gate
    probabilities at the posterior mean against the inputs). Returns the table rows.
    """
    out = Path(out)
    # Checked before any work, so that a bad setting costs nothing.
    counts = [
        ("--num-samples", num_samples),
        ("--dim", dim),
        ("--experts", num_experts),
        ("--starts", num_starts),
    ]
    if nuts:
        counts += [
            ("--nuts-samples", nuts_samples),
            ("--chains", num_chains),
            ("--num-warmup", num_warmup),
            ("--num-draws", num_draws),
        ]
    for flag, value in counts:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{flag}: expected an integer >= 1, got {value!r}")
    if not (isinstance(noise, int | float) and not isinstance(noise, bool) and noise > 0):
        raise ValueError(f"--noise: expected a number > 0, got {noise!r}")
    key = jax.random.key(seed)
    data_key, test_key, tensor_key, restart_key = jax.random.split(key, 4)
    nuts_key = jax.random.fold_in(key, 4)  # apart from the split: the fits do not depend on `nuts`
    notes = []
    with output_folder(out, overwrite=overwrite) as staging:
        _say(
            f"simulating n={num_samples}, d={dim}, k={num_experts}, link={link}, noise={noise}, "
            "orthogonal gates (the papers' setting)",
            verbose,
        )
        x, y, truth = simulate(
            key=data_key, num_samples=num_samples, dim=dim, num_experts=num_experts, noise=noise, link=link
        )
        x_test, y_test = sample_data(truth, key=test_key, num_samples=max(num_samples // 4, 1000))
        np.savez(staging / "data.npz", x=x, y=y, x_test=x_test, y_test=y_test)
        save_result(staging / "truth.npz", truth)

        stages: dict[str, MoEParams] = {}

        def tensor():
            estimate = estimate_experts(x, y, num_experts=num_experts, link=link, key=tensor_key)
            return estimate.to_params()

        def random_em(count):
            starts = random_starts(
                x, y, num_experts=num_experts, num_starts=count, key=restart_key, link=link
            )
            return fit_em(x, y, starts).params

        fits: list[tuple[str, Callable[[], MoEParams]]] = [
            ("tensor_experts_only", tensor),
            (
                "tensor+gating_em",
                lambda: fit_em(x, y, stages["tensor_experts_only"], fix=("experts",)).params,
            ),
            ("tensor+gating_em+joint_em", lambda: fit_em(x, y, stages["tensor+gating_em"]).params),
            ("baseline_em_1_random_start", lambda: random_em(1)),
            (f"baseline_em_best_of_{num_starts}", lambda: random_em(num_starts)),
            ("oracle_em_from_truth", lambda: fit_em(x, y, truth).params),
        ]
        steps = len(fits) + int(nuts)
        rows = []
        for step, (name, fit) in enumerate(fits, start=1):
            _say(f"[{step}/{steps}] {name} ...", verbose)
            start = time.perf_counter()
            params = jax.block_until_ready(fit())
            seconds = time.perf_counter() - start
            stages[name] = params
            save_result(staging / f"{name.replace('+', '_')}.npz", params)
            rows.append(_row(name, params, seconds, truth, x_test, y_test))
            _say(f"      done in {seconds:.2f} s, expert error {rows[-1]['expert_error']:.4f}", verbose)

        if nuts:
            rows_used = min(num_samples, nuts_samples)
            name = f"nuts_posterior_mean_n{rows_used}"
            _say(
                f"[{steps}/{steps}] {name}: NUTS from the joint-EM fit, {num_chains} chains x "
                f"({num_warmup} warmup + {num_draws} draws) on the first {rows_used} training rows ...",
                verbose,
            )
            mean, seconds, summary, diagnostics = _nuts_stage(
                staging,
                x[:rows_used],
                y[:rows_used],
                start=stages["tensor+gating_em+joint_em"],
                key=nuts_key,
                num_chains=num_chains,
                num_warmup=num_warmup,
                num_draws=num_draws,
            )
            save_result(staging / f"{name}.npz", mean)
            rows.append(_row(name, mean, seconds, truth, x_test, y_test))
            (staging / "nuts.json").write_text(json.dumps(diagnostics, indent=2) + "\n")
            notes.append(_nuts_note(name, diagnostics))
            _say(f"      done in {seconds:.2f} s, expert error {rows[-1]['expert_error']:.4f}", verbose)
            _say("\nposterior summary (az.summary, also in summary.csv):\n" + summary.to_string(), verbose)
        table = format_table(rows)
        (staging / "results.txt").write_text("\n\n".join([table, *notes]) + "\n")
        (staging / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    _say("\n" + table, verbose)
    _say(
        "\nexpert error: min over permutations of ||A_hat - A||_F / ||A||_F; gate err: mean total "
        "variation of the gate on held-out x; loglik/pt and MSE on held-out data.",
        verbose,
    )
    for note in notes:
        _say(note, verbose)
    _say(f"outputs written to {out}/", verbose)
    return rows
