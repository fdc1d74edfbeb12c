"""The SecAgg+ communication graph (Bell et al., CCS 2020).

Each client pairs with ``k = O(log n)`` neighbours instead of all ``n - 1`` other clients.
Following Bell et al., the graph is a Harary graph ``H(k, n)`` under a uniformly random
relabelling: place the clients on a ring in a random order and join each one to the ``k / 2``
nearest clients on either side (for odd ``k`` and even ``n``, also to the client opposite).
The order comes from a seed that the server cannot bias (:func:`graph_seed`, commit-then-
reveal), so every client recomputes its own neighbourhood and aborts on a mismatch.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Mapping, Sequence

from securefl.secagg.prg import encoded_id

__all__ = ["auto_neighbours", "degree", "graph_seed", "harary_graph", "neighbourhood", "ring",
           "threshold_for"]


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


def graph_seed(context: bytes, reveals: Mapping[str, bytes]) -> bytes:
    """``SHA-256(context || (len || id || r_id)* over sorted ids)``: the seed of the graph.

    Each ``r_id`` is a fresh 256-bit value that its client committed to (``H(r_id)``, in its
    signed advertisement) before any client revealed, and revealed only after it received
    the full commitment set.  One honest reveal makes the seed uniform, and since a client
    requires every committed value to be revealed, the server cannot drop or swap reveals
    after seeing them (commit-then-reveal coin tossing, Blum 1981).
    """
    return hashlib.sha256(context + b"".join(
        encoded_id(client_id) + reveals[client_id] for client_id in sorted(reveals))).digest()


def ring(client_ids: Sequence[str], seed: bytes) -> list[str]:
    """The ids ordered by ``SHA-256(seed || id)``: a uniformly random relabelling."""
    return list(_ring(tuple(client_ids), seed))


# Public values only (the round's ids and graph seed), so the order is kept for a few
# rounds: every party of a round (each client checking its neighbourhood, the server
# building the graph) orders the same ids by the same seed.
@functools.lru_cache(maxsize=16)
def _ring(client_ids: tuple[str, ...], seed: bytes) -> tuple[str, ...]:
    return tuple(sorted(client_ids,
                        key=lambda cid: hashlib.sha256(seed + cid.encode()).digest()))


def _offsets(n: int, k: int) -> list[int]:
    offsets = list(range(1, k // 2 + 1))
    if k % 2:
        offsets.append(n // 2)
    return offsets


def _check_ids(client_ids: Sequence[str]) -> int:
    n = len(client_ids)
    if len(set(client_ids)) != n:
        raise ValueError("client ids must be unique")
    if n < 2:
        raise ValueError(f"secure aggregation needs at least 2 clients, got {n}")
    return n


def neighbourhood(client_ids: Sequence[str], client_id: str, *, num_neighbours: int,
                  seed: bytes) -> tuple[str, ...]:
    """``client_id``'s sorted neighbours in :func:`harary_graph` (what a client checks)."""
    n = _check_ids(client_ids)
    order = ring(client_ids, seed)
    position = order.index(client_id)
    k = degree(n, neighbours=num_neighbours)
    return tuple(sorted({order[(position + sign * offset) % n]
                         for offset in _offsets(n, k) for sign in (1, -1)}))


def harary_graph(client_ids: Sequence[str], *, num_neighbours: int, seed: bytes,
                 ) -> dict[str, tuple[str, ...]]:
    """Random ``k``-regular neighbourhoods: ``{client: sorted neighbour ids}``.

    The Harary graph ``H(k, n)`` on :func:`ring`: each client joins the ``k / 2`` nearest on
    either side (for odd ``k``, also the client opposite).  ``k >= n - 1`` gives the complete
    graph; an odd ``k`` with an odd ``n`` (no ``k``-regular graph exists) is raised to ``k + 1``.
    """
    n = _check_ids(client_ids)
    k = degree(n, neighbours=num_neighbours)
    order = ring(client_ids, seed)
    graph: dict[str, set[str]] = {cid: set() for cid in order}
    for position, cid in enumerate(order):
        for offset in _offsets(n, k):
            peer = order[(position + offset) % n]
            graph[cid].add(peer)
            graph[peer].add(cid)
    return {cid: tuple(sorted(graph[cid])) for cid in client_ids}
