"""Streamed cross-moments of the tensor method: two passes, O(n d^2 + n d k) work, O(d^2) memory.

Pass 1 accumulates, per fixed-size chunk, ``sum x``, ``sum x x^T`` and ``sum P2(y) x x^T``, plus power sums of y and of each feature. From them come the
standardisation ``z = W^T (x - mean)`` (W = covariance^{-1/2}) and T2 in z-coordinates, with the
sample mean of P2(y) subtracted (``E[S2(z)] = 0``, so this is the same expectation with less
variance). For large d, T2's top eigenspace is found matrix-free instead: pass 1 then keeps only
the sketch ``sum P2(y) x x^T Omega`` for a random (d, p) probe matrix Omega, p a little above k
(a single-pass randomised eigensolver), so that part costs O(n d p). Pass 2 projects each chunk
onto k whitened directions, ``u = B^T (x - mean)`` (in float64; for host data by NumPy's BLAS
straight from the data, a bandwidth-bound product), and accumulates the k x k x k third moment:
no d x d x d tensor is ever formed.

All sums are of data shifted by the means of the first rows (``x - x_shift``, ``P2 - p2_shift``),
so no sum cancels; with ``precision="mixed"`` each chunk's pass-1 products are formed in float32
(twice the speed of float64 on a CPU) and summed in float64.

Data come as arrays or as a re-iterable source of ``(x_chunk, y_chunk)`` pairs; they are re-cut
into blocks of ``chunk_size`` rows, filled across the user's chunks, the last one zero-padded
(the kernels mask the padding rows), so each pass compiles once; the sums stay on the device
between blocks.

Several devices and hosts, on JAX's own machinery. With ``devices`` (`data_mesh`), every block is
split by rows over a one-axis `jax.sharding.Mesh` (``NamedSharding(mesh, P("rows"))``) and the
compiled kernels run on all of them at once: XLA partitions each block's products and all-reduces
the sums, which come back replicated. Under ``jax.distributed`` (several processes, one per host),
each process passes its own rows: it streams them through its own devices, and every pass's
totals, a few d x d arrays, are summed across the processes
(`jax.experimental.multihost_utils.process_allgather`); the pilot rows that set the shifts are
process 0's, broadcast to all, so every process computes the same sums, the same estimate and the
same fit.
"""

from __future__ import annotations

import mmap
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from numpyro_moe._transforms import OutputTransforms

__all__ = [
    "DataSource",
    "resolve_chunk_size",
    "FirstPass",
    "as_data_source",
    "data_mesh",
    "first_pass",
    "p2_sketch",
    "pilot_rows",
    "pilot_shifts",
    "whitened_third_moment",
]

DEFAULT_CHUNK_SIZE = None  # chosen from d by `resolve_chunk_size`
_CHUNK_ELEMENTS = 2**21  # ~16 MB of float64 per chunk of x


def resolve_chunk_size(chunk_size: int | None, dim: int, num_samples: int | None = None) -> int:
    """Rows per chunk: ``chunk_size`` if given, else a power of two with about 2^21 entries,
    and no more than the next power of two above ``num_samples`` (no padding to a huge chunk
    for small data, while data of similar size still share one compiled kernel)."""
    if chunk_size is not None:
        return chunk_size
    rows = max(_CHUNK_ELEMENTS // max(dim, 1), 1024)
    rows = min(1 << (rows.bit_length() - 1), 1 << 18)
    if num_samples is not None:
        rows = min(rows, 1 << max(num_samples - 1, 1).bit_length())
    return rows


class DataSource(NamedTuple):
    """Re-iterable ``(x_chunk, y_chunk)`` pairs with known dimension.

    ``chunks()`` returns a fresh iterator each call; ``dim`` is d; ``num_samples`` is n if
    known up front (arrays), else None (under ``jax.distributed``: this process's rows);
    ``mesh`` the devices each block is split over by rows (None: JAX's default device).
    """

    chunks: Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]
    dim: int
    num_samples: int | None
    mesh: Mesh | None = None


