"""The asynchronous engine: buffered asynchronous aggregation (FedBuff).

Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous
Aggregation" (AISTATS): workers never wait for a round. Each trains on the
newest model it can get and sends its delta; the server folds deltas into a
buffer as they arrive, weighing one that is ``tau`` server steps old by
``s(tau)`` (:mod:`enclavefl.server.staleness`), and makes the next model
version (one *server step*) each time the buffer holds ``round.buffer_size``
updates.

How this works:

- Once ``round.min_workers`` have joined, every worker that asks for work gets a
  TRAIN task on the newest version. It is busy from then until its upload ends
  (accepted or refused) or it is dropped; the version it was handed (by the
  task, or by its later download) is the only one it may push an update on.
- An upload is admitted against the open buffer (its staleness must be within
  ``round.max_staleness``) but bound to the engine, not to that buffer: when it
  is complete it folds into whichever buffer is open *then*, and its staleness
  and weight are taken against that buffer's version.
- A step closes in two moves: under the server lock the engine swaps a fresh
  buffer in (so an upload completing during the close folds into the next
  step), then it closes the old buffer, which waits for a fold in progress.
  A buffer refuses a fold once it is full or closed, and the upload then waits
  for the swap and tries the next buffer. So an update is in exactly one
  buffer, or it is refused; it is never lost without a refusal.
- The close itself is the sync engine's :class:`ClosePipeline`: one metrics row
  per server step (``round`` is the step number), plus ``mode``, ``updates`` and
  the step's staleness mean and maximum.

One difference from the paper: FedBuff sums ``s(tau) * delta`` over the buffer
and divides by its size K. Here the aggregator is the job's (a weighted mean
for FedAvg) with weights ``num_samples * s(tau)``, so it divides by the sum of
the weights: staleness changes an update's share of a step, not the size of the
step, which stays ``server.lr`` times the mean.

Lock order as in :mod:`enclavefl.server.round`: the server lock may be held
while taking a buffer's lock, never the other way round.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, final

import numpy as np

from enclavefl.errors import UpdateRejected
from enclavefl.messages import TaskInfo, TaskKind, UpdateMeta
from enclavefl.server.aggregator import Aggregator
from enclavefl.server.checkpoint import params_digest
from enclavefl.server.engine import Engine
from enclavefl.server.phases import Phase
from enclavefl.server.registry import WorkerRecord
from enclavefl.server.round import RoundRecord
from enclavefl.server.staging import UpdateTarget
from enclavefl.server.staleness import make_staleness
from enclavefl.tensors import ParamSet

__all__ = ["AsyncEngine", "UpdateBuffer"]

log = logging.getLogger(__name__)


@final
@dataclass(eq=False)
class UpdateBuffer:
    """The updates of one server step, folded as they arrive.

    ``number`` is the step the buffer will close as and ``model_version`` the
    version its aggregate will be applied to; both are fixed once the step
    before it has closed.
    """

    number: int
    model_version: int
    capacity: int
    aggregator: Aggregator
    notify: Callable[[], None] = lambda: None
    """Called (without the buffer lock) after every fold, so the engine can look at ``count``."""
    opened_at: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _count: int = 0
    _workers: list[str] = field(default_factory=list)
    _num_samples: int = 0
    _weight: float = 0.0
    _bytes_in: int = 0
    _metrics: list[Mapping[str, float]] = field(default_factory=list)
    _staleness: list[int] = field(default_factory=list)
    _closed: bool = False

    @property
    def count(self) -> int:
        """Updates folded so far. Read without the lock: the engine must not wait on a fold to look."""
        return self._count

    @property
    def closed(self) -> bool:
        return self._closed

    def try_accept(self, worker_id: str, update: ParamSet, based_on: int, weigh: Callable[[int], float],
                   num_samples: int, nbytes: int, metrics: Mapping[str, float]) -> bool:
        """Folds an update trained on version ``based_on`` and records it, as one transition.

        ``weigh(tau)`` gives the update's weight at staleness ``tau`` against this
        buffer's version, or raises UpdateRejected.

        Returns:
            False, with nothing changed, when the buffer is full or closed: the update belongs in the next one.

        Raises:
            UpdateRejected: ``weigh`` or the aggregator refused the update; nothing changed.
        """
        with self._lock:
            if self._closed or self._count >= self.capacity:
                return False
            tau = self.model_version - based_on
            weight = weigh(tau)
            self.aggregator.add(update, weight)
            self._count += 1
            self._workers.append(worker_id)
            self._num_samples += num_samples
            self._weight += weight
            self._bytes_in += nbytes
            self._metrics.append(dict(metrics))
            self._staleness.append(tau)
        self.notify()
        return True

    def relabel(self, number: int, model_version: int) -> None:
        """Re-targets the buffer after the step before it failed to close (its version did not come).

        Updates already folded keep their weight and recorded staleness, both
        taken against the version that did not come: one step more than they
        are. A failed close is rare (a non-finite aggregate), so this is left.
        """
        with self._lock:
            self.number, self.model_version = number, model_version

    def close(self, *, attempt: int, sampled: frozenset[str], rejected: int, bytes_out: int,
              dropped: frozenset[str] = frozenset(), rejected_ids: frozenset[str] = frozenset()) -> RoundRecord:
        """No fold is accepted after this; waits for a fold in progress. Returns the step's record."""
        with self._lock:
            self._closed = True
            return RoundRecord(
                number=self.number,
                model_version=self.model_version,
                attempt=attempt,
                sampled=sampled,
                pushed=frozenset(self._workers),
                dropped=dropped,
                rejected=rejected,
                num_samples=self._num_samples,
                weight=self._weight,
                bytes_in=self._bytes_in,
                bytes_out=bytes_out,
                opened_at=self.opened_at,
                worker_metrics=tuple(self._metrics),
                staleness=tuple(self._staleness),
                rejected_ids=rejected_ids,
            )


