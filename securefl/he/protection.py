"""HE protection: clients encrypt weight-scaled updates, the server adds ciphertexts.

One round (Phong et al., "Privacy-preserving deep learning via additively homomorphic
encryption", IEEE TIFS 2018, with CKKS in place of Paillier/LWE):

1. ``FitIns`` carries :class:`HERoundOpen`: the key id and a weight unit ``u = 2^k``, the
   previous round's mean weight rounded to a power of two (1 in the first round), so that
   ``sum_i w_i / u`` stays near the number of clients whatever the weights' scale (example
   counts) and the sum stays far below the CKKS capacity.  A power of two scales exactly.
2. Client ``i`` trains, then uploads :class:`HEUpload`: seeded symmetric CKKS encryptions of
   ``(w_i / u) x_i`` (packed, :mod:`securefl.he.packing`), its weight ``w_i`` *in the clear*,
   the unselected coordinates ``x_i`` in the clear (layer selection only) and an Ed25519
   signature over the round, its id, the key id, ``k`` and a hash of everything above.
3. The server drops a client whose upload fails any check (signature, key id, unit,
   ciphertext count, SEAL validation), adds the rest: ``C = sum_i Enc((w_i / u) x_i)``, and
   sends ``C`` to ``decryptors`` designated clients (:class:`HEDecryptRequest`).
4. Each decryptor refuses an aggregate of fewer than ``min_contributors`` clients or a
   second request in the same round, else returns ``Dec(C)`` (:class:`HEDecryptReply`).
   Decryption is deterministic, so several decryptors must agree; a silent decryptor is
   replaced by the next contributor.  The result is a :class:`WeightedSum` with
   ``total = u Dec(C) = sum_i w_i x_i``; dividing by ``sum_i w_i`` (the weights are public)
   gives the FedAvg mean.

The server holds only :meth:`CKKSKeys.public` and the clients' Ed25519 *public* keys.
"""

from __future__ import annotations

import hashlib
import logging
import math
import struct
from collections.abc import Collection, Mapping, Sequence

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from securefl.engine.messages import Decline, Message, message
from securefl.engine.protection import Update, WeightedSum, check_update
from securefl.engine.session import RoundContext
from securefl.errors import ProtocolAbort
from securefl.he.ckks import Ciphertext, CKKSKeys
from securefl.he.packing import Selection

__all__ = [
    "HEClientProtection",
    "HEDecryptReply",
    "HEDecryptRequest",
    "HERoundOpen",
    "HEServerProtection",
    "HEUpload",
]

_log = logging.getLogger(__name__)
_DOMAIN = b"securefl/he/upload/v1"
_MAX_UNIT_LOG2 = 64


@message
class HERoundOpen(Message):
    """Server -> client with ``FitIns``: the key in use and the weight unit ``2^unit_log2``."""

    key_id: bytes
    unit_log2: int


@message
class HEUpload(Message):
    """Client -> server: encrypted ``(w / u) x`` (seeded), clear weight and signature."""

    key_id: bytes
    unit_log2: int
    weight: float
    ciphertexts: list[bytes]
    clear: np.ndarray
    signature: bytes | None


@message
class HEDecryptRequest(Message):
    """Server -> decryptor: the summed ciphertexts and who contributed to them."""

    key_id: bytes
    contributors: tuple[str, ...]
    length: int
    ciphertexts: list[bytes]


@message
class HEDecryptReply(Message):
    """Decryptor -> server: the decrypted weighted sum of the encrypted coordinates."""

    total: np.ndarray


def upload_digest(*, round: int, client_id: str, key_id: bytes, unit_log2: int,
                  weight: float, ciphertexts: Sequence[bytes], clear: np.ndarray) -> bytes:
    """SHA-256 over the length-prefixed upload fields: what the client's signature covers."""
    digest = hashlib.sha256(_DOMAIN)
    parts = [struct.pack("<q", round), client_id.encode(), key_id,
             struct.pack("<q", unit_log2), struct.pack("<d", weight),
             np.ascontiguousarray(clear, dtype=np.float32).tobytes(), *ciphertexts]
    for part in parts:
        digest.update(struct.pack("<Q", len(part)))
        digest.update(part)
    return digest.digest()


