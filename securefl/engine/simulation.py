"""In-process simulation transport.

* ``wire=True`` runs every request and reply through :func:`encode`/:func:`decode`, so a
  simulation proves the wire format the gRPC runtime uses.
* ``workers=N`` handles clients in a thread pool (torch releases the GIL while training).
* Dropout injection (:class:`DropInjector`, shared with the Ray backend): each client misses
  each exchange with probability ``dropout`` (seeded by ``(seed, round, exchange, client)``),
  or exactly when ``schedule(round, exchange, client_id)`` says so.  With ``sticky=True`` a
  client that dropped stays away for the rest of the round, as a crashed site would;
  ``sticky=False`` lets it come back late.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from securefl.engine.messages import DEFAULT_MAX_BYTES, Message, decode, encode
from securefl.engine.transport import ClientHandler, Exchange, ReplyHook

__all__ = ["DropInjector", "DropSchedule", "InProcessTransport"]

_log = logging.getLogger(__name__)

#: ``(round, exchange index within the round (0 = FitIns), client id) -> drop?``
DropSchedule = Callable[[int, int, str], bool]


class DropInjector:
    """Which clients miss an exchange: the one dropout rule of every simulation backend.

    Each client misses each exchange with probability ``dropout``, drawn from a generator
    seeded by ``(seed, round, exchange index, crc32(client id))`` so that any backend drops
    the same clients, or exactly when ``schedule(round, exchange, client_id)`` says so.  With
    ``sticky`` a client that dropped stays away for the rest of the round.
    """

    def __init__(self, *, dropout: float = 0.0, schedule: DropSchedule | None = None,
                 sticky: bool = True, seed: int = 0) -> None:
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.dropout, self.schedule, self.sticky, self.seed = dropout, schedule, sticky, seed
        self._round = -1
        self._exchange = 0
        self._gone: set[str] = set()

    def split(self, requests: Mapping[str, object], *, round: int,
              dropped: dict[str, str]) -> list[str]:
        """The clients of the round's next exchange that are reached; the others are added
        to ``dropped`` with the reason ``"dropped (injected)"``."""
        if round != self._round:
            self._round, self._exchange, self._gone = round, 0, set()
        index, self._exchange = self._exchange, self._exchange + 1
        live = []
        for client_id in requests:
            if self._drops(round, index, client_id):
                dropped[client_id] = "dropped (injected)"
            else:
                live.append(client_id)
        return live

    def _drops(self, round: int, exchange: int, client_id: str) -> bool:
        if self.sticky and client_id in self._gone:
            return True
        if self.schedule is not None:
            drop = bool(self.schedule(round, exchange, client_id))
        elif self.dropout > 0:
            key = zlib.crc32(client_id.encode())
            rng = np.random.default_rng([self.seed, round, exchange, key])
            drop = bool(rng.random() < self.dropout)
        else:
            drop = False
        if drop:
            self._gone.add(client_id)
        return drop


class InProcessTransport:
    """Every client in this process; hands each reply over as it arrives (``on_reply``,
    :class:`~securefl.engine.transport.HandsOver`): without a thread pool a client's reply
    is consumed before the next client is called, so an exchange holds one large reply at a
    time, not one per client."""

    hands_over_replies = True

    def __init__(self, clients: Mapping[str, ClientHandler], *, wire: bool = False,
                 workers: int = 1, dropout: float = 0.0, schedule: DropSchedule | None = None,
                 sticky: bool = True, seed: int = 0,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self._clients = dict(clients)
        self.wire, self.max_bytes = wire, max_bytes
        self.drops = DropInjector(dropout=dropout, schedule=schedule, sticky=sticky, seed=seed)
        self._pool = ThreadPoolExecutor(workers) if workers > 1 else None
        self.bytes_sent = 0
        self.bytes_received = 0
        self._frames: dict[int, bytes] = {}  # this exchange's encoded requests, by id

    def client_ids(self) -> list[str]:
        return list(self._clients)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()

    def _carry(self, msg: Message, *, outbound: bool) -> Message:
        """``msg`` through the codec.  A request broadcast to many clients in one exchange is
        encoded once (each client still decodes its own copy): the exchange's requests hold
        every message alive, so their ids are unique."""
        if not self.wire:
            return msg
        frame = self._frames.get(id(msg)) if outbound else None
        if frame is None:
            frame = encode(msg)
            if outbound:
                self._frames[id(msg)] = frame
        if outbound:
            self.bytes_sent += len(frame)
        else:
            self.bytes_received += len(frame)
        return decode(frame, max_bytes=self.max_bytes)

    def _deliver(self, client_id: str, request: Message, round: int,
                 timeout: float | None) -> Message | str:
        """The client's reply, or why it counts as dropped."""
        handler = self._clients.get(client_id)
        if handler is None:
            return "unknown client"
        started = time.perf_counter()
        try:
            reply = handler.handle(self._carry(request, outbound=True), round=round)
            reply = self._carry(reply, outbound=False)
        except Exception as exc:  # a failing client is dropped, never fatal to the round
            _log.warning("client %s failed: %s", client_id, exc, exc_info=_log.isEnabledFor(10))
            return f"client error: {type(exc).__name__}: {exc}"
        if timeout is not None and time.perf_counter() - started > timeout:
            return f"missed the {timeout:g} s deadline"
        return reply

    def exchange(self, requests: Mapping[str, Message], *, round: int,
                 timeout: float | None = None, on_reply: ReplyHook | None = None) -> Exchange:
        result = Exchange()
        live = self.drops.split(requests, round=round, dropped=result.dropped)
        self._frames = {}
        jobs = [(cid, requests[cid], round, timeout) for cid in live]
        outcomes = iter(self._pool.map(lambda job: self._deliver(*job), jobs) if self._pool
                        else (self._deliver(*job) for job in jobs))
        for client_id in live:  # no zip: its reused tuple would keep the last reply alive
            outcome = next(outcomes)
            if isinstance(outcome, str):
                result.dropped[client_id] = outcome
            else:  # in this thread, in order: the hook never runs concurrently
                result.replies[client_id] = (outcome if on_reply is None
                                             else on_reply(client_id, outcome))
            del outcome  # a consumed reply (and its frame) is freed before the next client
        self._frames = {}
        return result
