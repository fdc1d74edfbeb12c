"""A site's own data: arrays, a torch ``Dataset`` or a loader -> a validated :class:`Dataset`.

Every source goes through :func:`as_dataset`, the one home of the rules a table must meet
before it reaches training: features are finite numbers (converted to float32, so numpy's
default float64 is accepted), labels are integer class codes ``0 .. num_classes - 1`` (any
integer or integral-float dtype, converted to int64), one label per feature row, at least
one row.  A violation is one :class:`~securefl.errors.DataError` line naming the source and,
where there is one, the column or row.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import numpy as np

from securefl.data.datasets import Dataset
from securefl.errors import DataError

__all__ = ["as_dataset", "fingerprint", "from_torch"]


def as_dataset(features: Any, labels: Any, *, name: str, num_classes: int | None = None,
               columns: tuple[str, ...] | None = None, label_column: str = "label",
               first_row: int = 0) -> Dataset:
    """Validate and convert ``(features, labels)`` into a float32 / int64 :class:`Dataset`.

    ``columns`` (the feature columns' names, for tables) and ``label_column`` only make the
    error messages name the column at fault; rows are numbered from ``first_row`` (0 for
    arrays, the file's line number for a CSV).  Without ``num_classes`` it is
    ``max(label) + 1``.
    """
    x = _numeric(features, name=name, what="features")
    y = _numeric(labels, name=name, what=f"label column {label_column!r}")
    if x.ndim < 2:
        x = x.reshape(len(x), -1) if x.ndim == 1 else x
    if len(x) == 0:
        raise DataError(f"{name}: no rows (empty data)")
    if y.ndim != 1:
        y = y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y
        if y.ndim != 1:
            raise DataError(f"{name}: labels must be one class code per row, got shape "
                            f"{tuple(y.shape)}")
    if len(x) != len(y):
        raise DataError(f"{name}: {len(x)} feature rows but {len(y)} labels")
    bad = ~np.isfinite(x)
    if bad.any():
        row, *rest = (int(i) for i in np.argwhere(bad)[0])
        col = f"column {columns[rest[0]]!r}" if columns and x.ndim == 2 else f"index {rest}"
        raise DataError(f"{name}: {col}, row {row + first_row}: missing or non-finite value "
                        f"({x[(row, *rest)].item()!r}); fill or drop it before federating")
    if not np.isfinite(y).all() or (y != np.round(y)).any():
        row = int(np.flatnonzero(~np.isfinite(y) | (y != np.round(y)))[0])
        raise DataError(f"{name}: label column {label_column!r}, row {row + first_row}: "
                        f"{y[row].item()!r} is not an integer class code")
    codes = y.astype(np.int64)
    classes = int(codes.max()) + 1 if num_classes is None else num_classes
    out = np.flatnonzero((codes < 0) | (codes >= classes))
    if len(out):
        raise DataError(f"{name}: label column {label_column!r}, row {int(out[0]) + first_row}: "
                        f"label "
                        f"{int(codes[out[0]])} is out of range 0..{classes - 1}")
    if classes < 2:
        raise DataError(f"{name}: label column {label_column!r} holds one class only; "
                        "classification needs at least 2 (set num_classes)")
    return Dataset(np.ascontiguousarray(x, dtype=np.float32), codes, classes, name)


def _numeric(values: Any, *, name: str, what: str) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number)
                                     or array.dtype == np.bool_):
        raise DataError(f"{name}: {what} must be numbers, got dtype {array.dtype}")
    return array.astype(np.float64, copy=False)


def from_torch(source: Iterable[Any], *, name: str, num_classes: int | None = None,
               max_rows: int = 10_000_000) -> Dataset:
    """Materialise a torch ``Dataset`` (``(x, y)`` items) or a loader (``(x, y)`` batches).

    A map-style dataset is read item by item; anything else is iterated as batches.  At
    most ``max_rows`` rows are read (a larger source is refused, not truncated).
    """
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    rows = 0
    batched = not (hasattr(source, "__getitem__") and hasattr(source, "__len__"))
    items = source if batched else (source[i] for i in range(len(source)))  # type: ignore
    for item in items:
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise DataError(f"{name}: each item must be a pair (features, label), got "
                            f"{type(item).__name__}")
        x, y = (np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v)
                for v in item)
        if not batched:
            x, y = x[None], np.reshape(y, (1,))
        xs.append(x)
        ys.append(np.reshape(y, (-1,)))
        rows += len(ys[-1])
        if rows > max_rows:
            raise DataError(f"{name}: more than {max_rows} rows")
    if not xs:
        raise DataError(f"{name}: no rows (empty data)")
    try:
        features = np.concatenate(xs)
    except ValueError as exc:
        raise DataError(f"{name}: examples differ in shape ({exc})") from None
    return as_dataset(features, np.concatenate(ys), name=name, num_classes=num_classes)


def fingerprint(dataset: Dataset) -> str:
    """SHA-256 over the converted arrays (shape, float32 features, int64 labels)."""
    digest = hashlib.sha256()
    digest.update(repr((dataset.features.shape, dataset.num_classes)).encode())
    digest.update(np.ascontiguousarray(dataset.features, np.float32).tobytes())
    digest.update(np.ascontiguousarray(dataset.labels, np.int64).tobytes())
    return digest.hexdigest()