# ----------------------------------------------------------------------------- client
class HEClientProtection:
    """Client half: holds the *secret* CKKS context and the client's signing key."""

    name = "he"

    def __init__(self, keys: CKKSKeys, *, client_id: str,
                 signing_key: Ed25519PrivateKey | None = None, min_contributors: int = 2,
                 selection: Selection | None = None) -> None:
        if not keys.is_private():
            raise ValueError("a client needs the secret CKKS context to encrypt and decrypt")
        if min_contributors < 1:
            raise ValueError(f"min_contributors must be >= 1, got {min_contributors}")
        self.keys, self.client_id, self.signing_key = keys, client_id, signing_key
        self.min_contributors, self.selection = min_contributors, selection

    @classmethod
    def from_bytes(cls, secret_context: bytes, *, client_id: str,
                   signing_key: Ed25519PrivateKey | None = None, min_contributors: int = 2,
                   selection: Selection | None = None) -> HEClientProtection:
        """Deployment constructor from :meth:`CKKSKeys.to_bytes` of the secret context."""
        return cls(CKKSKeys.from_bytes(secret_context), client_id=client_id,
                   signing_key=signing_key, min_contributors=min_contributors,
                   selection=selection)

    def client_round(self, *, round: int, context: RoundContext) -> HEClientRound:
        return HEClientRound(self, round, context)


class HEClientRound:
    def __init__(self, owner: HEClientProtection, round: int, context: RoundContext) -> None:
        self._owner, self._round, self._context = owner, round, context
        self._decrypted = False

    def open(self, update: Update, payload: Message | None) -> Message:
        owner = self._owner
        problem = check_update(update.delta, update.delta.size)
        if problem is not None:
            raise ValueError(problem)
        weight = float(update.weight)
        if not (np.isfinite(weight) and weight > 0):
            raise ValueError(f"weight must be finite and > 0, got {update.weight}")
        unit_log2 = 0
        if payload is not None:
            if not isinstance(payload, HERoundOpen):
                raise ValueError(f"HE protection expects an HERoundOpen, got "
                                 f"{type(payload).__name__}")
            if payload.key_id != owner.keys.key_id:
                raise ValueError("the server uses a different CKKS key than this client")
            if not -_MAX_UNIT_LOG2 <= payload.unit_log2 <= _MAX_UNIT_LOG2:
                raise ValueError(f"weight unit 2^{payload.unit_log2} is out of range")
            unit_log2 = payload.unit_log2
        selection = owner.selection or Selection.everything(update.delta.size)
        secret_part, clear = selection.split(update.delta)
        scaled = np.ldexp(weight * secret_part.astype(np.float64), -unit_log2)
        ciphertexts = owner.keys.encrypt(scaled)
        clear = np.ascontiguousarray(clear, dtype=np.float32)
        signature = None
        if owner.signing_key is not None:
            signature = owner.signing_key.sign(upload_digest(
                round=self._round, client_id=owner.client_id, key_id=owner.keys.key_id,
                unit_log2=unit_log2, weight=weight, ciphertexts=ciphertexts, clear=clear))
        return HEUpload(key_id=owner.keys.key_id, unit_log2=unit_log2, weight=weight,
                        ciphertexts=ciphertexts, clear=clear, signature=signature)

    def step(self, request: Message) -> Message:
        owner = self._owner
        if not isinstance(request, HEDecryptRequest):
            raise ValueError(f"HE protection expects an HEDecryptRequest, got "
                             f"{type(request).__name__}")
        if request.key_id != owner.keys.key_id:
            return Decline(reason="aggregate is under a different CKKS key")
        if self._decrypted:  # one decryption per round: the server gets no oracle
            return Decline(reason="already decrypted an aggregate this round")
        if len(set(request.contributors)) < owner.min_contributors:
            return Decline(reason=f"refusing to decrypt an aggregate of "
                                  f"{len(set(request.contributors))} clients "
                                  f"(min_contributors = {owner.min_contributors})")
        self._context.release(request.contributors)
        try:
            total = owner.keys.decrypt(request.ciphertexts, request.length)
        except ProtocolAbort:
            return Decline(reason="aggregate does not decrypt")
        self._decrypted = True
        return HEDecryptReply(total=total)


