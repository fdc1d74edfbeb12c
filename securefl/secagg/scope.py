"""What every SecAgg key, mask and signature is bound to: federation, run, round, graph.

* **Federation id** ``F = SHA-256("securefl/secagg/federation/v1" || directory || config)``,
  with the identity directory as sorted ``(len || id || Ed25519 public key)`` entries and the
  config fields every site must agree on (``clip``, ``max_weight``, ``bits``, and the
  parameters of a non-default encoding: distributed DP's) as canonical JSON.  Two
  federations that share identities but not their protection, or the reverse, have
  different ids.
* **Run id**: the 32 bytes the server announces in ``FitIns`` and each site pins in its
  :class:`~securefl.engine.session.ReleaseLog`.
* **Round** number, and, once the commit-then-reveal of :mod:`securefl.secagg.graph` has
  fixed it, the **graph seed**: share encryption, masks and consistency signatures also bind
  the graph, so two neighbours with different views of it cannot complete a round.

``Scope.info(label, *ids)`` is the HKDF ``info`` and the signed prefix of every message
(:func:`securefl.secagg.prg.info`), so nothing of one federation, run or round is accepted
in another (Bonawitz et al., CCS 2017, §4: signatures bind the round's context).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import struct
from collections.abc import Mapping

from securefl.config.secagg import SecAggConfig
from securefl.secagg.prg import info_prefix, info_with_prefix

__all__ = ["Scope", "federation_id"]

_ID_BYTES = 32


def federation_id(directory: Mapping[str, bytes], config: SecAggConfig, *,
                  encoding: Mapping[str, object] | None = None) -> bytes:
    """``F`` of the module docstring, from what each party holds itself; ``encoding``: the
    parameters of a non-default encoding (distributed DP's), agreed on the same way."""
    digest = hashlib.sha256(b"securefl/secagg/federation/v1\x00")
    for client_id in sorted(directory):
        raw = client_id.encode()
        digest.update(struct.pack(">H", len(raw)) + raw + directory[client_id])
    agreed: dict[str, object] = {"clip": float(config.clip),
                                 "max_weight": float(config.max_weight), "bits": config.bits}
    if encoding is not None:
        agreed["encoding"] = dict(encoding)
    digest.update(json.dumps(agreed, sort_keys=True).encode())
    return digest.digest()


@dataclasses.dataclass(frozen=True)
class Scope:
    """``federation (32) || run (32) || round (u64) || len (u8) || graph seed`` in every info."""

    federation: bytes
    run: bytes
    round: int
    graph: bytes = b""

    def __post_init__(self) -> None:
        if len(self.federation) != _ID_BYTES or len(self.run) != _ID_BYTES:
            raise ValueError(f"federation and run ids are {_ID_BYTES} bytes")
        if self.round < 0 or len(self.graph) > 0xFF:
            raise ValueError("round must be >= 0 and the graph seed at most 255 bytes")

    @functools.cached_property
    def _encoded(self) -> bytes:
        return (self.federation + self.run + struct.pack(">QB", self.round, len(self.graph))
                + self.graph)

    def encoded(self) -> bytes:
        return self._encoded

    @functools.cached_property
    def _prefixes(self) -> dict[str, bytes]:
        return {}

    def info(self, label: str, *client_ids: str) -> bytes:
        """:func:`securefl.secagg.prg.info` of this scope (thousands of calls per round:
        the ``label || 0x00 || scope`` prefix is built once per label)."""
        prefix = self._prefixes.get(label)
        if prefix is None:
            prefix = self._prefixes[label] = info_prefix(label, self._encoded)
        return info_with_prefix(prefix, *client_ids)

    def with_graph(self, seed: bytes) -> Scope:
        return dataclasses.replace(self, graph=seed)
