"""Streamed cross-moments of the tensor method: two passes, O(n d^2 + n d k) work, O(d^2) memory.

Pass 1 accumulates, per fixed-size chunk, ``sum x``, ``sum x x^T`` and ``sum P2(y) x x^T``, plus power sums of y and of each feature. From them come the
standardisation ``z = W^T (x - mean)`` (W = covariance^{-1/2}) and T2 in z-coordinates, with the
sample mean of P2(y) subtracted (``E[S2(z)] = 0``, so this is the same expectation with less
variance). For large d, T2's top eigenspace is found matrix-free instead: pass 1 then keeps only
the sketch ``sum P2(y) x x^T Omega`` for a random (d, p) probe matrix Omega, p a little above k
(a single-pass randomised eigensolver), so that part costs O(n d p). Pass 2 projects each chunk onto k whitened directions, ``u = B^T (x - mean)``, and
accumulates the k x k x k third moment: no d x d x d tensor is ever formed.

All sums are of data shifted by the means of the first rows (``x - x_shift``, ``P2 - p2_shift``),
so no sum cancels; with ``precision="mixed"`` each chunk's products are formed in float32 (twice
the speed of float64 on a CPU) and summed in float64.

Data come as arrays or as a re-iterable source of ``(x_chunk, y_chunk)`` pairs; every chunk is
re-cut and zero-padded to ``chunk_size`` rows (the kernel masks the padding), so each pass
compiles once; the sums stay on the device between chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_moe._transforms import OutputTransforms

__all__ = [
    "DataSource",
    "resolve_chunk_size",
    "FirstPass",
    "as_data_source",
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
    known up front (arrays), else None.
    """

    chunks: Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]
    dim: int
    num_samples: int | None


def as_data_source(x, y=None, *, chunk_size: int | None = DEFAULT_CHUNK_SIZE) -> DataSource:
    """Wrap arrays ``x`` (n, d), ``y`` (n,), or chunks, as a `DataSource`.

    With ``y=None``, ``x`` must be a re-iterable of ``(x_chunk, y_chunk)`` pairs (a list, or a
    zero-argument callable returning an iterator): the estimator reads the data twice, so a
    one-shot generator is refused.
    """
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
        return DataSource(array_chunks, x_shape[1], n)

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

    return DataSource(checked_chunks, dim, None)


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


def _blocks(source: DataSource, chunk_size: int, ring: int | None = None, x_dtype=None):
    """Yield ``(x, y, rows)`` blocks of exactly ``chunk_size`` rows, zero-padded after ``rows``.

    JAX arrays are sliced where they live. Host arrays are copied into ``ring`` reused, 64-byte
    aligned staging buffers that the compiled kernel reads in place (``device_put`` aliases an
    aligned NumPy buffer on CPU): no fresh allocation per chunk. A buffer is reused ``ring``
    blocks later, so the consumer must have waited for the kernels that read it by then:
    `_accumulate` synchronises every ``_FLUSH_EVERY`` blocks, the default ``ring``. ``x_dtype``
    float32 stages x as float32 (the kernel then reads half the bytes; for float32 products).
    """
    ring = _FLUSH_EVERY if ring is None else ring
    staging: dict = {}
    slot = 0
    for x_chunk, y_chunk in source.chunks():
        if isinstance(x_chunk, jax.Array):
            x_chunk, y_chunk = jnp.asarray(x_chunk), jnp.asarray(y_chunk)
            for start in range(0, len(x_chunk), chunk_size):
                xb = x_chunk[start : start + chunk_size]
                yb = y_chunk[start : start + chunk_size]
                rows = xb.shape[0]
                if rows < chunk_size:
                    xb = jnp.pad(xb, ((0, chunk_size - rows), (0, 0)))
                    yb = jnp.pad(yb, (0, chunk_size - rows))
                yield xb, yb, rows
            continue
        x_chunk, y_chunk = np.asarray(x_chunk), np.asarray(y_chunk)
        dtypes = (np.dtype(x_dtype or _staging_dtype(x_chunk.dtype)), _staging_dtype(y_chunk.dtype))
        for start in range(0, len(x_chunk), chunk_size):
            key = (slot, *dtypes)
            if key not in staging:
                staging[key] = (
                    _aligned_empty((chunk_size, x_chunk.shape[1]), dtypes[0]),
                    _aligned_empty((chunk_size,), dtypes[1]),
                )
            xb, yb = staging[key]
            rows = min(chunk_size, len(x_chunk) - start)
            np.copyto(xb[:rows], x_chunk[start : start + rows], casting="unsafe")
            np.copyto(yb[:rows], y_chunk[start : start + rows], casting="unsafe")
            if rows < chunk_size:
                xb[rows:], yb[rows:] = 0, 0
            yield jax.device_put(xb, may_alias=True), jax.device_put(yb, may_alias=True), rows
            slot = (slot + 1) % ring


