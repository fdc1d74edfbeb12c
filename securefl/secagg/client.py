"""Client state machine of SecAgg+ (Bonawitz et al., CCS 2017, figure 4; Bell et al., CCS 2020).

One :class:`SecAggClientRound` per round, no I/O.  The phases:

0. ``open``: keep the quantized update, generate X25519 pairs ``(c, s)``, sign both public
   keys with the Ed25519 identity key.
1. Share keys: verify each neighbour's signature; Shamir-share ``b_u`` and ``s_u^SK``
   ``t``-of-neighbourhood; encrypt each neighbour's pair of shares with AES-GCM.
2. Masked input: ``y_u = q(x_u) + PRG(b_u) + sum_{v in N(u) ∩ U2} ±PRG(s_uv) mod 2**32`` with
   ``+`` when ``u < v``.
3. Unmask: reveal shares of ``b_v`` for surviving neighbours and of ``s_v^SK`` for dropped
   ones; never both kinds for the same neighbour, whatever the server asks later.

Any inconsistency from the server or a peer raises the opaque ProtocolAbort.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from securefl.engine.messages import Message
from securefl.engine.protection import Update
from securefl.engine.session import RoundContext
from securefl.errors import ProtocolAbort
from securefl.secagg import shamir
from securefl.secagg.config import SecAggConfig
from securefl.secagg.graph import threshold_for
from securefl.secagg.keys import (
    agree,
    decrypt_shares,
    encrypt_shares,
    pairwise_mask_key,
    private_bytes,
    public_bytes,
    self_mask_key,
    sign_advertisement,
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
from securefl.secagg.prg import add_masks, info, keystream, prg_key
from securefl.secagg.quantize import Quantizer, levels_for

__all__ = ["SecAggClientRound"]

_SEED = "seed"
_KEY = "key"


class SecAggClientRound:
    """One client's side of one SecAgg+ round."""

    def __init__(self, *, client_id: str, identity: Ed25519PrivateKey,
                 directory: Mapping[str, bytes], config: SecAggConfig, round: int,
                 context: RoundContext) -> None:
        self.client_id = client_id
        self._context = context
        self._identity = identity
        self._directory = directory
        self._config = config
        self._round = round
        self._phase = "open"
        self._revealed: dict[str, str] = {}
        self._setup: SecAggSetup | None = None
        self._encoded: np.ndarray | None = None
        self._c_key = X25519PrivateKey.generate()
        self._s_key = X25519PrivateKey.generate()
        self._seed = b""
        self._peers: dict[str, SecAggAdvertise] = {}
        self._channels: dict[str, bytes] = {}  # X25519(c_u, c_v), reused to decrypt shares
        self._inbox: dict[str, bytes] = {}

    # ------------------------------------------------------------------ phase 0
    def open(self, update: Update, payload: Message | None) -> Message:
        if self._phase != "open":
            raise ProtocolAbort.because(f"{self.client_id}: round opened twice")
        setup = self._check_setup(payload)
        levels = levels_for(setup.num_participants, bits=self._config.bits)
        quantizer = Quantizer(clip=self._config.clip, max_weight=self._config.max_weight,
                              levels=levels)
        dither = keystream(prg_key(os.urandom(32), info("dither", self._round, self.client_id)),
                           update.delta.shape[0] + 1)
        self._encoded = quantizer.encode(update.delta, float(update.weight), dither)
        self._setup = setup
        self._phase = "advertised"
        c_public, s_public = public_bytes(self._c_key), public_bytes(self._s_key)
        signature = sign_advertisement(self._identity, round=self._round,
                                       client_id=self.client_id, c_public=c_public,
                                       s_public=s_public)
        return SecAggAdvertise(c_public=c_public, s_public=s_public, signature=signature)

    def _check_setup(self, payload: Message | None) -> SecAggSetup:
        if not isinstance(payload, SecAggSetup):
            raise ProtocolAbort.because(f"{self.client_id}: expected SecAggSetup")
        neighbours = payload.neighbours
        k = len(neighbours)
        problems = [
            (payload.round != self._round, f"round {payload.round} != {self._round}"),
            (list(neighbours) != sorted(set(neighbours)), "neighbours not sorted and unique"),
            (self.client_id in neighbours, "client is its own neighbour"),
            (any(v not in self._directory for v in neighbours), "unknown neighbour"),
            (not 1 <= k < payload.num_participants, "neighbourhood size out of range"),
        ]
        for failed, why in problems:
            if failed:
                raise ProtocolAbort.because(f"{self.client_id}: bad setup: {why}")
        if not threshold_for(k, fraction=self._config.threshold) <= payload.threshold <= k:
            raise ProtocolAbort.because(
                f"{self.client_id}: threshold {payload.threshold} below this client's minimum")
        return payload

    # ------------------------------------------------------------------ later phases
    def _require_setup(self) -> SecAggSetup:
        if self._setup is None:
            raise ProtocolAbort.because(f"{self.client_id}: round was never opened")
        return self._setup

    def step(self, request: Message) -> Message:
        if self._phase == "advertised" and isinstance(request, SecAggKeys):
            return self._share_keys(request)
        if self._phase == "shared" and isinstance(request, SecAggRelay):
            return self._masked_input(request)
        if self._phase in ("masked", "unmasked") and isinstance(request, SecAggUnmaskRequest):
            return self._unmask(request)
        raise ProtocolAbort.because(
            f"{self.client_id}: unexpected {type(request).__name__} in phase {self._phase}")

    def _share_keys(self, request: SecAggKeys) -> SecAggShares:
        setup = self._require_setup()
        if (not set(request.advertisements) <= set(setup.neighbours)
                or len(request.advertisements) < setup.threshold):
            raise ProtocolAbort.because(f"{self.client_id}: bad neighbour key set")
        try:
            peers = {v: SecAggAdvertise.unpack(raw) for v, raw in request.advertisements.items()}
        except ValueError:
            raise ProtocolAbort.because(f"{self.client_id}: malformed advertisement") from None
        seen = {public_bytes(self._c_key), public_bytes(self._s_key)}
        for peer, advert in peers.items():
            verify_advertisement(self._directory[peer], advert.signature, round=self._round,
                                 client_id=peer, c_public=advert.c_public,
                                 s_public=advert.s_public)
            if advert.c_public in seen or advert.s_public in seen:
                raise ProtocolAbort.because(f"{self.client_id}: repeated public key")
            seen |= {advert.c_public, advert.s_public}
        self._peers = dict(peers)
        self._seed = secrets.token_bytes(32)
        holders = [v for v in setup.neighbours if v in peers]
        xs = [setup.neighbours.index(v) + 1 for v in holders]
        seed_shares = shamir.split(int.from_bytes(self._seed, "big"),
                                   threshold=setup.threshold, xs=xs)
        key_shares = shamir.split(int.from_bytes(private_bytes(self._s_key), "big"),
                                  threshold=setup.threshold, xs=xs)
        ciphertexts = {}
        for holder, seed_share, key_share in zip(holders, seed_shares, key_shares, strict=True):
            shared = self._channels[holder] = agree(self._c_key, peers[holder].c_public,
                                                    peer=holder)
            bundle = shamir.encode_share(seed_share) + shamir.encode_share(key_share)
            ciphertexts[holder] = encrypt_shares(shared, bundle, round=self._round,
                                                 sender=self.client_id, receiver=holder)
        self._phase = "shared"
        return SecAggShares(ciphertexts=ciphertexts)

    def _masked_input(self, request: SecAggRelay) -> SecAggMaskedInput:
        setup, encoded = self._require_setup(), self._encoded
        if encoded is None:
            raise ProtocolAbort.because(f"{self.client_id}: masked input requested twice")
        senders = request.ciphertexts
        if not set(senders) <= set(self._peers) or len(senders) < setup.threshold:
            raise ProtocolAbort.because(f"{self.client_id}: bad relay sender set")
        self._inbox = dict(senders)
        masks = [(self_mask_key(self._seed, round=self._round, client_id=self.client_id), 1)]
        for peer in sorted(senders):
            shared = agree(self._s_key, self._peers[peer].s_public, peer=peer)
            key = pairwise_mask_key(shared, round=self._round, first=self.client_id, second=peer)
            masks.append((key, 1 if self.client_id < peer else -1))
        add_masks(encoded, masks)  # in place: the quantized input becomes y_u
        self._encoded = None
        self._phase = "masked"
        return SecAggMaskedInput(masked=encoded)

    def _unmask(self, request: SecAggUnmaskRequest) -> SecAggUnmaskReply:
        setup = self._require_setup()
        survivors, dropped = set(request.survivors), set(request.dropped)
        if survivors & dropped or not (survivors | dropped) <= set(self._inbox):
            raise ProtocolAbort.because(f"{self.client_id}: inconsistent unmask request")
        if len(survivors) < setup.threshold:
            raise ProtocolAbort.because(f"{self.client_id}: fewer than t surviving neighbours")
        conflict = ([v for v in survivors if self._revealed.get(v) == _KEY]
                    + [v for v in dropped if self._revealed.get(v) == _SEED])
        if conflict:
            raise ProtocolAbort.because(
                f"{self.client_id}: asked to reveal both secrets of {sorted(conflict)}")
        self._context.release(survivors)
        seed_shares, key_shares = {}, {}
        for peer in sorted(survivors | dropped):
            bundle = decrypt_shares(self._channels[peer], self._inbox[peer], round=self._round,
                                    sender=peer, receiver=self.client_id)
            if len(bundle) != 2 * shamir.SHARE_BYTES:
                raise ProtocolAbort.because(f"{self.client_id}: malformed share from {peer!r}")
            if peer in survivors:
                seed_shares[peer] = bundle[:shamir.SHARE_BYTES]
            else:
                key_shares[peer] = bundle[shamir.SHARE_BYTES:]
        self._revealed.update(dict.fromkeys(survivors, _SEED))
        self._revealed.update(dict.fromkeys(dropped, _KEY))
        self._phase = "unmasked"
        return SecAggUnmaskReply(seed_shares=seed_shares, key_shares=key_shares)
