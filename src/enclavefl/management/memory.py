"""A job that exists only in memory: the second implementation of :class:`~enclavefl.management.schema.JobHandle`.

How this works: :class:`MemoryJob` keeps a status, a worker table, metrics
rows and the changeable settings of a :class:`~enclavefl.config.JobConfig`,
and moves through the same states as a real parameter server when asked
(pause, resume, stop, a round completing). The management API, the
dashboard and the exporters are tested against it without starting a PS;
the acceptance tests use the real one. Settings changes are validated like
the job file (the whole job is parsed again with the change applied).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any, Final, final

from enclavefl.config import JobConfig, parse_job
from enclavefl.errors import ConfigError
from enclavefl.management.schema import Identity, JobState, RoundsPage, Status, StopMode, WorkerInfo
from enclavefl.server.events import EventBus

__all__ = ["CHANGEABLE_KEYS", "MemoryJob"]

CHANGEABLE_KEYS: Final = (
    "job.rounds",
    "round.fraction",
    "round.min_updates",
    "round.min_workers",
    "round.start_window_s",
    "round.update_ratio",
    "round.update_window_s",
)
"""The settings a :class:`MemoryJob` lets change between rounds."""


def _get(doc: Mapping[str, Any], dotted: str) -> Any:
    section, _, key = dotted.partition(".")
    return doc[section][key]


@final
class MemoryJob:
    """A job's state held in memory, thread-safe, changed by its methods and by the test driving it."""

    def __init__(self, config: JobConfig | None = None, *, instance: str = "memory-0000") -> None:
        self._lock = threading.Lock()
        self._config = config or parse_job(None)
        self._events = EventBus()
        self._instance = instance
        self._state: JobState = "running"
        self._round = 1
        self._rows: list[dict[str, Any]] = []
        self._workers: dict[str, WorkerInfo] = {}
        self._started = time.time()
        self.stop_mode: StopMode | None = None
        """The mode :meth:`stop` was last called with (None if never)."""

    @property
    def events(self) -> EventBus:
        return self._events

    def status(self) -> Status:
        with self._lock:
            rounds = self._config.job.rounds
            done = len(self._rows)
            return Status(job=self._config.job.name, instance=self._instance, state=self._state,
                          phase="training" if self._state == "running" else self._state, round=self._round,
                          rounds=rounds, rounds_done=done, rounds_left=max(rounds - done, 0),
                          model_version=done, participants=len(self._workers), updates=0,
                          workers_joined=len(self._workers), started_at=self._started,
                          uptime_s=time.time() - self._started, attestation_mode=self._config.attestation.mode,
                          identity=Identity(evidence="none"))

    def workers(self) -> list[WorkerInfo]:
        with self._lock:
            return list(self._workers.values())

    def rounds(self, offset: int, limit: int) -> RoundsPage:
        with self._lock:
            return RoundsPage(total=len(self._rows), offset=offset, rows=self._rows[offset:offset + limit])

    def stop(self, mode: StopMode, *, by: str) -> None:
        with self._lock:
            self.stop_mode = mode
            self._state = "stopped"
        self._events.publish("control", action="stop", by=by, mode=mode)
        self._events.publish("job", state="stopped", reason=f"stopped by {by}")

    def pause(self, *, by: str) -> bool:
        with self._lock:
            if self._state != "running":
                return False
            self._state = "paused"
        self._events.publish("control", action="pause", by=by)
        return True

    def resume(self, *, by: str) -> bool:
        with self._lock:
            if self._state != "paused":
                return False
            self._state = "running"
        self._events.publish("control", action="resume", by=by)
        return True

    def settings(self) -> dict[str, Any]:
        with self._lock:
            doc = self._config.to_dict()
        return {key: _get(doc, key) for key in CHANGEABLE_KEYS}

    def patch_settings(self, changes: Mapping[str, Any], *, by: str) -> dict[str, Any]:
        with self._lock:
            doc = self._config.to_dict()
            for key, value in changes.items():
                if key not in CHANGEABLE_KEYS:
                    raise ConfigError(f"{key}: cannot be changed while the job runs "
                                      f"(changeable: {', '.join(CHANGEABLE_KEYS)})")
                section, _, name = key.partition(".")
                doc[section][name] = value
            self._config = parse_job(doc, source="PATCH /api/v1/config")
        self._events.publish("control", action="config", by=by, changes=dict(changes))
        return self.settings()

    # ------------------------------------------------------------ driven by a test
    def add_worker(self, worker: WorkerInfo) -> None:
        """Adds or replaces a row of the worker table."""
        with self._lock:
            self._workers[worker.worker_id] = worker
        self._events.publish("worker", worker_id=worker.worker_id, worker=worker.name, state=worker.state,
                             reason=worker.reason)

    def complete_round(self, row: Mapping[str, Any]) -> None:
        """Records a completed round's metrics row (and publishes it)."""
        with self._lock:
            self._rows.append(dict(row))
            self._round += 1
        self._events.publish("round", **dict(row))

    def finish(self, state: JobState = "finished") -> None:
        """Ends the job as ``state`` and closes its event bus."""
        with self._lock:
            self._state = state
        self._events.publish("job", state=state, reason="")
        self._events.close()