def _staging_dtype(dtype) -> np.dtype:
    """float32 data stay float32 (the kernel casts); anything else becomes JAX's default float."""
    return np.dtype(np.float32) if dtype == np.float32 else np.dtype(jnp.result_type(float))


_ALIGNMENT = 64  # bytes: what XLA's CPU client needs to read a host buffer without a copy


def _aligned_empty(shape, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGNMENT, np.uint8)
    offset = -raw.ctypes.data % _ALIGNMENT
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


# Chunk sums are accumulated on the device (no host synchronisation per chunk, so copying the
# next chunk overlaps the work on this one) and moved into float64 host totals every this many
# chunks. The flush waits for the queued work, which bounds both the chunks in flight (memory)
# and the rounding of float32 accumulation.
_FLUSH_EVERY = 4


def _accumulate(kernel, zeros, blocks, *args):
    """Sum ``kernel(totals, x, y, rows, *args)`` over blocks; float64 NumPy totals."""
    host = None
    device = zeros()
    for index, (xb, yb, rows) in enumerate(blocks, start=1):
        device = kernel(device, xb, yb, rows, *args)
        if index % _FLUSH_EVERY == 0:
            host = _add_host(host, device)
            device = zeros()
    return _add_host(host, device)


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
    """The first ``rows`` rows of the data (float64 NumPy), across chunks if needed."""
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


@partial(jax.jit, donate_argnums=0, static_argnames="product_dtype")
def _first_pass_chunk(totals, x, y, rows, gamma, x_shift, p2_shift, probes, product_dtype):
    dtype = totals[1].dtype
    y = y.astype(dtype)
    weight = (jnp.arange(x.shape[0]) < rows).astype(dtype)
    # Padding rows stay zero. With float32 products x arrives as float32 (cast while staged):
    # each entry is rounded to 6e-8 of its size, a tiny noise, and shifted in float32.
    xp = (x.astype(product_dtype) - x_shift.astype(product_dtype)) * weight.astype(product_dtype)[:, None]
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
    probes_j = None if probes is None else jnp.asarray(probes, dtype)

    def zeros():
        return tuple(jnp.zeros(shape, dtype) for shape in shapes)

    product_dtype = _product_dtype(precision)
    totals = _accumulate(
        partial(_first_pass_chunk, product_dtype=product_dtype), zeros,
        _blocks(source, chunk_size, x_dtype=_staged_x_dtype(product_dtype)), jnp.asarray(transforms.gamma, dtype), jnp.asarray(x_shift, dtype),
        jnp.asarray(p2_shift, dtype), probes_j,
    )
    # A NaN or inf entry makes the sums non-finite; only then are the entries counted (one more
    # pass), so the check costs nothing on clean data. (Sums that overflow are refused too.)
    if not all(np.all(np.isfinite(total)) for total in totals):
        nonfinite = _accumulate(
            lambda counts, x, y, rows: _count_nonfinite(counts, x, y),
            lambda: (jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)),
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