def data_mesh(devices) -> Mesh | None:
    """The one-axis (``"rows"``) mesh of ``devices``: None (JAX's default device, no mesh),
    ``"all"`` (every device of this process), a positive int (the first that many), or a
    sequence of this process's `jax.Device` objects."""
    if devices is None:
        return None
    local = jax.local_devices()
    if isinstance(devices, str):
        if devices != "all":
            raise ValueError(f"devices: expected None, 'all', a number of devices or a list of devices, got {devices!r}")
        chosen = local
    elif isinstance(devices, int | np.integer) and not isinstance(devices, bool):
        if not 1 <= devices <= len(local):
            raise ValueError(f"devices: expected 1 to {len(local)} (the devices of this process), got {devices}")
        chosen = local[: int(devices)]
    else:
        try:
            chosen = list(devices)
        except TypeError:
            raise TypeError(
                f"devices: expected None, 'all', a number of devices or a list of devices, got {type(devices).__name__}"
            ) from None
        if not chosen or not all(device in local for device in chosen):
            raise ValueError(f"devices: expected a non-empty list of this process's devices {local}, got {chosen}")
    return Mesh(np.asarray(chosen), ("rows",))


def as_data_source(x, y=None, *, chunk_size: int | None = DEFAULT_CHUNK_SIZE, devices=None) -> DataSource:
    """Wrap arrays ``x`` (n, d), ``y`` (n,), or chunks, as a `DataSource`.

    With ``y=None``, ``x`` must be a re-iterable of ``(x_chunk, y_chunk)`` pairs (a list, or a
    zero-argument callable returning an iterator): the estimator reads the data twice, so a
    one-shot generator is refused. ``devices``: see `data_mesh`.
    """
    mesh = data_mesh(devices)
    if y is not None:
        # Validate shapes without copying: the data are read chunk by chunk, so memory does not
        # grow with n; NaN and inf are counted inside the compiled pass (see `first_pass`).
        x_shape, y_shape = np.shape(x), np.shape(y)
        if len(x_shape) != 2 or 0 in x_shape:
            raise ValueError(f"x: expected a non-empty 2-d array (num_samples, dim), got shape {x_shape}")
        if len(y_shape) != 1 or y_shape[0] != x_shape[0]:
            raise ValueError(
                f"y: expected shape ({x_shape[0]},) to match x's rows, got shape {y_shape}"
            )
        n = x_shape[0]
        chunk_size = resolve_chunk_size(chunk_size, x_shape[1], n)

        def array_chunks():
            for start in range(0, n, chunk_size):
                stop = min(start + chunk_size, n)
                yield x[start:stop], y[start:stop]

        for name, value in (("x", x), ("y", y)):
            kind = np.result_type(getattr(value, "dtype", None) or np.asarray(value[:1]).dtype).kind
            if kind not in "fiub":
                raise TypeError(f"{name}: expected a real numeric array, got dtype {value.dtype}")
        return DataSource(array_chunks, x_shape[1], n, mesh)

    if callable(x):
        factory = x
    elif isinstance(x, Iterable) and not isinstance(x, Iterator):
        factory = x.__iter__
    else:
        raise TypeError(
            "x: with y=None, expected a re-iterable of (x_chunk, y_chunk) pairs (a list or a "
            f"callable returning an iterator); got {type(x).__name__}, which can be read only once"
        )
    first = next(iter(factory()), None)
    if first is None:
        raise ValueError("x: the chunk source yielded no chunks")
    x0, _ = _check_chunk(first, "chunk 0", None)
    dim = x0.shape[1]

    def checked_chunks():
        for index, pair in enumerate(factory()):
            yield _check_chunk(pair, f"chunk {index}", dim)

    return DataSource(checked_chunks, dim, None, mesh)


def _check_chunk(pair, where: str, dim):
    """Shape checks of one user chunk (values are checked in the compiled pass)."""
    try:
        x_chunk, y_chunk = pair
    except (TypeError, ValueError) as error:
        raise TypeError(f"x: {where} is not an (x_chunk, y_chunk) pair") from error
    x_shape, y_shape = np.shape(x_chunk), np.shape(y_chunk)
    if len(x_shape) != 2 or 0 in x_shape:
        raise ValueError(f"x ({where}): expected a non-empty 2-d array, got shape {x_shape}")
    if y_shape != (x_shape[0],):
        raise ValueError(f"y ({where}): expected shape ({x_shape[0]},) to match x, got shape {y_shape}")
    if dim is not None and x_shape[1] != dim:
        raise ValueError(f"x ({where}): expected {dim} columns like chunk 0, got {x_shape[1]}")
    return x_chunk, y_chunk


