"""An HE federation of real engine Clients (stub trainers), driven through the wire codec."""

from __future__ import annotations

import numpy as np

from securefl.aggregation import FedAvg
from securefl.engine.client import Client
from securefl.engine.messages import FitRes, Message, decode, encode
from securefl.engine.optim import ServerOptimizer
from securefl.engine.protection import Update
from securefl.engine.server import Server
from securefl.engine.session import ReleaseLog
from securefl.engine.simulation import InProcessTransport
from securefl.he import HEConfig
from securefl.he import build_simulation as build_he

IDS = [f"site-{i}" for i in range(4)]


class StubTrainer:
    """Returns a fixed delta per (site, round) and counts what it was asked."""

    def __init__(self, seed: int, dimension: int, weight: float) -> None:
        self.rng = np.random.default_rng(seed)
        self.dimension, self.weight = dimension, weight
        self.fits: list[np.ndarray] = []
        self.evaluations = 0

    def fit(self, parameters, *, round):
        self.fits.append(np.array(parameters))
        delta = self.rng.normal(0, 0.05, self.dimension).astype(np.float32)
        return Update(delta, self.weight), {"train_loss": 1.0}

    def evaluate(self, parameters):
        self.evaluations += 1
        return 10, 0.5, 0.75


def wire(message: Message) -> Message:
    return decode(encode(message))


class Federation:
    """Server + real Clients over an in-process transport that encodes every message."""

    def __init__(self, *, dimension: int = 9000, config: HEConfig | None = None,
                 releases: dict[str, ReleaseLog] | None = None, lr: float = 1.0,
                 federated: bool = False) -> None:
        self.dimension = dimension
        self.server_half, self.halves = build_he(config or HEConfig(), IDS, dimension=dimension,
                                                 server_lr=lr)
        self.trainers = {c: StubTrainer(i, dimension, 10.0 + 5 * i) for i, c in enumerate(IDS)}
        self.clients = {c: Client(c, self.trainers[c], self.halves[c],
                                  releases=(releases or {}).get(c), evaluate=federated)
                        for c in IDS}
        self.transport = SpyTransport(self.clients)
        self.initial = np.linspace(-0.5, 0.5, dimension).astype(np.float32)
        self.server = Server(self.transport, self.server_half, FedAvg(),
                             ServerOptimizer(lr=lr), parameters=self.initial, seed=0,
                             federated_evaluation=federated)


class SpyTransport(InProcessTransport):
    """Wire transport that keeps every reply the server received (decoded), and each
    site's last upload."""

    def __init__(self, clients) -> None:
        super().__init__(clients, wire=True)
        self.received: list[Message] = []
        self.uploads: dict[str, Message] = {}

    def _deliver(self, client_id, request, round, timeout):
        reply = super()._deliver(client_id, request, round, timeout)
        if not isinstance(reply, str):
            self.received.append(reply)
            if isinstance(reply, FitRes):
                self.uploads[client_id] = reply.payload
        return reply
