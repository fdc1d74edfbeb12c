"""The client state machine: answer the server's messages for one site."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

from securefl.engine.messages import (
    Decline,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Message,
)
from securefl.engine.protection import ClientProtection, ClientRound, Update, opens_model
from securefl.engine.session import ReleaseLog, RoundContext, model_digest
from securefl.engine.trainer import Trainer
from securefl.errors import BudgetExceeded, MessageError

__all__ = ["Client", "UpdateHook"]

_log = logging.getLogger(__name__)

#: transforms a client's update before protection (e.g. DP-FedAvg clipping, an attack)
UpdateHook = Callable[[Update], Update]


class Client:
    """One site: trains on ``FitIns``, evaluates on ``EvaluateIns``, and otherwise forwards
    the round's protection messages to its :class:`ClientRound`.

    The site, not the server, decides what it releases:

    * every ``FitIns`` enters the site's :class:`~securefl.engine.session.ReleaseLog`: rounds
      strictly increase within a run, and the protection checks the one replay rule there
      before it reveals anything;
    * a message for a round other than the one in progress is rejected;
    * a client whose privacy budget would be exceeded answers :class:`Decline`;
    * evaluation is answered only when the site's own configuration enables it
      (``evaluate``), only on the global model of the round in progress (the model it
      trained from), and at most once per round: the server gets no query oracle on the
      site's validation data.

    Under a protection that opens the model (:class:`~securefl.engine.protection.OpensModel`:
    HE with a blind server) the site decrypts and checks the global model itself before
    anything else, hashes *that* model into the release log, and evaluates only that model.
    """

    def __init__(self, client_id: str, trainer: Trainer, protection: ClientProtection, *,
                 update_hooks: Sequence[UpdateHook] = (), releases: ReleaseLog | None = None,
                 evaluate: bool = False) -> None:
        self.client_id = client_id
        self.trainer = trainer
        self.protection = protection
        self.update_hooks = tuple(update_hooks)
        self.releases = releases if releases is not None else ReleaseLog()
        self.evaluate = evaluate
        self._run: bytes | None = None
        self._round: int | None = None
        self._protocol: ClientRound | None = None
        self._evaluated: int | None = None
        self._model: np.ndarray | None = None  # the model of the round in progress

    def handle(self, request: Message, *, round: int) -> Message:
        if isinstance(request, FitIns):
            if request.round != round:
                raise MessageError(f"FitIns for round {request.round} delivered in round {round}")
            return self._fit(request)
        if isinstance(request, EvaluateIns):
            return self._evaluate(request)
        if self._protocol is None or round != self._round:
            raise MessageError(f"{type(request).__name__} for round {round}, but the round in "
                               f"progress is {self._round}")
        return self._protocol.step(request)

    def _fit(self, request: FitIns) -> Message:
        parameters = request.parameters
        if opens_model(self.protection):
            parameters = self.protection.open_model(request)
        digest = model_digest(parameters)
        self.releases.start(run=request.run, round=request.round, model=digest)
        self._run, self._round, self._protocol = request.run, request.round, None
        self._model = parameters
        try:
            update, metrics = self.trainer.fit(parameters, round=request.round)
        except BudgetExceeded as exc:
            _log.info("%s declines round %d: %s", self.client_id, request.round, exc)
            return Decline(reason=str(exc))
        for hook in self.update_hooks:
            update = hook(update)
        context = RoundContext(run=request.run, round=request.round, model=digest,
                               releases=self.releases)
        self._protocol = self.protection.client_round(round=request.round, context=context)
        payload = self._protocol.open(update, request.protection)
        return FitRes(payload=payload, metrics={k: float(v) for k, v in metrics.items()})

    def _evaluate(self, request: EvaluateIns) -> Message:
        if not self.evaluate:
            return Decline(reason="federated evaluation is disabled at this site")
        current = None if self._run is None else self.releases.current(self._run)
        parameters = request.parameters
        if opens_model(self.protection) and self._model is not None \
                and parameters.size == 0:  # the server never holds the model: use our own
            parameters = self._model
        if current != (request.round, model_digest(parameters)):
            _log.warning("%s refuses to evaluate round %d: not the model it trained from",
                         self.client_id, request.round)
            return Decline(reason="evaluation only of the global model of the round in progress")
        if self._evaluated == request.round:
            return Decline(reason=f"round {request.round} was already evaluated")
        self._evaluated = request.round
        n, loss, accuracy = self.trainer.evaluate(parameters)
        return EvaluateRes(num_examples=n, loss=loss, accuracy=accuracy)
