"""The Protection seam: how an update is protected on the client and combined on the server.

A protection is a short conversation per round.  The server side (:class:`ServerRound`)
attaches an opening payload to each client's :class:`~securefl.engine.messages.FitIns`,
then turns every batch of replies into the next batch of requests until it can return a
:data:`Combined` result.  The client side (:class:`ClientRound`) answers.  Both are pure
state machines: the engine's transport moves their messages, so the same code runs
in-process and over gRPC.

* :class:`Plain` (one exchange) reveals each client's row: :class:`Rows`.
* Secure aggregation reveals only the weighted sum: :class:`WeightedSum`.
* HE with a blind server reveals nothing: the sum stays encrypted (:class:`Sealed`), the
  server protection keeps it as the global model (:class:`KeepsModel`), and each site
  recovers the model from ``FitIns`` itself (:class:`OpensModel`).

Server and client halves are built separately (:class:`ServerProtection`,
:class:`ClientProtection`) so that secret material never has to exist on the server.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeGuard, runtime_checkable

import numpy as np

from securefl.aggregation.base import weighted_sum
from securefl.engine.messages import FitIns, Message, PlainUpdate
from securefl.engine.session import RoundContext

__all__ = [
    "Absorbed",
    "ClientProtection",
    "ClientRound",
    "Combined",
    "KeepsModel",
    "OpensModel",
    "PerClass",
    "Plain",
    "Receives",
    "Redoable",
    "Rows",
    "Sealed",
    "ServerProtection",
    "ServerRound",
    "Update",
    "WeightedSum",
    "check_update",
    "opens_model",
]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Update:
    """What local training produces: ``delta = local - global`` (float32, shape ``(d,)``)."""

    delta: np.ndarray
    weight: float


@dataclass(frozen=True)
class Rows:
    """Individual client rows, visible to the server (plain protection only)."""

    client_ids: tuple[str, ...]
    updates: np.ndarray  # (n, d) float32
    weights: np.ndarray  # (n,) float64
    rejected: Mapping[str, str] = field(default_factory=dict)

    def weighted_sum(self) -> WeightedSum:
        total = weighted_sum(self.updates, self.weights)
        return WeightedSum(self.client_ids, total, float(self.weights.sum()), self.rejected)


@dataclass(frozen=True)
class WeightedSum:
    """Only ``total = sum_i w_i x_i`` and ``total_weight = sum_i w_i`` are revealed."""

    client_ids: tuple[str, ...]
    total: np.ndarray  # (d,) float64
    total_weight: float
    rejected: Mapping[str, str] = field(default_factory=dict)

    def mean(self) -> np.ndarray:
        if self.total_weight <= 0:
            raise ValueError("cannot average: total weight is zero")
        return (self.total / self.total_weight).astype(np.float32)


@dataclass(frozen=True)
class Sealed:
    """Nothing is revealed: the round's sum stays encrypted and becomes the global model that
    the protection keeps (:class:`KeepsModel`); the server has nothing to apply."""

    client_ids: tuple[str, ...]
    rejected: Mapping[str, str] = field(default_factory=dict)


Combined = Rows | WeightedSum | Sealed


class ServerRound(Protocol):
    """Server half of one round's protection conversation."""

    def open(self, participants: Sequence[str]) -> Mapping[str, Message | None]:
        """Payload to attach to each participant's FitIns."""
        ...

    def step(self, replies: Mapping[str, Message],
             dropped: Collection[str]) -> Mapping[str, Message] | Combined:
        """Consume one batch of replies; return the next requests or the combined result.

        ``dropped`` holds every client that missed this exchange or declined.  Raises
        :class:`~securefl.errors.ProtocolAbort` when the round cannot complete.
        """
        ...


class Absorbed(Message):
    """What an exchange keeps of a reply that a :class:`Receives` round consumed on arrival.
    Not a wire message (never registered): no client can send one."""


@runtime_checkable
class Receives(Protocol):
    """A server round that consumes each reply of its exchanges as it arrives (the SecAgg+
    server adds each masked input into its sum), so that an exchange holds one large reply at
    a time.  The engine passes :meth:`receive` to the transport
    (:class:`~securefl.engine.transport.HandsOver`), or applies it to the replies after an
    exchange; :meth:`ServerRound.step` then gets what it returned."""

    def receive(self, client_id: str, reply: Message) -> Message:
        """``reply`` itself, or :class:`Absorbed` once its content is in the round's state."""
        ...


@runtime_checkable
class Redoable(Protocol):
    """A server round that can say whether any client may have revealed anything yet; one
    that aborted before that point may be redone in the same round (see
    :class:`~securefl.engine.session.ReleaseLog`)."""

    @property
    def revealed(self) -> bool: ...


@runtime_checkable
class CohortRule(Protocol):
    """A server protection that releases nothing from fewer than some number of answering
    clients (distributed DP's minimum cohort): the server does not start a round that it
    knows cannot reach it."""

    def check_cohort(self, survivors: int) -> str | None:
        """Why ``survivors`` clients are too few, or ``None``."""
        ...


