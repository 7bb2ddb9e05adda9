# %% [markdown]
# # Scale: data on disk, several devices, the command line
#
# A mixture of experts fitted by `numpyro-moe` reads its data in fixed-size blocks: the tensor
# method's moments always did, and EM does too when the data are a NumPy memmap, a Dask array or
# an iterable of chunks. Memory then stays flat in n, a new n compiles nothing new, and the same
# blocks can be split over several devices, or the rows over several hosts.
#
# This tutorial writes simulated data to disk, fits them out of core, times the fit against n,
# splits the passes over four devices, reads a Dask array, and finishes with the command line on
# a CSV file.
#
# Set the environment variable `CI` to run it at smoke size.

# %%
import os

# Four CPU "devices", to show the sharded passes on any machine. This must be set before JAX
# starts; on a machine with several GPUs, leave it out: `devices="all"` then means the GPUs.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import dask.array
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

import numpyro_moe as moe
from numpyro_moe.metrics import expert_error
from numpyro_moe.simulation import sample_response, simulate

smoke_test = "CI" in os.environ
num_samples = 40_000 if smoke_test else 1_000_000
sizes = [5_000, 10_000, 20_000, 40_000] if smoke_test else [31_250, 62_500, 125_000, 250_000, 500_000, 1_000_000]
dim, num_experts = 10, 3
CHUNK = 8_192  # rows per block: every size below then shares one set of compiled passes

FIGURES = Path(os.environ.get("TUTORIAL_FIGURES", "tutorial-figures")) / "scale"
FIGURES.mkdir(parents=True, exist_ok=True)


def save_figure(figure, name):
    """Write a matplotlib figure to FIGURES/NAME.png."""
    figure.savefig(FIGURES / f"{name}.png", dpi=90, bbox_inches="tight")


# %% [markdown]
# ## Data on disk
#
# The papers' setting (inputs `x ~ N(0, I_10)`, three linear experts, orthogonal gates, noise 0.1),
# written block by block into two `.npy` files, as data too large for memory would be: no step
# below holds all of `x` at once.

# %%
workdir = Path(tempfile.mkdtemp(prefix="numpyro-moe-scale-"))
truth = simulate(key=jax.random.key(0), num_samples=16, dim=dim, num_experts=num_experts).truth
x_file = np.lib.format.open_memmap(workdir / "x.npy", mode="w+", dtype=np.float64, shape=(num_samples, dim))
y_file = np.lib.format.open_memmap(workdir / "y.npy", mode="w+", dtype=np.float64, shape=(num_samples,))
rng = np.random.default_rng(1)
for index, start in enumerate(range(0, num_samples, 100_000)):
    stop = min(start + 100_000, num_samples)
    block = rng.standard_normal((stop - start, dim))
    x_file[start:stop] = block
    y_file[start:stop] = np.asarray(sample_response(truth, block, key=jax.random.key(100 + index)))
x_file.flush(), y_file.flush()
del x_file, y_file

x = np.load(workdir / "x.npy", mmap_mode="r")  # memmaps: pages are read as the passes reach them
y = np.load(workdir / "y.npy", mmap_mode="r")
print(f"x: {x.shape}, {x.nbytes / 2**20:.0f} MiB on disk")

# %% [markdown]
# ## Fitting out of core
#
# `fit_moe` sees memmaps and streams: the moments take two passes, and each EM iteration takes two
# more (the sums of the E-step and of the M-step's Newton systems, then a step search over
# candidate steps). The tensor start is all it needs here (`num_starts=1`). Blocks hold
# `chunk_size` rows; by default a power of two of about 16 MB of x, smaller for small n.

# %%
clock = time.perf_counter()
fit = moe.fit_moe(x, y, num_experts=num_experts, key=jax.random.key(2), num_starts=1, chunk_size=CHUNK)
seconds = time.perf_counter() - clock
print(f"streamed fit_moe: {seconds:.1f} s, {fit.iterations} joint EM iterations")
print(f"expert error against the truth: {expert_error(fit.params.experts, truth.experts):.4f}")
print(f"log-likelihood per point: {fit.log_likelihood:.5f}")

# %% [markdown]
# Both EMs take one Newton step on the gate per iteration, but the streamed one takes every step
# from the sums of one pass at the current parameters, so their paths differ a little; their
# optimum is the same. On the first rows, loaded into memory:

# %%
rows = sizes[0]
in_memory = moe.fit_moe(np.asarray(x[:rows]), np.asarray(y[:rows]), num_experts=num_experts, key=jax.random.key(2),
                        num_starts=1)
streamed = moe.fit_moe(x[:rows], y[:rows], num_experts=num_experts, key=jax.random.key(2), num_starts=1,
                       chunk_size=CHUNK)
print(f"n = {rows}: log-likelihood per point in memory {in_memory.log_likelihood:.8f}, "
      f"streamed {streamed.log_likelihood:.8f}")
print(f"largest difference of the experts: "
      f"{np.max(np.abs(np.asarray(in_memory.params.experts) - np.asarray(streamed.params.experts))):.1e}")

