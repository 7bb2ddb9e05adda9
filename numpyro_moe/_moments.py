"""Streamed cross-moments of the tensor method: two passes, O(n d^2 + n d k) work, O(d^2) memory.

Pass 1 accumulates, per fixed-size chunk, ``sum x``, ``sum x x^T`` and ``sum P2(y) x x^T`` (one
matrix product ``x^T [x, P2(y) x]``), plus power sums of y and of each feature. From them come the
standardisation ``z = W^T (x - mean)`` (W = covariance^{-1/2}) and T2 in z-coordinates, with the
sample mean of P2(y) subtracted (``E[S2(z)] = 0``, so this is the same expectation with less
variance). Pass 2 projects each chunk onto k whitened directions, ``u = B^T (x - mean)``, and
accumulates the k x k x k third moment: no d x d x d tensor is ever formed.

Data come as arrays or as a re-iterable source of ``(x_chunk, y_chunk)`` pairs; every chunk is
re-cut and zero-padded to ``chunk_size`` rows with a 0/1 row weight, so each pass compiles once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
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


def _padded(source: DataSource, chunk_size: int):
    """Yield (x, y, weight) blocks of exactly ``chunk_size`` rows (zero rows have weight 0)."""
    dtype = jnp.result_type(float)
    for x_chunk, y_chunk in source.chunks():
        for start in range(0, len(x_chunk), chunk_size):
            xb = jnp.asarray(x_chunk[start : start + chunk_size], dtype=dtype)
            yb = jnp.asarray(y_chunk[start : start + chunk_size], dtype=dtype)
            rows = xb.shape[0]
            weight = jnp.ones(rows, dtype)
            if rows < chunk_size:
                pad = chunk_size - rows
                xb = jnp.pad(xb, ((0, pad), (0, 0)))
                yb = jnp.pad(yb, (0, pad))
                weight = jnp.pad(weight, (0, pad))
            yield xb, yb, weight


class FirstPass(NamedTuple):
    """Sums from pass 1 (float64 numpy), n = ``count``.

    ``sum_x`` (d,), ``sum_xx`` (d, d), ``sum_p2x`` (d,), ``sum_p2xx`` (d, d), ``sum_x3``/``sum_x4``
    (d,) per-feature power sums, ``sum_y`` (4,) holding sum y^1..y^4, ``sum_p2sq`` sum P2(y)^2.
    """

    count: float
    sum_x: np.ndarray
    sum_xx: np.ndarray
    sum_p2x: np.ndarray
    sum_p2xx: np.ndarray
    sum_x3: np.ndarray
    sum_x4: np.ndarray
    sum_y: np.ndarray
    sum_p2sq: float


@jax.jit
def _first_pass_chunk(x, y, weight, gamma):
    # Padding rows are zero in x and y and carry weight 0.
    p2 = (y * y + gamma * y) * weight
    x_squared = x * x
    sums = (
        weight.sum(),
        jnp.sum(x, axis=0),
        x.T @ x,
        p2 @ x,
        (p2[:, None] * x).T @ x,
        jnp.sum(x_squared * x, axis=0),
        jnp.sum(x_squared * x_squared, axis=0),
        jnp.stack([jnp.sum(y**m) for m in range(1, 5)]),
        p2 @ p2,
    )
    nonfinite = jnp.stack([jnp.sum(~jnp.isfinite(x)), jnp.sum(~jnp.isfinite(y))])
    return sums, nonfinite


def first_pass(source: DataSource, transforms: OutputTransforms, chunk_size: int) -> FirstPass:
    """Accumulate the pass-1 sums over all chunks (one compiled chunk kernel).

    Raises
    ------
    ValueError
        If x or y holds NaN or inf (counted inside the kernel, so the check costs no extra pass).
    """
    totals = None
    nonfinite = np.zeros(2, dtype=np.int64)
    for xb, yb, weight in _padded(source, chunk_size):
        parts, bad = _first_pass_chunk(xb, yb, weight, transforms.gamma)
        parts = [np.asarray(part, dtype=np.float64) for part in parts]
        nonfinite += np.asarray(bad)
        totals = parts if totals is None else [t + p for t, p in zip(totals, parts, strict=True)]
    for name, count in zip("xy", nonfinite, strict=True):
        if count:
            raise ValueError(f"{name}: expected finite values, found {int(count)} NaN or inf entries")
    totals[0] = float(totals[0])
    totals[-1] = float(totals[-1])
    return FirstPass(*totals)


@jax.jit
def _third_moment_chunk(x, y, weight, mean, projection, coefficients, centers):
    """Sums of centred P3 parts times u^{(x)3} and u, for u = projection^T (x - mean)."""
    u = (x - mean) @ projection  # (c, k)
    alpha, beta_noiseless = coefficients
    p3_noiseless = (y**3 + alpha * y**2 + beta_noiseless * y - centers[0]) * weight
    linear = (y - centers[1]) * weight
    both = jnp.stack([p3_noiseless, linear])  # (2, c)
    rows, k = u.shape
    # sum_n both[s, n] u_na u_nb u_nc as one (2k x c) @ (c x k^2) product.
    weighted = (both[:, :, None] * u[None]).transpose(0, 2, 1).reshape(2 * k, rows)
    outer = (u[:, :, None] * u[:, None, :]).reshape(rows, k * k)
    cubes = (weighted @ outer).reshape(2, k, k, k)
    firsts = both @ u
    return cubes, firsts


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
    so the two parts are accumulated separately and combined here.
    """
    n = stats.count
    y_means = stats.sum_y[:3] / n
    p3_noiseless_mean = y_means[2] + transforms.alpha * y_means[1] + transforms.beta_noiseless * y_means[0]
    centers = jnp.asarray([p3_noiseless_mean, y_means[0]])
    coefficients = jnp.asarray([transforms.alpha, transforms.beta_noiseless])
    mean_j, projection_j = jnp.asarray(mean), jnp.asarray(projection)
    cubes = firsts = 0.0
    for xb, yb, weight in _padded(source, chunk_size):
        chunk_cubes, chunk_firsts = _third_moment_chunk(
            xb, yb, weight, mean_j.astype(xb.dtype), projection_j.astype(xb.dtype),
            coefficients.astype(xb.dtype), centers.astype(xb.dtype),
        )
        cubes = cubes + np.asarray(chunk_cubes, dtype=np.float64)
        firsts = firsts + np.asarray(chunk_firsts, dtype=np.float64)
    combine = np.array([1.0, -3.0 * transforms.noise**2])
    cube = np.tensordot(combine, cubes, axes=1) / n
    first = np.tensordot(combine, firsts, axes=1) / n
    # S3(z)(M,M,M) = u^{(x)3} - (u (x) G + its two other placements), G = M^T M
    correction = np.einsum("a,bc->abc", first, gram)
    correction = correction + correction.transpose(1, 0, 2) + correction.transpose(1, 2, 0)
    return cube - correction
