"""The end-to-end demo on simulated data in the papers' setting: fit, then compare to the truth."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from numpyro_moe._baselines import fit_em_restarts
from numpyro_moe._experts import estimate_experts
from numpyro_moe._fit import fit_em, fit_gating
from numpyro_moe._io import output_folder, save_params
from numpyro_moe._metrics import (
    expert_error,
    gating_error,
    heldout_log_likelihood,
    mean_squared_error,
)
from numpyro_moe._params import MoEParams
from numpyro_moe._simulate import sample_data, simulate

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


def run_demo(
    out: str | Path,
    *,
    seed: int = 0,
    num_samples: int = 20_000,
    dim: int = 10,
    num_experts: int = 3,
    noise: float = 0.1,
    link: str = "linear",
    num_restarts: int = 10,
    overwrite: bool = False,
    verbose: bool = True,
) -> list[dict]:
    """Simulate the papers' setting, fit, and write a recovery table against the truth.

    Fits, on the same data: the tensor method of moments (ICML 2019) for the experts, then EM over
    the gate with those experts fixed, then joint EM from there; beside it, joint EM from one
    random start, the best of ``num_restarts`` random-start EM runs, and the oracle (joint EM
    started at the truth).

    Writes into ``out`` (atomically; an existing folder is refused unless ``overwrite``):
    ``data.npz`` (train and held-out x, y), ``truth.npz`` and one ``<method>.npz`` per fit
    (`save_params` format), ``results.json`` and ``results.txt``. Returns the table rows.
    """
    out = Path(out)
    key = jax.random.key(seed)
    data_key, test_key, tensor_key, restart_key = jax.random.split(key, 4)
    with output_folder(out, overwrite=overwrite) as staging:
        _say(
            f"simulating n={num_samples}, d={dim}, k={num_experts}, link={link}, noise={noise}, "
            "orthogonal gates (the papers' setting)",
            verbose,
        )
        x, y, truth = simulate(
            data_key, num_samples=num_samples, dim=dim, num_experts=num_experts, noise=noise, link=link
        )
        x_test, y_test = sample_data(test_key, truth, num_samples=max(num_samples // 4, 1000), link=link)
        np.savez(staging / "data.npz", x=x, y=y, x_test=x_test, y_test=y_test)
        save_params(staging / "truth.npz", truth)

        stages: dict[str, MoEParams] = {}

        def tensor():
            estimate = estimate_experts(x, y, num_experts=num_experts, link=link, key=tensor_key)
            return estimate.to_params()

        fits: list[tuple[str, Callable[[], MoEParams]]] = [
            ("tensor_experts_only", tensor),
            ("tensor+gating_em", lambda: fit_gating(x, y, stages["tensor_experts_only"], link=link)),
            ("tensor+gating_em+joint_em", lambda: fit_em(x, y, stages["tensor+gating_em"], link=link).params),
            (
                "baseline_em_1_random_start",
                lambda: fit_em_restarts(
                    x, y, num_experts=num_experts, key=restart_key, num_restarts=1, link=link
                ).best.params,
            ),
            (
                f"baseline_em_best_of_{num_restarts}",
                lambda: fit_em_restarts(
                    x, y, num_experts=num_experts, key=restart_key, num_restarts=num_restarts, link=link
                ).best.params,
            ),
            ("oracle_em_from_truth", lambda: fit_em(x, y, truth, link=link).params),
        ]
        rows = []
        for step, (name, fit) in enumerate(fits, start=1):
            _say(f"[{step}/{len(fits)}] {name} ...", verbose)
            start = time.perf_counter()
            params = jax.block_until_ready(fit())
            seconds = time.perf_counter() - start
            stages[name] = params
            save_params(staging / f"{name.replace('+', '_')}.npz", params)
            experts_only = name == "tensor_experts_only"
            rows.append(
                {
                    "method": name,
                    "expert_error": expert_error(params, truth),
                    "gating_error": float("nan") if experts_only else gating_error(params, truth, x_test),
                    "heldout_loglik": float("nan") if experts_only else heldout_log_likelihood(
                        params, x_test, y_test, link=link
                    ),
                    "heldout_mse": float("nan") if experts_only else mean_squared_error(
                        params, x_test, y_test, link=link
                    ),
                    "seconds": seconds,
                }
            )
            _say(f"      done in {seconds:.2f} s, expert error {rows[-1]['expert_error']:.4f}", verbose)
        table = format_table(rows)
        (staging / "results.txt").write_text(table + "\n")
        (staging / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    _say("\n" + table, verbose)
    _say(
        "\nexpert error: min over permutations of ||A_hat - A||_F / ||A||_F; gate err: mean total "
        "variation of the gate on held-out x; loglik/pt and MSE on held-out data.",
        verbose,
    )
    _say(f"outputs written to {out}/", verbose)
    return rows
