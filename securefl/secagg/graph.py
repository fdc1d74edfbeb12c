"""The SecAgg+ communication graph (Bell et al., CCS 2020).

Each client pairs with ``k = O(log n)`` neighbours instead of all ``n - 1`` other clients.
Following Bell et al., the graph is a Harary graph ``H(k, n)`` under a uniformly random
relabelling: place the clients on a ring in a random order and join each one to the ``k / 2``
nearest clients on either side (for odd ``k`` and even ``n``, also to the client opposite).
The order comes from :class:`secrets.SystemRandom`, never from a seeded generator.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence

__all__ = ["auto_neighbours", "degree", "harary_graph", "threshold_for"]


def auto_neighbours(num_clients: int) -> int:
    """``k = min(n - 1, 2 * ceil(1.5 * log2 n))``: logarithmic degree, complete graph when small."""
    if num_clients < 2:
        raise ValueError(f"secure aggregation needs at least 2 clients, got {num_clients}")
    return min(num_clients - 1, 2 * math.ceil(1.5 * math.log2(num_clients)))


def degree(num_clients: int, *, neighbours: int | str) -> int:
    """The degree of :func:`harary_graph` for a ``neighbours`` setting (an int or ``"auto"``):
    raised by one when ``k`` and ``n`` are both odd, capped at ``n - 1``."""
    wanted = auto_neighbours(num_clients) if neighbours == "auto" else int(neighbours)
    if wanted < 1:
        raise ValueError(f"number of neighbours must be >= 1, got {wanted}")
    return min(wanted + (wanted * num_clients) % 2, num_clients - 1)


def threshold_for(num_neighbours: int, *, fraction: float) -> int:
    """``t = min(k, floor(fraction * k) + 1)``: shares needed to reconstruct a secret."""
    if not 0.5 <= fraction < 1:
        raise ValueError(f"threshold fraction must be in [0.5, 1), got {fraction}")
    if num_neighbours < 1:
        raise ValueError(f"number of neighbours must be >= 1, got {num_neighbours}")
    return min(num_neighbours, math.floor(fraction * num_neighbours) + 1)


def _shuffled(ids: Sequence[str]) -> list[str]:
    order = list(ids)
    secrets.SystemRandom().shuffle(order)
    return order


def harary_graph(client_ids: Sequence[str], *, num_neighbours: int,
                 _order: Callable[[Sequence[str]], list[str]] = _shuffled,
                 ) -> dict[str, tuple[str, ...]]:
    """Random ``k``-regular neighbourhoods: ``{client: sorted neighbour ids}``.

    ``k >= n - 1`` gives the complete graph.  An odd ``k`` with an odd ``n`` (no ``k``-regular
    graph exists) is raised to ``k + 1``.  ``_order`` is a seam for deterministic tests.
    """
    n = len(client_ids)
    if len(set(client_ids)) != n:
        raise ValueError("client ids must be unique")
    if n < 2:
        raise ValueError(f"secure aggregation needs at least 2 clients, got {n}")
    k = degree(n, neighbours=num_neighbours)
    ring = _order(client_ids)
    if sorted(ring) != sorted(client_ids):
        raise ValueError("the ring order must be a permutation of the client ids")
    offsets = list(range(1, k // 2 + 1))
    if k % 2:
        offsets.append(n // 2)
    graph: dict[str, set[str]] = {cid: set() for cid in ring}
    for position, cid in enumerate(ring):
        for offset in offsets:
            peer = ring[(position + offset) % n]
            graph[cid].add(peer)
            graph[peer].add(cid)
    return {cid: tuple(sorted(graph[cid])) for cid in client_ids}
