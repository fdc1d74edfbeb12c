"""The server's round loop.  It never knows whether the transport is in-process or gRPC.

One round:

1. sample clients (by count or fraction) with an RNG derived from ``(seed, round)``, so a
   resumed server samples exactly as an uninterrupted one;
2. exchange messages: ``FitIns`` then as many protection steps as the protection needs;
3. the protection combines the replies into :class:`Rows` or a :class:`WeightedSum`;
4. hooks (attacks in simulation, DP-FedAvg noise) transform the combined result;
5. the aggregator turns it into one delta (a ``WeightedSum`` only admits linear rules);
6. the server optimizer applies the delta;
7. evaluation: centrally (simulation only) and/or federated over the clients' validation
   splits, weighted by their sizes;

Under a protection that keeps the model (:class:`KeepsModel`: HE with a blind server) steps
4-6 do not exist: the sum stays encrypted and becomes the next global model, which each
site decrypts for itself.
8. the round is recorded in the :class:`History`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast, runtime_checkable

import numpy as np

from securefl.aggregation.base import Aggregator, ReferenceRule, StatefulRule
from securefl.config import clients_per_round
from securefl.engine.history import History, RoundRecord
from securefl.engine.messages import Decline, EvaluateIns, EvaluateRes, FitIns, FitRes, Message
from securefl.engine.optim import ServerOptimizer
from securefl.engine.protection import (
    CohortRule,
    Combined,
    KeepsModel,
    Receives,
    Redoable,
    Rows,
    Sealed,
    ServerProtection,
    ServerRound,
    WeightedSum,
)
from securefl.engine.session import RUN_ID_BYTES
from securefl.engine.transport import Exchange, HandsOver, Transport
from securefl.errors import ProtocolAbort

__all__ = ["AggregateHook", "Sampler", "Server", "ServerHook"]


class ServerHook(Protocol):
    """Transforms what the protection combined before the aggregator sees it: an attack in
    simulation (byzantine rows), or DP-FedAvg's noise on the sum.  ``rng`` is the round's
    seeded generator (:meth:`Server.round_rng`); a deployed DP hook draws from its own
    CSPRNG instead."""

    def transform_combined(self, combined: Rows | WeightedSum, *, round: int,
                           rng: np.random.Generator) -> Rows | WeightedSum: ...


@runtime_checkable
class AggregateHook(Protocol):
    """A server hook that also sees the aggregated delta before the optimizer applies it
    (the user-level audit records each round's released aggregate)."""

    def transform_aggregate(self, delta: np.ndarray, *, round: int, num_clients: int,
                            rng: np.random.Generator) -> np.ndarray: ...

_log = logging.getLogger(__name__)

CentralEvaluator = Callable[[np.ndarray], tuple[int, float, float]]


@dataclass(frozen=True)
class Sampler:
    """Pick :func:`~securefl.config.clients_per_round` clients uniformly without replacement."""

    count: int | None = None
    fraction: float = 1.0

    def __call__(self, available: Sequence[str], rng: np.random.Generator) -> list[str]:
        n = len(available)
        k = clients_per_round(n, count=self.count, fraction=self.fraction)
        chosen = rng.choice(n, size=k, replace=False) if k < n else np.arange(n)
        return [available[i] for i in sorted(chosen)]


class Server:
    """Runs rounds over a :class:`Transport`; holds the global parameter vector."""

    def __init__(self, transport: Transport, protection: ServerProtection,
                 aggregator: Aggregator, optimizer: ServerOptimizer, *,
                 parameters: np.ndarray, seed: int, sampler: Sampler = Sampler(),
                 min_clients: int = 1, timeout: float | None = None,
                 central_evaluator: CentralEvaluator | None = None,
                 federated_evaluation: bool = False, hooks: Sequence[ServerHook] = (),
                 fit_config: Mapping[str, Any] | None = None,
                 reference_update: Callable[[np.ndarray], np.ndarray] | None = None,
                 run_id: bytes | None = None) -> None:
        if protection.reveals_rows is False and not aggregator.linear:
            raise ValueError(f"{aggregator!r} needs individual updates, which protection "
                             f"{protection.name!r} hides; use FedAvg")
        if isinstance(protection, KeepsModel) and (type(optimizer) is not ServerOptimizer
                                                   or hooks or reference_update is not None):
            raise ValueError(f"protection {protection.name!r} keeps the global model "
                             "encrypted: the server cannot run an optimizer, hooks or a "
                             "reference update on it (server optimizer fedavg only)")
        self.transport = transport
        self.protection = protection
        self.aggregator = aggregator
        self.optimizer = optimizer
        self.parameters = np.asarray(parameters, dtype=np.float32).copy()
        self.seed = seed
        self.sampler = sampler
        self.min_clients = min_clients
        self.timeout = timeout
        self.central_evaluator = central_evaluator
        self.federated_evaluation = federated_evaluation
        self.hooks = list(hooks)
        self.fit_config = dict(fit_config or {})
        #: the server's own update on its root data, for rules such as FLTrust
        self.reference_update = reference_update
        self.history = History()
        #: clients that declined a FitIns, with their reason: a client declines only when its
        #: privacy budget cannot pay for the round (:class:`~securefl.engine.client.Client`),
        #: and a budget only shrinks, so it declines every later round of the run too
        self.exhausted: dict[str, str] = {}
        self.aggregator_state: Any = None
        #: announced in every FitIns; a resumed deployment passes the persisted one
        self.run_id = run_id if run_id is not None else os.urandom(RUN_ID_BYTES)
        if len(self.run_id) != RUN_ID_BYTES:
            raise ValueError(f"run_id must be {RUN_ID_BYTES} bytes, got {len(self.run_id)}")

    def round_rng(self, round: int, purpose: int = 0) -> np.random.Generator:
        return np.random.default_rng([self.seed, round, purpose])

    def run(self, rounds: int, *, start: int = 1,
            on_round: Callable[[RoundRecord], None] | None = None) -> History:
        for rnd in range(start, start + rounds):
            if self.stop_before(rnd):
                break
            record = self.run_round(rnd)
            if on_round is not None:
                on_round(record)
        return self.history

    def cohort_shortfall(self, candidates: Collection[str]) -> str | None:
        """Why the protection's cohort rule (:class:`CohortRule`) cannot be met by the
        ``candidates`` that have not declined for their budget (:attr:`exhausted`), or
        ``None``."""
        if not isinstance(self.protection, CohortRule):
            return None
        live = [c for c in candidates if c not in self.exhausted]
        reason = self.protection.check_cohort(len(live))
        if reason is None:
            return None
        return (f"{len(live)} of {len(candidates)} clients have privacy budget left (the "
                f"others declined an earlier round): {reason}")

    def stop_before(self, rnd: int) -> bool:
        """True (and :attr:`History.stopped` set, one line logged) when no client set of the
        federation can reach the cohort any more, so that no round from ``rnd`` on can
        release anything; only budget exhaustion, which is permanent, stops a run."""
        if not self.exhausted:
            return False
        reason = self.cohort_shortfall(self.transport.client_ids())
        if reason is None:
            return False
        self.history.stopped = f"stopped before round {rnd}: {reason}"
        _log.warning("%s", self.history.stopped)
        return True

    def run_round(self, rnd: int) -> RoundRecord:
        started = time.perf_counter()
        record = RoundRecord(round=rnd)
        record.sampled = self.sampler(self.transport.client_ids(), self.round_rng(rnd))
        trained_from = self.sent_parameters()
        shortfall = self.cohort_shortfall(record.sampled) if self.exhausted else None
        if shortfall is not None:  # no FitIns is sent: nothing trained, charged or revealed
            record.aborted = f"not started: {shortfall}"
            record.declined = {c: self.exhausted[c] for c in record.sampled
                               if c in self.exhausted}
            _log.warning("round %d %s", rnd, record.aborted)
            combined = None
        else:
            try:
                combined = self._collect(rnd, record)
            except ProtocolAbort as exc:
                record.aborted = str(exc)
                combined = None
        if combined is not None:
            record.rejected.update(combined.rejected)
            if len(combined.client_ids) < self.min_clients:
                record.aborted = (f"only {len(combined.client_ids)} usable updates, "
                                  f"min_clients = {self.min_clients}")
            else:
                record.clients = sorted(combined.client_ids)
                if not isinstance(combined, Sealed):
                    self._apply(rnd, combined, record)
        self._evaluate(rnd, record, trained_from)
        record.seconds = time.perf_counter() - started
        self.history.append(record)
        return record

    def sent_parameters(self) -> np.ndarray:
        """What ``FitIns`` carries: the global model, or nothing once the protection keeps it
        (the sites then recover it from the protection's payload)."""
        if isinstance(self.protection, KeepsModel) and self.protection.holds_model():
            return self.parameters[:0]
        return self.parameters

    # ------------------------------------------------------------------ the conversation
    def _collect(self, rnd: int, record: RoundRecord) -> Combined | None:
        """The round's conversation.  A protection that aborts before it revealed anything
        (:class:`Redoable`) is redone once, at once, with the clients still answering: the
        sites recognise the repeated ``FitIns`` (same run, round and model), answer from their
        memo without a new privacy charge, and the one replay rule lets them reveal for one
        survivor set only, so the aborted attempt can never be unmasked."""
        if len(record.sampled) < self.min_clients:
            record.aborted = f"only {len(record.sampled)} clients available"
            return None
        participants, redone = list(record.sampled), False
        while True:
            protocol = self.protection.server_round(round=rnd, dimension=self.parameters.size,
                                                    run=self.run_id)
            try:
                return self._converse(rnd, record, protocol, participants)
            except ProtocolAbort:
                if redone or not (isinstance(protocol, Redoable) and not protocol.revealed):
                    raise
                gone = set(record.dropped) | set(record.declined)
                participants = [c for c in participants if c not in gone]
                if len(participants) < self.min_clients:
                    raise
                record.extra["redone"] = sorted(gone)
                redone = True
                _log.info("round %d: aborted before any reveal; redone without %s", rnd,
                          sorted(gone))

    def _converse(self, rnd: int, record: RoundRecord, protocol: ServerRound,
                  participants: Sequence[str]) -> Combined:
        payloads = protocol.open(participants)
        parameters = self.sent_parameters()
        # one FitIns per distinct payload: clients with the same payload get one broadcast
        # message (in process, the model is encoded once for all of them)
        made: dict[int, FitIns] = {}  # by id: ``payloads`` keeps every payload alive
        requests: dict[str, Message] = {}
        for cid in participants:
            payload = payloads.get(cid)
            if id(payload) not in made:
                made[id(payload)] = FitIns(run=self.run_id, round=rnd, parameters=parameters,
                                           config=self.fit_config, protection=payload)
            requests[cid] = made[id(payload)]
        exchange = self.transport.exchange(requests, round=rnd, timeout=self.timeout)
        record.dropped.update(exchange.dropped)
        first: dict[str, Message] = {}
        train_losses = []
        for cid, reply in exchange.replies.items():
            if isinstance(reply, FitRes):
                first[cid] = reply.payload
                record.client_metrics[cid] = dict(reply.metrics)
                if "train_loss" in reply.metrics:
                    train_losses.append(reply.metrics["train_loss"])
            elif isinstance(reply, Decline):
                record.declined[cid] = self.exhausted[cid] = reply.reason
            else:
                record.dropped[cid] = f"unexpected reply {type(reply).__name__}"
        if train_losses:
            record.train_loss = float(np.mean(train_losses))
        missing: Collection[str] = set(participants) - set(first)
        result = protocol.step(first, missing)
        while not isinstance(result, Rows | WeightedSum | Sealed):
            exchange = self._exchange(rnd, protocol, result)
            record.dropped.update(exchange.dropped)
            result = protocol.step(exchange.replies, set(exchange.dropped))
        return result

    def _exchange(self, rnd: int, protocol: ServerRound,
                  requests: Mapping[str, Message]) -> Exchange:
        """One protection exchange; a :class:`Receives` round gets each reply as it arrives
        where the transport hands replies over, else right after the exchange."""
        if not isinstance(protocol, Receives):
            return self.transport.exchange(requests, round=rnd, timeout=self.timeout)
        if isinstance(self.transport, HandsOver) and self.transport.hands_over_replies:
            return self.transport.exchange(requests, round=rnd, timeout=self.timeout,
                                           on_reply=protocol.receive)
        exchange = self.transport.exchange(requests, round=rnd, timeout=self.timeout)
        exchange.replies = {cid: protocol.receive(cid, reply)
                            for cid, reply in exchange.replies.items()}
        return exchange

    # ------------------------------------------------------------------ aggregate + apply
    def _apply(self, rnd: int, combined: Rows | WeightedSum, record: RoundRecord) -> None:
        for hook in self.hooks:
            combined = hook.transform_combined(combined, round=rnd, rng=self.round_rng(rnd, 1))
        if isinstance(combined, Rows):
            delta = self._aggregate_rows(combined)
        elif self.aggregator.linear:
            delta = combined.mean()
        else:
            raise ValueError(f"{self.aggregator!r} cannot aggregate a bare weighted sum")
        for hook in self.hooks:
            if isinstance(hook, AggregateHook):
                delta = hook.transform_aggregate(delta, round=rnd,
                                                 num_clients=len(combined.client_ids),
                                                 rng=self.round_rng(rnd, 2))
        record.update_norm = float(np.linalg.norm(delta))
        self.parameters = self.optimizer.step(self.parameters, delta)

    def _aggregate_rows(self, rows: Rows) -> np.ndarray:
        context: dict[str, Any] = {}
        if self.aggregator.needs_reference:
            if self.reference_update is None:
                raise ValueError(f"{self.aggregator!r} needs the server's reference update "
                                 "(root data), and none was configured")
            context["reference"] = self.reference_update(self.parameters)
        if self.aggregator.stateful:
            delta, self.aggregator_state = cast(StatefulRule, self.aggregator)(
                rows.updates, rows.weights, state=self.aggregator_state, **context)
            return np.asarray(delta, dtype=np.float32)
        if context:
            return np.asarray(cast(ReferenceRule, self.aggregator)(
                rows.updates, rows.weights, **context), dtype=np.float32)
        return np.asarray(self.aggregator(rows.updates, rows.weights), dtype=np.float32)

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, rnd: int, record: RoundRecord, trained_from: np.ndarray) -> None:
        """Central evaluation scores the new model; federated evaluation scores the model
        the round's sites trained from, the only one a site agrees to evaluate."""
        if self.central_evaluator is not None:
            _, record.loss, record.accuracy = self.central_evaluator(self.parameters)
        if self.federated_evaluation:
            ids = record.sampled
            request = EvaluateIns(round=rnd, parameters=trained_from)
            exchange = self.transport.exchange(dict.fromkeys(ids, request), round=rnd,
                                               timeout=self.timeout)
            results = [r for r in exchange.replies.values()
                       if isinstance(r, EvaluateRes) and r.num_examples > 0]
            total = sum(r.num_examples for r in results)
            if total:
                record.federated_loss = sum(r.loss * r.num_examples for r in results) / total
                record.federated_accuracy = sum(
                    r.accuracy * r.num_examples for r in results) / total
            if self.central_evaluator is None:
                record.loss, record.accuracy = record.federated_loss, record.federated_accuracy
