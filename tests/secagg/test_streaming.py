"""The masked inputs flow one at a time: each site encodes its update only when its masked
input is due (after checking it at open), and the server sums the inputs as they arrive
(securefl.secagg.summing; the engine's Receives / HandsOver seam): the same sum, U3 exactly
the summed set."""

from __future__ import annotations

import gc
import logging
import weakref

import numpy as np
import pytest

from securefl.aggregation.mean import FedAvg
from securefl.engine.client import Client
from securefl.engine.messages import Message
from securefl.engine.optim import build_server_optimizer
from securefl.engine.protection import Absorbed, Update, WeightedSum
from securefl.engine.server import Server
from securefl.engine.simulation import InProcessTransport
from securefl.errors import ProtocolAbort
from securefl.secagg import SecAggConfig, build_simulation
from securefl.secagg.messages import SecAggConsistency, SecAggMaskedInput
from tests.secagg.protocol_driver import (
    FixedTrainer,
    drive,
    make_updates,
    opened,
    plain_clipped_sum,
    quantizer,
    wire,
)

CONFIG = SecAggConfig(max_weight=100.0)


class Recording(InProcessTransport):
    """Notes, in order, each client call and each reply handed over, and what each exchange
    kept of its replies."""

    def __init__(self, clients, **kw):
        super().__init__(clients, **kw)
        self.events: list[tuple[str, str]] = []
        self.kept: list[dict[str, str]] = []
        self.handed_over: list[bool] = []

    def exchange(self, requests, *, round, timeout=None, on_reply=None):
        self.handed_over.append(on_reply is not None)

        def spy(cid: str, reply: Message) -> Message:
            self.events.append(("handed over", cid))
            return on_reply(cid, reply)

        out = super().exchange(requests, round=round, timeout=timeout,
                               on_reply=None if on_reply is None else spy)
        self.kept.append({c: type(m).__name__ for c, m in out.replies.items()})
        return out


def _engine(ids, *, hands_over: bool):
    server, protections = build_simulation(CONFIG, ids)
    updates = make_updates(ids, 32, np.random.default_rng(4), scale=0.1)
    clients = {c: Client(c, FixedTrainer(updates[c]), protections[c]) for c in ids}
    transport = Recording(clients, wire=True)
    transport.hands_over_replies = hands_over
    for cid, client in clients.items():  # note each call of a client, in order
        def handle(request, *, round, _inner=client.handle, _cid=cid):
            transport.events.append(("called", _cid))
            return _inner(request, round=round)
        client.handle = handle
    engine = Server(transport, server, FedAvg(),
                    build_server_optimizer("fedavg", lr=1.0, momentum=0.0, beta1=0.9,
                                           beta2=0.99, tau=1e-3),
                    parameters=np.zeros(32, np.float32), seed=0)
    return engine, transport, updates


def _plain_mean(updates, ids):
    total, weight = plain_clipped_sum(CONFIG, updates, ids)
    return total / weight


def test_in_process_each_masked_input_is_summed_before_the_next_client_is_called():
    ids = [f"c{i}" for i in range(6)]
    engine, transport, updates = _engine(ids, hands_over=True)
    record = engine.run_round(1)
    assert record.aborted is None and record.clients == ids
    # the masked-input exchange kept a marker per client, no exchange kept a masked input
    assert dict.fromkeys(ids, "Absorbed") in transport.kept
    assert all("SecAggMaskedInput" not in kept.values() for kept in transport.kept)
    # after FitIns (no protection step), each reply was handed over before the next call
    assert transport.events[len(ids):] == [
        event for _ in range(5) for cid in ids for event in (("called", cid),
                                                              ("handed over", cid))]
    # the same mean as the plain one, within n quantization steps per coordinate
    weight = sum(updates[c].weight for c in ids)
    step = quantizer(CONFIG, len(ids)).step
    assert np.abs(engine.parameters - _plain_mean(updates, ids)).max() <= \
        len(ids) * step / weight + 1e-6


def test_a_transport_that_cannot_hand_over_gets_the_same_round():
    ids = [f"c{i}" for i in range(6)]
    engine, transport, updates = _engine(ids, hands_over=False)
    record = engine.run_round(1)
    assert record.aborted is None and record.clients == ids
    assert not any(transport.handed_over)  # the engine applied receive after each exchange
    assert any(kept == dict.fromkeys(ids, "SecAggMaskedInput") for kept in transport.kept)
    weight = sum(updates[c].weight for c in ids)
    assert np.abs(engine.parameters - _plain_mean(updates, ids)).max() <= \
        len(ids) * quantizer(CONFIG, len(ids)).step / weight + 1e-6


def _masked_inputs(ids):
    """The honest round up to the masked inputs (through the codec)."""
    protocol, rounds, relays = drive(ids, exchanges=3)
    replies = {c: wire(rounds[c].step(wire(m))) for c, m in relays.items()}
    return protocol, rounds, replies


