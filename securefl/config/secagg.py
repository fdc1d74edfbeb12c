"""``[protection.secagg]``: secure aggregation parameters (Bonawitz et al. 2017; Bell et al. 2020).

* ``clip``: every coordinate of a client's update is clipped to ``[-clip, clip]`` before
  quantization.
* ``max_weight``: public bound on a client's aggregation weight.  A client sends
  ``q((w / max_weight) * x)`` and ``q(w / max_weight)``, so the pre-multiplied value stays in
  ``[-clip, clip]``; a weight above ``max_weight`` is refused.
* ``bits``: quantization levels per client, ``L = 2**(bits - 1) - 1``; ``"auto"`` picks the
  largest ``L`` with ``n * L <= 2**31 - 1`` so that the sum of ``n`` clients cannot wrap
  modulo ``2**32``.
* ``neighbours``: degree ``k`` of the SecAgg+ communication graph; ``"auto"`` is
  ``k = min(n - 1, 2 * ceil(1.5 * log2 n))`` (Bell et al., ``k = O(log n)``).
* ``threshold``: fraction of a neighbourhood needed to reconstruct a secret,
  ``t = min(k, floor(threshold * k) + 1)``; at least 0.5 so that ``t`` is a strict majority.
  A site also refuses a round whose ``t`` is below its own ``threshold`` applied to ``k``.
* ``min_neighbours``: the smallest neighbourhood ``k`` *this site* accepts, whatever the
  server announces (default 2: a three-site consortium, complete graph, ``t = 2``).  A
  neighbourhood of ``k`` with ``t = floor(k / 2) + 1`` keeps a secret from ``t - 1`` colluding
  neighbours and survives ``k - t`` dropped ones.

``clip``, ``max_weight`` and ``bits`` must be equal at every site and the server: they enter
the federation id (:func:`securefl.secagg.scope.federation_id`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from securefl.config.parse import check

__all__ = ["SecAggConfig"]


@dataclass(frozen=True)
class SecAggConfig:
    clip: float = 1.0
    max_weight: float = 1e5
    bits: int | Literal["auto"] = "auto"
    neighbours: int | Literal["auto"] = "auto"
    threshold: float = 0.5
    min_neighbours: int = 2

    def validate(self) -> None:
        check(self.clip > 0 and self.clip < float("inf"), "clip",
              f"must be finite and > 0, got {self.clip}")
        check(self.max_weight > 0 and self.max_weight < float("inf"), "max_weight",
              f"must be finite and > 0, got {self.max_weight}")
        if self.bits != "auto":
            check(2 <= self.bits <= 31, "bits", f"must be in [2, 31] or \"auto\", got {self.bits}")
        check(isinstance(self.min_neighbours, int) and self.min_neighbours >= 2,
              "min_neighbours", f"must be an integer >= 2, got {self.min_neighbours}")
        if self.neighbours != "auto":
            check(self.neighbours >= self.min_neighbours, "neighbours",
                  f"must be >= min_neighbours ({self.min_neighbours}) or \"auto\", "
                  f"got {self.neighbours}")
        check(0.5 <= self.threshold < 1, "threshold",
              f"must be in [0.5, 1), got {self.threshold}")
