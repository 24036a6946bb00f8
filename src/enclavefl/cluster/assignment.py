"""Which server a worker should use, and the alternatives it fails over to, in order.

Rendezvous (highest random weight) hashing, Thaler and Ravishankar 1998: each
(worker, server) pair gets a score, SHA-256 of both names, and a worker's
servers are the live ones sorted by score. Every node computes the same list
without coordination; when a server leaves, only its workers move (each to its
next choice), and a new server takes about 1/N of the workers, no more.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from enclavefl.cluster.store import Member

__all__ = ["assign"]


def _score(worker: str, server: str) -> bytes:
    return hashlib.sha256(f"{len(worker)}:{worker}|{server}".encode()).digest()


def assign(worker: str, servers: Sequence[Member]) -> list[Member]:
    """``servers`` in the order ``worker`` should try them (the first is its server; the rest, failovers)."""
    return sorted(servers, key=lambda m: (_score(worker, m.member_id), m.member_id), reverse=True)
