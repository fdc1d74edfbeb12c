"""Run-directory output.  Nothing is ever half-written: write a temporary file, then rename."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["append_jsonl", "atomic_write", "save_model", "write_json"]


def atomic_write(path: str | Path, data: bytes | str, *, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically: a same-directory temp file (created with
    ``mode`` when given, e.g. 0o600 for a key), fsync, rename, then fsync of the directory so
    the rename itself survives a crash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(raw)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def append_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Rewrite a JSON-lines file with ``rows`` atomically (files stay small: one row a round)."""
    return atomic_write(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def save_model(path: str | Path, tensors: dict[str, np.ndarray],
               metadata: dict[str, str] | None = None) -> Path:
    """Save parameters as safetensors (no code on load), atomically."""
    from safetensors.numpy import save

    return atomic_write(path, save({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                                   metadata=metadata))
