"""Contract every Protection must honour.  Subclass :class:`ProtectionContract` and define
``make(client_ids) -> (server half, {id: client half})`` and ``tolerance`` (the largest
absolute error allowed between the combined weighted sum and the plaintext one)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import pytest

from securefl.engine.messages import FitIns, Message, decode, encode
from securefl.engine.protection import (
    ClientProtection,
    Combined,
    OpensModel,
    Rows,
    Sealed,
    ServerProtection,
    Update,
    WeightedSum,
)
from securefl.engine.session import RUN_ID_BYTES, RoundContext, model_digest

RUN = b"\x01" * RUN_ID_BYTES  # RoundContext.standalone's run id


def ctx(round: int, model: bytes = b"\0" * 32) -> RoundContext:
    """A round context with a replay log of its own."""
    return RoundContext.standalone(round=round, model=model)


Drop = Callable[[int, str], bool]


def converse(server: ServerProtection, clients: Mapping[str, ClientProtection],
             updates: Mapping[str, Update], *, round: int = 1, dimension: int,
             drop: Drop = lambda exchange, cid: False, wire: bool = True) -> Combined:
    """Drive one round's protection conversation in-process (through the codec if ``wire``).

    ``drop(exchange, client)`` removes a client from exchange ``exchange`` onwards.
    """
    carry = (lambda m: decode(encode(m))) if wire else (lambda m: m)
    protocol = server.server_round(round=round, dimension=dimension)
    participants = list(updates)
    payloads = protocol.open(participants)
    rounds = {}
    for cid in participants:
        context = ctx(round)
        if isinstance(clients[cid], OpensModel):  # the site opens the global model first
            opening = payloads.get(cid)
            empty = opening is not None and getattr(opening, "state", None) is not None
            request = FitIns(run=RUN, round=round, config={}, protection=opening,
                             parameters=np.zeros(0 if empty else dimension, np.float32))
            model = clients[cid].open_model(carry(request))  # type: ignore[union-attr]
            context = ctx(round, model_digest(model))
        rounds[cid] = clients[cid].client_round(round=round, context=context)
    gone: set[str] = set()
    exchange = 0

    def deliver(requests: Mapping[str, Message | None], first: bool) -> dict[str, Message]:
        replies = {}
        for cid, request in requests.items():
            if cid in gone or drop(exchange, cid):
                gone.add(cid)
                continue
            if first:
                reply = rounds[cid].open(updates[cid], None if request is None else carry(request))
            else:
                reply = rounds[cid].step(carry(request))
            replies[cid] = carry(reply)
        return replies

    replies = deliver({cid: payloads.get(cid) for cid in participants}, first=True)
    result = protocol.step(replies, set(participants) - set(replies))
    while not isinstance(result, Rows | WeightedSum | Sealed):
        exchange += 1
        requested = dict(result)
        replies = deliver(requested, first=False)
        result = protocol.step(replies, set(requested) - set(replies))
    return result


def plain_sum(updates: Mapping[str, Update], ids) -> tuple[np.ndarray, float]:
    total = sum(updates[c].weight * updates[c].delta.astype(np.float64) for c in ids)
    return np.asarray(total), float(sum(updates[c].weight for c in ids))


class ProtectionContract:
    tolerance: float = 1e-6
    num_clients: int = 5
    dimension: int = 64
    scale: float = 0.05  # typical update magnitude

    def make(self, client_ids: list[str]) -> tuple[ServerProtection, dict[str, ClientProtection]]:
        raise NotImplementedError

    def updates(self, seed: int, ids: list[str]) -> dict[str, Update]:
        rng = np.random.default_rng(seed)
        return {c: Update(rng.normal(0, self.scale, self.dimension).astype(np.float32),
                          float(rng.integers(10, 100))) for c in ids}

    @pytest.fixture
    def ids(self) -> list[str]:
        return [f"site-{i}" for i in range(self.num_clients)]

    def as_sum(self, result: Combined) -> WeightedSum:
        return result.weighted_sum() if isinstance(result, Rows) else result

    def test_sum_matches_plaintext(self, ids):
        server, clients = self.make(ids)
        updates = self.updates(1, ids)
        result = self.as_sum(converse(server, clients, updates, dimension=self.dimension))
        total, weight = plain_sum(updates, ids)
        assert sorted(result.client_ids) == sorted(ids)
        assert result.total_weight == pytest.approx(weight, rel=1e-9, abs=self.tolerance)
        assert np.max(np.abs(result.total - total)) <= self.tolerance * weight

    def test_client_dropped_before_replying_is_excluded(self, ids):
        server, clients = self.make(ids)
        updates = self.updates(2, ids)
        gone = ids[0]
        result = self.as_sum(converse(server, clients, updates, dimension=self.dimension,
                                      drop=lambda exchange, cid: cid == gone))
        total, weight = plain_sum(updates, ids[1:])
        assert gone not in result.client_ids
        assert result.total_weight == pytest.approx(weight, rel=1e-9, abs=self.tolerance)
        assert np.max(np.abs(result.total - total)) <= self.tolerance * weight

    def test_rows_only_when_declared(self, ids):
        server, clients = self.make(ids)
        result = converse(server, clients, self.updates(3, ids), dimension=self.dimension)
        assert isinstance(result, Rows) == bool(server.reveals_rows)

    def test_names_agree(self, ids):
        server, clients = self.make(ids)
        assert {c.name for c in clients.values()} == {server.name}
