"""The server's running sum of the masked inputs ``sum_{u in U3} y_u mod 2**b`` (Bonawitz et
al., CCS 2017, figure 4, round 2), filled as the inputs arrive.

Each accepted input is added into one accumulator and dropped, so the server holds one vector
of ``d + 1`` words instead of one per client (2 GB of inputs at n = 5000, d = 100K).  The
result is bit for bit the sum taken after the exchange: addition modulo ``2**b`` does not
depend on the order, and an input enters exactly when the server accepts it (from a member
of ``U2``, once, of the encoding's dtype and length), so the set of summed clients is ``U3``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from securefl.engine.messages import Message
from securefl.engine.protection import Absorbed
from securefl.secagg.messages import SecAggMaskedInput

__all__ = ["MaskedSum"]


class MaskedSum:
    """``sum_u y_u`` over the inputs :meth:`add` accepted from ``members`` (``U2``)."""

    def __init__(self, members: Sequence[str], *, words: int, dtype: np.dtype) -> None:
        self._order = tuple(members)
        self._members = frozenset(members)
        self._words, self._dtype = words, dtype
        self._total: np.ndarray | None = None
        #: the clients whose inputs are in the sum
        self.summed: set[str] = set()

    def add(self, client_id: str, msg: Message) -> bool:
        """Add ``msg`` if it is an acceptable masked input of ``client_id``; else False and
        nothing changes."""
        if (client_id in self.summed or client_id not in self._members
                or not isinstance(msg, SecAggMaskedInput) or msg.masked.dtype != self._dtype
                or msg.masked.shape != (self._words,)):
            return False
        if self._total is None:
            self._total = np.zeros(self._words, self._dtype)
        np.add(self._total, msg.masked, out=self._total)
        self.summed.add(client_id)
        return True

    def settle(self, live: Mapping[str, Message]) -> tuple[list[str], list[str]]:
        """After the exchange, over ``U2`` in its order: ``(survivors, malformed)``.  A member
        survives when its input was summed on arrival (``live`` holds :class:`Absorbed` for
        it) or is acceptable now (it is added); a member whose reply is neither sent a
        malformed input."""
        survivors: list[str] = []
        malformed: list[str] = []
        for cid in self._order:
            msg = live.get(cid)
            if msg is None:
                continue
            summed = isinstance(msg, Absorbed) and cid in self.summed
            (survivors if summed or self.add(cid, msg) else malformed).append(cid)
        return survivors, malformed

    def take(self) -> np.ndarray | None:
        """The sum (``None`` before any input); the accumulator is handed over, not copied."""
        total, self._total = self._total, None
        return total