# %% [markdown]
# ## Time against n
#
# Every pass compiles once per model structure and block size; a new n reuses the programs (the
# fits above compiled them). The fit's time then grows with n, as the number of passes times the
# time of one pass; at small n the fixed costs per pass (the solves between passes, the host's
# loop) weigh more, so the curve is flatter there than the line proportional to n.

# %%
timings = []
for size in sizes:
    clock = time.perf_counter()
    sized = moe.fit_moe(x[:size], y[:size], num_experts=num_experts, key=jax.random.key(2), num_starts=1,
                        chunk_size=CHUNK)
    timings.append(time.perf_counter() - clock)
    print(f"n = {size:>9,}: {timings[-1]:6.2f} s, expert error {expert_error(sized.params.experts, truth.experts):.4f}")

figure, axis = plt.subplots(figsize=(5.5, 4))
axis.loglog(sizes, timings, "o-", label="streamed fit_moe (moments, gate EM, joint EM)")
reference = np.asarray(sizes) / sizes[-1] * timings[-1]
axis.loglog(sizes, reference, "--", color="gray", label="proportional to n")
axis.set_xlabel("n (rows read from the memmap)")
axis.set_ylabel("seconds")
axis.set_title("Out-of-core fit: time against n")
axis.legend(fontsize=8)
save_figure(figure, "time_against_n")

# %% [markdown]
# ## Several devices
#
# With `devices="all"` every block is split by rows over the devices (one mesh axis) and the
# compiled passes run on all of them: XLA all-reduces the sums. The estimate and the fit are
# those of one device, up to the order of the additions.

# %%
print(jax.devices())
subset_x, subset_y = x[: sizes[1]], y[: sizes[1]]
one = moe.fit_moe(subset_x, subset_y, num_experts=num_experts, key=jax.random.key(2), num_starts=1, chunk_size=CHUNK)
four = moe.fit_moe(subset_x, subset_y, num_experts=num_experts, key=jax.random.key(2), num_starts=1, chunk_size=CHUNK,
                   devices="all")
print(f"one device against four: largest difference of the experts "
      f"{np.max(np.abs(np.asarray(one.params.experts) - np.asarray(four.params.experts))):.1e}")

# %% [markdown]
# On several hosts, each process calls `jax.distributed.initialize(...)` first, loads its own
# rows and calls the same function; every pass's sums are added across the processes and every
# process gets the fit of all the rows (see the documentation's page on scale).
#
# ## A Dask array
#
# A Dask array is read block by block the same way: each block is computed when the pass reaches
# it (by a Dask cluster, when a `dask.distributed.Client` is active). The blocks and so the fit
# are the memmap's.

# %%
lazy_x = dask.array.from_array(subset_x, chunks=(5_000, dim))
lazy_y = dask.array.from_array(subset_y, chunks=5_000)
from_dask = moe.fit_moe(lazy_x, lazy_y, num_experts=num_experts, key=jax.random.key(2), num_starts=1,
                        chunk_size=CHUNK)
print(f"Dask against the memmap: largest difference of the experts "
      f"{np.max(np.abs(np.asarray(one.params.experts) - np.asarray(from_dask.params.experts))):.1e}")

# %% [markdown]
# ## The command line on a CSV
#
# `numpyro-moe fit` reads a CSV, chooses k (here fixed at 3), standardises the columns and writes
# a fit folder; `numpyro-moe predict` turns a new CSV into predictions in the target's units.

# %%
train_rows = 2_000 if smoke_test else 20_000
columns = [f"x{j}" for j in range(dim)]
table = pd.DataFrame(np.asarray(x[:train_rows]), columns=columns).assign(y=np.asarray(y[:train_rows]))
table.to_csv(workdir / "train.csv", index=False)
new = pd.DataFrame(np.asarray(x[-1_000:]), columns=columns).assign(y=np.asarray(y[-1_000:]))
new.to_csv(workdir / "new.csv", index=False)
command = [sys.executable, "-m", "numpyro_moe.apps.cli"]
fitted = subprocess.run(
    [*command, "fit", str(workdir / "train.csv"), "--target", "y", "--experts", "3", "--out", str(workdir / "fit")],
    capture_output=True, text=True, check=True,
)
print(fitted.stdout[-1500:])  # what the command says about its fit
subprocess.run(
    [*command, "predict", str(workdir / "fit"), str(workdir / "new.csv"), "--out", str(workdir / "predictions.csv"),
     "--quiet"],
    capture_output=True, text=True, check=True,
)
predictions = pd.read_csv(workdir / "predictions.csv")
print(predictions.head())
print(f"held-out log density per point: {predictions['log_density'].mean():.3f}")

figure, axis = plt.subplots(figsize=(5, 4.5))
axis.scatter(new["y"], predictions["mean"], s=5, alpha=0.5, label="predictive mean")
axis.plot([new["y"].min(), new["y"].max()], [new["y"].min(), new["y"].max()], color="gray", lw=1)
axis.set_xlabel("observed y (new rows)")
axis.set_ylabel("predicted")
axis.set_title("numpyro-moe predict on a new CSV")
save_figure(figure, "cli_predictions")

# %% [markdown]
# The files were written to a temporary folder; remove it.

# %%
import shutil

shutil.rmtree(workdir)
