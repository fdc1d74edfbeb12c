"""A recording in-process driver for SecAgg+ rounds, plus the dropout oracle."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from securefl.engine.messages import FitIns, FitRes, Message, decode, encode
from securefl.engine.protection import Update, WeightedSum
from securefl.engine.session import RoundContext
from securefl.errors import ProtocolAbort
from securefl.secagg import SecAggConfig, build_simulation
from securefl.secagg.messages import SecAggSetup
from securefl.secagg.quantize import Quantizer, levels_for
from tests.contracts.protection import ctx

#: exchange index at which a client stops answering (0: before advertising keys, 1: before
#: revealing its graph coin, 2: before sharing keys, 3: before its masked input, 4: before
#: signing the survivor set, 5: before its unmask reply); None: never drops.
DropAt = Mapping[str, int | None]
EXCHANGES = 6


@dataclass
class Transcript:
    setups: dict[str, SecAggSetup] = field(default_factory=dict)
    view: list[tuple[int, str, Message]] = field(default_factory=list)  # every reply received
    requests: list[dict[str, Message]] = field(default_factory=list)
    graph: dict[str, tuple[str, ...]] = field(default_factory=dict)
    threshold: int = 0


def make_updates(ids: list[str], d: int, rng: np.random.Generator, *,
                 scale: float = 0.5) -> dict[str, Update]:
    return {c: Update(rng.normal(0, scale, d).astype(np.float32), float(rng.integers(1, 100)))
            for c in ids}


def run(config: SecAggConfig, updates: Mapping[str, Update], *, drop_at: DropAt | None = None,
        round: int = 1, wire: bool = True, transcript: Transcript | None = None,
        late: Mapping[str, int] | None = None) -> WeightedSum:
    """Drive one round.  ``late[c] = p``: ``c`` misses exchange ``p`` (reported dropped) but its
    reply still reaches the server in the same batch, as a straggler would."""
    carry = (lambda m: decode(encode(m))) if wire else (lambda m: m)
    drop_at = drop_at or {}
    late = late or {}
    record = transcript if transcript is not None else Transcript()
    ids = list(updates)
    dimension = next(iter(updates.values())).delta.shape[0]
    server, clients = build_simulation(config, ids)
    protocol = server.server_round(round=round, dimension=dimension)
    rounds = {cid: clients[cid].client_round(round=round, context=ctx(round)) for cid in ids}
    requests: dict[str, Message] = dict(protocol.open(ids))  # type: ignore[arg-type]
    record.setups = dict(requests)  # type: ignore[arg-type]
    exchange = 0
    while True:
        replies, missed = {}, set()
        for cid, request in requests.items():
            stop = drop_at.get(cid)
            if stop is not None and stop <= exchange:
                missed.add(cid)
                continue
            message = carry(request)
            reply = (rounds[cid].open(updates[cid], message) if exchange == 0
                     else rounds[cid].step(message))
            replies[cid] = carry(reply)
            if late.get(cid) == exchange:
                missed.add(cid)
            record.view.append((exchange, cid, replies[cid]))
        result = protocol.step(replies, missed)
        record.graph, record.threshold = dict(protocol.graph), protocol.threshold
        if isinstance(result, WeightedSum):
            return result
        requests = dict(result)
        record.requests.append(requests)
        exchange += 1


def expected_survivors(transcript: Transcript, drop_at: DropAt) -> list[str] | None:
    """The clients whose inputs the round must sum, or None when it must abort."""
    ids = list(transcript.setups)

    def alive(p: int) -> set[str]:
        return {c for c in ids if drop_at.get(c) is None or drop_at[c] > p}

    u1 = alive(0)
    if len(u1) < 3 or u1 - alive(1):  # min_neighbours = 2; every committed coin is revealed
        return None
    graph, t = transcript.graph, transcript.threshold

    def weak(members: set[str], pool: set[str]) -> bool:
        return any(sum(v in pool for v in graph[c]) < t for c in members)

    u2 = u1 & alive(2)
    if weak(u2, u2):
        return None
    u3 = u2 & alive(3)
    if len(u3) < t or weak(u2, u3):
        return None
    u4 = u3 & alive(4)
    revealers = {c for c in u4 if sum(v in u4 for v in graph[c]) >= t}
    if weak(u2, revealers) or weak(u2, revealers & alive(5)):
        return None
    return sorted(u3)


def quantizer(config: SecAggConfig, n: int) -> Quantizer:
    """The quantizer of a federation whose directory holds ``n`` sites."""
    return Quantizer(clip=config.clip, max_weight=config.max_weight,
                     levels=levels_for(n, bits=config.bits))


def plain_clipped_sum(config: SecAggConfig, updates: Mapping[str, Update],
                      ids: list[str]) -> tuple[np.ndarray, float]:
    total = sum(updates[c].weight * np.clip(updates[c].delta.astype(np.float64), -config.clip,
                                            config.clip) for c in ids)
    return np.asarray(total), float(sum(updates[c].weight for c in ids))


def wire(message: Message) -> Message:
    """Carry ``message`` through the codec, as the transports do."""
    return decode(encode(message))


@dataclass
class Opened:
    """A fresh round: the server half, each client's round, updates, first requests."""

    protocol: Any
    rounds: dict[str, Any]
    updates: dict[str, Update]
    requests: dict[str, Message]


