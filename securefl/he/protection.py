"""HE with a blind server: the sites decrypt the aggregate themselves, the server never does.

The server holds a public context (no key at all) and the sites' Ed25519 public keys; it
keeps the global model only as a ciphertext.  Round ``r`` (FedAvg, McMahan et al. 2017, on
ciphertexts; CKKS, Cheon et al. ASIACRYPT 2017, through SEAL):

1. ``FitIns`` carries :class:`HERoundOpen`: the key id, a weight unit ``u = 2^k`` (the
   previous round's mean weight rounded to a power of two, so ``sum w_i / u`` stays near the
   number of sites) and the encrypted global model :class:`HEState` of the last completed
   round (``None`` at first: then ``FitIns.parameters`` is the public initial model).
2. Each site checks the state: at least ``min_contributors`` distinct contributors, each
   statement signed by its site for this run, round and key, all trained from the same
   model; the ciphertext count is fixed by the site's *own* model size, never by the server.
   It records the state in its :class:`DecryptionLog` (one aggregate per round, persisted),
   decrypts *locally*, ``x_r = (u' / W') Dec(S)``, and trains from ``x_r``.  Nothing
   decrypted ever leaves the site, so the server never sees a decryption it could re-encode
   into the key (Li and Micciancio, EUROCRYPT 2021).
3. The site uploads seeded symmetric encryptions of ``(w_i / u)(x_r + lr delta_i)`` (the
   server learning rate ``lr`` is applied by the sites, from their own config) with its
   weight in the clear and its signed statement (:mod:`securefl.he.wire`).
4. The server checks every upload before summing (type, key id, unit, weight, ciphertext
   count, clear part, signature, SEAL validation: size, NTT form, level, scale), names each
   excluded one, keeps the largest group trained from one model, and adds the rest:
   ``S = sum_i Enc((w_i / u)(x_r + lr delta_i))``.  Then ``(u / W) Dec(S) = x_r + lr
   sum_i w_i delta_i / W`` with ``W = sum_i w_i``: FedAvg with server learning rate ``lr``.
   ``S`` becomes the state sent with the next ``FitIns``; the round yields :class:`Sealed`.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Collection, Mapping, Sequence

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from securefl.engine.messages import FitIns, Message, decode, encode
from securefl.engine.protection import Sealed, Update, check_update
from securefl.engine.session import RUN_ID_BYTES, RoundContext, model_digest
from securefl.errors import MessageError, ProtocolAbort
from securefl.he.ckks import Ciphertext, CKKSKeys
from securefl.he.packing import Selection
from securefl.he.statelog import DecryptionLog
from securefl.he.wire import (
    HEContribution,
    HERoundOpen,
    HEState,
    HEUpload,
    statement,
    upload_digest,
)

__all__ = ["HEClientProtection", "HEServerProtection"]

_log = logging.getLogger(__name__)
_MAX_UNIT_LOG2 = 64
_DIGEST = 32


def _abort(detail: str) -> ProtocolAbort:
    return ProtocolAbort.because(f"HE: {detail}")


# ----------------------------------------------------------------------------- client
class HEClientProtection:
    """Site half: the *secret* CKKS context, the site's signing key and the directory of
    every site's verifying key (to check the statements behind an aggregate)."""

    name = "he"

    def __init__(self, keys: CKKSKeys, *, client_id: str, signing_key: Ed25519PrivateKey,
                 verify_keys: Mapping[str, Ed25519PublicKey], dimension: int,
                 min_contributors: int = 2, selection: Selection | None = None,
                 server_lr: float = 1.0, log: DecryptionLog | None = None) -> None:
        if not keys.is_private():
            raise ValueError("a site needs the secret CKKS context to encrypt and decrypt")
        if min_contributors < 1:
            raise ValueError(f"min_contributors must be >= 1, got {min_contributors}")
        if not (math.isfinite(server_lr) and server_lr > 0):
            raise ValueError(f"server_lr must be finite and > 0, got {server_lr}")
        self.selection = selection or Selection.everything(dimension)
        if self.selection.dimension != dimension:
            raise ValueError(f"layer selection covers {self.selection.dimension} parameters, "
                             f"the model has {dimension}")
        self.keys, self.client_id, self.signing_key = keys, client_id, signing_key
        self.verify_keys = dict(verify_keys)
        self.dimension, self.server_lr = dimension, server_lr
        self.min_contributors = min_contributors
        self.log = log if log is not None else DecryptionLog()
        self._opened: tuple[bytes, int, bytes, np.ndarray] | None = None

    @classmethod
    def from_bytes(cls, secret_context: bytes, **options: object) -> HEClientProtection:
        """Deployment constructor from :meth:`CKKSKeys.to_bytes` of the secret context."""
        return cls(CKKSKeys.from_bytes(secret_context), **options)  # type: ignore[arg-type]

    # ---------------------------------------------------------------- the global model
    def open_model(self, request: FitIns) -> np.ndarray:
        """Step 2 of the round: check, record and locally decrypt the global model."""
        opening = request.protection
        if not isinstance(opening, HERoundOpen) or opening.key_id != self.keys.key_id:
            raise _abort(f"round {request.round}: no opening for this site's CKKS key")
        if opening.state is None:
            model = request.parameters
            if check_update(model, self.dimension) is not None:
                raise _abort(f"round {request.round}: the initial model is malformed")
            state_digest = hashlib.sha256(b"initial model").digest()
        else:
            if request.parameters.size:
                raise _abort(f"round {request.round}: plaintext parameters with a state")
            if not isinstance(opening.state, HEState) or opening.state.round >= request.round:
                raise _abort(f"round {request.round}: no aggregate of an earlier round")
            self._check_state(opening.state, request.run)  # a refusal records nothing
            state_digest = hashlib.sha256(encode(opening.state)).digest()
        self.log.admit(run=request.run, round=request.round, key_id=self.keys.key_id,
                       state=state_digest)
        if opening.state is not None:
            model = self._decrypt(opening.state)
        model = np.ascontiguousarray(model, dtype=np.float32)
        self._opened = (request.run, request.round, model_digest(model), model)
        return model

    def open_state(self, state: HEState, *, run: bytes) -> np.ndarray:
        """Check ``state`` against the signed statements of its contributors and decrypt it
        here (no replay record: :meth:`open_model` keeps that).  Also reads a final model."""
        self._check_state(state, run)
        return self._decrypt(state)

    def _decrypt(self, state: HEState) -> np.ndarray:
        """``x = (u / W) Dec(S)`` on the encrypted coordinates, ``clear`` on the others."""
        contributors = [c.client_id for c in state.contributions]
        total_weight = math.fsum(c.weight for c in state.contributions)
        selection = self.selection
        try:
            values = self.keys.decrypt(state.ciphertexts, selection.encrypted.size)
        except ProtocolAbort:
            _log.warning("HE: the aggregate of round %d does not decrypt; suspects (its "
                         "contributors): %s", state.round, ", ".join(contributors))
            raise
        encrypted = np.ldexp(values, state.unit_log2) / total_weight
        model = selection.merge(encrypted, state.clear.astype(np.float64))
        if not np.isfinite(model).all():
            raise _abort(f"the model of round {state.round} is not finite")
        return model.astype(np.float32)

    def _check_state(self, state: HEState, run: bytes) -> None:
        if not isinstance(state, HEState):
            raise _abort("the global model is not an HEState")
        ids = [c.client_id for c in state.contributions]
        if len(set(ids)) != len(ids) or len(ids) < self.min_contributors:
            raise _abort(f"aggregate of round {state.round} lists {len(set(ids))} distinct of "
                         f"{len(ids)} contributors (min_contributors = {self.min_contributors})")
        if not -_MAX_UNIT_LOG2 <= state.unit_log2 <= _MAX_UNIT_LOG2:
            raise _abort(f"weight unit 2^{state.unit_log2} is out of range")
        if len({c.model for c in state.contributions}) != 1:
            raise _abort(f"the contributors of round {state.round} trained from different models")
        for c in state.contributions:
            key = self.verify_keys.get(c.client_id)
            if key is None or not (math.isfinite(c.weight) and c.weight > 0):
                raise _abort(f"contributor {c.client_id!r}: unknown site or bad weight")
            try:
                key.verify(c.signature, statement(
                    run=run, round=state.round, client_id=c.client_id, key_id=self.keys.key_id,
                    unit_log2=state.unit_log2, weight=float(c.weight), model=c.model,
                    upload=c.upload))
            except InvalidSignature:
                raise _abort(f"round {state.round}: the statement of {c.client_id!r} is not "
                             "signed by that site for this run, round and key") from None
        if len(state.ciphertexts) != self.keys.ciphertext_count(self.selection.encrypted.size):
            raise _abort(f"aggregate of {len(state.ciphertexts)} ciphertexts for "
                         f"{self.selection.encrypted.size} encrypted parameters")
        if check_update(state.clear, self.selection.clear.size) is not None:
            raise _abort("the clear part of the global model is malformed")

    def client_round(self, *, round: int, context: RoundContext) -> HEClientRound:
        return HEClientRound(self, round, context)


