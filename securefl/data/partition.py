"""Seeded partitioners: which training examples each client holds.

Every partitioner returns one index array per client; each example is assigned to exactly
one client.  A partition that would leave a client with fewer than ``min_examples``
examples is a :class:`~securefl.errors.DataError`, never a silently empty client.
"""

from __future__ import annotations

import numpy as np

from securefl.errors import DataError

__all__ = ["dirichlet", "iid", "shards"]


def _check(parts: list[np.ndarray], min_examples: int, how: str) -> list[np.ndarray]:
    small = [(i, len(p)) for i, p in enumerate(parts) if len(p) < min_examples]
    if small:
        client, size = small[0]
        raise DataError(f"{how} leaves client {client} with {size} examples "
                        f"(min_examples = {min_examples}); use fewer clients or a larger "
                        "dataset" + (" or a larger alpha" if how.startswith("dirichlet") else ""))
    return [np.sort(p) for p in parts]


def iid(labels: np.ndarray, num_clients: int, *, rng: np.random.Generator,
        min_examples: int = 1) -> list[np.ndarray]:
    """Uniformly random, (nearly) equal-sized shards."""
    order = rng.permutation(len(labels))
    return _check(list(np.array_split(order, num_clients)), min_examples, "iid partition")


def dirichlet(labels: np.ndarray, num_clients: int, *, alpha: float,
              rng: np.random.Generator, min_examples: int = 1,
              max_tries: int = 100) -> list[np.ndarray]:
    """Label skew (Hsu et al. 2019): for each class ``c``, ``p_c ~ Dir(alpha * 1)`` over clients.

    Class ``c``'s examples are split in proportions ``p_c``.  Small ``alpha`` gives each client
    few classes; large ``alpha`` tends to iid.  Draws are repeated (up to ``max_tries``, from
    the same seeded stream) until every client has ``min_examples``.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    classes = np.unique(labels)
    parts: list[np.ndarray] = []
    for _ in range(max_tries):
        buckets: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha))) * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts[:-1])):
                buckets[client].append(chunk)
        parts = [np.concatenate(b) for b in buckets]
        if min(len(p) for p in parts) >= min_examples:
            break
    return _check(parts, min_examples, f"dirichlet partition (alpha = {alpha})")


def shards(labels: np.ndarray, num_clients: int, *, shards_per_client: int,
           rng: np.random.Generator, min_examples: int = 1) -> list[np.ndarray]:
    """Pathological non-iid (McMahan et al. 2017): sort by label, cut into
    ``num_clients * shards_per_client`` shards, give each client ``shards_per_client`` at random."""
    num_shards = num_clients * shards_per_client
    if num_shards > len(labels):
        raise DataError(f"{num_shards} shards requested but only {len(labels)} examples")
    order = np.argsort(labels, kind="stable")
    pieces = np.array_split(order, num_shards)
    assignment = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    parts = [np.concatenate([pieces[s] for s in row]) for row in assignment]
    return _check(parts, min_examples, "shards partition")