# ----------------------------------------------------------------------------- server
class HEServerProtection:
    """Server half: holds a *public* CKKS context only, and the clients' verifying keys.

    ``verify_keys=None`` leaves upload integrity to the transport (mTLS); otherwise every
    upload must carry a valid signature by its client's key.
    """

    name = "he"
    reveals_rows = False

    def __init__(self, context: CKKSKeys, *,
                 verify_keys: Mapping[str, Ed25519PublicKey] | None = None,
                 decryptors: int = 1, min_contributors: int = 2,
                 selection: Selection | None = None) -> None:
        if not isinstance(context, CKKSKeys):
            raise TypeError(f"context must be CKKSKeys, got {type(context).__name__}")
        if context.is_private():
            raise ValueError("the server must hold only the public CKKS context; pass "
                             "keys.public(), never the secret context")
        if decryptors < 1:
            raise ValueError(f"decryptors must be >= 1, got {decryptors}")
        if min_contributors < 1:
            raise ValueError(f"min_contributors must be >= 1, got {min_contributors}")
        self.context = context
        self.verify_keys = None if verify_keys is None else dict(verify_keys)
        self.decryptors, self.min_contributors = decryptors, min_contributors
        self.selection = selection
        self.unit_log2 = 0  # weight unit 2^k for the next round, from the last one's weights

    @classmethod
    def from_bytes(cls, public_context: bytes, *,
                   verify_keys: Mapping[str, Ed25519PublicKey] | None = None,
                   decryptors: int = 1, min_contributors: int = 2,
                   selection: Selection | None = None) -> HEServerProtection:
        """Deployment constructor from :meth:`CKKSKeys.to_bytes` of the public context."""
        return cls(CKKSKeys.from_bytes(public_context), verify_keys=verify_keys,
                   decryptors=decryptors, min_contributors=min_contributors,
                   selection=selection)

    def server_round(self, *, round: int, dimension: int) -> HEServerRound:
        selection = self.selection or Selection.everything(dimension)
        if selection.dimension != dimension:
            raise ValueError(f"layer selection covers {selection.dimension} parameters, "
                             f"the model has {dimension}")
        return HEServerRound(self, round, selection)


