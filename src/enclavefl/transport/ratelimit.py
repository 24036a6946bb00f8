"""Limits on what an unauthenticated peer may cost the PS: calls per connection, and log lines.

How this works: every call that carries no valid session (Challenge, Join, or
any call whose session token the PS does not accept) first takes a token
from its connection's bucket (:class:`ConnectionLimiter`); an empty bucket
refuses the call at once with a short reason, before anything is parsed or
verified. Buckets are keyed by gRPC's peer address, which names one HTTP/2
connection (``ipv4:127.0.0.1:PORT``), not one host: workers that share a host
(or a NAT) with a flooder keep their own buckets and are never starved by it.

There is deliberately no global cap on such calls: a global budget is one
every flooder can spend, and then no honest worker could join. What bounds the
total is the cost of each new connection (a TLS handshake) and gRPC's own
bound on concurrent calls. The table of buckets is bounded too
(``max_connections``, least recently used forgotten first); forgetting a bucket
only ever gives that connection a full bucket again, so a flood of new
connections can weaken the limit for itself but cannot deny anyone else.

Refusals are logged through :class:`RefusalLog`: the first refusal of a
quiet period in full (an operator sees why an honest worker was refused), then
one summary line per ``interval_s`` with counts by reason, so a flood costs a
bounded number of log lines.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Final, final

__all__ = ["RATE_LIMITED", "ConnectionLimiter", "RefusalLog"]

RATE_LIMITED: Final = "rate limited"
"""The first words of the reason a refused call gets (RESOURCE_EXHAUSTED): the worker's client recognises them."""

Clock = Callable[[], float]


@final
class ConnectionLimiter:
    """A token bucket per connection for calls without a valid session, in a bounded table.

    An honest worker spends two tokens per join (Challenge and Join) and none
    while its session is valid, so the defaults never refuse it.
    """

    def __init__(self, *, rate_per_s: float = 2.0, burst: float = 20.0, max_connections: int = 4096,
                 clock: Clock = time.monotonic) -> None:
        """Sets the limits.

        Args:
            rate_per_s: tokens a connection regains per second.
            burst: tokens a connection starts with, and the most it holds.
            max_connections: buckets kept; the least recently used is forgotten first.
            clock: seconds, monotonic (tests pass their own).

        Raises:
            ValueError: a limit is not positive.
        """
        if not (rate_per_s > 0 and burst >= 1 and max_connections >= 1):
            raise ValueError(f"ConnectionLimiter: rate_per_s > 0, burst >= 1 and max_connections >= 1 expected, got "
                             f"{rate_per_s!r}, {burst!r}, {max_connections!r}")
        self._rate_per_s = rate_per_s
        self._burst = burst
        self._max_connections = max_connections
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # connection -> (tokens, at)

    @property
    def retry_after_s(self) -> float:
        """How long an emptied bucket takes to hold one token again."""
        return 1.0 / self._rate_per_s

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, connection: str) -> bool:
        """Takes one token from ``connection``'s bucket; False (nothing taken) when it is empty."""
        now = self._clock()
        with self._lock:
            tokens, at = self._buckets.pop(connection, (self._burst, now))
            tokens = min(self._burst, tokens + (now - at) * self._rate_per_s)
            allowed = tokens >= 1.0
            self._buckets[connection] = (tokens - 1.0 if allowed else tokens, now)
            while len(self._buckets) > self._max_connections:
                self._buckets.popitem(last=False)
        return allowed


@final
class RefusalLog:
    """Logs refused calls: the first of an interval in full, the rest as one summary line per interval.

    A summary still pending when the interval ends is written by a timer
    thread this object owns (at most one, alive only while a summary is
    pending); :meth:`close` writes what is left and stops it.
    """

    def __init__(self, logger: logging.Logger, *, what: str = "refused calls", interval_s: float = 10.0,
                 clock: Clock = time.monotonic) -> None:
        """Starts counting; no thread runs until a refusal must wait for its summary.

        Args:
            logger: where the lines go (at WARNING).
            what: what is counted, for the summary line ("refused calls").
            interval_s: at most one summary line per this many seconds.
            clock: seconds, monotonic (tests pass their own).
        """
        self._log = logger
        self._what = what
        self._interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._sources: set[str] = set()
        self._errors_logged: set[str] = set()  # reasons of ERROR lines written in full this interval
        self._since: float | None = None  # start of the interval that is being counted
        self._timer: threading.Timer | None = None
        self._closed = False
        self.total = 0
        """Refusals since the start."""

    def refused(self, source: str, reason: str, line: str, *, level: int = logging.WARNING) -> None:
        """Notes one refusal.

        Args:
            source: who was refused (gRPC's peer address of the call, a worker's name), counted in the summary.
            reason: a short category for the summary ("rate limited", "Join refused (mr_enclave)", ...).
            line: the whole story, logged only for the first refusal of an interval.
            level: the level of ``line``. An ERROR (a failure of the PS, not a
                refusal) is also written in full the first time its ``reason``
                occurs in an interval, so a flood of refusals cannot hide it.
        """
        with self._lock:
            now = self._clock()
            self.total += 1
            if self._since is not None and now - self._since >= self._interval_s:
                self._flush_locked(now)
            if self._since is None:
                self._since = now
                self._log.log(level, "%s (more are summed up every %.0f s)", line, self._interval_s)
                if level >= logging.ERROR:
                    self._errors_logged.add(reason)
                return
            if level >= logging.ERROR and reason not in self._errors_logged and len(self._errors_logged) < 64:
                self._errors_logged.add(reason)
                self._log.log(level, "%s (more are summed up every %.0f s)", line, self._interval_s)
            self._counts[reason] += 1
            if len(self._sources) < 100_000:  # a bound on memory, not on the count
                self._sources.add(source)
            self._arm_locked(now)

    def _arm_locked(self, now: float) -> None:
        """Starts the timer that writes the pending summary when the interval ends (unless one runs)."""
        if self._timer is None and not self._closed and self._since is not None:
            self._timer = threading.Timer(max(self._since + self._interval_s - now, 0.0), self._on_timer)
            self._timer.daemon = True
            self._timer.name = "refusal-log"
            self._timer.start()

    def _on_timer(self) -> None:
        with self._lock:
            self._timer = None
            now = self._clock()
            # A refusal may have written the summary since this timer was set: then wait for the new interval.
            if self._since is not None and now - self._since >= self._interval_s:
                self._flush_locked(now)
            if self._counts:
                self._arm_locked(now)

    def _flush_locked(self, now: float) -> None:
        if self._counts:
            by_reason = ", ".join(f"{reason} {n}" for reason, n in self._counts.most_common())
            self._log.warning("%d %s from %d source(s) in the last %.0f s: %s", sum(self._counts.values()),
                              self._what, len(self._sources), now - (self._since or now), by_reason)
            self._since = now  # the next refusal in this interval is counted, not logged in full
        else:
            self._since = None
        self._counts.clear()
        self._sources.clear()
        self._errors_logged.clear()

    def close(self) -> None:
        """Writes a pending summary and stops the timer. Idempotent."""
        with self._lock:
            self._closed = True
            timer, self._timer = self._timer, None
            self._flush_locked(self._clock())
        if timer is not None:
            timer.cancel()
