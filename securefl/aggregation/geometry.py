"""Shared geometry of the robust rules: a centred Gram matrix, distances, column blocks.

Distance-based rules (Krum, Bulyan, NNM, geometric median, centered clipping) need only
``n x n`` numbers: the Gram matrix ``G[i, j] = <x_i - x_r, x_j - x_r>`` and from it
``D[i, j] = ||x_i - x_j||^2 = G_ii + G_jj - 2 G_ij``.  ``G`` is computed in one pass over the
rows, block by block of columns, one BLAS call ``C C^T`` per block.  Centring on a row ``r``
avoids the catastrophic cancellation of the Gram identity when rows share a large offset;
``r`` is the most central row (a robust medoid), so a far-away byzantine row never becomes the
origin.  Blocks are accumulated in float64; float32 input is
multiplied in float32 (twice the BLAS speed, relative error ~1e-7 of the distances between
rows near ``r``).

A finite row so large that its squared norm overflows is infinitely far from every other
row; non-finite input (NaN, inf) is rejected with a ValueError, because no rule can place a
NaN row.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

__all__ = [
    "affine_sq_norms",
    "centred_gram",
    "column_blocks",
    "combine_rows",
    "pairwise_sq_distances",
    "require_finite",
    "row_statistics",
]

#: elements per block (read at call time); a float32 block this size stays in cache
BLOCK_ELEMENTS = 1 << 20
#: coordinates on which the centring row is first chosen
ORIGIN_SAMPLE = 4096
#: a centring row whose entries exceed this is not used in float32 (its squares would overflow)
_FLOAT32_SAFE = 1e15


def column_blocks(num_rows: int, dimension: int, *,
                  block_elements: int | None = None) -> Iterator[slice]:
    """Column slices of about ``block_elements`` entries (default 2^20) covering ``[0, d)``."""
    elements = BLOCK_ELEMENTS if block_elements is None else block_elements
    width = max(1, elements // max(num_rows, 1))
    for start in range(0, dimension, width):
        yield slice(start, min(start + width, dimension))


def require_finite(rows: np.ndarray, suspects: np.ndarray) -> None:
    """Raise ValueError if a row in ``suspects`` (indices) holds NaN or inf.

    Callers pass the rows whose squared norm came out non-finite: a NaN or inf entry always
    makes it so, and only those rows need the full check.
    """
    for index in suspects:
        if not np.isfinite(rows[index]).all():
            raise ValueError("updates must be finite (no NaN or inf); drop non-finite updates "
                             "before aggregating")


def _gram_to_distances(gram: np.ndarray) -> np.ndarray:
    norms = np.diag(gram)
    return norms[:, None] + norms[None, :] - 2.0 * gram


def _stacked(rows: np.ndarray, extra: np.ndarray | None, cols: slice) -> np.ndarray:
    return rows[:, cols] if extra is None else np.vstack([rows[:, cols], extra[cols]])


def _gram_pass(rows: np.ndarray, extra: np.ndarray | None, origin: int) -> np.ndarray:
    """``<x_i - x_origin, x_j - x_origin>`` accumulated block by block in float64."""
    points = rows.shape[0] + (extra is not None)
    work = np.float32 if rows.dtype == np.float32 else np.float64
    gram = np.zeros((points, points))
    with np.errstate(over="ignore", invalid="ignore"):
        for cols in column_blocks(points, rows.shape[1]):
            block = _stacked(rows, extra, cols)
            centre = block[origin]
            if work == np.float32 and np.abs(centre).max(initial=0.0) > _FLOAT32_SAFE:
                centred = block.astype(np.float64) - centre
            else:
                centred = block.astype(work, copy=False) - centre.astype(work)
            gram += centred @ centred.T
    return 0.5 * (gram + gram.T)


def centred_gram(rows: np.ndarray, *, extra: np.ndarray | None = None,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``(G, far)``: ``G[i, j] = <x_i - x_r, x_j - x_r>`` in float64 for a central row ``r``.

    ``extra`` (shape ``(d,)``) is appended as point ``m - 1`` without copying ``rows``.
    ``r`` is first chosen on the first ``ORIGIN_SAMPLE`` coordinates (exact float64); if the
    full pass shows ``r`` far from the truly central row ``r*`` (more than ``4x`` the typical
    distance around ``r*``), e.g. a byzantine row central only on the sample, the pass is
    repeated centred on ``r*``.  ``far[i]`` marks points whose squared norm overflowed: they
    are infinitely far from every other point, and their entries of ``G`` are 0.
    """
    sample = _stacked(rows, extra, slice(0, ORIGIN_SAMPLE)).astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        origin = _central_row(_gram_to_distances(sample @ sample.T))
    gram = _gram_pass(rows, extra, origin)
    with np.errstate(invalid="ignore"):
        distances = _gram_to_distances(gram)
        central = _central_row(distances)
        nearby = np.sort(distances[central])[1: (len(distances) + 1) // 2]
        if central != origin and nearby.size and \
                not distances[central, origin] <= 4.0 * float(np.median(nearby)):
            gram = _gram_pass(rows, extra, central)
    far = ~np.isfinite(np.diag(gram))
    if far.any():  # the extra point is checked by its caller
        require_finite(rows, np.flatnonzero(far[: rows.shape[0]]))
    gram[far, :] = 0.0
    gram[:, far] = 0.0
    return gram, far


def pairwise_sq_distances(rows: np.ndarray, *, extra: np.ndarray | None = None) -> np.ndarray:
    """``D[i, j] = ||x_i - x_j||^2`` as float64 ``(m, m)``: symmetric, zero diagonal, ``>= 0``,
    ``+inf`` for points whose norm overflows (see :func:`centred_gram`)."""
    gram, far = centred_gram(rows, extra=extra)
    distances = np.maximum(_gram_to_distances(gram), 0.0)
    distances[far, :] = np.inf
    distances[:, far] = np.inf
    np.fill_diagonal(distances, 0.0)
    return distances


def _central_row(distances: np.ndarray) -> int:
    """The row whose ``ceil(m/2)`` nearest squared distances sum least (a robust medoid)."""
    m = distances.shape[0]
    safe = np.where(np.isfinite(distances), distances, np.inf)
    nearest = np.sort(safe, axis=1)[:, : (m + 1) // 2]
    with np.errstate(invalid="ignore"):
        return int(np.argmin(nearest.sum(axis=1)))


def affine_sq_norms(gram: np.ndarray, coefficients: np.ndarray) -> np.ndarray:
    """``||x_i - z||^2`` for ``z = sum_j c_j x_j`` with ``sum_j c_j = 1``, from ``G`` alone.

    With ``G`` centred on any point: ``||x_i - z||^2 = G_ii - 2 (G c)_i + c^T G c``.  Iterative
    rules (Weiszfeld, centered clipping) thus run in ``n``-dimensional coefficient space and
    touch the ``(n, d)`` rows once at the end.  A far-away row enters only through
    ``c_j G_ij``, which stays of the order of its true influence on ``z`` (no cancellation
    of its huge squared distance).
    """
    projected = gram @ coefficients
    return np.maximum(np.diag(gram) - 2.0 * projected + coefficients @ projected, 0.0)


def combine_rows(rows: np.ndarray, coefficients: np.ndarray) -> np.ndarray:
    """``sum_i c_i x_i`` as float32 ``(d,)``: one BLAS pass, no copy of the rows.

    Rows with ``c_i = 0`` contribute exactly nothing (the input is finite), so a selection is a
    0/1 coefficient vector rather than a fancy-indexed copy of the selected rows.
    """
    work = np.float32 if rows.dtype == np.float32 else np.float64
    total = np.asarray(coefficients, dtype=work) @ rows.astype(work, copy=False)
    return total.astype(np.float32, copy=False)


def row_statistics(rows: np.ndarray, vector: np.ndarray | None = None,
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``(||x_i||^2, <x_i, vector>)`` in float64, one blocked pass (zeros without ``vector``)."""
    sq_norms = np.zeros(rows.shape[0])
    dots = np.zeros(rows.shape[0])
    for cols in column_blocks(rows.shape[0], rows.shape[1]):
        block = rows[:, cols].astype(np.float64)
        sq_norms += np.einsum("ij,ij->i", block, block)
        if vector is not None:
            dots += block @ vector[cols].astype(np.float64)
    require_finite(rows, np.flatnonzero(~np.isfinite(sq_norms)))
    return sq_norms, dots
