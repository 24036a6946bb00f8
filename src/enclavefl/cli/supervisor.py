"""``enclavefl run`` keeps its workers running: a crashed worker process is started again, with backoff.

How this works: the run's follow loop calls :meth:`WorkerSupervisor.poll`
every few tenths of a second. A worker that exited with 0 finished (the PS
told it so) and is left alone. One that exited otherwise (a signal, a crash, an
unreachable PS) is started again after ``backoff_s x 2^(n-1)`` seconds (n the
restart count, at most ``max_backoff_s``), at most ``max_restarts`` times; the
PS drops its old session and the new process joins as the same worker (same
certificate, same data partition). Configuration (2) and attestation (3)
failures are not retried: the same process would fail the same way. Each
decision is one console line (``worker-3 exited with -9; restarting (1/5)``).

When a worker is given up and fewer than ``round.min_workers`` workers are
left, the supervisor says at once that the job cannot go on; the PS ends it
after the round in progress and one start window, with a checkpoint.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import final

__all__ = ["MAX_RESTARTS", "NOT_RETRIED", "WorkerSupervisor"]

MAX_RESTARTS = 5
"""Default restarts per worker."""

NOT_RETRIED = {2: "configuration error", 3: "attestation refused"}
"""Exit codes a restart cannot fix, and what they mean."""


@dataclass
class _Watched:
    name: str
    proc: subprocess.Popen[bytes]
    restarts: int = 0
    restart_at: float | None = None
    given_up: bool = False


@final
class WorkerSupervisor:
    """Watches the worker processes of one run and restarts the crashed ones."""

    def __init__(self, respawn: Callable[[str], subprocess.Popen[bytes]], say: Callable[[str], None], *,
                 restart: bool, min_workers: int, max_restarts: int = MAX_RESTARTS, backoff_s: float = 1.0,
                 max_backoff_s: float = 30.0, why_exit: Callable[[str], str] | None = None) -> None:
        """Prepares the supervisor; add workers with :meth:`watch`.

        Args:
            respawn: starts worker ``name`` again and returns its new process.
            say: prints one console line.
            restart: restart crashed workers (``--restart-workers``), or only report them.
            min_workers: the job's ``round.min_workers``: fewer workers left is reported at once.
            max_restarts: restarts per worker.
            why_exit: the last line of a worker's log, shown when it is not restarted.
        """
        self._respawn = respawn
        self._say = say
        self._restart = restart
        self._min_workers = min_workers
        self._max_restarts = max_restarts
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._why_exit = why_exit
        self._workers: dict[str, _Watched] = {}
        self._short_said = False

    def watch(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        self._workers[name] = _Watched(name, proc)

    @property
    def restarts(self) -> dict[str, int]:
        """Restarts so far, by worker name."""
        return {w.name: w.restarts for w in self._workers.values()}

    def poll(self, now: float | None = None) -> None:
        """Starts the workers whose backoff is over and decides about the ones that exited since the last poll."""
        now = time.monotonic() if now is None else now
        for w in self._workers.values():
            if w.given_up:
                continue
            if w.restart_at is not None:
                if now >= w.restart_at:
                    w.restart_at = None
                    w.proc = self._respawn(w.name)
                continue
            code = w.proc.poll()
            if code is None or code == 0:
                continue
            self._exited(w, code, now)

    def _exited(self, w: _Watched, code: int, now: float) -> None:
        if code in NOT_RETRIED:
            self._give_up(w, f"{w.name} exited with {code} ({NOT_RETRIED[code]}); not restarted, it would fail again")
        elif not self._restart:
            self._give_up(w, f"{w.name} exited with {code}; not restarted (--no-restart-workers)")
        elif w.restarts >= self._max_restarts:
            self._give_up(w, f"{w.name} exited with {code}; not restarted (limit of {self._max_restarts} restarts)")
        else:
            w.restarts += 1
            delay = min(self._max_backoff_s, self._backoff_s * 2 ** (w.restarts - 1))
            w.restart_at = now + delay
            self._say(f"{w.name} exited with {code}; restarting ({w.restarts}/{self._max_restarts}) in {delay:g}s")

    def _give_up(self, w: _Watched, line: str) -> None:
        w.given_up = True
        if self._why_exit is not None:
            last = self._why_exit(w.name)
            if last:
                line += f": {last}"
        self._say(line)
        left = sum(1 for x in self._workers.values() if not x.given_up)
        if left < self._min_workers and not self._short_said:
            self._short_said = True
            self._say(f"{left} workers left, fewer than round.min_workers={self._min_workers}: the job cannot go on; "
                      "the PS ends it after the round in progress and one start window")
