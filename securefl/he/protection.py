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
   ``S`` becomes the state sent with the next ``FitIns``; the round yields ``Sealed``
   (the server half is :mod:`securefl.he.server`).

With ``resum`` the state carries every contributor's upload instead of their sum, and each
site adds them itself after checking each against its signed statement: then no server can
make a site decrypt anything but the sum of the listed uploads, at ``n`` uploads of
download instead of one sum.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from securefl.engine.messages import FitIns, Message, encode
from securefl.engine.protection import Update, check_update
from securefl.engine.session import RoundContext, model_digest
from securefl.errors import ProtocolAbort
from securefl.he.ckks import Ciphertext, CKKSKeys
from securefl.he.packing import Selection
from securefl.he.statelog import DecryptionLog
from securefl.he.wire import HERoundOpen, HEState, HEUpload, statement, upload_digest

__all__ = ["HEClientProtection"]

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
                 server_lr: float = 1.0, resum: bool = False,
                 log: DecryptionLog | None = None) -> None:
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
        self.min_contributors, self.resum = min_contributors, resum
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
                       state=state_digest, initial=opening.state is None)
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
        """``x = (u / W) Dec(S)`` on the encrypted coordinates, ``clear`` on the others; with
        ``resum`` the site adds the contributors' uploads itself into ``S`` and the clear mean."""
        contributors = [c.client_id for c in state.contributions]
        total_weight = math.fsum(c.weight for c in state.contributions)
        selection = self.selection
        ciphertexts, clear = state.ciphertexts, state.clear.astype(np.float64)
        if self.resum:
            ciphertexts, clear = self._resum(state, total_weight)
        try:
            values = self.keys.decrypt(ciphertexts, selection.encrypted.size)
        except ProtocolAbort:
            _log.warning("HE: the aggregate of round %d does not decrypt; suspects (its "
                         "contributors): %s", state.round, ", ".join(contributors))
            raise
        encrypted = np.ldexp(values, state.unit_log2) / total_weight
        model = selection.merge(encrypted, clear)
        if not np.isfinite(model).all():
            raise _abort(f"the model of round {state.round} is not finite")
        return model.astype(np.float32)

    def _resum(self, state: HEState, total_weight: float) -> tuple[list[bytes], np.ndarray]:
        sums: list[Ciphertext | None] = [None] * len(state.parts[0].ciphertexts)
        clear = np.zeros(self.selection.clear.size, dtype=np.float64)
        for contribution, part in zip(state.contributions, state.parts, strict=True):
            loaded = [self.keys.load(data) for data in part.ciphertexts]
            sums = [self.keys.add_into(total, ct) for total, ct in zip(sums, loaded, strict=True)]
            clear += contribution.weight * part.clear.astype(np.float64)
        return [self.keys.dump(total) for total in sums], clear / total_weight

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
        count = self.keys.ciphertext_count(self.selection.encrypted.size)
        if check_update(state.clear, self.selection.clear.size) is not None:
            raise _abort("the clear part of the global model is malformed")
        if not self.resum:
            if len(state.ciphertexts) != count or state.parts:
                raise _abort(f"aggregate of {len(state.ciphertexts)} ciphertexts for "
                             f"{self.selection.encrypted.size} encrypted parameters")
            return
        if state.ciphertexts or len(state.parts) != len(state.contributions):
            raise _abort("the sites re-sum: the state must carry every contributor's upload")
        for c, part in zip(state.contributions, state.parts, strict=True):
            if (len(part.ciphertexts) != count
                    or check_update(part.clear, self.selection.clear.size) is not None
                    or upload_digest(part.ciphertexts, part.clear) != c.upload):
                raise _abort(f"round {state.round}: the upload of {c.client_id!r} does not "
                             "match its signed statement")

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
