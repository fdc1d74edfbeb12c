"""The client state machine: answer the server's messages for one site."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from securefl.engine.messages import (
    Decline,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Message,
)
from securefl.engine.protection import ClientProtection, ClientRound, Update
from securefl.engine.trainer import Trainer
from securefl.errors import BudgetExceeded, MessageError

__all__ = ["Client", "UpdateHook"]

_log = logging.getLogger(__name__)

#: transforms a client's update before protection (e.g. DP-FedAvg clipping, an attack)
UpdateHook = Callable[[Update], Update]


class Client:
    """One site: trains on ``FitIns``, evaluates on ``EvaluateIns``, and otherwise forwards
    the round's protection messages to its :class:`ClientRound`.

    A message for a round other than the one in progress is rejected; a client whose
    privacy budget would be exceeded answers :class:`Decline` instead of training.
    """

    def __init__(self, client_id: str, trainer: Trainer, protection: ClientProtection, *,
                 update_hooks: Sequence[UpdateHook] = ()) -> None:
        self.client_id = client_id
        self.trainer = trainer
        self.protection = protection
        self.update_hooks = tuple(update_hooks)
        self._round: int | None = None
        self._protocol: ClientRound | None = None

    def handle(self, request: Message, *, round: int) -> Message:
        if isinstance(request, FitIns):
            if request.round != round:
                raise MessageError(f"FitIns for round {request.round} delivered in round {round}")
            return self._fit(request)
        if isinstance(request, EvaluateIns):
            n, loss, accuracy = self.trainer.evaluate(request.parameters)
            return EvaluateRes(num_examples=n, loss=loss, accuracy=accuracy)
        if self._protocol is None or round != self._round:
            raise MessageError(f"{type(request).__name__} for round {round}, but the round in "
                               f"progress is {self._round}")
        return self._protocol.step(request)

    def _fit(self, request: FitIns) -> Message:
        self._round, self._protocol = request.round, None
        try:
            update, metrics = self.trainer.fit(request.parameters, round=request.round)
        except BudgetExceeded as exc:
            _log.info("%s declines round %d: %s", self.client_id, request.round, exc)
            return Decline(reason=str(exc))
        for hook in self.update_hooks:
            update = hook(update)
        self._protocol = self.protection.client_round(round=request.round)
        payload = self._protocol.open(update, request.protection)
        return FitRes(payload=payload, metrics={k: float(v) for k, v in metrics.items()})