@dataclass(slots=True)
class _Task:
    worker: WorkerRecord
    version: int
    """The model version the worker was last handed (by its task or a later download)."""


@final
class _Upload:
    """One admitted upload: folds into whichever buffer is open when the update is complete."""

    def __init__(self, engine: AsyncEngine, number: int, based_on: int, tau: int) -> None:
        self.number = number
        """The step the update is expected to count for (updated when it folds)."""
        self._engine = engine
        self._based_on = based_on
        self._tau = tau

    def accept(self, worker_id: str, update: ParamSet, weight: float, num_samples: int, nbytes: int,
               metrics: Mapping[str, float], staleness: int = 0) -> None:
        engine = self._engine

        def weigh(tau: int) -> float:
            reason = engine._staleness_refusal(self._based_on, tau)
            if reason is not None:
                raise UpdateRejected(reason)
            if tau == self._tau:
                return weight
            # The update landed in a later buffer than the one it was admitted to: re-weigh it.
            return weight * engine.staleness_weight(tau) / engine.staleness_weight(self._tau)

        self.number = engine._fold(update, worker_id, self._based_on, weigh, num_samples, nbytes, metrics)

    def end_upload(self, worker_id: str) -> None:
        self._engine._end_upload(worker_id)

    def note_rejection(self, worker_id: str) -> None:
        with self._engine.core.cond:
            self._engine.note_rejection(worker_id)