def _blocks(source: DataSource, chunk_size: int, *, x_dtype=None, shift=None, projection=None):
    """Yield ``(x, y, rows)`` blocks of exactly ``chunk_size`` rows, zero-padded after ``rows``.

    With ``shift`` (d,) the blocks hold ``x - shift``, and with ``projection`` (d, k) as well
    they hold ``(x - shift) @ projection`` (k columns): the padding rows stay zero either way, so
    they add nothing to sums of products. JAX arrays are sliced, shifted and projected where they
    live. Host data are written into `_RING` reused, page-aligned staging buffers that the
    compiled kernel reads in place (``device_put`` aliases an aligned NumPy buffer on CPU),
    filled across the boundaries of the user's chunks (only the last block is padded, however
    small the chunks). The shift (in float64) and the cast to ``x_dtype`` (default: JAX's
    default float) happen in the one copy; a projection reads the user's array straight through
    NumPy's BLAS, a bandwidth-bound product, and only its k columns are staged. A buffer is
    refilled `_RING` blocks later, so the consumer must have finished the kernel that read it by
    then, as `_accumulate` does.
    """
    default = np.dtype(jnp.result_type(float))
    x_dtype = default if x_dtype is None or projection is not None else np.dtype(x_dtype)
    mesh = source.mesh
    if mesh is not None:  # blocks split evenly over the devices
        chunk_size = -(-chunk_size // mesh.size) * mesh.size
        by_rows, by_rows_2d = NamedSharding(mesh, P("rows")), NamedSharding(mesh, P("rows", None))

    def place(xb, yb):
        if mesh is None:
            return jax.device_put(xb, may_alias=True), jax.device_put(yb, may_alias=True)
        return jax.device_put(xb, by_rows_2d), jax.device_put(yb, by_rows)

    if projection is not None:
        projection = np.asarray(projection, np.float64)
        offset = 0.0 if shift is None else np.asarray(shift, np.float64) @ projection
    # For JAX chunks (converted once here, not per block).
    device_shift = None if shift is None else jnp.asarray(shift, default)
    device_projection = None if projection is None else jnp.asarray(projection, default)
    width = source.dim if projection is None else projection.shape[1]
    ring = [None] * _RING
    slot, filled = 0, 0

    def emit():  # the current staging buffers as a block, zero-padded after ``filled`` rows
        xb, yb = ring[slot]
        xb[filled:], yb[filled:] = 0, 0
        return (*place(xb, yb), filled)

    for x_chunk, y_chunk in source.chunks():
        if isinstance(x_chunk, jax.Array):
            if filled:
                yield emit()
                slot, filled = (slot + 1) % _RING, 0
            x_chunk, y_chunk = jnp.asarray(x_chunk), jnp.asarray(y_chunk)
            for start in range(0, len(x_chunk), chunk_size):
                xb = x_chunk[start : start + chunk_size]
                yb = y_chunk[start : start + chunk_size]
                if device_shift is not None:
                    xb = xb.astype(default) - device_shift
                if device_projection is not None:
                    xb = xb @ device_projection
                xb, rows = xb.astype(x_dtype), xb.shape[0]
                if rows < chunk_size:
                    xb = jnp.pad(xb, ((0, chunk_size - rows), (0, 0)))
                    yb = jnp.pad(yb, (0, chunk_size - rows))
                if mesh is not None:
                    xb, yb = place(xb, yb)
                yield xb, yb, rows
            continue
        x_chunk, y_chunk = np.asarray(x_chunk), np.asarray(y_chunk)
        start = 0
        while start < len(x_chunk):
            if ring[slot] is None:
                ring[slot] = (_aligned_empty((chunk_size, width), x_dtype), _aligned_empty((chunk_size,), default))
            xb, yb = ring[slot]
            take = min(chunk_size - filled, len(x_chunk) - start)
            part, into = x_chunk[start : start + take], slice(filled, filled + take)
            if projection is not None:
                np.copyto(xb[into], part @ projection - offset, casting="unsafe")
            elif shift is not None:
                np.subtract(part, shift, out=xb[into], casting="unsafe")
            else:
                np.copyto(xb[into], part, casting="unsafe")
            np.copyto(yb[into], y_chunk[start : start + take], casting="unsafe")
            start, filled = start + take, filled + take
            if filled == chunk_size:
                yield emit()
                slot, filled = (slot + 1) % _RING, 0
    if filled:
        yield emit()


def _aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised array in its own anonymous memory map: page-aligned (XLA's CPU client
    reads it without a copy), and its pages go back to the system as soon as it is freed."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    return np.frombuffer(mmap.mmap(-1, max(nbytes, 1)), np.uint8)[:nbytes].view(dtype).reshape(shape)


# Staging buffers per pass (see `_blocks`). Chunk sums are added up on the device, with no host
# synchronisation per chunk, so copying the next chunks overlaps the work on this one; the
# kernels in flight, and so their temporary buffers, are at most _RING - 1 while a chunk is copied.
_RING = 4
# The device totals move into float64 host totals every this many chunks (which bounds the
# rounding of a float32 accumulation, as without JAX's x64 mode).
_FLUSH_EVERY = 64


def _accumulate(kernel, zeros, blocks, *args):
    """Sum ``kernel(totals, x, y, rows, *args)`` over blocks; float64 NumPy totals."""
    host = None
    device = zeros()
    in_flight = deque()
    for index, (xb, yb, rows) in enumerate(blocks, start=1):
        device = kernel(device, xb, yb, rows, *args)
        in_flight.append(device)
        if len(in_flight) == _RING:
            # The next block refills the staging buffer read _RING blocks ago; the kernels
            # form a chain, so this wait covers that block's kernel.
            jax.block_until_ready(in_flight.popleft())
        if index % _FLUSH_EVERY == 0:
            host, device = _add_host(host, device), zeros()
            in_flight.clear()
    return _across_processes(_add_host(host, device))


def _across_processes(totals: list[np.ndarray]) -> list[np.ndarray]:
    """Under ``jax.distributed``, every process's totals summed (each process streamed its own
    rows); one process: the totals as they are."""
    if jax.process_count() == 1:
        return totals
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather([np.asarray(total, np.float64) for total in totals])
    return [np.asarray(part, np.float64).sum(axis=0) for part in gathered]


def _add_host(host, device):
    parts = [np.asarray(part, dtype=np.float64) for part in jax.device_get(device)]
    return parts if host is None else [h + p for h, p in zip(host, parts, strict=True)]


class FirstPass(NamedTuple):
    """Sums from pass 1 (float64 NumPy), n = ``count``, of the shifted data ``x - x_shift`` and
    ``P2(y) - p2_shift`` (shifts near the means, from the first rows: sums of centred values lose
    nothing to cancellation, which float32 products need).

    ``sum_x`` (d,), ``sum_xx`` (d, d), ``sum_p2x`` (d,) and ``sum_p2xx`` (d, d) sum the shifted
    x, x x^T, P2 x and P2 x x^T; or, when pass 1 ran with probes (d, p), ``sum_p2xx`` is the
    sketch ``sum P2 x x^T probes`` (d, p). ``shape_sums`` (4, d) are the power sums 1..4 of the
    shifted x over ``shape_count`` rows (the first `shape_rows` of every chunk) for the marginal
    skewness and kurtosis. ``sum_y`` (4,) holds the raw sums of y^1..y^4 and ``sum_p2sq`` the sum
    of the shifted P2 squared. ``precision`` names the products' dtype (see `first_pass`).
    """

    count: float
    sum_x: np.ndarray
    sum_xx: np.ndarray
    sum_p2x: np.ndarray
    sum_p2xx: np.ndarray
    shape_count: float
    shape_sums: np.ndarray
    sum_y: np.ndarray
    sum_p2sq: float
    x_shift: np.ndarray
    p2_shift: float
    probes: np.ndarray | None = None
    precision: str = "float64"


# Rows per chunk that enter the skewness and kurtosis sums: the first 1/SHAPE_FRACTION of each
# chunk, and at least SHAPE_ROWS (all of a smaller chunk). These elementwise powers cost as much
# as a d x d product on a CPU; 1 in 8 rows, spread over the whole data, pins a marginal skewness
# to +-0.007 at n = 1e6 (the warning's limit is 0.25).
SHAPE_ROWS = 1024
SHAPE_FRACTION = 8


def shape_rows(chunk_size: int) -> int:
    """Rows of each chunk in the skewness and kurtosis sums."""
    return max(chunk_size // SHAPE_FRACTION, min(chunk_size, SHAPE_ROWS))
# Rows of the data that set the shifts (and the precision choice's first look at the design).
PILOT_ROWS = 4096


def pilot_rows(source: DataSource, rows: int = PILOT_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """The first ``rows`` rows of the data (float64 NumPy), across chunks if needed (under
    ``jax.distributed``: process 0's, the same in every process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        pilot_x, pilot_y = _local_pilot_rows(source, rows)
        # Every process sends arrays of process 0's shape; process 0's values are kept.
        count = int(multihost_utils.broadcast_one_to_all(np.asarray(len(pilot_y))))
        if jax.process_index() != 0:
            pilot_x, pilot_y = np.zeros((count, source.dim)), np.zeros(count)
        return tuple(np.asarray(part) for part in multihost_utils.broadcast_one_to_all((pilot_x, pilot_y)))
    return _local_pilot_rows(source, rows)


def _local_pilot_rows(source: DataSource, rows: int) -> tuple[np.ndarray, np.ndarray]:
    xs, ys, count = [], [], 0
    for x_chunk, y_chunk in source.chunks():
        take = min(rows - count, len(x_chunk))
        xs.append(np.asarray(x_chunk[:take], dtype=np.float64))
        ys.append(np.asarray(y_chunk[:take], dtype=np.float64))
        count += take
        if count >= rows:
            break
    return np.concatenate(xs), np.concatenate(ys)


def _product_dtype(precision: str):
    return jnp.float32 if precision == "mixed" else jnp.result_type(float)


def _staged_x_dtype(product_dtype):
    """float32 products read x staged as float32; otherwise x keeps its own float dtype."""
    return np.float32 if product_dtype == jnp.float32 else None


@partial(jax.jit, static_argnames="product_dtype")
def _first_pass_chunk(totals, x, y, rows, gamma, p2_shift, probes, product_dtype):
    """Pass-1 sums of one block of shifted x (`_blocks` with ``shift``; padding rows zero)."""
    dtype = totals[1].dtype
    y = y.astype(dtype)
    weight = (jnp.arange(x.shape[0]) < rows).astype(dtype)
    # With float32 products x arrives as float32, shifted in float64 and then rounded while
    # staged: each entry carries a relative rounding of 6e-8, a tiny noise.
    xp = x.astype(product_dtype)
    p2 = (y * y + gamma * y - p2_shift) * weight
    p2p = p2.astype(product_dtype)
    if probes is None:
        # Two products: XLA's CPU GEMM on x^T [x, P2 x] measured 2.4x slower than these.
        gram, p2_gram = xp.T @ xp, (p2p[:, None] * xp).T @ xp
    else:
        # Matrix-free: only the sketch sum P2 x x^T probes, O(d p) per row.
        gram, p2_gram = xp.T @ xp, xp.T @ (p2p[:, None] * (xp @ probes.astype(product_dtype)))
    firsts = jnp.stack([weight, p2]).astype(product_dtype) @ xp  # sum x, sum P2 x
    head_rows = shape_rows(x.shape[0])
    head = xp[:head_rows].astype(dtype)  # only these rows are needed in float64
    squares = head * head
    shape_sums = jnp.stack([head.sum(0), squares.sum(0), (squares * head).sum(0), (squares * squares).sum(0)])
    sums = (
        weight.sum(),
        firsts[0].astype(dtype),
        gram.astype(dtype),
        firsts[1].astype(dtype),
        p2_gram.astype(dtype),
        weight[:head_rows].sum(),
        shape_sums,
        jnp.stack([jnp.sum(y**m) for m in range(1, 5)]),
        p2 @ p2,
    )
    return tuple(total + part for total, part in zip(totals, sums, strict=True))


@jax.jit
def _count_nonfinite(counts, x, y):
    return counts[0] + jnp.sum(~jnp.isfinite(x)), counts[1] + jnp.sum(~jnp.isfinite(y))


def first_pass(
    source: DataSource,
    transforms: OutputTransforms,
    chunk_size: int,
    probes: np.ndarray | None = None,
    *,
    precision: str = "float64",
    shifts: tuple[np.ndarray, float] | None = None,
) -> FirstPass:
    """Accumulate the pass-1 sums over all chunks (one compiled chunk kernel).

    With ``probes`` (d, p), ``sum_p2xx`` is the (d, p) sketch ``sum P2(y) x x^T probes`` instead of
    the (d, d) matrix: O(n d p) work instead of O(n d^2) for that part. ``precision="mixed"`` forms
    each chunk's products of the shifted data in float32 (twice the speed of float64 on a CPU)
    and sums them in float64; ``"float64"`` uses JAX's default float throughout. ``shifts``
    ``(x_shift, p2_shift)`` defaults to the means of the first `PILOT_ROWS` rows.

    Raises
    ------
    ValueError
        If x or y holds NaN or inf, or the sums overflow.
    """
    dtype = jnp.result_type(float)
    d = source.dim
    if shifts is None:
        shifts = pilot_shifts(*pilot_rows(source), transforms)
    x_shift, p2_shift = np.asarray(shifts[0], np.float64), float(shifts[1])
    width = d if probes is None else probes.shape[1]
    shapes = [(), (d,), (d, d), (d,), (d, width), (), (4, d), (4,), ()]
    probes_j = None if probes is None else np.asarray(probes, dtype)

    def zeros():
        return tuple(np.zeros(shape, dtype) for shape in shapes)

    product_dtype = _product_dtype(precision)
    totals = _accumulate(
        partial(_first_pass_chunk, product_dtype=product_dtype), zeros,
        _blocks(source, chunk_size, x_dtype=_staged_x_dtype(product_dtype), shift=x_shift),
        np.asarray(transforms.gamma, dtype), np.asarray(p2_shift, dtype), probes_j,
    )
    # A NaN or inf entry makes the sums non-finite; only then are the entries counted (one more
    # pass), so the check costs nothing on clean data. (Sums that overflow are refused too.)
    if not all(np.all(np.isfinite(total)) for total in totals):
        nonfinite = _accumulate(
            lambda counts, x, y, rows: _count_nonfinite(counts, x, y),
            lambda: (np.zeros((), np.int32), np.zeros((), np.int32)),
            _blocks(source, chunk_size),
        )
        for name, count in zip("xy", nonfinite, strict=True):
            if count:
                raise ValueError(f"{name}: expected finite values, found {int(count)} NaN or inf entries")
        raise ValueError(
            "x, y: values too large: their power sums (up to x^4 and y^4) overflow; rescale x and y"
        )
    for index in (0, 5, 8):
        totals[index] = float(totals[index])
    return FirstPass(
        *totals, x_shift=x_shift, p2_shift=p2_shift,
        probes=None if probes is None else np.asarray(probes, np.float64),
        precision="mixed" if precision == "mixed" and dtype == jnp.float64 else str(np.dtype(dtype)),
    )


def pilot_shifts(x: np.ndarray, y: np.ndarray, transforms: OutputTransforms) -> tuple[np.ndarray, float]:
    """Shifts of x and P2(y) for the streamed sums: their means over the pilot rows (0 where a
    pilot value is not finite; `first_pass` then reports the bad entries)."""
    with np.errstate(all="ignore"):
        x_shift = np.nan_to_num(x.mean(axis=0), nan=0.0, posinf=0.0, neginf=0.0)
        p2_shift = float(np.nan_to_num(np.mean(y * y + transforms.gamma * y), nan=0.0, posinf=0.0, neginf=0.0))
    return x_shift, p2_shift


@jax.jit
def _sketch_chunk(totals, x, y, rows, gamma, p2_shift, vectors):
    """One block's ``sum P2 xs xs^T vectors`` (x arrives shifted, padding rows zero)."""
    dtype = totals.dtype
    x, y = x.astype(dtype), y.astype(dtype)
    p2 = (y * y + gamma * y - p2_shift) * (jnp.arange(x.shape[0]) < rows)
    return totals + x.T @ (p2[:, None] * (x @ vectors))


def p2_sketch(
    source: DataSource, transforms: OutputTransforms, vectors: np.ndarray, chunk_size: int,
    shifts: tuple[np.ndarray, float],
) -> np.ndarray:
    """``sum (P2(y) - p2_shift) xs xs^T vectors`` (d, p), xs = x - x_shift, by one pass: T2
    applied to p vectors, matrix-free (in the shifted coordinates of `first_pass`)."""
    dtype = jnp.result_type(float)
    (total,) = _accumulate(
        lambda totals, *args: (_sketch_chunk(totals[0], *args),),
        lambda: (np.zeros(vectors.shape, dtype),),
        _blocks(source, chunk_size, shift=shifts[0]),
        np.asarray(transforms.gamma, dtype),
        np.asarray(shifts[1], dtype),
        np.asarray(vectors, dtype),
    )
    return total


@jax.jit
def _third_moment_chunk(totals, u, y, rows, coefficients, centers):
    """Sums of centred P3 parts times u^{(x)3} and u, for one block of projections
    u = (x - mean) @ projection (`_blocks` with ``projection``; padding rows zero)."""
    dtype = totals[0].dtype
    u, y = u.astype(dtype), y.astype(dtype)
    weight = (jnp.arange(u.shape[0]) < rows).astype(dtype)
    alpha, beta_noiseless = coefficients
    p3_noiseless = (y**3 + alpha * y**2 + beta_noiseless * y - centers[0]) * weight
    linear = (y - centers[1]) * weight
    both = jnp.stack([p3_noiseless, linear])  # (2, c)
    count, k = u.shape
    # sum_n both[s, n] u_na u_nb u_nc as one (2k x c) @ (c x k^2) product.
    weighted = (both[:, :, None] * u[None]).transpose(0, 2, 1).reshape(2 * k, count)
    outer = (u[:, :, None] * u[:, None, :]).reshape(count, k * k)
    cubes = (weighted @ outer).reshape(2, k, k, k)
    firsts = both @ u
    return totals[0] + cubes, totals[1] + firsts


def whitened_third_moment(
    source: DataSource,
    transforms: OutputTransforms,
    mean: np.ndarray,
    projection: np.ndarray,
    gram: np.ndarray,
    stats: FirstPass,
    chunk_size: int,
) -> np.ndarray:
    """E[(P3(y) - mean P3) S3(z)](M, M, M), a k x k x k array (float64), by one pass.

    ``projection`` (d, k) maps centred x to u = M^T z; ``gram`` is M^T M (k, k), the metric of
    S3's correction terms in u-coordinates. The noise enters as ``beta = beta_noiseless - 3 s^2``,
    so the two parts are accumulated separately and combined here. u is formed in float64 (for
    host data by NumPy's BLAS, straight from the user's array: see `_blocks`).
    """
    n = stats.count
    y_means = stats.sum_y[:3] / n
    p3_noiseless_mean = y_means[2] + transforms.alpha * y_means[1] + transforms.beta_noiseless * y_means[0]
    centers = np.asarray([p3_noiseless_mean, y_means[0]])
    coefficients = np.asarray([transforms.alpha, transforms.beta_noiseless])
    dtype = jnp.result_type(float)
    k = projection.shape[1]

    def zeros():
        return np.zeros((2, k, k, k), dtype), np.zeros((2, k), dtype)

    cubes, firsts = _accumulate(
        _third_moment_chunk, zeros, _blocks(source, chunk_size, shift=mean, projection=projection),
        coefficients.astype(dtype), centers.astype(dtype),
    )
    combine = np.array([1.0, -3.0 * transforms.noise**2])
    cube = np.tensordot(combine, cubes, axes=1) / n
    first = np.tensordot(combine, firsts, axes=1) / n
    # S3(z)(M,M,M) = u^{(x)3} - (u (x) G + its two other placements), G = M^T M
    correction = np.einsum("a,bc->abc", first, gram)
    correction = correction + correction.transpose(1, 0, 2) + correction.transpose(1, 2, 0)
    return cube - correction
