"""What a private trainer may release, and when it must answer from memory.

Every training of a private client ends in a release: its update leaves the site (in the
clear, masked or encrypted; whether or not the round later completes).  So a private trainer
(:class:`~securefl.privacy.dp_sgd.DPSGDTrainer`,
:class:`~securefl.privacy.dp_fedavg.UserLevelTrainer`) handles a request for ``round`` from
global parameters ``w`` as follows:

1. ``r = SHA-256(float32 little-endian bytes of w)`` names the release.
2. If the client already released ``r`` (its ledger's ``releases`` table, which survives a
   restart), the same update and metrics are returned: no training, no charge.  Answering
   again reveals nothing new.  If that update was since replaced by a later one, the request
   is refused: the client never trains twice from the same parameters.
3. Otherwise ``round`` must be above every round this trainer has answered (round numbers
   strictly increase within a run; across runs and restarts the ledger still charges each new
   release, so an alternating ``1, 2, 1, 2, ...`` is refused here and charged there).
4. The ledger charges the release *before* training (refusing it over budget), and the
   answer is remembered *before* it is returned, so nothing leaves the site uncharged.

A refusal is an opaque :class:`~securefl.errors.ProtocolAbort`; the detail goes to the site
operator's log.  Whether the same *protected* update may be sent again (SecAgg unmasking,
HE decryption) is decided by the replay rule of the protections, not here.
"""

from __future__ import annotations

import hashlib

import numpy as np

from securefl.engine.protection import Update
from securefl.errors import ProtocolAbort
from securefl.privacy.ledger import PrivacyLedger

__all__ = ["Releases", "parameters_digest"]

Answer = tuple[Update, dict[str, float]]


def parameters_digest(parameters: np.ndarray) -> bytes:
    """``SHA-256`` of the global parameters as float32 little-endian bytes."""
    return hashlib.sha256(np.ascontiguousarray(parameters, dtype="<f4").tobytes()).digest()


class Releases:
    """Steps 1-4 of the module docstring for one client of ``ledger``."""

    def __init__(self, ledger: PrivacyLedger, client_id: str) -> None:
        self.ledger, self.client_id = ledger, client_id
        self._last_round: int | None = None

    def recall(self, parameters: np.ndarray, *, round: int) -> tuple[bytes, Answer | None]:
        """``(release digest, the remembered answer or None)``; raises
        :class:`ProtocolAbort` when the request must be refused (steps 2 and 3)."""
        release = parameters_digest(parameters)
        known = self.ledger.recall(self.client_id, release)
        if known is not None:
            if known.update is None:
                raise ProtocolAbort.because(
                    f"{self.client_id}: round {round} asks again for parameters "
                    f"{release.hex()[:16]} first trained in round {known.round}; that update "
                    f"was replaced since, and training again would be a second release")
            self._last_round = max(round, self._last_round or round)
            return release, (known.update, known.metrics)
        if self._last_round is not None and round <= self._last_round:
            raise ProtocolAbort.because(
                f"{self.client_id}: round {round} with new parameters after round "
                f"{self._last_round}; round numbers must increase")
        return release, None

    def keep(self, release: bytes, *, round: int, update: Update,
             metrics: dict[str, float]) -> Answer:
        """Remember the answer to ``release`` (step 4) and return it."""
        self.ledger.remember(self.client_id, release, round=round, update=update,
                             metrics=metrics)
        self._last_round = max(round, self._last_round or round)
        return update, metrics
