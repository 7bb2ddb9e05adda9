"""The end-to-end demo on simulated data in the papers' setting: fit, then compare to the truth."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from numpyro_moe._io import output_folder, save_params
from numpyro_moe._map import fit_map
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
    header = f"{'method':<28}{'expert err':>11}{'gate err':>10}{'loglik/pt':>11}{'MSE':>9}{'sec':>8}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['method']:<28}{row['expert_error']:>11.4f}{row['gating_error']:>10.4f}"
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
    num_steps: int = 2000,
    overwrite: bool = False,
    verbose: bool = True,
) -> list[dict]:
    """Simulate the papers' setting, fit, and write a recovery table against the truth.

    Writes into ``out`` (atomically; an existing folder is refused unless ``overwrite``):
    ``data.npz`` (train and held-out x, y), ``truth.npz`` and one ``<method>.npz`` per fit
    (`save_params` format), ``results.json`` and ``results.txt``. Returns the table rows.
    """
    out = Path(out)
    key = jax.random.key(seed)
    data_key, test_key, fit_key = jax.random.split(key, 3)
    with output_folder(out, overwrite=overwrite) as staging:
        _say(
            f"[1/3] simulating n={num_samples}, d={dim}, k={num_experts}, link={link}, "
            f"noise={noise}, orthogonal gates",
            verbose,
        )
        x, y, truth = simulate(
            data_key, num_samples=num_samples, dim=dim, num_experts=num_experts, noise=noise, link=link
        )
        x_test, y_test = sample_data(test_key, truth, num_samples=max(num_samples // 4, 1000), link=link)
        np.savez(staging / "data.npz", x=x, y=y, x_test=x_test, y_test=y_test)
        save_params(staging / "truth.npz", truth)

        fits: list[tuple[str, Callable[[], MoEParams]]] = [
            (
                "map_random_start",
                lambda: fit_map(
                    x, y, num_experts=num_experts, link=link, key=fit_key, num_steps=num_steps,
                    progress_bar=verbose,
                ).params,
            ),
            (
                "oracle_map_from_truth",
                lambda: fit_map(
                    x, y, num_experts=num_experts, link=link, key=fit_key, init=truth,
                    num_steps=num_steps, progress_bar=verbose,
                ).params,
            ),
        ]
        rows = []
        for step, (name, fit) in enumerate(fits, start=2):
            _say(f"[{step}/{len(fits) + 1}] fitting {name}", verbose)
            start = time.perf_counter()
            params = jax.block_until_ready(fit())
            seconds = time.perf_counter() - start
            save_params(staging / f"{name}.npz", params)
            rows.append(
                {
                    "method": name,
                    "expert_error": expert_error(params, truth),
                    "gating_error": gating_error(params, truth, x_test),
                    "heldout_loglik": heldout_log_likelihood(params, x_test, y_test, link=link),
                    "heldout_mse": mean_squared_error(params, x_test, y_test, link=link),
                    "seconds": seconds,
                }
            )
        table = format_table(rows)
        (staging / "results.txt").write_text(table + "\n")
        (staging / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    _say("\n" + table, verbose)
    _say(f"\noutputs written to {out}/", verbose)
    return rows