class HEClientRound:
    def __init__(self, owner: HEClientProtection, round: int, context: RoundContext) -> None:
        self._owner, self._round, self._context = owner, round, context

    def open(self, update: Update, payload: Message | None) -> Message:
        """Step 3: encrypt ``(w / u)(x + lr delta)`` and sign the statement."""
        owner, context = self._owner, self._context
        opened = owner._opened
        if opened is None or opened[:3] != (context.run, context.round, context.model):
            raise _abort(f"round {self._round}: no global model opened for this round")
        if not isinstance(payload, HERoundOpen) or not -_MAX_UNIT_LOG2 <= payload.unit_log2 \
                <= _MAX_UNIT_LOG2:
            raise _abort(f"round {self._round}: malformed opening")
        weight = float(update.weight)
        if check_update(update.delta, owner.dimension) is not None or not (
                math.isfinite(weight) and weight > 0):
            raise _abort(f"round {self._round}: this site's own update is malformed")
        if payload.state is not None:  # the one replay rule, for the aggregate it decrypted
            context.release([c.client_id for c in payload.state.contributions])
        local = opened[3].astype(np.float64) + owner.server_lr * update.delta
        secret_part, clear = owner.selection.split(local)
        ciphertexts = owner.keys.encrypt(np.ldexp(weight * secret_part, -payload.unit_log2))
        clear = np.ascontiguousarray(clear, dtype=np.float32)
        signature = owner.signing_key.sign(statement(
            run=context.run, round=self._round, client_id=owner.client_id,
            key_id=owner.keys.key_id, unit_log2=payload.unit_log2, weight=weight,
            model=context.model, upload=upload_digest(ciphertexts, clear)))
        return HEUpload(run=context.run, key_id=owner.keys.key_id,
                        unit_log2=payload.unit_log2, weight=weight, model=context.model,
                        ciphertexts=ciphertexts, clear=clear, signature=signature)

    def step(self, request: Message) -> Message:
        raise _abort(f"round {self._round}: unexpected {type(request).__name__} (a blind "
                     "server has nothing to ask after the upload)")