def opened(ids: list[str], *, config: SecAggConfig | None = None, round: int = 1,
           seed: int = 0, d: int = 4, contexts: Mapping[str, RoundContext] | None = None,
           run: bytes | None = None, protections: tuple[Any, Mapping[str, Any]] | None = None,
           ) -> Opened:
    config = config or SecAggConfig(max_weight=100.0)
    server, clients = protections or build_simulation(config, ids)
    protocol = server.server_round(round=round, dimension=d, run=run)
    rounds = {c: clients[c].client_round(
        round=round, context=(contexts or {}).get(c) or ctx(round)) for c in ids}
    return Opened(protocol, rounds, make_updates(ids, d, np.random.default_rng(seed)),
                  dict(protocol.open(ids)))  # type: ignore[arg-type]


def drive(ids: list[str], exchanges: int, **kw: Any) -> tuple[Any, dict[str, Any],
                                                             dict[str, Message]]:
    """Run ``exchanges`` exchanges honestly through the codec; return the next requests."""
    o = opened(ids, **kw)
    requests = o.requests
    for exchange in range(exchanges):
        replies = {c: wire(o.rounds[c].open(o.updates[c], wire(m)) if exchange == 0
                           else o.rounds[c].step(wire(m))) for c, m in requests.items()}
        requests = dict(o.protocol.step(replies, set()))
    return o.protocol, o.rounds, requests


class FixedTrainer:
    """A trainer that returns the same update every time it is asked."""

    def __init__(self, update: Update) -> None:
        self.update = update

    def fit(self, parameters, *, round):
        return self.update, {}

    def evaluate(self, parameters):
        return 1, 0.0, 0.0


def conversation(server, sites, cohort, *, run, round, parameters):
    """One round over the engine's Client, every message through the codec; returns the
    result and the clients that aborted, by exchange."""
    protocol = server.server_round(round=round, dimension=parameters.size, run=run)
    opening = protocol.open(cohort)
    requests = {c: FitIns(run=run, round=round, parameters=parameters, config={},
                          protection=opening[c]) for c in cohort}
    aborted: dict[str, int] = {}
    for exchange in range(6):
        replies = {}
        for cid, request in requests.items():
            try:
                reply = wire(sites[cid].handle(wire(request), round=round))
            except ProtocolAbort:
                aborted[cid] = exchange
                continue
            replies[cid] = reply.payload if isinstance(reply, FitRes) else reply
        if not replies:
            return None, aborted
        result = protocol.step(replies, set(requests) - set(replies))
        if isinstance(result, WeightedSum):
            return result, aborted
        requests = dict(result)
    raise AssertionError("the round did not end in six exchanges")
