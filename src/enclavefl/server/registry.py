"""The workers a PS knows: who joined, with which certificate, when they were last heard from, and what they did.

Not thread-safe on its own: the PS calls it with its lock held. Besides the
joined workers it keeps the most recently departed ones (dropped or left), a
bounded history the management plane shows; every change of a worker's state
is published on the PS's event bus as a ``worker`` event.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final, Literal

from enclavefl.errors import StaleSession
from enclavefl.messages import PeerIdentity
from enclavefl.server.events import EventBus
from enclavefl.server.sampling import Candidate

__all__ = ["DEPARTED_KEPT", "WorkerRecord", "WorkerRegistry", "WorkerState"]

WorkerState = Literal["joined", "training", "uploaded", "dropped", "left"]
"""joined: idle; training: handed a train task; uploaded: its last update was accepted; dropped, left: gone."""

DEPARTED_KEPT: Final = 256
"""How many departed workers the registry remembers (the oldest is forgotten first)."""


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
    identity: PeerIdentity | None = None
    """What the worker's attestation proved at its join."""
    state: WorkerState = "joined"
    rounds_contributed: int = 0
    """Updates of this worker the PS accepted."""
    bytes_in: int = 0
    """Update bytes accepted from it."""
    bytes_out: int = 0
    """Model bytes it pulled."""
    reason: str = ""
    """Why it was dropped or left ("" while joined)."""


class WorkerRegistry:
    """Joined workers by id; each id is bound to the certificate fingerprint it joined with."""

    def __init__(self, ps_instance: str, events: EventBus | None = None) -> None:
        self._ps_instance = ps_instance
        self._events = events
        self._workers: dict[str, WorkerRecord] = {}
        self._departed: OrderedDict[str, WorkerRecord] = OrderedDict()

    def __len__(self) -> int:
        return len(self._workers)

    def __contains__(self, worker_id: object) -> bool:
        return worker_id in self._workers

    def records(self) -> list[WorkerRecord]:
        return list(self._workers.values())

    def departed(self) -> list[WorkerRecord]:
        """The most recently departed workers (at most :data:`DEPARTED_KEPT`), oldest first."""
        return list(self._departed.values())

    def candidates(self) -> list[Candidate]:
        return [Candidate(w.worker_id, w.name, w.num_samples) for w in self._workers.values()]

    def add(self, peer: PeerIdentity, name: str, num_samples: int) -> tuple[WorkerRecord, list[str]]:
        """Registers a worker; returns it and the ids of older sessions of the same certificate (to drop)."""
        stale = [w.worker_id for w in self._workers.values() if w.fingerprint == peer.fingerprint]
        worker_id = f"w-{uuid.uuid4().hex[:8]}"
        record = WorkerRecord(worker_id, name[:64], peer.fingerprint, max(num_samples, 0), time.monotonic(),
                              identity=peer)
        self._workers[worker_id] = record
        self._publish(record)
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

    def find(self, worker_id: str) -> WorkerRecord | None:
        """The joined worker ``worker_id`` (no certificate check, no stamp), or None."""
        return self._workers.get(worker_id)

    def set_state(self, worker_id: str, state: WorkerState) -> None:
        """Moves a joined worker to ``state`` (publishing the change); unknown ids are ignored."""
        w = self._workers.get(worker_id)
        if w is not None and w.state != state:
            w.state = state
            self._publish(w)

    def settle(self) -> None:
        """Every joined worker is idle again (a new round opens); not published: the phase event says it."""
        for w in self._workers.values():
            w.state = "joined"

    def silent(self, timeout_s: float, now: float) -> list[WorkerRecord]:
        """The workers not heard from for more than ``timeout_s`` at ``now`` (those told FINISH excepted)."""
        return [w for w in self._workers.values() if not w.finished and now - w.last_seen > timeout_s]

    def remove(self, worker_id: str, *, state: Literal["dropped", "left"] = "dropped",
               reason: str = "") -> WorkerRecord | None:
        """Forgets a joined worker; it is kept among the departed with ``state`` and ``reason``."""
        record = self._workers.pop(worker_id, None)
        if record is None:
            return None
        record.state, record.reason = state, reason
        self._departed[worker_id] = record
        while len(self._departed) > DEPARTED_KEPT:
            self._departed.popitem(last=False)
        self._publish(record)
        return record

    def all_finished(self) -> bool:
        return all(w.finished for w in self._workers.values())

    def _publish(self, w: WorkerRecord) -> None:
        if self._events is not None:
            self._events.publish("worker", worker_id=w.worker_id, worker=w.name, state=w.state, reason=w.reason)