class ClientRound(Protocol):
    """Client half of one round's protection conversation."""

    def open(self, update: Update, payload: Message | None) -> Message:
        """Protect ``update``; the returned message becomes ``FitRes.payload``."""
        ...

    def step(self, request: Message) -> Message:
        """Answer a later request of the same round."""
        ...


@runtime_checkable
class ServerProtection(Protocol):
    name: str
    reveals_rows: bool  # True only when the server sees individual updates

    def server_round(self, *, round: int, dimension: int,
                     run: bytes | None = None) -> ServerRound:
        """One round's server half; ``run`` is the run id the server announces in FitIns."""
        ...


@runtime_checkable
class ClientProtection(Protocol):
    name: str

    def client_round(self, *, round: int, context: RoundContext) -> ClientRound:
        """One round's client half; it must call ``context.release(survivors)`` before it
        reveals anything that depends on who survived (the one replay rule)."""
        ...


@runtime_checkable
class KeepsModel(Protocol):
    """A server protection that keeps the global model itself, in protected form.

    ``Server.parameters`` then stay the public initial model, sent in ``FitIns`` only while
    :meth:`holds_model` is false; no aggregator, server optimizer or central evaluation
    ever sees the model.  :meth:`save_state` / :meth:`load_state` checkpoint it.
    """

    def holds_model(self) -> bool: ...

    def save_state(self) -> bytes: ...

    def load_state(self, data: bytes) -> None: ...


@runtime_checkable
class OpensModel(Protocol):
    """A client protection under which a site recovers (e.g. decrypts) the global model from
    ``FitIns`` itself, checks it, and trains and evaluates only that model."""

    def open_model(self, request: FitIns) -> np.ndarray:
        """The global model of ``request`` (float32), or :class:`ProtocolAbort`."""
        ...


class PerClass:
    """``isinstance(value, protocol)`` for a runtime-checkable ``protocol`` whose members are
    all methods, decided once per class of ``value``: the protocol check itself inspects
    every attribute, and the engine asks on every message.  Bounded by the number of
    classes a process defines."""

    def __init__(self, protocol: type) -> None:
        self.protocol = protocol
        self._known: dict[type, bool] = {}

    def __call__(self, value: object) -> bool:
        cls = type(value)
        known = self._known.get(cls)
        if known is None:
            known = self._known[cls] = issubclass(cls, self.protocol)
        return known


_OPENS_MODEL = PerClass(OpensModel)


def opens_model(protection: object) -> TypeGuard[OpensModel]:
    """``isinstance(protection, OpensModel)`` (:class:`PerClass`; a site asks on every
    ``FitIns``)."""
    return _OPENS_MODEL(protection)


def check_update(vector: object, dimension: int) -> str | None:
    """Why ``vector`` is not a usable update of length ``dimension``, or ``None`` if it is."""
    if not isinstance(vector, np.ndarray) or vector.dtype.kind != "f":
        return "update is not a float array"
    if vector.shape != (dimension,):
        return f"update has shape {vector.shape}, expected ({dimension},)"
    if not np.isfinite(vector).all():
        return "update contains NaN or Inf"
    return None


# ----------------------------------------------------------------------------- plain
class _PlainServerRound:
    def __init__(self, dimension: int) -> None:
        self._dimension = dimension

    def open(self, participants: Sequence[str]) -> Mapping[str, Message | None]:
        return dict.fromkeys(participants)

    def step(self, replies: Mapping[str, Message], dropped: Collection[str]) -> Rows:
        ids, rows, weights, rejected = [], [], [], {}
        for client_id, reply in replies.items():
            if not isinstance(reply, PlainUpdate):
                _log.warning("client %s rejected: expected a PlainUpdate", client_id)
                rejected[client_id] = "expected a PlainUpdate"
                continue
            reason = check_update(reply.update, self._dimension)
            if reason is None and not (np.isfinite(reply.weight) and reply.weight > 0):
                reason = f"weight must be finite and > 0, got {reply.weight}"
            if reason is not None:
                _log.warning("client %s rejected: %s", client_id, reason)
                rejected[client_id] = reason
                continue
            ids.append(client_id)
            rows.append(reply.update)
            weights.append(float(reply.weight))
        updates = (np.stack(rows).astype(np.float32, copy=False) if rows
                   else np.zeros((0, self._dimension), np.float32))
        return Rows(tuple(ids), updates, np.asarray(weights, np.float64), rejected)


class _PlainClientRound:
    def open(self, update: Update, payload: Message | None) -> Message:
        return PlainUpdate(update=update.delta, weight=float(update.weight))

    def step(self, request: Message) -> Message:
        raise ValueError(f"plain protection has no further steps (got {type(request).__name__})")


class Plain:
    """No protection: each client's delta and weight go to the server as they are."""

    name = "plain"
    reveals_rows = True

    def server_round(self, *, round: int, dimension: int,
                     run: bytes | None = None) -> ServerRound:
        return _PlainServerRound(dimension)

    def client_round(self, *, round: int, context: RoundContext) -> ClientRound:
        return _PlainClientRound()
