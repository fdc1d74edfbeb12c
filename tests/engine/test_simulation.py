import numpy as np
import pytest

from securefl.engine.messages import EvaluateIns
from securefl.engine.simulation import InProcessTransport
from tests.contracts.transport import EchoHandler, TransportContract


class TestInProcessContract(TransportContract):
    def make(self, handlers):
        return InProcessTransport(handlers)


class TestInProcessWireContract(TransportContract):
    def make(self, handlers):
        return InProcessTransport(handlers, wire=True, workers=2)


def _exchange_ids(transport, n_exchanges, round=1):
    request = EvaluateIns(round=round, parameters=np.ones(2, np.float32))
    out = []
    for _ in range(n_exchanges):
        ex = transport.exchange(dict.fromkeys(transport.client_ids(), request), round=round)
        out.append(sorted(ex.dropped))
    return out


def test_seeded_dropout_is_reproducible_and_near_p():
    handlers = {f"c{i}": EchoHandler(f"c{i}") for i in range(400)}
    a = InProcessTransport(handlers, dropout=0.25, seed=7, sticky=False)
    b = InProcessTransport(handlers, dropout=0.25, seed=7, sticky=False)
    da, db = _exchange_ids(a, 2), _exchange_ids(b, 2)
    assert da == db
    assert da[0] != da[1]  # a fresh draw per exchange
    rate = len(da[0]) / 400
    assert 0.19 < rate < 0.31  # p = 0.25, sd = 0.022


def test_sticky_dropout_keeps_a_client_away_for_the_round():
    handlers = {c: EchoHandler(c) for c in ("a", "b", "c")}
    schedule = lambda rnd, exchange, cid: (exchange, cid) == (0, "b")  # noqa: E731
    sticky = InProcessTransport(handlers, schedule=schedule)
    assert _exchange_ids(sticky, 3) == [["b"], ["b"], ["b"]]
    assert _exchange_ids(sticky, 1, round=2) == [["b"]]  # new round, exchange 0 again
    late = InProcessTransport(handlers, schedule=schedule, sticky=False)
    assert _exchange_ids(late, 2) == [["b"], []]


def test_wire_mode_counts_bytes():
    transport = InProcessTransport({"a": EchoHandler("a")}, wire=True)
    request = EvaluateIns(round=1, parameters=np.ones(1000, np.float32))
    transport.exchange({"a": request}, round=1)
    assert transport.bytes_sent > 4000 and transport.bytes_received > 0


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        InProcessTransport({}, dropout=1.0)
    with pytest.raises(ValueError):
        InProcessTransport({}, workers=0)
