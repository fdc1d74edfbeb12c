"""Server state machine of SecAgg+ (Bonawitz et al., CCS 2017, figure 4 and §4; Bell et al.,
CCS 2020).

The server only relays, sums and checks.  With ``U1 ⊇ U2 ⊇ U3 ⊇ U4 ⊇ U5`` the clients that
advertised keys (and revealed their graph coin), shared keys, sent a masked input, signed
the survivor set and answered the unmask request:

    sum_{u in U3} q(x_u) = sum_{u in U3} y_u - sum_{u in U3} PRG(b_u)
                           - sum_{v in U2 \\ U3} sum_{u in N(v) ∩ U3} ±PRG(s_uv)   (mod 2**32)

Pairwise masks between two survivors cancel.  ``b_u`` and ``s_v^SK`` are recovered from ``t``
Shamir shares held by the neighbourhood.  Before it asks anyone for a secret the server
checks that every client of ``U2`` keeps ``t`` neighbours among the clients that can reveal
(those holding ``t`` neighbour signatures on ``U3``); otherwise the round aborts with no
secret requested.  Every reconstruction is verified: ``b_u`` against ``H(b_u)`` from the
signed advertisement, ``s_v^SK`` against ``s_v^PK``; a mismatch, like a sum the
:class:`~securefl.secagg.encoding.Encoding` cannot decode (a weight outside ``(0, |U3| W]``),
is an unattributable ProtocolAbort.  The masked inputs are summed as they arrive
(:mod:`securefl.secagg.summing`), modulo the encoding's ``2**b``; a
survivor set the encoding refuses (below distributed DP's minimum cohort) aborts the round
before any consistency signature is requested.  An unmask reply must carry exactly the
encoding's ``removable(|U3|)`` secrets of 32 bytes (else it is rejected, naming its sender);
those of the accepted replies go to ``decode`` as ``removed``.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from securefl.config.secagg import SecAggConfig
from securefl.engine.messages import Message
from securefl.engine.protection import Absorbed, Combined, WeightedSum
from securefl.errors import ProtocolAbort
from securefl.secagg import shamir, suspects
from securefl.secagg.encoding import (
    Encoding,
    FixedPoint,
    reduce,
    reveal_problem,
    shared_seed,
    word_dtype,
)
from securefl.secagg.graph import auto_neighbours, degree, graph_seed, harary_graph, threshold_for
from securefl.secagg.keys import (
    advert_body,
    agree,
    check_round_keys,
    commitment,
    consistency_body,
    pairwise_mask_key,
    participants_digest,
    public_bytes,
    self_mask_key,
    verify,
)
from securefl.secagg.messages import (
    SIGNATURE_BYTES,
    SecAggAdvertise,
    SecAggCommitments,
    SecAggConsistency,
    SecAggKeys,
    SecAggRelay,
    SecAggReveal,
    SecAggSetup,
    SecAggShares,
    SecAggSignature,
    SecAggUnmaskReply,
    SecAggUnmaskRequest,
    pack,
)
from securefl.secagg.prg import add_masks
from securefl.secagg.recovery import collect_points, reconstruct
from securefl.secagg.scope import Scope
from securefl.secagg.summing import MaskedSum

__all__ = ["SecAggServerRound", "ServerPhase"]

_CIPHERTEXT_BYTES = 12 + 2 * shamir.SHARE_BYTES + 16


class ServerPhase(enum.Enum):
    NEW = "new"
    ADVERTISE = "advertise"
    REVEAL = "reveal"
    SHARE = "share"
    MASK = "mask"
    CONSISTENCY = "consistency"
    UNMASK = "unmask"
    DONE = "done"


class SecAggServerRound:
    """The server's side of one SecAgg+ round; holds only public keys and masked data.

    ``run``: the run id announced in ``FitIns``; without it the round adopts the run that
    most advertisements sign, and excludes the others.
    """

    @property
    def revealed(self) -> bool:
        """Whether the unmask request went out: before it, no client revealed anything and
        the round may be redone (the engine's :class:`~securefl.engine.protection.Redoable`)."""
        return self.phase in (ServerPhase.UNMASK, ServerPhase.DONE)

    def __init__(self, *, round: int, dimension: int, directory: Mapping[str, bytes],
                 config: SecAggConfig, federation: bytes, run: bytes | None = None,
                 encoding: Encoding | None = None) -> None:
        if dimension < 1:
            raise ValueError(f"dimension must be >= 1, got {dimension}")
        self._round, self._dimension = round, dimension
        self._directory, self._config = directory, config
        self._federation, self._run = federation, run
        self.phase = ServerPhase.NEW
        self._scope: Scope | None = None
        self._participants = b""
        self._graph: dict[str, tuple[str, ...]] = {}
        self._degree = self._threshold = 0
        self._encoding = encoding or FixedPoint(config, num_sites=len(directory))
        self._words = self._encoding.words(dimension)
        self._dtype = word_dtype(self._encoding.bits)
        self._adverts: dict[str, SecAggAdvertise] = {}
        self._u1: tuple[str, ...] = ()
        self._shares: dict[str, Mapping[str, bytes]] = {}
        self._u2: list[str] = []
        self._u3: list[str] = []
        self._signatures: dict[str, bytes] = {}
        self._revealers: set[str] = set()
        self._sum = MaskedSum((), words=self._words, dtype=self._dtype)
        self._total = np.zeros(0, np.uint32)
        self.rejected: dict[str, str] = {}

    @property
    def graph(self) -> Mapping[str, tuple[str, ...]]:
        """The round's graph once the reveals have fixed it (public information)."""
        return dict(self._graph)

    @property
    def threshold(self) -> int:
        return self._threshold

    # ------------------------------------------------------------------ setup
    def open(self, participants: Sequence[str]) -> Mapping[str, Message | None]:
        if self.phase is not ServerPhase.NEW:
            raise ValueError("a SecAgg round opens once")
        unknown = [cid for cid in participants if cid not in self._directory]
        if unknown:
            raise ValueError(f"no identity key for clients {unknown[:5]}")
        ids = tuple(sorted(set(participants)))
        if len(ids) < self._config.min_neighbours + 1:
            raise ProtocolAbort.because(f"round {self._round}: {len(ids)} participant(s), need "
                                        f">= {self._config.min_neighbours + 1}")
        self._participants = participants_digest(ids)
        self.phase = ServerPhase.ADVERTISE
        setup = SecAggSetup(round=self._round, participants=ids)
        return dict.fromkeys(ids, setup)

    # ------------------------------------------------------------------ dispatch
    def step(self, replies: Mapping[str, Message],
             dropped: Collection[str]) -> Mapping[str, Message] | Combined:
        gone = set(dropped)
        live = {cid: msg for cid, msg in replies.items() if cid not in gone}
        handlers: dict[ServerPhase, Callable[[Mapping[str, Message]],
                                             Mapping[str, Message] | Combined]] = {
                    ServerPhase.ADVERTISE: self._collect_adverts,
                    ServerPhase.REVEAL: self._collect_reveals,
                    ServerPhase.SHARE: self._relay_shares,
                    ServerPhase.MASK: self._request_consistency,
                    ServerPhase.CONSISTENCY: self._request_unmask,
                    ServerPhase.UNMASK: self._unmask}
        handler = handlers.get(self.phase)
        if handler is None:
            raise ValueError(f"SecAgg round is in phase {self.phase.value!r}; nothing to step")
        return handler(live)

    def _reject(self, cid: str, reason: str) -> None:
        suspects.report(self._round, suspect=cid, reporter="server", why=reason)
        self.rejected[cid] = reason

    def _require(self, members: Collection[str], within: Collection[str], what: str) -> None:
        """Abort unless every client in ``members`` has ``t`` neighbours in ``within``."""
        pool = set(within)
        for cid in members:
            if sum(v in pool for v in self._graph[cid]) < self._threshold:
                raise ProtocolAbort.because(
                    f"round {self._round}: neighbourhood of {cid!r} below threshold "
                    f"{self._threshold} at {what}")

    def _base(self) -> Scope:
        if self._scope is None:
            raise ValueError("the SecAgg round has no scope before the advertisements")
        return self._scope

    # ------------------------------------------------------------------ 0 -> 1
    def _collect_adverts(self, live: Mapping[str, Message]) -> Mapping[str, Message]:
        signed: dict[str, SecAggAdvertise] = {}
        for cid, msg in live.items():
            if cid not in self._directory or not isinstance(msg, SecAggAdvertise):
                self._reject(cid, "expected a SecAggAdvertise")
                continue
            try:
                check_round_keys(msg.c_public, msg.s_public, client_id=cid)
                scope = Scope(federation=self._federation, run=msg.run, round=self._round)
                verify(self._directory[cid], msg.signature, self._advert_body(scope, cid, msg),
                       signer=cid, what="advertisement")
            except (ProtocolAbort, ValueError):
                self._reject(cid, "key advertisement failed verification")
                continue
            signed[cid] = msg
        runs = Counter(msg.run for msg in signed.values())
        run = self._run if self._run is not None else (runs.most_common(1) or [(b"", 0)])[0][0]
        for cid, msg in signed.items():
            if msg.run != run:
                self._reject(cid, "advertisement signed for another run")
            else:
                self._adverts[cid] = msg
        n1 = len(self._adverts)
        requested = (auto_neighbours(max(n1, 2)) if self._config.neighbours == "auto"
                     else int(self._config.neighbours))
        if n1 < 2 or degree(n1, neighbours=requested) < self._config.min_neighbours:
            raise ProtocolAbort.because(f"round {self._round}: {n1} clients advertised keys")
        self._scope = Scope(federation=self._federation, run=run, round=self._round)
        self._degree = requested
        self._threshold = threshold_for(degree(n1, neighbours=requested),
                                        fraction=self._config.threshold)
        self.phase = ServerPhase.REVEAL
        self._u1 = tuple(sorted(self._adverts))
        request = SecAggCommitments(
            members=self._u1, neighbours=requested, threshold=self._threshold,
            commitments=pack(self._u1, {c: a.graph_commitment for c, a in self._adverts.items()}))
        return dict.fromkeys(self._adverts, request)

    def _advert_body(self, scope: Scope, cid: str, msg: SecAggAdvertise) -> bytes:
        return advert_body(scope, client_id=cid, participants=self._participants,
                           c_public=msg.c_public, s_public=msg.s_public,
                           graph_commitment=msg.graph_commitment,
                           seed_commitment=msg.seed_commitment)

    # ------------------------------------------------------------------ 1 -> 2
    def _collect_reveals(self, live: Mapping[str, Message]) -> Mapping[str, Message]:
        base = self._base()
        reveals = {}
        for cid, advert in self._adverts.items():
            msg = live.get(cid)
            if msg is None:
                raise ProtocolAbort.because(f"round {self._round}: {cid!r} committed to the "
                                            "graph and did not reveal; the round is redone")
            if (not isinstance(msg, SecAggReveal)
                    or commitment(base, "graph", cid, msg.value) != advert.graph_commitment):
                self._reject(cid, "graph reveal does not open its signed commitment")
                raise ProtocolAbort.because(f"round {self._round}: bad reveal from {cid!r}")
            reveals[cid] = msg.value
        seed = graph_seed(base.info("graph-seed"), reveals)
        self._scope = base.with_graph(seed)
        self._graph = harary_graph(self._u1, num_neighbours=self._degree,
                                   seed=seed)
        self.phase = ServerPhase.SHARE
        packed = {cid: advert.packed() for cid, advert in self._adverts.items()}
        revealed = pack(self._u1, reveals)
        return {cid: SecAggKeys(reveals=revealed,
                                advertisements={v: packed[v] for v in self._graph[cid]})
                for cid in self._adverts}

    # ------------------------------------------------------------------ 2 -> 3
    def _relay_shares(self, live: Mapping[str, Message]) -> Mapping[str, Message]:
        for cid, msg in live.items():
            if (cid not in self._adverts or not isinstance(msg, SecAggShares)
                    or set(msg.ciphertexts) != set(self._graph[cid])
                    or any(len(c) != _CIPHERTEXT_BYTES for c in msg.ciphertexts.values())):
                self._reject(cid, "malformed SecAggShares")
                continue
            self._shares[cid] = msg.ciphertexts
        self._u2 = [cid for cid in self._adverts if cid in self._shares]
        self._sum = MaskedSum(self._u2, words=self._words, dtype=self._dtype)
        # Every client in U2 is masked against by its neighbours, so each needs t holders.
        self._require(self._u2, self._u2, "share keys")
        self.phase = ServerPhase.MASK
        return {cid: SecAggRelay(ciphertexts={v: self._shares[v][cid] for v in self._graph[cid]
                                              if v in self._shares})
                for cid in self._u2}

    # ------------------------------------------------------------------ 3 -> 4
    def receive(self, client_id: str, reply: Message) -> Message:
        """Add a masked input into the sum as it arrives (:class:`~securefl.secagg.summing.
        MaskedSum`; the engine's :class:`~securefl.engine.protection.Receives`); the
        transport hands over only replies it accepted, on time.  Any other reply, a
        malformed input included, stays as it is for the step."""
        if self.phase is ServerPhase.MASK and self._sum.add(client_id, reply):
            return Absorbed()
        return reply

    def _request_consistency(self, live: Mapping[str, Message]) -> Mapping[str, Message]:
        survivors, malformed = self._sum.settle(live)
        for cid in malformed:
            self._reject(cid, "malformed SecAggMaskedInput")
        if self._sum.summed != set(survivors):  # the sum would hold an input outside U3
            raise ProtocolAbort.because(f"round {self._round}: a summed masked input was "
                                        "reported dropped; nothing is revealed")
        total = self._sum.take()
        if len(survivors) < self._threshold or total is None:
            raise ProtocolAbort.because(f"round {self._round}: {len(survivors)} masked inputs, "
                                        f"fewer than t = {self._threshold}")
        cohort = self._encoding.check_cohort(len(survivors))
        if cohort is not None:
            raise ProtocolAbort.because(f"round {self._round}: {cohort}; nothing is revealed")
        self._u3, self._total = sorted(survivors), reduce(total, self._encoding.bits)
        self._require(self._u2, survivors, "masked input")
        self.phase = ServerPhase.CONSISTENCY
        return dict.fromkeys(self._u3, SecAggConsistency(survivors=tuple(self._u3)))

    # ------------------------------------------------------------------ 4 -> 5
    def _request_unmask(self, live: Mapping[str, Message]) -> Mapping[str, Message]:
        scope = self._base()
        survivors = participants_digest(self._u3)
        for cid in self._u3:
            msg = live.get(cid)
            if msg is None:
                continue
            body = consistency_body(scope, client_id=cid, survivors=survivors)
            try:
                if not isinstance(msg, SecAggSignature) or len(msg.signature) != SIGNATURE_BYTES:
                    raise ProtocolAbort.because(f"malformed consistency reply from {cid!r}")
                verify(self._directory[cid], msg.signature, body, signer=cid,
                       what="consistency")
            except ProtocolAbort:
                self._reject(cid, "consistency signature failed verification")
                continue
            self._signatures[cid] = msg.signature
        signers = set(self._signatures)
        # a client reveals only with t neighbour signatures: ask only those that have them
        self._revealers = {cid for cid in signers
                           if sum(v in signers for v in self._graph[cid]) >= self._threshold}
        self._require(self._u2, self._revealers, "consistency check")
        self.phase = ServerPhase.UNMASK
        return {cid: SecAggUnmaskRequest(signatures={v: self._signatures[v]
                                                     for v in self._graph[cid] if v in signers})
                for cid in sorted(self._revealers)}

    # ------------------------------------------------------------------ 5 -> result
    def _unmask(self, live: Mapping[str, Message]) -> WeightedSum:
        scope = self._base()
        survivors = self._u3
        alive = set(survivors)
        dropped = [cid for cid in self._u2 if cid not in alive]
        seed_points: dict[str, dict[int, int]] = {cid: {} for cid in survivors}
        key_points: dict[str, dict[int, int]] = {cid: {} for cid in dropped}
        allowed, removed = self._encoding.removable(len(survivors)), []
        for holder, msg in live.items():
            if holder not in self._revealers or not isinstance(msg, SecAggUnmaskReply):
                self._reject(holder, "expected a SecAggUnmaskReply")
                continue
            problem = reveal_problem(msg.excess, expected=allowed)
            if problem is not None:
                self._reject(holder, f"unmask reply with bad excess seeds: {problem}")
                continue
            removed.append(msg.excess)
            bad = collect_points(self._graph, holder, msg, seed_points, key_points,
                                 round=self._round)
            if bad is not None:
                self._reject(holder, f"malformed share of {bad!r}; its shares are unused")
        masks = []
        advertised = scope.with_graph(b"")  # the seed commitments predate the graph
        for owner in survivors:
            seed = reconstruct(owner, seed_points[owner], threshold=self._threshold,
                               round=self._round)
            if commitment(advertised, "seed", owner,
                          seed) != self._adverts[owner].seed_commitment:
                raise ProtocolAbort.because(
                    f"round {self._round}: reconstructed seed of {owner!r} does not match its "
                    "commitment")
            masks.append((self_mask_key(seed, scope=scope, client_id=owner), -1))
        for owner in dropped:
            key = X25519PrivateKey.from_private_bytes(reconstruct(
                owner, key_points[owner], threshold=self._threshold, round=self._round))
            if public_bytes(key) != self._adverts[owner].s_public:
                raise ProtocolAbort.because(
                    f"round {self._round}: reconstructed key of {owner!r} does not match")
            for peer in self._graph[owner]:
                if peer in alive:
                    shared = agree(key, self._adverts[peer].s_public, peer=peer)
                    mask = pairwise_mask_key(shared, scope=scope, first=peer, second=owner)
                    masks.append((mask, -1 if peer < owner else 1))
        total = self._total
        add_masks(total, masks)
        reduce(total, self._encoding.bits)
        self.phase = ServerPhase.DONE
        self._total = np.zeros(0, self._dtype)
        try:
            weighted, total_weight = self._encoding.decode(
                total, seed=shared_seed(scope), survivors=len(survivors),
                dimension=self._dimension, removed=removed)
        except ValueError as exc:
            raise ProtocolAbort.because(f"round {self._round}: {exc}") from None
        return WeightedSum(client_ids=tuple(survivors), total=weighted,
                           total_weight=total_weight, rejected=dict(self.rejected))
