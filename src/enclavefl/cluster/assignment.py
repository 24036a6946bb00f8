"""Which server a worker should use, and the alternatives it fails over to, in order.

Rendezvous (highest random weight) hashing, Thaler and Ravishankar 1998: each
(worker, server) pair gets a score, SHA-256 of both names, and a worker's
servers are the live ones sorted by score (:func:`assign`). Every node computes
the same list without coordination; when a server leaves, only its workers move
(each to its next choice).

With few workers per server, hashing alone is uneven (8 workers can leave 2 of 4
servers empty), so the cluster places workers with bounded loads
(:func:`balance`, after Mirrokni, Thorup and Zadimoghaddam 2018, "Consistent
hashing with bounded loads"): taken in name order, each worker goes to the first
server of its rendezvous order that holds fewer than ``ceil(workers / servers)``.
Every server computes the same placement from the same worker names and live
servers, a new server takes about ``1/N`` of the workers, and no server holds
more than its share.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence

from enclavefl.cluster.store import Member

__all__ = ["assign", "balance"]


def _score(worker: str, server: str) -> bytes:
    return hashlib.sha256(f"{len(worker)}:{worker}|{server}".encode()).digest()


def assign(worker: str, servers: Sequence[Member]) -> list[Member]:
    """``servers`` in the order ``worker`` should try them (the first is its server; the rest, failovers)."""
    return sorted(servers, key=lambda m: (_score(worker, m.member_id), m.member_id), reverse=True)


def balance(workers: Iterable[str], servers: Sequence[Member]) -> dict[str, list[Member]]:
    """Each worker's servers in order, its own first, with no server first for more than its share.

    The alternatives after the first keep the worker's rendezvous order, so a failover spreads the
    workers of a dead server over the others. Empty when there is no server.
    """
    names = sorted(set(workers))
    if not servers:
        return {}
    cap = math.ceil(len(names) / len(servers))
    load = {m.member_id: 0 for m in servers}
    out: dict[str, list[Member]] = {}
    for name in names:
        order = assign(name, servers)
        first = next(m for m in order if load[m.member_id] < cap)
        load[first.member_id] += 1
        out[name] = [first, *(m for m in order if m is not first)]
    return out
