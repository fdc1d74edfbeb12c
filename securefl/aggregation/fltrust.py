"""FLTrust: trust bootstrapped from the server's own root dataset (Cao et al., NDSS 2021)."""

from __future__ import annotations

import numpy as np

from securefl.aggregation.base import Rule, as_rows
from securefl.aggregation.geometry import combine_rows, row_statistics

__all__ = ["FLTrust"]


class FLTrust(Rule):
    """FLTrust (Cao, Fang, Liu, Gong, "FLTrust: Byzantine-robust federated learning via trust
    bootstrapping", NDSS 2021).

    With ``g_0`` the server's update on its root dataset (``reference``):
    ``TS_i = ReLU(cos(g_i, g_0))``, ``g_i' = g_i ||g_0|| / ||g_i||`` and
    ``out = sum_i TS_i g_i' / sum_i TS_i``; ``out = 0`` (the model does not move) when no
    client has positive trust.  ``||out|| <= ||g_0||`` whatever the clients send.

    The engine supplies ``g_0``: a rule with ``needs_reference = True`` is called as
    ``rule(rows, weights, reference=g_0)``, where ``g_0`` is one local-training update of the
    current global model on ``root_examples`` server-held examples (the paper uses 100).
    Weights are validated but not used.  Precondition: ``n >= 1`` and a finite, non-zero
    ``reference`` of shape ``(d,)``.
    """

    linear = False
    needs_reference = True

    def max_byzantine(self, n: int) -> int:
        """Trust comes from the server's root data, not from a majority: up to ``n - 1``."""
        return n - 1

    def __init__(self, *, root_examples: int = 100) -> None:
        if isinstance(root_examples, bool) or not isinstance(root_examples, int) \
                or root_examples < 1:
            raise ValueError(f"root_examples must be an int >= 1, got {root_examples!r}")
        self.root_examples = root_examples

    def __call__(self, updates: np.ndarray, weights: np.ndarray | None = None, *,
                 reference: np.ndarray | None = None) -> np.ndarray:
        rows, _ = as_rows(updates, weights)
        if reference is None:
            raise ValueError("FLTrust needs the server's root-data update: call it with "
                             "reference=<(d,) update>")
        server = np.asarray(reference, dtype=np.float64)
        if server.shape != (rows.shape[1],):
            raise ValueError(f"reference must have shape ({rows.shape[1]},), got {server.shape}")
        server_norm = float(np.linalg.norm(server))
        if not (np.isfinite(server_norm) and server_norm > 0):
            raise ValueError("reference must be finite and non-zero")
        sq_norms, dots = row_statistics(rows, server)
        norms = np.sqrt(sq_norms)
        with np.errstate(divide="ignore", invalid="ignore"):
            trust = np.where(norms > 0, np.maximum(dots / (norms * server_norm), 0.0), 0.0)
            scale = np.where(norms > 0, server_norm / norms, 0.0)
        total = trust.sum()
        if total == 0:
            return np.zeros(rows.shape[1], dtype=np.float32)
        return combine_rows(rows, trust * scale / total)

    def __repr__(self) -> str:
        return f"FLTrust(root_examples={self.root_examples})"