# ----------------------------------------------------------------------------- server
class HEServerProtection:
    """Server half: a *public* CKKS context (no key at all), the sites' verifying keys, and
    the encrypted global model (:class:`~securefl.engine.protection.KeepsModel`)."""

    name = "he"
    reveals_rows = False

    def __init__(self, context: CKKSKeys, *, verify_keys: Mapping[str, Ed25519PublicKey],
                 min_contributors: int = 2, selection: Selection | None = None) -> None:
        if not isinstance(context, CKKSKeys):
            raise TypeError(f"context must be CKKSKeys, got {type(context).__name__}")
        if context.is_private():
            raise ValueError("the server must hold only the public CKKS context; pass "
                             "keys.public(), never the secret context")
        if min_contributors < 1:
            raise ValueError(f"min_contributors must be >= 1, got {min_contributors}")
        self.context, self.verify_keys = context, dict(verify_keys)
        self.min_contributors, self.selection = min_contributors, selection
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
        context = self._owner.context
        sums: list[Ciphertext | None] = [None] * self._count
        clear = np.zeros(self._selection.clear.size, dtype=np.float64)
        total_weight = math.fsum(upload.weight for upload, _ in uploads)
        contributions = []
        for client_id, (upload, loaded) in zip(ids, uploads, strict=True):
            sums = [context.add_into(total, ct) for total, ct in zip(sums, loaded, strict=True)]
            clear += upload.weight * upload.clear.astype(np.float64)
            contributions.append(HEContribution(
                client_id=client_id, weight=float(upload.weight), model=upload.model,
                upload=upload_digest(upload.ciphertexts, upload.clear),
                signature=upload.signature))
        return HEState(round=self._round, unit_log2=self._unit_log2,
                       contributions=tuple(contributions),
                       ciphertexts=[context.dump(total) for total in sums],
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