class HEServerRound:
    def __init__(self, owner: HEServerProtection, round: int, selection: Selection) -> None:
        self._owner, self._round, self._selection = owner, round, selection
        self._count = owner.context.ciphertext_count(selection.encrypted.size)
        self._accepted: list[str] = []
        self._weights: dict[str, float] = {}
        self._rejected: dict[str, str] = {}
        self._clear = np.zeros(selection.clear.size, dtype=np.float64)
        self._request: HEDecryptRequest | None = None
        self._asked: set[str] = set()
        self._unit_log2 = owner.unit_log2

    def open(self, participants: Sequence[str]) -> Mapping[str, Message | None]:
        opening = HERoundOpen(key_id=self._owner.context.key_id, unit_log2=self._unit_log2)
        return dict.fromkeys(participants, opening)

    def step(self, replies: Mapping[str, Message],
             dropped: Collection[str]) -> Mapping[str, Message] | WeightedSum:
        if self._request is None:
            return self._combine(replies)
        return self._finish(self._request, replies)

    # ---------------------------------------------------------------- exchange 1: uploads
    def _check(self, client_id: str, reply: Message) -> tuple[list[Ciphertext], float] | str:
        """The loaded ciphertexts and weight of a valid upload, or why it is rejected."""
        owner = self._owner
        if not isinstance(reply, HEUpload):
            return f"expected an HEUpload, got {type(reply).__name__}"
        if reply.key_id != owner.context.key_id:
            return "ciphertexts are under a different CKKS context (key id mismatch)"
        if reply.unit_log2 != self._unit_log2:
            return f"weight unit 2^{reply.unit_log2}, expected 2^{self._unit_log2}"
        if not (np.isfinite(reply.weight) and reply.weight > 0):
            return f"weight must be finite and > 0, got {reply.weight}"
        if len(reply.ciphertexts) != self._count:
            return f"expected {self._count} ciphertexts, got {len(reply.ciphertexts)}"
        problem = check_update(reply.clear, self._selection.clear.size)
        if problem is not None:
            return f"clear part: {problem}"
        if owner.verify_keys is not None:
            key = owner.verify_keys.get(client_id)
            if key is None or not isinstance(reply.signature, bytes):
                return "upload is not signed by a known client key"
            try:
                key.verify(reply.signature, upload_digest(
                    round=self._round, client_id=client_id, key_id=reply.key_id,
                    unit_log2=reply.unit_log2, weight=float(reply.weight),
                    ciphertexts=reply.ciphertexts,
                    clear=reply.clear))
            except InvalidSignature:
                return "upload signature does not verify (tampered or replayed)"
        try:
            loaded = [owner.context.load(data) for data in reply.ciphertexts]
        except ProtocolAbort:
            return "invalid ciphertext (truncated, tampered or from another context)"
        return loaded, float(reply.weight)

    def _combine(self, replies: Mapping[str, Message]) -> Mapping[str, Message]:
        context = self._owner.context
        sums: list[Ciphertext | None] = [None] * self._count
        for client_id in sorted(replies):
            outcome = self._check(client_id, replies[client_id])
            if isinstance(outcome, str):
                _log.warning("HE round %d: client %s rejected: %s", self._round, client_id,
                             outcome)
                self._rejected[client_id] = outcome
                continue
            loaded, weight = outcome
            sums = [context.add_into(total, ct) for total, ct in zip(sums, loaded, strict=True)]
            self._clear += weight * replies[client_id].clear.astype(np.float64)
            self._accepted.append(client_id)
            self._weights[client_id] = weight
        if self._accepted:  # even if this round fails, the next one uses a fitting unit
            mean_weight = sum(self._weights.values()) / len(self._accepted)
            self._owner.unit_log2 = round(math.log2(mean_weight))
        if len(self._accepted) < self._owner.min_contributors:
            raise ProtocolAbort.because(
                f"HE round {self._round}: {len(self._accepted)} valid uploads, "
                f"min_contributors = {self._owner.min_contributors}")
        self._request = HEDecryptRequest(
            key_id=context.key_id, contributors=tuple(self._accepted),
            length=int(self._selection.encrypted.size),
            ciphertexts=[context.dump(total) for total in sums])
        return self._ask(self._request)

    # ---------------------------------------------------------------- exchange 2+: decrypt
    def _ask(self, request: HEDecryptRequest) -> Mapping[str, Message]:
        """Send the aggregate to the next ``decryptors`` contributors not asked yet."""
        candidates = [c for c in self._accepted if c not in self._asked]
        chosen = candidates[:self._owner.decryptors]
        if not chosen:
            raise ProtocolAbort.because(f"HE round {self._round}: no decryptor answered")
        self._asked.update(chosen)
        return dict.fromkeys(chosen, request)

    def _finish(self, request: HEDecryptRequest,
                replies: Mapping[str, Message]) -> Mapping[str, Message] | WeightedSum:
        length = self._selection.encrypted.size
        totals = []
        for client_id, reply in sorted(replies.items()):
            if (isinstance(reply, HEDecryptReply) and isinstance(reply.total, np.ndarray)
                    and reply.total.shape == (length,) and np.isfinite(reply.total).all()):
                totals.append(reply.total.astype(np.float64))
            else:
                reason = reply.reason if isinstance(reply, Decline) else "malformed reply"
                _log.warning("HE round %d: decryptor %s failed: %s", self._round, client_id,
                             reason)
        if not totals:
            return self._ask(request)
        # Decryption is deterministic; only floating-point decoding may differ across hosts.
        tolerance = self._owner.context.parameters.error_bound(len(self._accepted))
        if any(np.max(np.abs(totals[0] - other), initial=0.0) > tolerance
               for other in totals[1:]):
            raise ProtocolAbort.because(f"HE round {self._round}: decryptors disagree")
        total = self._selection.merge(np.ldexp(totals[0], self._unit_log2), self._clear)
        return WeightedSum(client_ids=tuple(self._accepted), total=total,
                           total_weight=float(sum(self._weights.values())),
                           rejected=dict(self._rejected))
