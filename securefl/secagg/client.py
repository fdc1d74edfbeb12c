"""Client state machine of SecAgg+ against a malicious server (Bonawitz et al., CCS 2017,
figure 4 with the consistency check of §4; Bell et al., CCS 2020).

One :class:`SecAggClientRound` per round, no I/O.  Every check below uses only what the
client holds itself (its config, the identity directory, its :class:`RoundContext`):

0. ``open``: check the participant list and the update (with ``L`` sized from the directory,
   never from the server's ``n``): an encoding with a separate check
   (:class:`~securefl.secagg.encoding.Checked`, the fixed-point one) checks it now and encodes
   it at step 3, any other encodes it now; draw ``r_u`` (graph randomness),
   ``b_u`` (self-mask seed) and two X25519 pairs; sign ``(scope, H(participants), c_pk, s_pk,
   H(r_u), H(b_u))``.
1. Commitments: check ``U1`` ⊆ participants holds this client's own commitment, and that
   ``k >= min_neighbours`` and ``t >= threshold_for(k)`` (own config); then reveal ``r_u``.
2. Keys: every commitment of ``U1`` opened; graph seed ``= H(all reveals)``; recompute the
   own neighbourhood ``N(u)`` and abort unless the relayed advertisements are exactly those
   of ``N(u)``, each correctly signed; Shamir-share ``b_u`` and ``s_u^SK`` ``t``-of-``k``.
3. Masked input: ``y_u = q(x_u) + PRG(b_u) + sum_{v in N(u) ∩ U2} ±PRG(s_uv) mod 2**b``
   (``q`` and ``b``: the :class:`~securefl.secagg.encoding.Encoding`; 32 by default); a
   checked update is encoded only now, so ``q(x_u)`` is written, masked and sent in one go
   while it is in cache.
4. Consistency: sign the survivor set ``U3``, once, and only if the encoding accepts
   ``|U3|`` (distributed DP's minimum cohort).
5. Unmask: only with ``t`` valid neighbour signatures on that same ``U3``, and after the
   :class:`~securefl.engine.session.ReleaseLog` allows a reveal for ``U3``: shares of ``b_v``
   for ``v in U3``, of ``s_v^SK`` for ``v in U2 \\ U3``, exactly as ``U3`` says, and the
   encoding's first ``removable(|U3|)`` own secrets (distributed DP's excess-noise seeds).

Any inconsistency raises the opaque ProtocolAbort, and the round is dead afterwards.
"""

from __future__ import annotations

import enum
import itertools
import secrets
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from securefl.config.secagg import SecAggConfig
from securefl.engine.messages import Message
from securefl.engine.protection import Update
from securefl.engine.session import RoundContext
from securefl.errors import ProtocolAbort
from securefl.secagg import shamir, suspects
from securefl.secagg.encoding import Encoding, FixedPoint, checks_first, reduce, shared_seed
from securefl.secagg.graph import degree, graph_seed, neighbourhood, threshold_for
from securefl.secagg.keys import (
    advert_body,
    agree,
    channel_keys,
    check_round_keys,
    commitment,
    consistency_body,
    decrypt_shares,
    encrypt_shares,
    opens,
    pairwise_mask_key,
    participants_digest,
    private_bytes,
    public_bytes,
    self_mask_key,
    sign,
    verify,
)
from securefl.secagg.messages import (
    SecAggAdvertise,
    SecAggCommitments,
    SecAggConsistency,
    SecAggKeys,
    SecAggMaskedInput,
    SecAggRelay,
    SecAggReveal,
    SecAggSetup,
    SecAggShares,
    SecAggSignature,
    SecAggUnmaskReply,
    SecAggUnmaskRequest,
    unpack,
)
from securefl.secagg.prg import add_masks
from securefl.secagg.scope import Scope

__all__ = ["ClientPhase", "SecAggClientRound"]


class ClientPhase(enum.Enum):
    OPEN = "open"
    ADVERTISED = "advertised"
    REVEALED = "revealed"
    SHARED = "shared"
    MASKED = "masked"
    SIGNED = "signed"
    UNMASKED = "unmasked"
    ABORTED = "aborted"


_EXPECTS: dict[ClientPhase, type[Message]] = {
    ClientPhase.ADVERTISED: SecAggCommitments, ClientPhase.REVEALED: SecAggKeys,
    ClientPhase.SHARED: SecAggRelay, ClientPhase.MASKED: SecAggConsistency,
    ClientPhase.SIGNED: SecAggUnmaskRequest, ClientPhase.UNMASKED: SecAggUnmaskRequest,
}


