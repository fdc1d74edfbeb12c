"""``provenance.json``: what a run really trained, next to the ``config.toml`` it ran.

* ``model``: its source (a built-in name, the ``[model] factory`` import path, or the class
  of a Python object), its class, and its parameter layout (name, shape, dtype of every
  parameter, in :class:`~securefl.vector.Layout` order) with ``layout_sha256``, the SHA-256
  of that layout's canonical JSON.  Two parties with the same hash flatten to the same
  vector.
* ``training``: the loss and the training step (``[client] loss`` / ``step`` by import
  path, ``python:<name>`` for Python objects, or the built-ins).
* ``data``: the source, the files read (name, rows, SHA-256 of their bytes), and for each
  client and the test set the row count and a SHA-256 of the converted arrays
  (:func:`securefl.data.own.fingerprint`), so a later reader can check which rows trained.

A deployment writes one record per party, each of what that party holds: the server's
(:func:`server_provenance`, in its state directory) has the model and the test set it
evaluates on, and no site's data, which never reaches it; each site's
(:func:`site_provenance`, ``provenance-<site>.json`` in its state folder) has the model and
the shard it trains on.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from torch import nn

from securefl.config import Config
from securefl.data import FederatedData
from securefl.data.own import fingerprint

__all__ = ["layout_record", "provenance", "server_provenance", "site_provenance"]


def layout_record(model: nn.Module) -> tuple[list[dict[str, Any]], str]:
    """Every parameter's ``(name, shape, dtype)`` and the SHA-256 of their canonical JSON."""
    layout = [{"name": name, "shape": list(param.shape), "dtype": str(param.dtype)}
              for name, param in model.named_parameters()]
    canonical = json.dumps(layout, sort_keys=True, separators=(",", ":")).encode()
    return layout, hashlib.sha256(canonical).hexdigest()


def _model(config: Config, model: nn.Module) -> dict[str, Any]:
    layout, digest = layout_record(model)
    m = config.model
    source = {"factory": f"import {m.factory}", "python": f"python object {m.factory}"}.get(
        m.name, f"built-in {m.name}")
    return {"source": source, "class": f"{type(model).__module__}.{type(model).__qualname__}",
            "parameters": sum(p.numel() for p in model.parameters()),
            "layout_sha256": digest, "layout": layout}


def _training(config: Config) -> dict[str, str]:
    """The loss and step that trained (``[client] loss`` / ``step``, or the built-ins)."""
    c = config.client
    return {"loss": c.loss or "built-in cross-entropy",
            "step": c.step or "built-in loss(model(features), labels)"}


def _files(records: Any) -> list[dict[str, Any]]:
    return [{"name": f.name, "rows": f.rows, "sha256": f.sha256} for f in records]


def _data(config: Config, data: FederatedData) -> dict[str, Any]:
    return {"source": config.data.dataset, "num_classes": data.num_classes,
            "shape": list(data.shape)}


def provenance(config: Config, data: FederatedData, model: nn.Module) -> dict[str, Any]:
    """A simulation's record: the model, every file read, every client and the test set."""
    return {
        "model": _model(config, model), "training": _training(config),
        "data": {
            **_data(config, data), "files": _files(data.files),
            "clients": {cid: {"train_rows": len(d.train), "val_rows": len(d.val),
                              "sha256": fingerprint(d.train)}
                        for cid, d in data.clients.items()},
            "test": {"rows": len(data.test), "sha256": fingerprint(data.test)},
        },
    }


def server_provenance(config: Config, data: FederatedData, model: nn.Module
                      ) -> dict[str, Any]:
    """A deployed server's record: the model and the test set it evaluates on (from
    ``[data] test_path`` when set, else held out of the files read); the sites' data stay
    at the sites (``"sites"`` says where their records are)."""
    files = data.files[-1:] if config.data.test_path is not None else data.files
    return {"model": _model(config, model),
            "data": {**_data(config, data), "test": {
                "rows": len(data.test), "sha256": fingerprint(data.test),
                "files": _files(files)}},
            "sites": {site: f"provenance-{site}.json in the site's own state folder"
                      for site in sorted(config.network.allowlist)}}


def site_provenance(config: Config, data: FederatedData, shard: str, model: nn.Module
                    ) -> dict[str, Any]:
    """A site's record: the model and the shard ``shard`` it trains on (train and
    validation rows with their fingerprints), and the files it read."""
    mine = data.clients[shard]
    return {"model": _model(config, model), "training": _training(config),
            "data": {**_data(config, data), "files": _files(data.files), "shard": shard,
                     "train_rows": len(mine.train), "train_sha256": fingerprint(mine.train),
                     "val_rows": len(mine.val), "val_sha256": fingerprint(mine.val)}}
