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
3. Otherwise the request is new.  That round numbers strictly increase within a run, also
   across restarts, is the site's :class:`~securefl.engine.session.ReleaseLog`'s rule,
   checked by the engine client before any training.
4. The ledger charges the release *before* training (refusing it over budget), and the
   answer is remembered *before* it is returned, so nothing leaves the site uncharged.

A refusal is an opaque :class:`~securefl.errors.ProtocolAbort`; the detail goes to the site
operator's log.  Whether the same *protected* update may be sent again (SecAgg unmasking,
HE decryption) is decided by the replay rule of the protections, not here.
"""

from __future__ import annotations

import numpy as np

from securefl.engine.protection import Update
from securefl.engine.session import model_digest
from securefl.errors import ProtocolAbort
from securefl.privacy.ledger import PrivacyLedger

__all__ = ["Releases"]

Answer = tuple[Update, dict[str, float]]


class Releases:
    """Steps 1-4 of the module docstring for one client of ``ledger``."""

    def __init__(self, ledger: PrivacyLedger, client_id: str) -> None:
        self.ledger, self.client_id = ledger, client_id

    def recall(self, parameters: np.ndarray, *, round: int) -> tuple[bytes, Answer | None]:
        """``(release digest, the remembered answer or None)``; raises
        :class:`ProtocolAbort` when the request must be refused (steps 2 and 3)."""
        release = model_digest(parameters)
        known = self.ledger.recall(self.client_id, release)
        if known is not None:
            if known.update is None:
                raise ProtocolAbort.because(
                    f"{self.client_id}: round {round} asks again for parameters "
                    f"{release.hex()[:16]} first trained in round {known.round}; that update "
                    f"was replaced since, and training again would be a second release")
            return release, (known.update, known.metrics)
        return release, None

    def keep(self, release: bytes, *, round: int, update: Update,
             metrics: dict[str, float]) -> Answer:
        """Remember the answer to ``release`` (step 4) and return it."""
        self.ledger.remember(self.client_id, release, round=round, update=update,
                             metrics=metrics)
        return update, metrics
