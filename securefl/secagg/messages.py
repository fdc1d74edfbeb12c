"""Wire messages of the six SecAgg+ exchanges (Bonawitz et al. 2017, figure 4, with the
consistency check of §4; Bell et al. 2020; the graph from commit-then-reveal).

0 advertise keys   server -> client: :class:`SecAggSetup` (inside FitIns)
                   client -> server: :class:`SecAggAdvertise` (inside FitRes)
1 fix the graph    server -> client: :class:`SecAggCommitments`
                   client -> server: :class:`SecAggReveal`
2 share keys       server -> client: :class:`SecAggKeys`
                   client -> server: :class:`SecAggShares`
3 masked input     server -> client: :class:`SecAggRelay`
                   client -> server: :class:`SecAggMaskedInput`
4 consistency      server -> client: :class:`SecAggConsistency`
                   client -> server: :class:`SecAggSignature`
5 unmask           server -> client: :class:`SecAggUnmaskRequest`
                   client -> server: :class:`SecAggUnmaskReply`
"""

from __future__ import annotations

import numpy as np

from securefl.engine.messages import Message, message

DIGEST_BYTES = 32
SIGNATURE_BYTES = 64
ADVERTISEMENT_BYTES = 4 * 32 + SIGNATURE_BYTES  # c_pk, s_pk, H(r_u), H(b_u), signature

__all__ = [
    "ADVERTISEMENT_BYTES",
    "DIGEST_BYTES",
    "SIGNATURE_BYTES",
    "SecAggAdvertise",
    "SecAggCommitments",
    "SecAggConsistency",
    "SecAggKeys",
    "SecAggMaskedInput",
    "SecAggRelay",
    "SecAggReveal",
    "SecAggSetup",
    "SecAggShares",
    "SecAggSignature",
    "SecAggUnmaskReply",
    "SecAggUnmaskRequest",
    "pack",
    "unpack",
]


@message
class SecAggSetup(Message):
    """The round and its sorted participant list (``n = len(participants)``)."""

    round: int
    participants: tuple[str, ...]


@message
class SecAggAdvertise(Message):
    """Round public keys ``c`` and ``s``, commitments ``H(r_u)`` (graph) and ``H(b_u)`` (self-mask
    seed), signed with the identity key over the scope (which holds ``run``) and the participant
    list.  ``run`` names the run the client signed for, so the server can check it."""

    run: bytes
    c_public: bytes
    s_public: bytes
    graph_commitment: bytes
    seed_commitment: bytes
    signature: bytes

    def packed(self) -> bytes:
        """The five fields concatenated, as relayed in :class:`SecAggKeys`."""
        return (self.c_public + self.s_public + self.graph_commitment + self.seed_commitment
                + self.signature)

    @classmethod
    def unpack(cls, raw: bytes, *, run: bytes) -> SecAggAdvertise:
        """Inverse of :meth:`packed` (``run``: the receiver's); ``ValueError`` on a wrong length."""
        if len(raw) != ADVERTISEMENT_BYTES:
            raise ValueError(f"an advertisement is {ADVERTISEMENT_BYTES} bytes, got {len(raw)}")
        return cls(run=run, c_public=raw[:32], s_public=raw[32:64], graph_commitment=raw[64:96],
                   seed_commitment=raw[96:128], signature=raw[128:])


@message
class SecAggCommitments(Message):
    """The commitment set of every client that advertised: ``members`` (``U1``, sorted) and
    ``commitments``, their ``H(r_u)`` concatenated in that order (32 bytes each); the degree
    ``k`` and the threshold ``t`` of the graph that the reveals will fix."""

    members: tuple[str, ...]
    commitments: bytes
    neighbours: int
    threshold: int


@message
class SecAggReveal(Message):
    """``r_u``, sent only after the commitment set is fixed."""

    value: bytes


@message
class SecAggKeys(Message):
    """Every reveal of ``U1`` (``r_u`` concatenated in the order of
    :attr:`SecAggCommitments.members`) and the advertisements of the client's neighbours."""

    reveals: bytes
    advertisements: dict[str, bytes]


def pack(members: tuple[str, ...], table: dict[str, bytes]) -> bytes:
    """The 32-byte values of ``table`` concatenated in ``members`` order."""
    return b"".join(table[m] for m in members)


def unpack(members: tuple[str, ...], packed: bytes) -> dict[str, bytes]:
    """Inverse of :func:`pack`; ``ValueError`` on a wrong length."""
    if len(packed) != DIGEST_BYTES * len(members):
        raise ValueError(f"{len(members)} members need {DIGEST_BYTES * len(members)} bytes, "
                         f"got {len(packed)}")
    return {m: packed[DIGEST_BYTES * i:DIGEST_BYTES * (i + 1)] for i, m in enumerate(members)}


@message
class SecAggShares(Message):
    """Encrypted share bundles, keyed by receiving neighbour."""

    ciphertexts: dict[str, bytes]


@message
class SecAggRelay(Message):
    """Encrypted share bundles addressed to this client, keyed by sender."""

    ciphertexts: dict[str, bytes]


@message
class SecAggMaskedInput(Message):
    """``y_u = q(x_u) + PRG(b_u) + sum_v +-PRG(s_uv) mod 2**b``: the encoding's words
    (``d + 1`` uint32 by default; uint16 when ``b <= 16``)."""

    masked: np.ndarray


@message
class SecAggConsistency(Message):
    """The survivor set ``U3`` (sorted): the clients whose masked inputs the server sums."""

    survivors: tuple[str, ...]


@message
class SecAggSignature(Message):
    """The client's Ed25519 signature on ``U3`` (:func:`securefl.secagg.keys.consistency_body`)."""

    signature: bytes


@message
class SecAggUnmaskRequest(Message):
    """The neighbours' signatures on ``U3``; the client reveals only with ``t`` valid ones."""

    signatures: dict[str, bytes]


@message
class SecAggUnmaskReply(Message):
    """Shares of ``b_v`` for survivors and of ``s_v^SK`` for dropped neighbours (36 bytes each);
    ``withheld``: the neighbours whose share bundle failed authentication at this client (it
    names them so the server's operator can blame the sender, not the reporter); ``excess``:
    the sender's own removable-noise seeds of the levels at or below ``|U3|`` (distributed
    DP's :meth:`~securefl.secagg.encoding.Encoding.removable`; empty otherwise)."""

    seed_shares: dict[str, bytes]
    key_shares: dict[str, bytes]
    withheld: tuple[str, ...]
    excess: tuple[bytes, ...] = ()
