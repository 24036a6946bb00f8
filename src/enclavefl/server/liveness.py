"""Worker liveness: a worker the PS has not heard from for ``round.worker_timeout_s`` is dropped.

How this works: every call a worker makes (join, long-poll, pull, push,
heartbeat) stamps its registry record (``WorkerRecord.last_seen``). A waiting
worker is heard at least every ``round.heartbeat_s``, because the PS ends each
long-poll by then; a busy worker (pulling, training, pushing) sends a heartbeat
as often. The monitor, a thread the PS owns while it runs, sweeps the registry
a few times per timeout and drops the silent workers through the PS, so an open
round stops waiting for them at once instead of at the end of its window.

A PS process that itself stalled (swapped out, stopped in a debugger) would
find every worker silent when it wakes: a sweep that comes much later than
planned judges nobody, and the next one, an interval on, when the calls queued
meanwhile have been served, does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import final

from enclavefl.server.core import ServerCore

__all__ = ["LivenessMonitor"]

log = logging.getLogger(__name__)


@final
class LivenessMonitor:
    """Drops silent workers from a thread it owns; use it as a context manager around the PS's run."""

    def __init__(self, core: ServerCore, drop: Callable[[str, str], None], *, timeout_s: float) -> None:
        """Prepares the monitor; nothing runs until the context is entered.

        Args:
            core: the PS state whose registry is swept.
            drop: forgets a worker (called with the server lock held): its id and why.
            timeout_s: the silence after which a worker is dropped (``round.worker_timeout_s``).
        """
        self._core = core
        self._drop = drop
        self._timeout_s = timeout_s
        self.interval_s = min(1.0, timeout_s / 4)
        """How often the registry is swept: a worker is dropped at most this long after its timeout."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_sweep = time.monotonic()

    def sweep(self) -> list[str]:
        """Drops every worker silent for longer than the timeout; returns their ids. Takes the server lock."""
        now = time.monotonic()
        gap, self._last_sweep = now - self._last_sweep, now
        if gap > 3 * self.interval_s:
            log.debug("ps %s: liveness sweep %.1fs after the last one: judging nobody this time",
                      self._core.instance, gap)
            return []
        with self._core.cond:
            silent = self._core.registry.silent(self._timeout_s, now)
            for worker in silent:
                self._drop(worker.worker_id,
                           f"silent for {now - worker.last_seen:.1f}s, worker_timeout_s={self._timeout_s:g}")
        return [w.worker_id for w in silent]

    def __enter__(self) -> LivenessMonitor:
        self._last_sweep = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="ps-liveness", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sweep()
            except Exception:  # a dead monitor would leave rounds waiting for the dead: say so, keep sweeping
                log.exception("ps %s: liveness sweep failed; trying again in %.1fs", self._core.instance,
                              self.interval_s)