@final
class AsyncEngine(Engine):
    """FedBuff-style asynchronous server steps over a buffer of ``round.buffer_size`` updates."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._s = make_staleness(self.config.round.staleness)
        self.buffer: UpdateBuffer | None = None
        """The open buffer (None before the first step and after the last one closed)."""
        self._busy: dict[str, _Task] = {}
        self._uploading: dict[str, WorkerRecord] = {}
        # Per step, reset when the buffer is swapped (all under the server lock):
        self._asked: set[str] = set()
        self._rejected = 0
        self._rejected_ids: set[str] = set()
        self._dropped: set[str] = set()
        self._bytes_out = 0

    # ----------------------------------------------------------- handler side (server lock held)
    def staleness_weight(self, staleness: int) -> float:
        """s(tau) from ``round.staleness``."""
        return self._s(staleness)

    def _staleness_refusal(self, based_on: int, tau: int) -> str | None:
        """Why an update on version ``based_on``, ``tau`` steps old, is refused, or None."""
        limit = self.config.round.max_staleness
        if tau < 0:
            return f"update on model version {based_on} is newer than the server's (tau={tau}, max_staleness={limit})"
        if tau > limit:
            return f"update on model version {based_on} is tau={tau} server steps old, max_staleness={limit}"
        return None

    def task_for(self, worker: WorkerRecord) -> TaskInfo | None:
        """A TRAIN task on the newest version for a worker that asks while no upload of its is in flight.

        A worker asks only when it is not training, so a busy worker that asks
        again has given its task up (its upload was refused before it reached
        the engine, or the reply to its last ask was lost): it gets a new task,
        which replaces the old one. While a step closes, or the buffer is full
        and about to, the worker waits for the version that step makes rather
        than train on one already a step old.
        """
        core, buf = self.core, self.buffer
        if (core.phase is not Phase.TRAINING or buf is None or buf.count >= buf.capacity
                or worker.worker_id in self._uploading or core.paused or core.ending):
            return None
        self._busy[worker.worker_id] = _Task(worker, core.version)
        worker.busy_since = time.monotonic()
        self._asked.add(worker.worker_id)
        return TaskInfo(TaskKind.TRAIN, core.instance, round=core.next_round, model_version=core.version,
                        client=self.strategy.algorithm.client_settings(self.config.client, core.next_round),
                        config=dict(self.strategy.task_config))

    def target_for(self, meta: UpdateMeta) -> tuple[UpdateTarget, int, float]:
        buf = self.buffer
        if buf is None:
            self.note_rejection(meta.worker_id)
            raise UpdateRejected(f"no buffer is open (phase {self.core.phase.value})")
        tau = buf.model_version - meta.model_version
        reason = self._staleness_refusal(meta.model_version, tau)
        task = self._busy.pop(meta.worker_id, None)  # an upload ends the task, whatever its fate
        if reason is None:
            if task is not None and task.version == meta.model_version:
                self._uploading[meta.worker_id] = task.worker
                deadline = time.monotonic() + self.config.round.update_window_s
                return _Upload(self, buf.number, meta.model_version, tau), tau, deadline
            given = "no task" if task is None else f"a task on model version {task.version}"
            reason = (f"worker {meta.worker_id} pushed an update on model version {meta.model_version} "
                      f"but was given {given}")
        self.note_rejection(meta.worker_id)
        if task is not None:  # a worker with a task has no upload in flight: it is idle now
            task.worker.busy_since = None
        raise UpdateRejected(reason)

    def _grace_window(self) -> str:
        return f"update_window_s={self.config.round.update_window_s:g} of a step that gets too few updates"

    def open_counts(self) -> tuple[int, int]:
        buf = self.buffer
        return (len(self._asked), buf.count) if buf is not None else (0, 0)

    def note_rejection(self, worker_id: str) -> None:
        self._rejected += 1
        self._rejected_ids.add(worker_id)

    def on_drop(self, worker_id: str) -> None:
        self._busy.pop(worker_id, None)
        self._uploading.pop(worker_id, None)
        self._dropped.add(worker_id)

    def on_download(self, worker_id: str, nbytes: int) -> None:
        self._bytes_out += nbytes
        task = self._busy.get(worker_id)
        if task is not None:
            # model_for hands out the newest version, which may be newer than the task's.
            task.version = self.core.version

    # ----------------------------------------------------------- upload side (no lock held)
    def _fold(self, update: ParamSet, worker_id: str, based_on: int, weigh: Callable[[int], float],
             num_samples: int, nbytes: int, metrics: Mapping[str, float]) -> int:
        """Folds a complete update into the open buffer; returns the step it will count for.

        A full or closed buffer sends the update on to the next one; while a full
        buffer waits for its swap, the update waits too, for at most ``round.update_window_s``.

        Raises:
            UpdateRejected: the job made its last step, the wait ran out, or ``weigh``/the aggregator refused.
        """
        core, window_s = self.core, self.config.round.update_window_s
        deadline = time.monotonic() + window_s
        full: UpdateBuffer | None = None
        while True:
            with core.cond:
                buf = self.buffer
                while buf is not None and buf is full:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise UpdateRejected(f"step {buf.number}'s buffer stayed full for update_window_s={window_s}")
                    core.cond.wait(remaining)
                    buf = self.buffer
                if buf is None:
                    raise UpdateRejected("no buffer is open any more (the job made its last step, or failed)")
            if buf.try_accept(worker_id, update, based_on, weigh, num_samples, nbytes, metrics):
                return buf.number
            full = buf

    def _end_upload(self, worker_id: str) -> None:
        """The worker's upload ended (accepted or not): it is idle unless it already has a new task."""
        with self.core.cond:
            worker = self._uploading.pop(worker_id, None)
            if worker is not None and worker_id not in self._busy:
                worker.busy_since = None
            self.core.cond.notify_all()

    # ----------------------------------------------------------- engine thread
    def _open(self, number: int, model_version: int) -> UpdateBuffer:
        return UpdateBuffer(number, model_version, self.config.round.buffer_size,
                            self.strategy.aggregator(self.upload_template), notify=self.core.notify)

    def loop(self) -> None:
        core, cfg = self.core, self.config
        if core.next_round > cfg.job.rounds:
            return
        started, attempt = time.monotonic(), 0
        with core.cond:
            core.hold_while_paused()
        while not self._await_workers():
            if core.ending:
                return
            attempt += 1
            self._retry_or_fail(attempt, f"fewer than min_workers={cfg.round.min_workers} joined within "
                                         f"start_window_s={cfg.round.start_window_s}")
        if core.ending:
            return
        seconds_wait = time.monotonic() - started
        with core.cond:
            self.buffer = self._open(core.next_round, core.version)
            self._opened()
            core.set_phase(Phase.TRAINING)
            joined = len(core.registry)
        log.info("ps %s round %d: async steps start on model version %d digest %s, %d joined, buffer_size=%d",
                 core.instance, core.next_round, core.version, params_digest(core.params)[:16], joined,
                 cfg.round.buffer_size)
        attempt = 0
        try:
            # The last step leaves no buffer open; a failed close opens one again.
            while core.phase is not Phase.FINISHED and (buf := self.buffer) is not None:
                count = self._await_buffer(buf)
                cfg = self.config  # an operator's change applies from the next step
                if core.stopping:
                    log.warning("ps %s round %d: stopped; %d buffered updates are abandoned", core.instance,
                                buf.number, count)
                    break
                if core.finishing and count < buf.capacity and count < cfg.round.min_updates:
                    log.warning("ps %s round %d: stop asked for; the step got %d updates, min_updates=%d: "
                                "abandoned", core.instance, buf.number, count, cfg.round.min_updates)
                    break
                if count < buf.capacity and count < cfg.round.min_updates:
                    self._fail_if_lost(buf.number, self._grace_window())
                    attempt += 1
                    self._retry_or_fail(attempt, f"step {buf.number} got {count} updates within update_window_s="
                                                 f"{cfg.round.update_window_s}, min_updates={cfg.round.min_updates}")
                    continue  # the same buffer keeps what it has and waits another window
                failure = self._step(buf, attempt, seconds_wait)
                seconds_wait = 0.0
                if core.finishing:
                    break
                if failure is None:
                    attempt = 0
                else:
                    attempt += 1
                    self._retry_or_fail(attempt, failure)
        finally:
            with core.cond:
                left, self.buffer = self.buffer, None
            if left is not None:
                left.close(attempt=attempt, sampled=frozenset(), rejected=0, bytes_out=0)
                left.aggregator.close()

    def _await_buffer(self, buf: UpdateBuffer) -> int:
        """Waits until the buffer is full or one window passed; returns its count.

        While the job is paused no task is handed out, so the window would only
        count missing updates: it starts again when the job resumes. Uploads in
        flight still fold, and a buffer they fill closes.
        """
        core, cfg = self.core, self.config.round
        deadline = time.monotonic() + cfg.update_window_s
        with core.cond:
            while buf.count < buf.capacity and not core.stopping:
                if core.paused and not core.ending:
                    core.cond.wait(1.0)
                    deadline = time.monotonic() + cfg.update_window_s
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                core.cond.wait(remaining)
            return buf.count

    def _step(self, buf: UpdateBuffer, attempt: int, seconds_wait: float) -> str | None:
        """Swaps a fresh buffer in, then closes ``buf`` into the next version; returns why it failed, or None."""
        core = self.core
        with core.cond:
            core.set_phase(Phase.AGGREGATING)
            last = buf.number >= self.config.job.rounds or core.finishing
            # The fresh buffer's updates apply to the version this close makes.
            self.buffer = None if last else self._open(buf.number + 1, buf.model_version + 1)
            sampled, rejected, bytes_out = frozenset(self._asked), self._rejected, self._bytes_out
            dropped, rejected_ids = frozenset(self._dropped), frozenset(self._rejected_ids)
            self._asked, self._rejected, self._bytes_out = set(), 0, 0
            self._dropped, self._rejected_ids = set(), set()
        record = buf.close(attempt=attempt, sampled=sampled, rejected=rejected, bytes_out=bytes_out,
                           dropped=dropped, rejected_ids=rejected_ids)
        staleness = np.asarray(record.staleness, dtype=np.float64)
        extra = {
            "mode": "async",
            "updates": len(record.staleness),
            "staleness_mean": float(staleness.mean()),
            "staleness_max": int(staleness.max()),
            # One worker may be in a buffer twice: count the updates, not the distinct workers.
            "bytes_in_dense": len(record.staleness) * self.upload_template.total_bytes,
        }
        failure = None
        try:
            # FedBuff's step is sum_k s(tau_k) w_k delta_k / sum_k w_k: the aggregator's weighted mean
            # divides by sum_k s(tau_k) w_k instead, so a buffer of stale updates would still take a
            # full step. Scaling by the ratio of the two sums makes staleness shrink the step.
            scale = record.weight / record.num_samples if record.num_samples > 0 else 1.0
            self.pipeline.close(record, buf.aggregator, seconds_wait=seconds_wait, extra=extra, scale=scale)
        except UpdateRejected as exc:
            failure = str(exc)
        with core.cond:
            if failure is not None:
                # The version the fresh buffer was opened for did not come: it serves this step again.
                if self.buffer is None:
                    self.buffer = self._open(core.next_round, core.version)
                else:
                    self.buffer.relabel(core.next_round, core.version)
            if core.phase is Phase.AGGREGATING:
                core.set_phase(Phase.TRAINING)
        return failure