@partial(jax.jit, donate_argnums=0)
def _sketch_chunk(totals, x, y, rows, gamma, x_shift, p2_shift, vectors):
    dtype = totals.dtype
    x, y = x.astype(dtype), y.astype(dtype)
    weight = (jnp.arange(x.shape[0]) < rows).astype(dtype)
    centred = (x - x_shift) * weight[:, None]
    p2 = (y * y + gamma * y - p2_shift) * weight
    return totals + centred.T @ (p2[:, None] * (centred @ vectors))


def p2_sketch(
    source: DataSource, transforms: OutputTransforms, vectors: np.ndarray, chunk_size: int,
    shifts: tuple[np.ndarray, float],
) -> np.ndarray:
    """``sum (P2(y) - p2_shift) xs xs^T vectors`` (d, p), xs = x - x_shift, by one pass: T2
    applied to p vectors, matrix-free (in the shifted coordinates of `first_pass`)."""
    dtype = jnp.result_type(float)
    (total,) = _accumulate(
        lambda totals, *args: (_sketch_chunk(totals[0], *args),),
        lambda: (jnp.zeros(vectors.shape, dtype),),
        _blocks(source, chunk_size),
        jnp.asarray(transforms.gamma, dtype),
        jnp.asarray(shifts[0], dtype),
        jnp.asarray(shifts[1], dtype),
        jnp.asarray(vectors, dtype),
    )
    return total


@partial(jax.jit, donate_argnums=0, static_argnames="product_dtype")
def _third_moment_chunk(totals, x, y, rows, mean, projection, coefficients, centers, product_dtype):
    """Sums of centred P3 parts times u^{(x)3} and u, for u = projection^T (x - mean)."""
    dtype = totals[0].dtype
    y = y.astype(dtype)
    weight = (jnp.arange(x.shape[0]) < rows).astype(dtype)
    # Centred first, which keeps float32 products accurate (u is k-dimensional: the rounding of
    # its float32 product is far below the sampling error of the cubes).
    centred = x.astype(product_dtype) - mean.astype(product_dtype)
    u = (centred @ projection.astype(product_dtype)).astype(dtype)
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
    precision: str = "float64",
) -> np.ndarray:
    """E[(P3(y) - mean P3) S3(z)](M, M, M), a k x k x k array (float64), by one pass.

    ``projection`` (d, k) maps centred x to u = M^T z; ``gram`` is M^T M (k, k), the metric of
    S3's correction terms in u-coordinates. The noise enters as ``beta = beta_noiseless - 3 s^2``,
    so the two parts are accumulated separately and combined here.
    """
    n = stats.count
    y_means = stats.sum_y[:3] / n
    p3_noiseless_mean = y_means[2] + transforms.alpha * y_means[1] + transforms.beta_noiseless * y_means[0]
    centers = jnp.asarray([p3_noiseless_mean, y_means[0]])
    coefficients = jnp.asarray([transforms.alpha, transforms.beta_noiseless])
    dtype = jnp.result_type(float)
    k = projection.shape[1]

    def zeros():
        return jnp.zeros((2, k, k, k), dtype), jnp.zeros((2, k), dtype)

    product_dtype = _product_dtype(precision)
    cubes, firsts = _accumulate(
        partial(_third_moment_chunk, product_dtype=product_dtype), zeros,
        _blocks(source, chunk_size, x_dtype=_staged_x_dtype(product_dtype)), jnp.asarray(mean, dtype),
        jnp.asarray(projection, dtype), coefficients.astype(dtype), centers.astype(dtype),
    )
    combine = np.array([1.0, -3.0 * transforms.noise**2])
    cube = np.tensordot(combine, cubes, axes=1) / n
    first = np.tensordot(combine, firsts, axes=1) / n
    # S3(z)(M,M,M) = u^{(x)3} - (u (x) G + its two other placements), G = M^T M
    correction = np.einsum("a,bc->abc", first, gram)
    correction = correction + correction.transpose(1, 0, 2) + correction.transpose(1, 2, 0)
    return cube - correction
