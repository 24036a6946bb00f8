"""The PS's view of TLS handshakes that fail: connections that never make a call.

How this works: gRPC handles TLS in its core and tells the application
nothing about a handshake that fails, so a worker whose CA or certificate does
not match the PS's fails (or retries) while the PS log stays silent. What
gRPC does tell: the server's certificate callback runs once for every new
connection, before its handshake (:meth:`HandshakeWatch.connection_started`),
and every call carries the address of the connection it came on, different
for each connection (:meth:`HandshakeWatch.call_seen`). A connection whose
handshake succeeds makes its first call at once (a gRPC client connects only
to send one), so a connection that made no call within ``grace_s`` failed its
handshake, or was not a gRPC client at all. Those are counted and reported in
one warning per ``report_every_s`` at most.

A connection still waiting for its first call is checked by a short-lived
thread that runs only while some are waiting (at most ``grace_s`` after the
last new connection) and then ends by itself: a worker that fails once and
exits must still show up in the PS log.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from typing import final

__all__ = ["HandshakeWatch"]

log = logging.getLogger(__name__)

MAX_REMEMBERED = 4096
"""Connections remembered (waiting ones, and addresses that made calls); older ones are forgotten."""


@final
class HandshakeWatch:
    """Counts incoming connections that never made a call, and logs them, rate-limited."""

    def __init__(self, hint: str, *, grace_s: float = 5.0, report_every_s: float = 60.0) -> None:
        """Starts counting; no thread runs until a connection arrives.

        Args:
            hint: what to check, appended to the warning (for example which CA this PS trusts).
            grace_s: how long a new connection may take to make its first call.
            report_every_s: at most one warning per this many seconds.
        """
        self._hint = hint
        self._grace_s = grace_s
        self._report_every_s = report_every_s
        self._cond = threading.Condition()
        self._waiting: deque[float] = deque(maxlen=MAX_REMEMBERED)  # start times of connections without a call
        self._peers: OrderedDict[str, None] = OrderedDict()
        self._unreported = 0
        self._last_report: float | None = None
        self._checker: threading.Thread | None = None
        self._closed = False
        self.failed_total = 0
        """Connections counted as failed since the start."""

    def connection_started(self) -> None:
        """A connection arrived and its TLS handshake begins (the certificate callback)."""
        with self._cond:
            if self._closed:
                return
            self._waiting.append(time.monotonic())
            if self._checker is None:
                self._checker = threading.Thread(target=self._check, name="handshake-watch", daemon=True)
                self._checker.start()

    def call_seen(self, peer: str) -> None:
        """A call arrived on the connection ``peer`` (gRPC's peer address, unique per connection)."""
        with self._cond:
            if peer in self._peers:
                self._peers.move_to_end(peer)
                return
            self._peers[peer] = None
            if len(self._peers) > MAX_REMEMBERED:
                self._peers.popitem(last=False)
            if self._waiting:
                self._waiting.pop()  # the newest connection is the likeliest to be this one

    def _check(self) -> None:
        """Runs while connections wait for their first call; ends when none do."""
        with self._cond:
            while self._waiting and not self._closed:
                now = time.monotonic()
                while self._waiting and now - self._waiting[0] >= self._grace_s:
                    self._waiting.popleft()
                    self._unreported += 1
                    self.failed_total += 1
                self._report(now)
                if self._waiting:
                    self._cond.wait(self._waiting[0] + self._grace_s - now)
            self._checker = None

    def close(self) -> None:
        """Stops watching (the server stopped): the checker thread ends; connections still waiting are not counted.

        Idempotent; waits at most a second for the thread.
        """
        with self._cond:
            self._closed = True
            self._waiting.clear()
            checker = self._checker
            self._cond.notify_all()
        if checker is not None and checker is not threading.current_thread():
            checker.join(1.0)

    def _report(self, now: float) -> None:
        if not self._unreported:
            return
        if self._last_report is not None and now - self._last_report < self._report_every_s:
            return  # kept for the next report
        log.warning("%d incoming connection(s) failed the TLS handshake or made no call%s: a worker's CA or "
                    "certificate does not match this PS's, or it checks another server name; %s",
                    self._unreported, "" if self._last_report is None else
                    f" in the last {now - self._last_report:.0f}s", self._hint)
        self._unreported = 0
        self._last_report = now
