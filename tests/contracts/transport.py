"""Contract every Transport must honour.  Subclass :class:`TransportContract` and define
``make(handlers) -> Transport`` for handlers keyed by client id."""

from __future__ import annotations

import time

import numpy as np
import pytest

from securefl.engine.messages import Decline, EvaluateIns, EvaluateRes, Message, PlainUpdate
from securefl.engine.transport import Exchange, Transport


class EchoHandler:
    """Replies to EvaluateIns with the parameter sum; fails or stalls on demand."""

    def __init__(self, client_id: str, *, fail: bool = False, delay: float = 0.0) -> None:
        self.client_id, self.fail, self.delay = client_id, fail, delay
        self.seen: list[int] = []

    def handle(self, request: Message, *, round: int) -> Message:
        self.seen.append(round)
        if self.delay:
            time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("site crashed")
        if isinstance(request, EvaluateIns):
            return EvaluateRes(num_examples=len(self.client_id),
                               loss=float(request.parameters.sum()), accuracy=round / 100)
        return Decline(reason=f"{self.client_id} declines")


class TransportContract:
    def make(self, handlers: dict[str, EchoHandler]) -> Transport:
        raise NotImplementedError

    def test_replies_come_back_per_client(self):
        handlers = {f"c{i}": EchoHandler(f"c{i}" + "x" * i) for i in range(4)}
        transport = self.make(handlers)
        try:
            assert sorted(transport.client_ids()) == sorted(handlers)
            params = np.arange(5, dtype=np.float32)
            out = transport.exchange({c: EvaluateIns(round=3, parameters=params * (i + 1))
                                      for i, c in enumerate(handlers)}, round=3)
            assert isinstance(out, Exchange) and not out.dropped
            for i, c in enumerate(handlers):
                reply = out.replies[c]
                assert isinstance(reply, EvaluateRes)
                assert reply.loss == pytest.approx(10.0 * (i + 1))
                assert reply.num_examples == len(c) + i and reply.accuracy == 0.03
        finally:
            transport.close()

    def test_only_addressed_clients_are_contacted(self):
        handlers = {c: EchoHandler(c) for c in ("a", "b", "c")}
        transport = self.make(handlers)
        try:
            out = transport.exchange({"b": PlainUpdate(update=np.zeros(2, np.float32),
                                                       weight=1.0)}, round=1)
            assert set(out.replies) == {"b"} and isinstance(out.replies["b"], Decline)
            assert handlers["a"].seen == [] and handlers["b"].seen == [1]
        finally:
            transport.close()

    def test_failing_client_is_reported_dropped_not_raised(self):
        handlers = {"ok": EchoHandler("ok"), "bad": EchoHandler("bad", fail=True)}
        transport = self.make(handlers)
        try:
            request = EvaluateIns(round=1, parameters=np.ones(3, np.float32))
            out = transport.exchange(dict.fromkeys(handlers, request), round=1)
            assert set(out.replies) == {"ok"} and set(out.dropped) == {"bad"}
            assert out.dropped["bad"]
        finally:
            transport.close()

    def test_deadline_drops_slow_client(self):
        handlers = {"fast": EchoHandler("fast"), "slow": EchoHandler("slow", delay=0.3)}
        transport = self.make(handlers)
        try:
            request = EvaluateIns(round=1, parameters=np.ones(3, np.float32))
            out = transport.exchange(dict.fromkeys(handlers, request), round=1, timeout=0.1)
            assert set(out.replies) == {"fast"} and "slow" in out.dropped
        finally:
            transport.close()
