"""Wire messages of the four SecAgg+ exchanges (Bonawitz et al. 2017, figure 4; Bell et al. 2020).

Round 0 (advertise keys)  server -> client: :class:`SecAggSetup` (inside FitIns)
                          client -> server: :class:`SecAggAdvertise` (inside FitRes)
Round 1 (share keys)      server -> client: :class:`SecAggKeys`
                          client -> server: :class:`SecAggShares`
Round 2 (masked input)    server -> client: :class:`SecAggRelay`
                          client -> server: :class:`SecAggMaskedInput`
Round 3 (unmask)          server -> client: :class:`SecAggUnmaskRequest`
                          client -> server: :class:`SecAggUnmaskReply`
"""

from __future__ import annotations

import numpy as np

from securefl.engine.messages import Message, message

ADVERTISEMENT_BYTES = 32 + 32 + 64  # c_pk, s_pk, Ed25519 signature

__all__ = [
    "ADVERTISEMENT_BYTES",
    "SecAggAdvertise",
    "SecAggKeys",
    "SecAggMaskedInput",
    "SecAggRelay",
    "SecAggSetup",
    "SecAggShares",
    "SecAggUnmaskReply",
    "SecAggUnmaskRequest",
]


@message
class SecAggSetup(Message):
    """The round's public parameters and this client's sorted neighbourhood."""

    round: int
    num_participants: int
    neighbours: tuple[str, ...]
    threshold: int


@message
class SecAggAdvertise(Message):
    """Round public keys ``c`` (share encryption) and ``s`` (masks), signed by the identity."""

    c_public: bytes
    s_public: bytes
    signature: bytes

    def packed(self) -> bytes:
        """``c_pk || s_pk || signature``, as relayed in :class:`SecAggKeys`."""
        return self.c_public + self.s_public + self.signature

    @classmethod
    def unpack(cls, raw: bytes) -> SecAggAdvertise:
        """Inverse of :meth:`packed`; raises ``ValueError`` on a wrong length."""
        if len(raw) != ADVERTISEMENT_BYTES:
            raise ValueError(f"an advertisement is {ADVERTISEMENT_BYTES} bytes, got {len(raw)}")
        return cls(c_public=raw[:32], s_public=raw[32:64], signature=raw[64:])


@message
class SecAggKeys(Message):
    """The client's neighbours that answered round 0: ``c_pk || s_pk || signature`` each."""

    advertisements: dict[str, bytes]


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
    """``y_u = q(x_u) + PRG(b_u) + sum_v +-PRG(s_uv) mod 2**32`` (``d + 1`` words)."""

    masked: np.ndarray


@message
class SecAggUnmaskRequest(Message):
    """Neighbours whose self-mask seed (``survivors``) or mask key (``dropped``) is needed."""

    survivors: tuple[str, ...]
    dropped: tuple[str, ...]


@message
class SecAggUnmaskReply(Message):
    """Shares of ``b_v`` for survivors and of ``s_v^SK`` for dropped neighbours (33 bytes each)."""

    seed_shares: dict[str, bytes]
    key_shares: dict[str, bytes]
