"""One attempt at a synchronous round: whom it asked, what arrived, and its aggregator.

How this works: every change to a round happens under the round's own lock,
and accepting an update is one transition: the aggregator folds it and the
round records it (participant, samples, bytes, metrics) inside the same
critical section. ``close()`` takes that lock too, so an update is either in
the aggregate *and* the record, or in neither, however the window and the
upload race. The PS lock may be held while taking the round lock, never the
other way round.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from enclavefl.errors import UpdateRejected
from enclavefl.messages import UpdateMeta
from enclavefl.server.aggregator import Aggregator
from enclavefl.tensors import ParamSet, StreamHeader

__all__ = ["Round", "RoundRecord"]


@dataclass(frozen=True, slots=True)
class RoundRecord:
    """What a closed round saw: the inputs of its metrics row."""

    number: int
    model_version: int
    attempt: int
    sampled: frozenset[str]
    pushed: frozenset[str]
    dropped: frozenset[str]
    rejected: int
    num_samples: int
    weight: float
    bytes_in: int
    bytes_out: int
    opened_at: float
    worker_metrics: tuple[Mapping[str, float], ...] = ()
    staleness: tuple[int, ...] = ()
    rejected_ids: frozenset[str] = frozenset()
    """The workers whose updates (at least one) were refused."""


@dataclass(eq=False)
class Round:
    """A round attempt. ``template`` is the header every update must match."""

    number: int
    model_version: int
    attempt: int
    sampled: frozenset[str]
    required: int
    aggregator: Aggregator
    template: StreamHeader
    window_s: float
    notify: Callable[[], None] = lambda: None
    """Called (without the round lock) after every change an engine may wait for."""
    opened_at: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _pushed: set[str] = field(default_factory=set)
    _dropped: set[str] = field(default_factory=set)
    _uploading: set[str] = field(default_factory=set)
    _rejected: int = 0
    _rejected_ids: set[str] = field(default_factory=set)
    _num_samples: int = 0
    _weight: float = 0.0
    _bytes_in: int = 0
    _bytes_out: int = 0
    _metrics: list[Mapping[str, float]] = field(default_factory=list)
    _closed: bool = False

    @property
    def deadline(self) -> float:
        return self.opened_at + self.window_s

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pushed(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._pushed)

    def is_training(self, worker_id: str) -> bool:
        """Sampled, and neither pushed nor uploading nor dropped: the worker still owes an update."""
        with self._lock:
            return (
                not self._closed and worker_id in self.sampled and worker_id not in self._pushed
                and worker_id not in self._uploading and worker_id not in self._dropped
            )

    def admit(self, meta: UpdateMeta) -> None:
        """Reserves the worker's upload slot in this round.

        Raises:
            UpdateRejected: wrong round or version, not sampled, already pushed or uploading, or closed.
        """
        with self._lock:
            if self._closed:
                reason = f"round {self.number} is closed"
            elif meta.round != self.number or meta.model_version != self.model_version:
                reason = f"update for round {meta.round} v{meta.model_version}, open is round {self.number} v{self.model_version}"
            elif meta.worker_id not in self.sampled:
                reason = f"worker {meta.worker_id} was not sampled for round {self.number}"
            elif meta.worker_id in self._pushed or meta.worker_id in self._uploading:
                reason = f"worker {meta.worker_id} already pushed round {self.number}"
            else:
                self._uploading.add(meta.worker_id)
                return
            self._rejected += 1
            self._rejected_ids.add(meta.worker_id)
        raise UpdateRejected(reason)

    def accept(self, worker_id: str, update: ParamSet, weight: float, num_samples: int, nbytes: int,
               metrics: Mapping[str, float], staleness: int = 0) -> None:
        """Folds the update and records it, as one transition.

        Raises:
            UpdateRejected: the round closed first, or the aggregator refused the update;
                either way neither the aggregate nor the record changed.
        """
        with self._lock:
            if self._closed:
                raise UpdateRejected(f"round {self.number} closed before the update was complete")
            self.aggregator.add(update, weight)
            self._pushed.add(worker_id)
            self._num_samples += num_samples
            self._weight += weight
            self._bytes_in += nbytes
            self._metrics.append(dict(metrics))
        self.notify()

    def retract(self, worker_id: str, weight: float, num_samples: int, nbytes: int,
                metrics: Mapping[str, float]) -> None:
        """Undoes the record of an accepted update whose aggregator dropped it afterwards.

        A cluster server's aggregator folds an update at ``accept`` but makes it
        durable later, outside the round's lock (group commit); when the store
        then refuses it, the aggregator has already taken it out of its sum, and
        this takes the worker out of the record with the same amounts, so the
        round's counts match what was aggregated. The worker may upload again.
        Works after ``close()`` too (the record already returned stays as it was).

        Raises:
            UpdateRejected: the round has no accepted update of ``worker_id``.
        """
        with self._lock:
            if worker_id not in self._pushed:
                raise UpdateRejected(f"round {self.number}: worker {worker_id} has no accepted update to retract")
            self._pushed.discard(worker_id)
            self._num_samples -= num_samples
            self._weight -= weight
            self._bytes_in -= nbytes
            recorded = dict(metrics)
            if recorded in self._metrics:
                self._metrics.remove(recorded)
        self.notify()

    def end_upload(self, worker_id: str) -> None:
        """The worker's upload finished (accepted or not): it no longer holds a slot."""
        with self._lock:
            self._uploading.discard(worker_id)
        self.notify()

    def note_rejection(self, worker_id: str) -> None:
        with self._lock:
            self._rejected += 1
            self._rejected_ids.add(worker_id)

    def note_download(self, nbytes: int) -> None:
        with self._lock:
            self._bytes_out += nbytes

    def mark_dropped(self, worker_id: str) -> None:
        """The worker will not answer (it left or was dropped).

        Called with the PS lock held, so it does not call ``notify`` (which takes
        that lock): the caller wakes the engine once it has forgotten the worker.
        """
        with self._lock:
            if worker_id in self.sampled:
                self._dropped.add(worker_id)

    def done(self) -> bool:
        """Enough updates arrived, or nobody else can still answer."""
        with self._lock:
            if len(self._pushed) >= self.required:
                return True
            outstanding = self.sampled - self._pushed - self._dropped
            return not outstanding and not self._uploading

    def close(self) -> RoundRecord:
        """No update is accepted after this; waits for an accept in progress. Idempotent."""
        with self._lock:
            self._closed = True
            return RoundRecord(
                number=self.number,
                model_version=self.model_version,
                attempt=self.attempt,
                sampled=self.sampled,
                pushed=frozenset(self._pushed),
                dropped=frozenset(self._dropped),
                rejected=self._rejected,
                num_samples=self._num_samples,
                weight=self._weight,
                bytes_in=self._bytes_in,
                bytes_out=self._bytes_out,
                opened_at=self.opened_at,
                worker_metrics=tuple(self._metrics),
                rejected_ids=frozenset(self._rejected_ids),
            )
