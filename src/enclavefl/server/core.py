"""The state the PS's parts share: the lock, the phase, the global model and the worker registry.

The worker-facing handler (:mod:`enclavefl.server.ps`) and the engines
(:mod:`enclavefl.server.engine`, :mod:`enclavefl.server.async_engine`) read and
change it under ``cond``'s lock; every wait on ``cond`` has a deadline.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from enclavefl.server.metrics import MetricsLog
from enclavefl.server.phases import Phase, check_transition
from enclavefl.server.registry import WorkerRegistry
from enclavefl.server.state import PartState
from enclavefl.tensors import ParamSet

__all__ = ["ServerCore"]


class ServerCore:
    """Shared PS state. ``params``/``version`` change only through :meth:`install`."""

    def __init__(self, params: ParamSet, *, version: int, next_round: int, metrics: MetricsLog,
                 part_states: Callable[[], dict[str, PartState]]) -> None:
        self.instance = uuid.uuid4().hex[:12]
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.registry = WorkerRegistry(self.instance)
        self.phase = Phase.WAITING
        self.params = params
        self.version = version
        self.next_round = next_round
        self.metrics = metrics
        self.failure: str | None = None
        self.stopping = False
        """Set by :meth:`request_stop`: engines stop opening rounds and end the open one unaggregated."""
        self._part_states = part_states
        self._metrics_dropped = 0

    def note_metrics_dropped(self, count: int) -> None:
        """Counts worker metrics refused at receipt (caller holds the lock); the next row reports them."""
        self._metrics_dropped += count

    def take_metrics_dropped(self) -> int:
        """The worker metrics refused since the last call (for the round row); resets the count."""
        with self.cond:
            count, self._metrics_dropped = self._metrics_dropped, 0
        return count

    def set_phase(self, new: Phase) -> None:
        """Moves to ``new`` (caller holds the lock) and wakes every waiter."""
        check_transition(self.phase, new)
        self.phase = new
        self.cond.notify_all()

    def notify(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def install(self, params: ParamSet, version: int, next_round: int, row: Mapping[str, Any]) -> None:
        """Makes ``params`` the global model and records its metrics row, as one change."""
        with self.cond:
            self.params = params
            self.version = version
            self.next_round = next_round
            self.metrics.append(row)
            self.cond.notify_all()

    def request_stop(self) -> None:
        """Asks the engine to stop: no new round opens, the open one is abandoned, the job ends."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()

    def finish(self) -> None:
        """The job is done: every worker is told FINISH from now on."""
        with self.cond:
            if self.phase is not Phase.FINISHED:
                self.set_phase(Phase.FINISHED)

    def part_states(self) -> dict[str, PartState]:
        """The checkpointable state of every stateful part, by name."""
        return self._part_states()
