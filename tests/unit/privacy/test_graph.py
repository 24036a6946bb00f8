"""The neighbour graph: k-regular, symmetric, the same for everyone, complete when small."""

from __future__ import annotations

import pytest

from enclavefl.privacy.secagg.graph import (
    auto_degree,
    neighbour_graph,
    neighbours_of,
    resolve_degree,
    resolve_threshold,
)


def test_auto_degree_by_hand() -> None:
    # n = 100: 3 * log2(100) = 19.93 -> 20 (even). n = 10: 9.97 -> 10 -> capped at n - 1 = 9.
    assert auto_degree(100) == 20
    assert auto_degree(10) == 9
    assert resolve_degree(100, 5) == 6


def test_graph_is_k_regular_and_symmetric() -> None:
    ids = [f"w{i:03d}" for i in range(50)]
    graph = neighbour_graph(ids, 8, b"seed")
    for u, vs in graph.items():
        assert len(vs) == 8 and u not in vs
        assert all(u in graph[v] for v in vs)


def test_graph_depends_on_the_seed_only() -> None:
    ids = [f"w{i}" for i in range(20)]
    assert neighbour_graph(ids, 4, b"a") == neighbour_graph(list(reversed(ids)), 4, b"a")
    assert neighbour_graph(ids, 4, b"a") != neighbour_graph(ids, 4, b"b")


def test_small_round_is_complete() -> None:
    graph = neighbour_graph(["a", "b", "c"], 2, b"s")
    assert graph == {"a": ("b", "c"), "b": ("a", "c"), "c": ("a", "b")}


def test_threshold_fraction_and_count() -> None:
    # 0.67 of 9 holders is 6.03 -> 7; an int is taken as it is.
    assert resolve_threshold(9, 0.67) == 7
    assert resolve_threshold(9, 5) == 5


def test_threshold_not_above_half_is_refused() -> None:
    # t = 4 of k = 8: two disjoint groups of 4 could reveal both secrets of one worker.
    with pytest.raises(ValueError, match="k/2 < t"):
        resolve_threshold(8, 4)


def test_neighbours_of_is_the_row_of_the_whole_graph() -> None:
    # Harary graph (k = 4 of 12) and complete graph (k = 3 of 4): every id's row matches.
    for ids, k in ([f"w{i}" for i in range(12)], 4), (["a", "b", "c", "d"], 3):
        graph = neighbour_graph(ids, k, b"seed")
        assert all(neighbours_of(ids, k, b"seed", u) == graph[u] for u in ids)


def test_neighbours_of_refuses_an_id_outside_the_graph() -> None:
    with pytest.raises(ValueError, match="'z' is not among"):
        neighbours_of(["a", "b", "c"], 2, b"s", "z")
