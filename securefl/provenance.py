"""``provenance.json``: what a run really trained, next to the ``config.toml`` it ran.

* ``model``: its source (a built-in name, the ``[model] factory`` import path, or the class
  of a Python object), its class, and its parameter layout (name, shape, dtype of every
  parameter, in :class:`~securefl.vector.Layout` order) with ``layout_sha256``, the SHA-256
  of that layout's canonical JSON.  Two parties with the same hash flatten to the same
  vector.
* ``data``: the source, the files read (name, rows, SHA-256 of their bytes), and for each
  client and the test set the row count and a SHA-256 of the converted arrays
  (:func:`securefl.data.own.fingerprint`), so a later reader can check which rows trained.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from torch import nn

from securefl.config import Config
from securefl.data import FederatedData
from securefl.data.own import fingerprint

__all__ = ["layout_record", "provenance"]


def layout_record(model: nn.Module) -> tuple[list[dict[str, Any]], str]:
    """Every parameter's ``(name, shape, dtype)`` and the SHA-256 of their canonical JSON."""
    layout = [{"name": name, "shape": list(param.shape), "dtype": str(param.dtype)}
              for name, param in model.named_parameters()]
    canonical = json.dumps(layout, sort_keys=True, separators=(",", ":")).encode()
    return layout, hashlib.sha256(canonical).hexdigest()


def provenance(config: Config, data: FederatedData, model: nn.Module) -> dict[str, Any]:
    layout, digest = layout_record(model)
    m = config.model
    source = {"factory": f"import {m.factory}", "python": f"python object {m.factory}"}.get(
        m.name, f"built-in {m.name}")
    return {
        "model": {"source": source, "class": f"{type(model).__module__}."
                                              f"{type(model).__qualname__}",
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "layout_sha256": digest, "layout": layout},
        "data": {
            "source": config.data.dataset, "num_classes": data.num_classes,
            "shape": list(data.shape),
            "files": [{"name": f.name, "rows": f.rows, "sha256": f.sha256} for f in data.files],
            "clients": {cid: {"train_rows": len(d.train), "val_rows": len(d.val),
                              "sha256": fingerprint(d.train)}
                        for cid, d in data.clients.items()},
            "test": {"rows": len(data.test), "sha256": fingerprint(data.test)},
        },
    }
