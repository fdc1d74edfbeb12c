"""SecAgg+ graph: k-regular, symmetric, logarithmic degree, majority threshold."""

from __future__ import annotations

import math

import pytest

from securefl.secagg.graph import (
    auto_neighbours,
    graph_seed,
    harary_graph,
    neighbourhood,
    ring,
    threshold_for,
)

SEED = bytes(range(32))


@pytest.mark.parametrize(("n", "k"), [(2, 1), (5, 4), (10, 4), (11, 6), (12, 5), (50, 18),
                                      (101, 20), (9, 3)])
def test_graph_is_regular_symmetric_loop_free(n, k):
    ids = [f"c{i:03d}" for i in range(n)]
    graph = harary_graph(ids, num_neighbours=k, seed=SEED)
    expected = min(k + (k * n) % 2, n - 1)
    assert set(graph) == set(ids)
    for cid, neighbours in graph.items():
        assert neighbourhood(ids, cid, num_neighbours=k, seed=SEED) == neighbours
        assert len(neighbours) == expected
        assert cid not in neighbours
        assert list(neighbours) == sorted(neighbours)
        assert all(cid in graph[v] for v in neighbours)


def test_graph_ring_structure_follows_the_seeded_order():
    ids = [str(i) for i in range(8)]
    order = ring(ids, SEED)
    graph = harary_graph(ids, num_neighbours=4, seed=SEED)
    assert graph[order[0]] == tuple(sorted((order[1], order[2], order[6], order[7])))
    assert sorted(order) == sorted(ids)


def test_graph_seed_depends_on_every_reveal_and_the_relabelling_is_random():
    ids = [f"c{i}" for i in range(40)]
    reveals = {c: bytes([i]) * 32 for i, c in enumerate(ids)}
    seed = graph_seed(b"ctx", reveals)
    for changed in ("c0", "c39"):
        assert graph_seed(b"ctx", {**reveals, changed: b"\xff" * 32}) != seed
    assert graph_seed(b"other", reveals) != seed
    del reveals["c5"]
    assert graph_seed(b"ctx", reveals) != seed
    graphs = {harary_graph(ids, num_neighbours=4, seed=bytes([i]) * 32)["c0"] for i in range(5)}
    assert len(graphs) > 1


def test_auto_degree_is_logarithmic():
    assert auto_neighbours(2) == 1
    assert auto_neighbours(10) == 9
    assert auto_neighbours(100) == 20
    assert auto_neighbours(1000) == 30
    assert auto_neighbours(10**6) == 2 * math.ceil(1.5 * math.log2(10**6))


def test_threshold_is_a_strict_majority():
    assert threshold_for(10, fraction=0.5) == 6
    assert threshold_for(9, fraction=0.5) == 5
    assert threshold_for(1, fraction=0.5) == 1
    assert threshold_for(20, fraction=0.75) == 16
    for k in range(1, 60):
        t = threshold_for(k, fraction=0.5)
        assert 2 * t > k and t <= k
    with pytest.raises(ValueError, match=r"\[0\.5, 1\)"):
        threshold_for(10, fraction=0.4)


def test_graph_rejects_bad_input():
    with pytest.raises(ValueError, match="unique"):
        harary_graph(["a", "a"], num_neighbours=1, seed=SEED)
    with pytest.raises(ValueError, match="at least 2"):
        harary_graph(["a"], num_neighbours=1, seed=SEED)