def _finish(protocol, rounds, requests) -> WeightedSum:
    for _ in range(2):  # consistency, unmask
        replies = {c: wire(rounds[c].step(wire(m))) for c, m in requests.items()}
        requests = protocol.step(replies, set())
    assert isinstance(requests, WeightedSum)
    return requests


def test_a_malformed_input_is_never_summed_and_its_sender_is_named(caplog):
    ids = [f"c{i}" for i in range(6)]  # complete graph, k = 5, t = 3
    protocol, rounds, replies = _masked_inputs(ids)
    replies["c2"] = SecAggMaskedInput(masked=replies["c2"].masked[:-1])  # a word short
    kept = {c: protocol.receive(c, m) for c, m in replies.items()}
    assert [c for c in ids if isinstance(kept[c], Absorbed)] == ["c0", "c1", "c3", "c4", "c5"]
    assert kept["c2"] is replies["c2"]  # left for the step to reject
    assert protocol.receive("c0", replies["c0"]) is replies["c0"]  # never summed twice
    with caplog.at_level(logging.WARNING, "securefl.security"):
        requests = protocol.step(kept, set())
    assert "malformed SecAggMaskedInput" in protocol.rejected["c2"]
    assert "'c2'" in caplog.text
    survivors = [c for c in ids if c != "c2"]
    assert sorted(requests) == survivors
    assert all(m.survivors == tuple(survivors) for m in requests.values()
               if isinstance(m, SecAggConsistency))
    result = _finish(protocol, rounds, requests)
    assert list(result.client_ids) == survivors  # c2 recovered as a dropout
    total, weight = plain_clipped_sum(CONFIG, make_updates(ids, 4, np.random.default_rng(0)),
                                      survivors)
    assert np.abs(result.total - total).max() <= len(ids) * quantizer(CONFIG, 6).step
    assert abs(result.total_weight - weight) <= len(ids) * quantizer(CONFIG, 6).weight_step


def test_a_summed_input_reported_dropped_aborts_before_anything_is_revealed():
    ids = [f"c{i}" for i in range(6)]
    protocol, _, replies = _masked_inputs(ids)
    kept = {c: protocol.receive(c, m) for c, m in replies.items()}
    assert all(isinstance(m, Absorbed) for m in kept.values())
    with pytest.raises(ProtocolAbort):
        protocol.step(kept, {"c3"})  # its input is in the sum, but it would not be in U3
    assert not protocol.revealed  # no consistency signature, no share was asked for


def test_a_failed_or_dropped_client_is_never_handed_over():
    class Echo:
        def __init__(self, client_id: str, fails: bool) -> None:
            self.client_id, self.fails = client_id, fails

        def handle(self, request, *, round):
            if self.fails:
                raise RuntimeError("site crashed")
            return request

    ids = ["a", "b", "c", "d"]
    transport = InProcessTransport({c: Echo(c, c == "b") for c in ids}, wire=True,
                                   schedule=lambda round, exchange, cid: cid == "c")
    handed: list[str] = []

    def on_reply(cid: str, reply: Message) -> Message:
        handed.append(cid)
        return Absorbed()

    request = SecAggMaskedInput(masked=np.arange(5, dtype=np.uint32))
    out = transport.exchange(dict.fromkeys(ids, request), round=1, on_reply=on_reply)
    assert handed == ["a", "d"]
    assert sorted(out.replies) == ["a", "d"]
    assert all(isinstance(m, Absorbed) for m in out.replies.values())
    assert sorted(out.dropped) == ["b", "c"]


def test_an_unusable_update_keeps_a_site_out_before_it_advertises():
    o = opened([f"c{i}" for i in range(4)])
    unusable = {"c0": Update(np.full(4, np.nan, np.float32), 1.0),  # diverged training
                "c1": Update(np.zeros(4, np.float32), 101.0)}  # above max_weight = 100
    for cid, update in unusable.items():
        with pytest.raises(ValueError, match=r"finite|max_weight"):
            o.rounds[cid].open(update, wire(o.requests[cid]))


def test_in_process_a_consumed_reply_is_freed_before_the_next_client_is_called():
    handed: list[weakref.ref] = []
    alive_at_call: list[int] = []

    class Masker:
        def __init__(self, client_id: str) -> None:
            self.client_id = client_id

        def handle(self, request, *, round):
            gc.collect()
            alive_at_call.append(sum(ref() is not None for ref in handed))
            return SecAggMaskedInput(masked=np.zeros(100_001, np.uint32))

    ids = [f"c{i}" for i in range(5)]
    transport = InProcessTransport({c: Masker(c) for c in ids}, wire=True)

    def on_reply(cid: str, reply: Message) -> Message:
        handed.append(weakref.ref(reply))
        return Absorbed()

    request = SecAggMaskedInput(masked=np.zeros(1, np.uint32))
    transport.exchange(dict.fromkeys(ids, request), round=1, on_reply=on_reply)
    assert len(handed) == 5
    assert alive_at_call == [0, 0, 0, 0, 0]  # each decoded input (and its frame) was gone
