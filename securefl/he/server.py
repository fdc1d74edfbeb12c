"""Server half of HE with a blind server (protocol: :mod:`securefl.he.protection`).

The server holds a public CKKS context (no key at all) and the sites' Ed25519 verifying keys,
checks every upload before it sums it, names each one it excludes, and keeps the sum as the
encrypted global model (:class:`~securefl.engine.protection.KeepsModel`); it never receives a
decryption.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Mapping, Sequence

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from securefl.engine.messages import Message, decode, encode
from securefl.engine.protection import Sealed, check_update
from securefl.engine.session import RUN_ID_BYTES
from securefl.errors import MessageError, ProtocolAbort
from securefl.he.ckks import Ciphertext, CKKSKeys
from securefl.he.packing import Selection
from securefl.he.wire import (
    HEContribution,
    HEPart,
    HERoundOpen,
    HEState,
    HEUpload,
    statement,
    upload_digest,
)

__all__ = ["HEServerProtection"]

_log = logging.getLogger(__name__)
_DIGEST = 32


def _abort(detail: str) -> ProtocolAbort:
    return ProtocolAbort.because(f"HE: {detail}")


# ----------------------------------------------------------------------------- server
class HEServerProtection:
    """Server half: a *public* CKKS context (no key at all), the sites' verifying keys, and
    the encrypted global model (:class:`~securefl.engine.protection.KeepsModel`).  With
    ``resum`` the model it keeps is the contributors' checked uploads, not their sum, and
    each site adds them itself."""

    name = "he"
    reveals_rows = False

    def __init__(self, context: CKKSKeys, *, verify_keys: Mapping[str, Ed25519PublicKey],
                 min_contributors: int = 2, selection: Selection | None = None,
                 resum: bool = False) -> None:
        if not isinstance(context, CKKSKeys):
            raise TypeError(f"context must be CKKSKeys, got {type(context).__name__}")
        if context.is_private():
            raise ValueError("the server must hold only the public CKKS context; pass "
                             "keys.public(), never the secret context")
        if min_contributors < 1:
            raise ValueError(f"min_contributors must be >= 1, got {min_contributors}")
        self.context, self.verify_keys = context, dict(verify_keys)
        self.min_contributors, self.selection, self.resum = min_contributors, selection, resum
        self.unit_log2 = 0  # weight unit 2^k for the next round, from the last one's weights
        self.state: HEState | None = None
        self.previous: HEState | None = None

    @classmethod
    def from_bytes(cls, public_context: bytes, **options: object) -> HEServerProtection:
        """Deployment constructor from :meth:`CKKSKeys.to_bytes` of the public context."""
        return cls(CKKSKeys.from_bytes(public_context), **options)  # type: ignore[arg-type]

    def holds_model(self) -> bool:
        return self.state is not None

    def save_state(self) -> bytes:
        """The encrypted global model, encoded (empty before the first sum)."""
        return b"" if self.state is None else encode(self.state)

    def load_state(self, data: bytes) -> None:
        if not data:
            self.state = None
            return
        try:
            self.state = decode(data, expect=HEState)
        except MessageError as exc:
            raise ValueError(f"not an encrypted global model: {exc}") from None
        weights = [c.weight for c in self.state.contributions]
        self.unit_log2 = round(math.log2(sum(weights) / len(weights)))

    def server_round(self, *, round: int, dimension: int,
                     run: bytes | None = None) -> HEServerRound:
        selection = self.selection or Selection.everything(dimension)
        if selection.dimension != dimension:
            raise ValueError(f"layer selection covers {selection.dimension} parameters, "
                             f"the model has {dimension}")
        return HEServerRound(self, round, selection)


class HEServerRound:
    def __init__(self, owner: HEServerProtection, round: int, selection: Selection) -> None:
        self._owner, self._round, self._selection = owner, round, selection
        self._count = owner.context.ciphertext_count(selection.encrypted.size)
        self._unit_log2 = owner.unit_log2
        self._sent = owner.state

    def open(self, participants: Sequence[str]) -> Mapping[str, Message | None]:
        opening = HERoundOpen(key_id=self._owner.context.key_id, unit_log2=self._unit_log2,
                              state=self._sent)
        return dict.fromkeys(participants, opening)

    def _check(self, client_id: str, reply: Message) -> list[Ciphertext] | str:
        """Step 4: the loaded ciphertexts of a valid upload, or why it is excluded."""
        owner = self._owner
        if not isinstance(reply, HEUpload):
            return f"expected an HEUpload, got {type(reply).__name__}"
        if reply.key_id != owner.context.key_id:
            return "ciphertexts are under a different CKKS context (key id mismatch)"
        if reply.unit_log2 != self._unit_log2:
            return f"weight unit 2^{reply.unit_log2}, expected 2^{self._unit_log2}"
        if not (math.isfinite(reply.weight) and reply.weight > 0):
            return f"weight must be finite and > 0, got {reply.weight}"
        if len(reply.run) != RUN_ID_BYTES or len(reply.model) != _DIGEST:
            return "malformed run id or model digest"
        if len(reply.ciphertexts) != self._count:
            return f"expected {self._count} ciphertexts, got {len(reply.ciphertexts)}"
        problem = check_update(reply.clear, self._selection.clear.size)
        if problem is not None:
            return f"clear part: {problem}"
        key = owner.verify_keys.get(client_id)
        if key is None:
            return "no verifying key for this site"
        try:
            key.verify(reply.signature, statement(
                run=reply.run, round=self._round, client_id=client_id, key_id=reply.key_id,
                unit_log2=reply.unit_log2, weight=float(reply.weight), model=reply.model,
                upload=upload_digest(reply.ciphertexts, reply.clear)))
        except InvalidSignature:
            return "upload signature does not verify (tampered or replayed)"
        try:
            return [owner.context.load(data) for data in reply.ciphertexts]
        except ProtocolAbort:
            return "invalid ciphertext (malformed, wrong size, level or scale, or another context)"

    def step(self, replies: Mapping[str, Message], dropped: Collection[str]) -> Sealed:
        owner, rnd = self._owner, self._round
        rejected: dict[str, str] = {}
        valid: dict[str, tuple[HEUpload, list[Ciphertext]]] = {}
        for client_id in sorted(replies):
            outcome = self._check(client_id, replies[client_id])
            if isinstance(outcome, str):
                rejected[client_id] = outcome
            else:
                valid[client_id] = (replies[client_id], outcome)  # type: ignore[assignment]
        groups: dict[tuple[bytes, bytes], list[str]] = {}
        for client_id, (upload, _) in valid.items():
            groups.setdefault((upload.run, upload.model), []).append(client_id)
        chosen = max(groups.values(), key=len, default=[])
        for client_id in sorted(set(valid) - set(chosen)):
            rejected[client_id] = "trained from another global model than the other sites"
        for client_id, reason in rejected.items():
            _log.warning("HE round %d: upload of %s excluded: %s", rnd, client_id, reason)
        if not chosen and not rejected and self._sent is not None:
            self._fall_back(dropped)
        if len(chosen) < owner.min_contributors:
            raise _abort(f"round {rnd}: {len(chosen)} valid uploads, min_contributors = "
                         f"{owner.min_contributors}; excluded: {sorted(rejected) or 'none'}")
        owner.state = self._sum([valid[c] for c in chosen], chosen)
        owner.previous = self._sent
        mean_weight = sum(valid[c][0].weight for c in chosen) / len(chosen)
        owner.unit_log2 = round(math.log2(mean_weight))
        return Sealed(client_ids=tuple(chosen), rejected=rejected)

    def _sum(self, uploads: list[tuple[HEUpload, list[Ciphertext]]], ids: list[str]) -> HEState:
        context, resum = self._owner.context, self._owner.resum
        sums: list[Ciphertext | None] = [None] * self._count
        clear = np.zeros(self._selection.clear.size, dtype=np.float64)
        total_weight = math.fsum(upload.weight for upload, _ in uploads)
        contributions = []
        for client_id, (upload, loaded) in zip(ids, uploads, strict=True):
            if not resum:
                sums = [context.add_into(total, ct) for total, ct in zip(sums, loaded,
                                                                         strict=True)]
            clear += upload.weight * upload.clear.astype(np.float64)
            contributions.append(HEContribution(
                client_id=client_id, weight=float(upload.weight), model=upload.model,
                upload=upload_digest(upload.ciphertexts, upload.clear),
                signature=upload.signature))
        parts = [HEPart(ciphertexts=list(u.ciphertexts), clear=u.clear) for u, _ in uploads]
        return HEState(round=self._round, unit_log2=self._unit_log2,
                       contributions=tuple(contributions),
                       ciphertexts=[] if resum else [context.dump(total) for total in sums],
                       parts=parts if resum else [],
                       clear=(clear / total_weight).astype(np.float32))

    def _fall_back(self, dropped: Collection[str]) -> None:
        """No site used the state it was sent: name its contributors and, if there is one,
        offer the state before it next round (a bad upload may have spoilt the sum)."""
        sent = self._sent
        if sent is None:
            return
        _log.warning("HE round %d: no site of %d used the aggregate of round %d; suspects "
                     "(its contributors): %s; the next round starts from %s", self._round,
                     len(dropped), sent.round,
                     ", ".join(c.client_id for c in sent.contributions),
                     "the round before" if self._owner.previous else "the same aggregate")
        if self._owner.previous is not None:
            self._owner.state, self._owner.previous = self._owner.previous, None
