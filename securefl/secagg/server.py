"""Server state machine of SecAgg+ (Bonawitz et al., CCS 2017, figure 4; Bell et al., CCS 2020).

The server only relays and sums.  With ``U0 ⊇ U1 ⊇ U2 ⊇ U3 ⊇ U4`` the clients that received
the setup, advertised keys, shared keys, sent a masked input and answered the unmask request:

    sum_{u in U3} q(x_u) = sum_{u in U3} y_u - sum_{u in U3} PRG(b_u)
                           - sum_{v in U2 \\ U3} sum_{u in N(v) ∩ U3} ±PRG(s_uv)   (mod 2**32)

Pairwise masks between two survivors cancel.  ``b_u`` and ``s_v^SK`` are recovered from ``t``
Shamir shares held by the neighbourhood; each survivor is asked for seed shares of surviving
neighbours and key shares of dropped ones, never both for the same client (a client whose
masked input arrives after its deadline stays dropped).  A neighbourhood that falls below
``t`` aborts the round with ProtocolAbort before any secret is requested, so no partial sum
and no secret is revealed.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from securefl.engine.messages import Message
from securefl.engine.protection import Combined, WeightedSum
from securefl.errors import ProtocolAbort
from securefl.secagg import shamir
from securefl.secagg.config import SecAggConfig
from securefl.secagg.graph import degree, harary_graph, threshold_for
from securefl.secagg.keys import (
    agree,
    pairwise_mask_key,
    public_bytes,
    self_mask_key,
    verify_advertisement,
)
from securefl.secagg.messages import (
    SecAggAdvertise,
    SecAggKeys,
    SecAggMaskedInput,
    SecAggRelay,
    SecAggSetup,
    SecAggShares,
    SecAggUnmaskReply,
    SecAggUnmaskRequest,
)
from securefl.secagg.prg import add_masks
from securefl.secagg.quantize import Quantizer, levels_for

__all__ = ["SecAggServerRound"]

_log = logging.getLogger(__name__)
_CIPHERTEXT_BYTES = 12 + 2 * shamir.SHARE_BYTES + 16


class SecAggServerRound:
    """The server's side of one SecAgg+ round; holds only public keys and masked data."""

    def __init__(self, *, round: int, dimension: int, directory: Mapping[str, bytes],
                 config: SecAggConfig) -> None:
        if dimension < 1:
            raise ValueError(f"dimension must be >= 1, got {dimension}")
        self._round, self._dimension = round, dimension
        self._directory, self._config = directory, config
        self._phase = "new"
        self._graph: dict[str, tuple[str, ...]] = {}
        self._threshold = 0
        self._quantizer: Quantizer | None = None
        self._adverts: dict[str, SecAggAdvertise] = {}
        self._shares: dict[str, Mapping[str, bytes]] = {}
        self._u2: list[str] = []
        self._u3: list[str] = []
        self._total = np.zeros(0, np.uint32)
        self.rejected: dict[str, str] = {}

    # ------------------------------------------------------------------ setup
    def open(self, participants: Sequence[str]) -> Mapping[str, Message | None]:
        if self._phase != "new":
            raise ValueError("a SecAgg round opens once")
        unknown = [cid for cid in participants if cid not in self._directory]
        if unknown:
            raise ValueError(f"no identity key for clients {unknown[:5]}")
        n = len(participants)
        if n < 2:
            raise ProtocolAbort.because(f"round {self._round}: {n} participant(s), need >= 2")
        levels = levels_for(n, bits=self._config.bits)
        self._quantizer = Quantizer(clip=self._config.clip, max_weight=self._config.max_weight,
                                    levels=levels)
        k = degree(n, neighbours=self._config.neighbours)
        self._graph = harary_graph(list(participants), num_neighbours=k)
        self._threshold = threshold_for(k, fraction=self._config.threshold)
        self._phase = "advertise"
        return {cid: SecAggSetup(round=self._round, num_participants=n,
                                 neighbours=self._graph[cid], threshold=self._threshold)
                for cid in participants}

    # ------------------------------------------------------------------ dispatch
    def step(self, replies: Mapping[str, Message],
             dropped: Collection[str]) -> Mapping[str, Message] | Combined:
        live = {cid: msg for cid, msg in replies.items() if cid not in set(dropped)}
        if self._phase == "advertise":
            return self._collect_adverts(live)
        if self._phase == "share":
            return self._relay_shares(live)
        if self._phase == "mask":
            return self._request_unmask(live)
        if self._phase == "unmask":
            return self._unmask(live)
        raise ValueError(f"SecAgg round is in phase {self._phase!r}; nothing more to step")

    def _reject(self, cid: str, reason: str) -> None:
        _log.warning("secagg round %d: client %s rejected: %s", self._round, cid, reason)
        self.rejected[cid] = reason

    def _require(self, members: Collection[str], within: Collection[str], what: str) -> None:
        """Abort unless every client in ``members`` has ``t`` neighbours in ``within``."""
        pool = set(within)
        for cid in members:
            if sum(v in pool for v in self._graph[cid]) < self._threshold:
                raise ProtocolAbort.because(
                    f"round {self._round}: neighbourhood of {cid!r} below threshold "
                    f"{self._threshold} at {what}")

    # ------------------------------------------------------------------ phase 0 -> 1
    def _collect_adverts(self, live: Mapping[str, Message]) -> Mapping[str, Message]:
        for cid, msg in live.items():
            if cid not in self._graph or not isinstance(msg, SecAggAdvertise):
                self._reject(cid, "expected a SecAggAdvertise")
                continue
            try:
                verify_advertisement(self._directory[cid], msg.signature, round=self._round,
                                     client_id=cid, c_public=msg.c_public,
                                     s_public=msg.s_public)
            except ProtocolAbort:
                self._reject(cid, "key advertisement failed verification")
                continue
            self._adverts[cid] = msg
        # Clients with fewer than t advertised neighbours could never be unmasked: drop them
        # (they have shared nothing yet), repeating until every remaining one has t.
        while True:
            weak = [cid for cid in self._adverts
                    if sum(v in self._adverts for v in self._graph[cid]) < self._threshold]
            if not weak:
                break
            for cid in weak:
                del self._adverts[cid]
        if len(self._adverts) < 2:
            raise ProtocolAbort.because(f"round {self._round}: too few clients advertised keys")
        self._phase = "share"
        packed = {cid: advert.packed() for cid, advert in self._adverts.items()}
        return {cid: SecAggKeys(advertisements={v: packed[v] for v in self._graph[cid]
                                                if v in packed})
                for cid in self._adverts}

    # ------------------------------------------------------------------ phase 1 -> 2
    def _relay_shares(self, live: Mapping[str, Message]) -> Mapping[str, Message]:
        for cid, msg in live.items():
            expected = {v for v in self._graph.get(cid, ()) if v in self._adverts}
            if (cid not in self._adverts or not isinstance(msg, SecAggShares)
                    or set(msg.ciphertexts) != expected
                    or any(len(c) != _CIPHERTEXT_BYTES for c in msg.ciphertexts.values())):
                self._reject(cid, "malformed SecAggShares")
                continue
            self._shares[cid] = msg.ciphertexts
        self._u2 = [cid for cid in self._adverts if cid in self._shares]
        # Every client in U2 is masked against by its neighbours, so each needs t holders.
        self._require(self._u2, self._u2, "share keys")
        self._phase = "mask"
        return {cid: SecAggRelay(ciphertexts={v: self._shares[v][cid] for v in self._graph[cid]
                                              if v in self._shares})
                for cid in self._u2}

    # ------------------------------------------------------------------ phase 2 -> 3
    def _request_unmask(self, live: Mapping[str, Message]) -> Mapping[str, Message]:
        total = np.zeros(self._dimension + 1, np.uint32)
        survivors = []
        for cid in self._u2:
            msg = live.get(cid)
            if msg is None:
                continue
            if (not isinstance(msg, SecAggMaskedInput) or msg.masked.dtype != np.uint32
                    or msg.masked.shape != total.shape):
                self._reject(cid, "malformed SecAggMaskedInput")
                continue
            np.add(total, msg.masked, out=total)
            survivors.append(cid)
        if len(survivors) < self._threshold or not survivors:
            raise ProtocolAbort.because(f"round {self._round}: {len(survivors)} masked inputs, "
                                        f"fewer than t = {self._threshold}")
        self._u3, self._total = survivors, total
        dropped = [cid for cid in self._u2 if cid not in set(survivors)]
        self._require(survivors, survivors, "masked input")
        self._require(dropped, survivors, "masked input")
        alive, gone = set(survivors), set(dropped)
        self._phase = "unmask"
        return {cid: SecAggUnmaskRequest(
                    survivors=tuple(v for v in self._graph[cid] if v in alive),
                    dropped=tuple(v for v in self._graph[cid] if v in gone))
                for cid in survivors}

    # ------------------------------------------------------------------ phase 3 -> result
    def _unmask(self, live: Mapping[str, Message]) -> WeightedSum:
        quantizer = self._require_quantizer()
        survivors = self._u3
        alive = set(survivors)
        dropped = [cid for cid in self._u2 if cid not in alive]
        seed_points: dict[str, dict[int, int]] = {cid: {} for cid in survivors}
        key_points: dict[str, dict[int, int]] = {cid: {} for cid in dropped}
        for holder, msg in live.items():
            if holder not in alive or not isinstance(msg, SecAggUnmaskReply):
                self._reject(holder, "expected a SecAggUnmaskReply")
                continue
            for kind, points in ((msg.seed_shares, seed_points), (msg.key_shares, key_points)):
                for owner, raw in kind.items():
                    if owner not in points or holder not in self._graph[owner]:
                        continue
                    try:
                        points[owner][self._graph[owner].index(holder) + 1] = \
                            shamir.decode_share(raw)
                    except ValueError:
                        self._reject(holder, f"malformed share of {owner!r}")
        masks = [(self_mask_key(self._reconstruct(owner, seed_points[owner]), round=self._round,
                                client_id=owner), -1) for owner in survivors]
        for owner in dropped:
            key = X25519PrivateKey.from_private_bytes(self._reconstruct(owner, key_points[owner]))
            if public_bytes(key) != self._adverts[owner].s_public:
                raise ProtocolAbort.because(
                    f"round {self._round}: reconstructed key of {owner!r} does not match")
            for peer in self._graph[owner]:
                if peer in alive:
                    shared = agree(key, self._adverts[peer].s_public, peer=peer)
                    mask = pairwise_mask_key(shared, round=self._round, first=peer, second=owner)
                    masks.append((mask, -1 if peer < owner else 1))
        total = self._total
        add_masks(total, masks)
        weighted, total_weight = quantizer.decode(total)
        self._phase = "done"
        self._total = np.zeros(0, np.uint32)
        return WeightedSum(client_ids=tuple(survivors), total=weighted,
                           total_weight=total_weight, rejected=dict(self.rejected))

    def _reconstruct(self, owner: str, points: Mapping[int, int]) -> bytes:
        try:
            return shamir.combine(points, threshold=self._threshold).to_bytes(32, "big")
        except ValueError:
            raise ProtocolAbort.because(
                f"round {self._round}: {len(points)} shares of {owner!r}, need "
                f"{self._threshold}") from None

    def _require_quantizer(self) -> Quantizer:
        if self._quantizer is None:
            raise ValueError("the SecAgg round was never opened")
        return self._quantizer
