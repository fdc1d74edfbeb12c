"""Server optimizers: apply the aggregated client delta to the global model.

``FedAvg`` is plain ``x <- x + lr * delta`` (lr 1 recovers McMahan et al. 2017).  ``FedAvgM``
(Hsu et al. 2019) and ``FedAdam`` (Reddi et al., ICLR 2021, "Adaptive Federated
Optimization") treat ``-delta`` as a pseudo-gradient.  State is explicit so a server can
checkpoint and resume it.
"""

from __future__ import annotations

import numpy as np

__all__ = ["FedAdam", "FedAvgM", "ServerOptimizer", "build_server_optimizer"]


class ServerOptimizer:
    """``x <- x + lr * delta``."""

    def __init__(self, *, lr: float = 1.0) -> None:
        if lr <= 0:
            raise ValueError(f"server lr must be > 0, got {lr}")
        self.lr = lr

    def step(self, params: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return (params + self.lr * delta).astype(np.float32)

    def state(self) -> dict[str, np.ndarray]:
        return {}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        if state:
            raise ValueError(f"unexpected optimizer state {sorted(state)}")


class FedAvgM(ServerOptimizer):
    """Server momentum: ``v <- beta v + delta``; ``x <- x + lr v``."""

    def __init__(self, *, lr: float = 1.0, momentum: float = 0.9) -> None:
        super().__init__(lr=lr)
        self.momentum = momentum
        self.velocity: np.ndarray | None = None

    def step(self, params: np.ndarray, delta: np.ndarray) -> np.ndarray:
        velocity = delta if self.velocity is None else self.momentum * self.velocity + delta
        self.velocity = velocity.astype(np.float32)
        return (params + self.lr * self.velocity).astype(np.float32)

    def state(self) -> dict[str, np.ndarray]:
        return {} if self.velocity is None else {"velocity": self.velocity}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.velocity = state.get("velocity")


class FedAdam(ServerOptimizer):
    """FedAdam (Reddi et al. 2021, Alg. 2): ``m <- b1 m + (1-b1) delta``,
    ``v <- b2 v + (1-b2) delta^2``, ``x <- x + lr m / (sqrt(v) + tau)`` (no bias correction,
    as in the paper)."""

    def __init__(self, *, lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3) -> None:
        super().__init__(lr=lr)
        self.beta1, self.beta2, self.tau = beta1, beta2, tau
        self.m: np.ndarray | None = None
        self.v: np.ndarray | None = None

    def step(self, params: np.ndarray, delta: np.ndarray) -> np.ndarray:
        d = delta.astype(np.float64)
        m = (1 - self.beta1) * d if self.m is None else self.beta1 * self.m + (1 - self.beta1) * d
        v = ((1 - self.beta2) * d * d if self.v is None
             else self.beta2 * self.v + (1 - self.beta2) * d * d)
        self.m, self.v = m, v
        return (params + self.lr * m / (np.sqrt(v) + self.tau)).astype(np.float32)

    def state(self) -> dict[str, np.ndarray]:
        return {} if self.m is None else {"m": self.m, "v": self.v}  # type: ignore[dict-item]

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.m, self.v = state.get("m"), state.get("v")


def build_server_optimizer(name: str, *, lr: float, momentum: float, beta1: float,
                           beta2: float, tau: float) -> ServerOptimizer:
    if name == "fedavgm":
        return FedAvgM(lr=lr, momentum=momentum)
    if name == "fedadam":
        return FedAdam(lr=lr, beta1=beta1, beta2=beta2, tau=tau)
    if name == "fedavg":
        return ServerOptimizer(lr=lr)
    raise ValueError(f"unknown server optimizer {name!r} (fedavg, fedavgm, fedadam)")
