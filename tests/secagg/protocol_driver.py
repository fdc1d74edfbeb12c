"""A recording in-process driver for SecAgg+ rounds, plus the dropout oracle."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from securefl.engine.messages import Message, decode, encode
from securefl.engine.protection import Update, WeightedSum
from securefl.secagg import SecAggConfig, build_simulation
from securefl.secagg.messages import SecAggSetup
from securefl.secagg.quantize import Quantizer, levels_for
from tests.contracts.protection import ctx

#: exchange index at which a client stops answering (0: before advertising keys, 1: after
#: keys, 2: after shares, 3: after its masked input); None: never drops.
DropAt = Mapping[str, int | None]


@dataclass
class Transcript:
    setups: dict[str, SecAggSetup] = field(default_factory=dict)
    view: list[tuple[int, str, Message]] = field(default_factory=list)  # every reply received
    requests: list[dict[str, Message]] = field(default_factory=list)


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
        if isinstance(result, WeightedSum):
            return result
        requests = dict(result)
        record.requests.append(requests)
        exchange += 1


def expected_survivors(setups: Mapping[str, SecAggSetup], drop_at: DropAt) -> list[str] | None:
    """The clients whose inputs the round must sum, or None when it must abort."""
    ids = list(setups)
    t = next(iter(setups.values())).threshold
    graph = {c: setups[c].neighbours for c in ids}

    def alive(p: int) -> set[str]:
        return {c for c in ids if drop_at.get(c) is None or drop_at[c] > p}

    def weak(members: set[str], pool: set[str]) -> bool:
        return any(sum(v in pool for v in graph[c]) < t for c in members)

    u1 = alive(0)
    while weak(u1, u1):
        u1 = {c for c in u1 if sum(v in u1 for v in graph[c]) >= t}
    if len(u1) < 2:
        return None
    u2 = u1 & alive(1)
    if weak(u2, u2):
        return None
    u3 = u2 & alive(2)
    if len(u3) < t or weak(u2, u3):
        return None
    if weak(u2, u3 & alive(3)):
        return None
    return sorted(u3)


def quantizer(config: SecAggConfig, n: int) -> Quantizer:
    return Quantizer(clip=config.clip, max_weight=config.max_weight,
                     levels=levels_for(n, bits=config.bits))


def plain_clipped_sum(config: SecAggConfig, updates: Mapping[str, Update],
                      ids: list[str]) -> tuple[np.ndarray, float]:
    total = sum(updates[c].weight * np.clip(updates[c].delta.astype(np.float64), -config.clip,
                                            config.clip) for c in ids)
    return np.asarray(total), float(sum(updates[c].weight for c in ids))