class SecAggClientRound:
    """One client's side of one SecAgg+ round."""

    def __init__(self, *, client_id: str, identity: Ed25519PrivateKey,
                 directory: Mapping[str, bytes], config: SecAggConfig, federation: bytes,
                 context: RoundContext, encoding: Encoding | None = None) -> None:
        self.client_id = client_id
        self._encoding = encoding or FixedPoint(config, num_sites=len(directory))
        self._context = context
        self._identity = identity
        self._directory = directory
        self._config = config
        self._base = self._scope = Scope(federation=federation, run=context.run,
                                         round=context.round)
        self.phase = ClientPhase.OPEN
        self._participants = b""
        self._members: frozenset[str] = frozenset()
        self._update: Update | None = None  # a Checked encoding's input, encoded at step 3
        self._encoded: np.ndarray | None = None  # any other encoding's words, from open
        self._excess: tuple[bytes, ...] = ()
        self._c_key = X25519PrivateKey.generate()
        self._s_key = X25519PrivateKey.generate()
        self._publics = (public_bytes(self._c_key), public_bytes(self._s_key))
        self._coin = secrets.token_bytes(32)  # r_u: this client's share of the graph seed
        self._seed = secrets.token_bytes(32)  # b_u
        self._commitments: dict[str, bytes] = {}
        self._u1: tuple[str, ...] = ()
        self._threshold = 0
        self._neighbours: tuple[str, ...] = ()
        self._degree = 0
        self._peers: dict[str, SecAggAdvertise] = {}
        # the share-bundle keys of each neighbour (keys.channel_keys), kept to decrypt
        self._channels: dict[str, tuple[bytes, bytes]] = {}
        self._inbox: dict[str, bytes] = {}
        self._survivors: tuple[str, ...] = ()
        self._survivors_digest = b""
        self._reply: SecAggUnmaskReply | None = None

    def _abort(self, why: str) -> ProtocolAbort:
        return ProtocolAbort.because(f"{self.client_id}, round {self._base.round}: {why}")

    # ------------------------------------------------------------------ phase 0
    def open(self, update: Update, payload: Message | None) -> Message:
        if self.phase is not ClientPhase.OPEN:
            raise self._abort("round opened twice")
        self.phase = ClientPhase.ABORTED
        participants = self._check_setup(payload)
        if checks_first(self._encoding):  # encoded when the masked input is due
            self._encoding.check(update)
            self._update = update
        else:
            self._encoded, self._excess = self._encoding.encode(update,
                                                                seed=shared_seed(self._base))
        self._participants = participants_digest(participants)
        self._members = frozenset(participants)
        c_public, s_public = self._publics
        graph_commitment = commitment(self._base, "graph", self.client_id, self._coin)
        seed_commitment = commitment(self._base, "seed", self.client_id, self._seed)
        self._commitments = {self.client_id: graph_commitment}
        body = advert_body(self._base, client_id=self.client_id, participants=self._participants,
                           c_public=c_public, s_public=s_public,
                           graph_commitment=graph_commitment, seed_commitment=seed_commitment)
        self.phase = ClientPhase.ADVERTISED
        return SecAggAdvertise(run=self._base.run, c_public=c_public, s_public=s_public,
                               graph_commitment=graph_commitment,
                               seed_commitment=seed_commitment,
                               signature=sign(self._identity, body))

    def _check_setup(self, payload: Message | None) -> tuple[str, ...]:
        if not isinstance(payload, SecAggSetup):
            raise self._abort("expected SecAggSetup")
        ids = payload.participants
        problems = [
            (payload.round != self._base.round, f"setup for round {payload.round}"),
            (list(ids) != sorted(set(ids)), "participants not sorted and unique"),
            (self.client_id not in ids, "this client is not a participant"),
            (not self._directory.keys() >= set(ids), "unknown participant"),
            (len(ids) < self._config.min_neighbours + 1,
             f"{len(ids)} participants cannot give {self._config.min_neighbours} neighbours"),
        ]
        for failed, why in problems:
            if failed:
                raise self._abort(f"bad setup: {why}")
        return ids

    # ------------------------------------------------------------------ later phases
    def step(self, request: Message) -> Message:
        expected = _EXPECTS.get(self.phase)
        if expected is None or not isinstance(request, expected):
            phase, self.phase = self.phase, ClientPhase.ABORTED
            raise self._abort(f"unexpected {type(request).__name__} in phase {phase.value}")
        if self.phase is ClientPhase.UNMASKED and self._reply is not None:
            return self._reply  # a repeated request reveals nothing new
        handlers: dict[ClientPhase, Callable[[Any], Message]] = {
            ClientPhase.ADVERTISED: self._reveal, ClientPhase.REVEALED: self._share_keys,
            ClientPhase.SHARED: self._masked_input, ClientPhase.MASKED: self._sign,
            ClientPhase.SIGNED: self._unmask}
        handler = handlers[self.phase]
        current, self.phase = self.phase, ClientPhase.ABORTED
        reply, self.phase = handler(request), _next(current)
        return reply

    def _reveal(self, request: SecAggCommitments) -> SecAggReveal:
        members = request.members
        try:
            commitments = unpack(members, request.commitments)
        except ValueError:
            raise self._abort("malformed commitment set") from None
        n1 = len(members)
        if (list(members) != sorted(set(members)) or not set(members) <= self._members
                or commitments.get(self.client_id) != self._commitments[self.client_id]):
            raise self._abort("bad commitment set")
        try:
            k = degree(n1, neighbours=request.neighbours)
        except ValueError:
            raise self._abort(f"bad degree {request.neighbours}") from None
        if k < self._config.min_neighbours:
            raise self._abort(f"neighbourhood of {k} below this site's minimum "
                              f"{self._config.min_neighbours}")
        if not threshold_for(k, fraction=self._config.threshold) <= request.threshold <= k:
            raise self._abort(f"threshold {request.threshold} below this site's minimum for "
                              f"k = {k}")
        self._commitments, self._u1 = commitments, members
        self._degree, self._threshold = request.neighbours, request.threshold
        return SecAggReveal(value=self._coin)

    def _share_keys(self, request: SecAggKeys) -> SecAggShares:
        try:
            reveals = unpack(self._u1, request.reveals)
        except ValueError:
            raise self._abort("malformed reveals") from None
        if not opens(self._base, "graph", reveals, self._commitments):
            raise self._abort("the reveals do not open the commitment set")
        seed = graph_seed(self._base.info("graph-seed"), reveals)
        self._scope = self._base.with_graph(seed)
        self._neighbours = neighbourhood(self._u1, self.client_id, num_neighbours=self._degree,
                                         seed=seed)
        if set(request.advertisements) != set(self._neighbours):
            raise self._abort("the relayed neighbourhood is not the one the seed gives")
        self._peers = {v: self._checked_advert(v, raw)
                       for v, raw in request.advertisements.items()}
        seen = list(self._publics)
        seen += [key for a in self._peers.values() for key in (a.c_public, a.s_public)]
        if len(set(seen)) != len(seen):
            raise self._abort("repeated public key")
        xs = list(range(1, len(self._neighbours) + 1))
        seed_shares, key_shares = shamir.split_many(
            [int.from_bytes(self._seed, "big"), int.from_bytes(private_bytes(self._s_key), "big")],
            threshold=self._threshold, xs=xs)
        ciphertexts = {}
        for holder, seed_share, key_share in zip(self._neighbours, seed_shares, key_shares,
                                                 strict=True):
            shared = agree(self._c_key, self._peers[holder].c_public, peer=holder)
            keys = self._channels[holder] = channel_keys(shared, scope=self._scope,
                                                         first=self.client_id, second=holder)
            bundle = shamir.encode_share(seed_share) + shamir.encode_share(key_share)
            ciphertexts[holder] = encrypt_shares(keys, bundle, scope=self._scope,
                                                 sender=self.client_id, receiver=holder)
        return SecAggShares(ciphertexts=ciphertexts)

    def _checked_advert(self, peer: str, raw: bytes) -> SecAggAdvertise:
        try:
            advert = SecAggAdvertise.unpack(raw, run=self._base.run)
        except ValueError:
            suspects.report(self._base.round, suspect=peer, reporter=self.client_id,
                            why="malformed advertisement")
            raise self._abort(f"malformed advertisement of {peer!r}") from None
        check_round_keys(advert.c_public, advert.s_public, client_id=peer)
        if advert.graph_commitment != self._commitments[peer]:
            raise self._abort(f"advertisement of {peer!r} does not hold its commitment")
        body = advert_body(self._base, client_id=peer, participants=self._participants,
                           c_public=advert.c_public, s_public=advert.s_public,
                           graph_commitment=advert.graph_commitment,
                           seed_commitment=advert.seed_commitment)
        try:
            verify(self._directory[peer], advert.signature, body, signer=peer,
                   what="advertisement")
        except ProtocolAbort:
            suspects.report(self._base.round, suspect=peer, reporter=self.client_id,
                            why="advertisement signature (or a server that altered it)")
            raise
        return advert

    def _masked_input(self, request: SecAggRelay) -> SecAggMaskedInput:
        encoded, update, senders = self._encoded, self._update, request.ciphertexts
        if not set(senders) <= set(self._peers) or len(senders) < self._threshold:
            raise self._abort("bad relay sender set")
        self._encoded = self._update = None
        self._inbox = dict(senders)
        masks = [(self_mask_key(self._seed, scope=self._scope, client_id=self.client_id), 1)]
        for peer in sorted(senders):
            shared = agree(self._s_key, self._peers[peer].s_public, peer=peer)
            key = pairwise_mask_key(shared, scope=self._scope, first=self.client_id, second=peer)
            masks.append((key, 1 if self.client_id < peer else -1))
        if update is not None:  # written just before the masks are added, while in cache
            encoded, self._excess = self._encoding.encode(update, seed=shared_seed(self._base))
        if encoded is None:
            raise self._abort("masked input requested twice")
        add_masks(encoded, masks)  # in place: the quantized input becomes y_u
        reduce(encoded, self._encoding.bits)
        return SecAggMaskedInput(masked=encoded)

    def _sign(self, request: SecAggConsistency) -> SecAggSignature:
        survivors = request.survivors
        alive = set(survivors)
        mine = [v for v in self._neighbours if v in alive]
        cohort = self._encoding.check_cohort(len(alive))
        problems = [
            (list(survivors) != sorted(set(survivors)), "survivors not sorted and unique"),
            (self.client_id not in survivors, "this client is not among the survivors"),
            (not alive <= self._commitments.keys(), "unknown survivor"),
            (not set(mine) <= set(self._inbox), "a survivor whose shares never arrived"),
            (len(mine) < self._threshold, "fewer than t surviving neighbours"),
            (cohort is not None, f"{cohort}"),
        ]
        for failed, why in problems:
            if failed:
                raise self._abort(f"bad survivor set: {why}")
        self._survivors = survivors
        self._survivors_digest = participants_digest(survivors)
        body = consistency_body(self._scope, client_id=self.client_id,
                                survivors=self._survivors_digest)
        return SecAggSignature(signature=sign(self._identity, body))

    def _unmask(self, request: SecAggUnmaskRequest) -> SecAggUnmaskReply:
        valid = 0
        for peer in self._neighbours:
            signature = request.signatures.get(peer)
            if signature is None or valid >= self._threshold:
                continue
            body = consistency_body(self._scope, client_id=peer,
                                    survivors=self._survivors_digest)
            try:
                verify(self._directory[peer], signature, body, signer=peer, what="consistency")
            except ProtocolAbort:
                suspects.report(self._base.round, suspect=peer, reporter=self.client_id,
                                why="consistency signature on another survivor set")
                continue
            valid += 1
        if valid < self._threshold:
            raise self._abort(f"{valid} valid neighbour signatures on the survivor set, "
                              f"need t = {self._threshold}")
        survivors = set(self._survivors)
        self._context.release(survivors)
        seed_shares, key_shares, withheld = {}, {}, []
        for peer in sorted(self._inbox):
            bundle = self._open_bundle(peer)
            if bundle is None:
                withheld.append(peer)
                continue
            if peer in survivors:
                seed_shares[peer] = bundle[:shamir.SHARE_BYTES]
            else:
                key_shares[peer] = bundle[shamir.SHARE_BYTES:]
        excess = self._excess[:self._encoding.removable(len(survivors))]
        self._reply = SecAggUnmaskReply(seed_shares=seed_shares, key_shares=key_shares,
                                        withheld=tuple(withheld), excess=excess)
        return self._reply

    def _open_bundle(self, peer: str) -> bytes | None:
        """The pair of shares ``peer`` sent, or None (reported) if it is not authentic."""
        try:
            bundle = decrypt_shares(self._channels[peer], self._inbox[peer], scope=self._scope,
                                    sender=peer, receiver=self.client_id)
        except ProtocolAbort:
            bundle = b""
        if len(bundle) != 2 * shamir.SHARE_BYTES:
            suspects.report(self._base.round, suspect=peer, reporter=self.client_id,
                            why="share bundle failed authentication; its shares are withheld")
            return None
        return bundle


_NEXT = dict(itertools.pairwise(ClientPhase))


def _next(phase: ClientPhase) -> ClientPhase:
    return _NEXT[phase]
