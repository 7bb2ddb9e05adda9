"""The applications' figures: gate probabilities against the inputs, trace plots, predictive checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from numpyro_moe import MoEParams

__all__ = ["MAX_GATE_POINTS", "MAX_TRACE_PANELS", "plot_gates", "plot_predictive_check", "plot_trace", "save_plot"]

MAX_TRACE_PANELS = 60
MAX_GATE_POINTS = 2_000


def plot_gates(params: MoEParams, x: np.ndarray, feature_names: list[str], path: Path) -> None:
    """Scatter of P(expert | x) against the (at most six) features the gate leans on most, on at
    most `MAX_GATE_POINTS` rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # At most MAX_GATE_POINTS rows, evenly spread: a scatter of more shows nothing more and costs
    # seconds to draw (at n = 200,000, most of the CLI's time after the fit).
    rows = np.linspace(0, x.shape[0] - 1, min(x.shape[0], MAX_GATE_POINTS)).astype(int)
    x = np.asarray(x)[rows]
    # The gate's softmax on the host (NumPy): a plot compiles nothing.
    gates = np.asarray(params.gates)
    logits = x @ gates.T
    if params.gate_intercepts is not None:
        logits = logits + np.asarray(params.gate_intercepts)
    logits = logits - logits.max(axis=1, keepdims=True)
    probabilities = np.exp(logits)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
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


def plot_predictive_check(observed: np.ndarray, replicated: np.ndarray, path: Path) -> None:
    """Density of the observed y (n,) against that of each replicate (draws, n), as histograms
    on shared bins: the point fit's predictive check, drawn without ArviZ (whose import alone
    takes seconds) because a point fit has no posterior to show."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    observed = np.asarray(observed, dtype=float)
    replicated = np.asarray(replicated, dtype=float)
    edges = np.histogram_bin_edges(np.concatenate([observed, replicated.ravel()]), bins=60)
    centres = (edges[:-1] + edges[1:]) / 2
    densities = np.stack([np.histogram(draw, bins=edges, density=True)[0] for draw in replicated])
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(centres, densities.T, color="C0", alpha=0.15, linewidth=0.8)
    axis.plot([], [], color="C0", alpha=0.5, label=f"replicated y ({len(replicated)} draws from the fit)")
    axis.plot(centres, densities.mean(axis=0), color="C0", linestyle="--", label="mean of the replicates")
    axis.plot(centres, np.histogram(observed, bins=edges, density=True)[0], color="black", label="observed y")
    axis.set_xlabel("y (standardised)")
    axis.set_ylabel("density")
    axis.legend(fontsize="small")
    figure.suptitle("Predictive check of the point fit")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def save_plot(collection, path: Path) -> None:
    """Save an ArviZ ``PlotCollection`` (matplotlib backend) and close its figure."""
    import matplotlib.pyplot as plt

    collection.savefig(path)
    plt.close(collection.get_viz("figure"))


def plot_trace(datatree, path: Path) -> None:
    """``az.plot_trace`` of every parameter, or of the first features when that is over 60 panels."""
    import arviz as az

    posterior = datatree["posterior"]
    per_feature = sum(
        int(np.prod([posterior.sizes[dim] for dim in value.dims if dim not in ("chain", "draw", "feature")]))
        for value in posterior.data_vars.values()
        if "feature" in value.dims
    )
    others = sum(
        int(np.prod([posterior.sizes[dim] for dim in value.dims if dim not in ("chain", "draw")]))
        for value in posterior.data_vars.values()
        if "feature" not in value.dims
    )
    features = posterior.sizes["feature"]
    if per_feature:
        features = max(1, min(features, (MAX_TRACE_PANELS - others) // per_feature))
    coords = {"feature": np.arange(features)} if features < posterior.sizes["feature"] else None
    with az.rc_context({"plot.max_subplots": others + per_feature * features}):
        save_plot(az.plot_trace(datatree, coords=coords, backend="matplotlib"), path)
