"""CIFAR-10 batch readers that never execute code from the file.

Two formats are accepted in the user's folder:

* the binary version (``data_batch_1.bin`` ...): records of 1 label byte + 3072 pixel bytes,
  parsed with :func:`numpy.frombuffer`;
* the python version (``data_batch_1`` ...), which is a pickle.  It is read with an unpickler
  whose ``find_class`` admits only numpy's array reconstruction helpers and which checks
  the result is a dict holding a uint8 ``data`` array and an integer ``labels`` list; any
  other global (the usual code-execution vector) is refused.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from securefl.errors import DataError

__all__ = ["read_batch"]

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}
_RECORD = 1 + 3072


class _ArrayOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise DataError(f"refusing to load {module}.{name} from a CIFAR batch")
        return super().find_class(module, name)


def _images(data: np.ndarray) -> np.ndarray:
    return (data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, 3, 32, 32) float32 in [0, 1], labels (N,) int64)`` from one batch."""
    binary = path.with_suffix(".bin")
    if binary.exists():
        raw = np.frombuffer(binary.read_bytes(), dtype=np.uint8)
        if raw.size % _RECORD:
            raise DataError(f"{binary}: size is not a multiple of {_RECORD} bytes")
        records = raw.reshape(-1, _RECORD)
        return _images(records[:, 1:]), records[:, 0].astype(np.int64)
    if not path.exists():
        raise DataError(f"dataset file not found: {path} (or {binary.name})")
    try:
        batch = _ArrayOnlyUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except DataError:
        raise
    except Exception as exc:  # any parse failure of an untrusted file is a data error
        raise DataError(f"{path} is not a CIFAR-10 python batch ({exc})") from None
    data = batch.get(b"data") if isinstance(batch, dict) else None
    labels = batch.get(b"labels") if isinstance(batch, dict) else None
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8
            and data.ndim == 2 and data.shape[1] == 3072 and isinstance(labels, list)
            and len(labels) == data.shape[0]):
        raise DataError(f"{path} does not hold a CIFAR-10 batch")
    return _images(data), np.asarray(labels, dtype=np.int64)
