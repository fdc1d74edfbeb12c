"""What happened in each round, as records that serialise to one JSON line each."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["History", "RoundRecord"]


@dataclass
class RoundRecord:
    round: int
    clients: list[str] = field(default_factory=list)  # whose update entered the aggregate
    sampled: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)
    declined: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    aborted: str | None = None
    accuracy: float | None = None  # central held-out set
    loss: float | None = None
    federated_accuracy: float | None = None  # weighted over the clients' validation splits
    federated_loss: float | None = None
    train_loss: float | None = None
    client_metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # FitRes.metrics
    update_norm: float | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        extra = out.pop("extra")
        out.update(extra)
        # JSON has no NaN; a missing metric is null
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in out.items()}


@dataclass
class History:
    rounds: list[RoundRecord] = field(default_factory=list)
    #: why the run stopped before its last round (no further round could release anything)
    stopped: str | None = None

    def append(self, record: RoundRecord) -> None:
        self.rounds.append(record)

    @property
    def final(self) -> RoundRecord | None:
        return self.rounds[-1] if self.rounds else None

    def metric(self, name: str) -> list[float | None]:
        return [getattr(r, name) for r in self.rounds]
