"""The state the PS's parts share: the lock, the phase, the global model, the worker registry,
the job's live settings and its event bus.

The worker-facing handler (:mod:`enclavefl.server.ps`) and the engines
(:mod:`enclavefl.server.engine`, :mod:`enclavefl.server.async_engine`) read and
change it under ``cond``'s lock; every wait on ``cond`` has a deadline.

The operator's requests (:mod:`enclavefl.server.handle`) land here too: a
pause (no new round opens), a stop (``abort``: the open round is abandoned;
``finish``: it completes first) and new settings, which :attr:`ServerCore.config`
holds and every part reads afresh for each round.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Literal

from enclavefl.config import JobConfig
from enclavefl.server.events import EventBus
from enclavefl.server.metrics import MetricsLog
from enclavefl.server.phases import Phase, check_transition
from enclavefl.server.registry import WorkerRegistry
from enclavefl.server.state import PartState
from enclavefl.tensors import ParamSet

__all__ = ["JobOutcome", "ServerCore"]

JobOutcome = Literal["finished", "failed", "stopped"]


class ServerCore:
    """Shared PS state. ``params``/``version`` change only through :meth:`install`."""

    def __init__(self, params: ParamSet, *, version: int, next_round: int, metrics: MetricsLog,
                 part_states: Callable[[], dict[str, PartState]], config: JobConfig,
                 events: EventBus | None = None) -> None:
        self.instance = uuid.uuid4().hex[:12]
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.events = events or EventBus()
        """What happens in the job, for the management plane (one bus per PS)."""
        self.registry = WorkerRegistry(self.instance, self.events)
        self.phase = Phase.WAITING
        self.params = params
        self.version = version
        self.next_round = next_round
        self.metrics = metrics
        self.failure: str | None = None
        self.stopping = False
        """Set by :meth:`request_stop`: engines stop opening rounds and end the open one unaggregated."""
        self.finishing = False
        """Set by :meth:`request_finish`: engines open no new round; the open one completes, then the job ends."""
        self.paused = False
        """Set by :meth:`pause`: no new round opens (async: no new task is handed out) until :meth:`resume`."""
        self.running = False
        """The engine runs (set when the PS's ``run`` starts)."""
        self.outcome: JobOutcome | None = None
        """How the job ended (None while it runs)."""
        self.started_at = time.time()
        self.started_monotonic = time.monotonic()
        self.install_hooks: list[Callable[[ParamSet, ParamSet, int], None]] = []
        """Called under the lock with (old model, new model, new version) as :meth:`install` replaces the model."""
        self._config = config
        self._part_states = part_states
        self._metrics_dropped = 0

    @property
    def config(self) -> JobConfig:
        """The job's settings now: the job file's, with the changes an operator made since.

        Parts read it afresh for each round (never keep a copy across rounds).
        """
        return self._config

    def replace_config(self, config: JobConfig) -> None:
        """Makes ``config`` the job's settings from the next round on (caller holds the lock)."""
        self._config = config
        self.cond.notify_all()

    def note_metrics_dropped(self, count: int) -> None:
        """Counts worker metrics refused at receipt (caller holds the lock); the next row reports them."""
        self._metrics_dropped += count

    def take_metrics_dropped(self) -> int:
        """The worker metrics refused since the last call (for the round row); resets the count."""
        with self.cond:
            count, self._metrics_dropped = self._metrics_dropped, 0
        return count

    def set_phase(self, new: Phase) -> None:
        """Moves to ``new`` (caller holds the lock), wakes every waiter and publishes the change."""
        check_transition(self.phase, new)
        self.phase = new
        self.cond.notify_all()
        self.events.publish("phase", phase=new.value, round=self.next_round)

    def notify(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def install(self, params: ParamSet, version: int, next_round: int, row: Mapping[str, Any]) -> None:
        """Makes ``params`` the global model and records its metrics row, as one change."""
        with self.cond:
            for hook in self.install_hooks:
                hook(self.params, params, version)
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

    def request_finish(self) -> None:
        """Asks the engine to end the job after the open round completes (at once if none is open)."""
        with self.cond:
            self.finishing = True
            self.cond.notify_all()

    @property
    def ending(self) -> bool:
        """A stop of either kind was asked for: no new round may open."""
        return self.stopping or self.finishing

    def pause(self) -> bool:
        """No new round opens until :meth:`resume`; False if already paused (caller holds the lock)."""
        if self.paused:
            return False
        self.paused = True
        self.cond.notify_all()
        return True

    def resume(self) -> bool:
        """Rounds open again; False if not paused (caller holds the lock)."""
        if not self.paused:
            return False
        self.paused = False
        self.cond.notify_all()
        return True

    def hold_while_paused(self) -> None:
        """Blocks the engine while the job is paused (and no stop was asked for); caller holds the lock.

        A pause has no end an engine can know, so this waits in slices of a second and never times out.
        """
        while self.paused and not self.ending:
            self.cond.wait(1.0)

    def end(self, outcome: JobOutcome, reason: str) -> None:
        """Records how the job ended and publishes it (once); caller holds the lock."""
        if self.outcome is None:
            self.outcome = outcome
            self.events.publish("job", state=outcome, reason=reason)

    def finish(self) -> None:
        """The job is done: every worker is told FINISH from now on."""
        with self.cond:
            if self.phase is not Phase.FINISHED:
                self.set_phase(Phase.FINISHED)

    def part_states(self) -> dict[str, PartState]:
        """The checkpointable state of every stateful part, by name."""
        return self._part_states()
