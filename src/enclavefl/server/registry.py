"""The workers a PS knows: who joined, with which certificate, and when they were last heard from.

Not thread-safe on its own: the PS calls it with its lock held.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from enclavefl.errors import StaleSession
from enclavefl.messages import PeerIdentity
from enclavefl.server.sampling import Candidate

__all__ = ["WorkerRecord", "WorkerRegistry"]


@dataclass(slots=True)
class WorkerRecord:
    worker_id: str
    name: str
    fingerprint: str
    num_samples: int
    """What the worker declared at join: an upper bound on the weight of its updates."""
    last_seen: float
    """time.monotonic() of the worker's last call (any call: a long-poll, a heartbeat, a pull or a push)."""
    finished: bool = False
    busy_since: float | None = None
    """Async mode: when the worker was last handed a model to train on (None: idle)."""


class WorkerRegistry:
    """Joined workers by id; each id is bound to the certificate fingerprint it joined with."""

    def __init__(self, ps_instance: str) -> None:
        self._ps_instance = ps_instance
        self._workers: dict[str, WorkerRecord] = {}

    def __len__(self) -> int:
        return len(self._workers)

    def __contains__(self, worker_id: object) -> bool:
        return worker_id in self._workers

    def records(self) -> list[WorkerRecord]:
        return list(self._workers.values())

    def candidates(self) -> list[Candidate]:
        return [Candidate(w.worker_id, w.name, w.num_samples) for w in self._workers.values()]

    def add(self, peer: PeerIdentity, name: str, num_samples: int) -> tuple[WorkerRecord, list[str]]:
        """Registers a worker; returns it and the ids of older sessions of the same certificate (to drop)."""
        stale = [w.worker_id for w in self._workers.values() if w.fingerprint == peer.fingerprint]
        worker_id = f"w-{uuid.uuid4().hex[:8]}"
        record = WorkerRecord(worker_id, name[:64], peer.fingerprint, max(num_samples, 0), time.monotonic())
        self._workers[worker_id] = record
        return record, stale

    def get(self, peer: PeerIdentity, worker_id: str) -> WorkerRecord:
        """The worker ``worker_id``, if ``peer`` holds the certificate it joined with.

        Raises:
            StaleSession: unknown id (the PS restarted or dropped it), or another certificate.
        """
        w = self._workers.get(worker_id)
        if w is None:
            raise StaleSession(f"worker {worker_id!r} is not joined to PS {self._ps_instance}; join again")
        if w.fingerprint != peer.fingerprint:
            raise StaleSession(f"worker {worker_id!r} is bound to another certificate")
        w.last_seen = time.monotonic()
        return w

    def silent(self, timeout_s: float, now: float) -> list[WorkerRecord]:
        """The workers not heard from for more than ``timeout_s`` at ``now`` (those told FINISH excepted)."""
        return [w for w in self._workers.values() if not w.finished and now - w.last_seen > timeout_s]

    def remove(self, worker_id: str) -> WorkerRecord | None:
        return self._workers.pop(worker_id, None)

    def all_finished(self) -> bool:
        return all(w.finished for w in self._workers.values())
