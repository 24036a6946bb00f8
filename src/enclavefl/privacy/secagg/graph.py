"""Who shares secrets with whom: a random k-regular graph over a round's workers (SecAgg+).

Bell et al. 2020 ("Secure single-server aggregation with (poly)logarithmic
overhead") show that sharing with k = O(log n) neighbours of a random graph is
enough, which makes a worker's cost O(log n) and the server's O(n log n). We use
a Harary graph on a random cyclic order: each worker is linked to the k/2
workers before and after it on the cycle, so every degree is exactly k (k
even). The cyclic order comes from hashing each id with a seed that depends on
every advertised key, so the server cannot pick a convenient graph without
grinding keys that the workers made. For small rounds (k >= n - 1) the graph is
complete: the original SecAgg.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

__all__ = ["auto_degree", "neighbour_graph", "neighbours_of", "resolve_degree", "resolve_threshold"]


def auto_degree(n: int) -> int:
    """k = 3 log2 n rounded up to an even number, as Bell et al. suggest; n - 1 for small n."""
    if n <= 1:
        return 0
    k = math.ceil(3 * math.log2(n))
    k += k % 2
    return min(k, n - 1)


def resolve_degree(n: int, neighbours: int | None) -> int:
    """The degree used for a round of n workers: the configured one (made even) or :func:`auto_degree`."""
    if neighbours is None:
        return auto_degree(n)
    k = neighbours + neighbours % 2
    return min(k, n - 1)


def resolve_threshold(k: int, threshold: float | int) -> int:
    """t, the shares needed to rebuild a worker's secrets among its k holders.

    A float is a fraction of k (rounded up), an int an absolute count.

    Raises:
        ValueError: t is not more than half of k or exceeds k: with t <= k/2 a server could
            collect both kinds of shares of one worker from two disjoint groups of holders.
    """
    t = math.ceil(threshold * k) if isinstance(threshold, float) else threshold
    if not k / 2 < t <= k:
        raise ValueError(f"threshold {threshold} gives t={t} for {k} share holders; need k/2 < t <= k")
    return t


def neighbour_graph(ids: Sequence[str], k: int, seed: bytes) -> Mapping[str, tuple[str, ...]]:
    """Each id's k neighbours (sorted), in a k-regular graph drawn from ``seed``.

    Raises:
        ValueError: repeated ids, or k not even and below n - 1, or k >= n.
    """
    cycle = _cycle(ids, k, seed)
    if cycle is None:
        return {u: tuple(sorted(v for v in ids if v != u)) for u in ids}
    return {u: _row(cycle, i, k) for i, u in enumerate(cycle)}


def neighbours_of(ids: Sequence[str], k: int, seed: bytes, who: str) -> tuple[str, ...]:
    """``who``'s row of :func:`neighbour_graph` alone: a worker needs only its own (O(n), not O(n k)).

    Raises:
        ValueError: as :func:`neighbour_graph`, or ``who`` is not one of ``ids``.
    """
    cycle = _cycle(ids, k, seed)
    if who not in ids:
        raise ValueError(f"{who!r} is not among the {len(ids)} ids of the graph")
    if cycle is None:
        return tuple(sorted(v for v in ids if v != who))
    return _row(cycle, cycle.index(who), k)


def _cycle(ids: Sequence[str], k: int, seed: bytes) -> list[str] | None:
    """The random cyclic order of a Harary graph, or None when the graph is complete."""
    n = len(ids)
    if len(set(ids)) != n:
        raise ValueError("worker ids repeat")
    if not 0 <= k <= n - 1:
        raise ValueError(f"degree {k} is impossible for {n} workers")
    if k == n - 1:
        return None
    if k % 2:
        raise ValueError(f"a Harary graph of odd degree {k} below n - 1 is not built here")
    return sorted(ids, key=lambda u: hashlib.sha256(seed + u.encode()).digest())


def _row(cycle: Sequence[str], i: int, k: int) -> tuple[str, ...]:
    """The k/2 ids before and after position i on the cycle, sorted."""
    n, half = len(cycle), k // 2
    return tuple(sorted(cycle[(i + d) % n] for d in range(-half, half + 1) if d != 0))
