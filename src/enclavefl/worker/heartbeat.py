"""The worker's heartbeat: "still here" to the PS while it is busy and not long-polling.

A waiting worker is heard through its long-polls; while it pulls the model,
trains and pushes its update it makes no call for a while, so a thread sends a
heartbeat every ``heartbeat_s`` the PS asked for at join (``round.heartbeat_s``).
The PS drops a worker it has not heard from for ``round.worker_timeout_s``
(:mod:`enclavefl.server.liveness`), which is how a dead worker stops holding a
round open.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from types import TracebackType
from typing import final

from enclavefl.errors import ClosedError, EnclaveFLError, StaleSession, TransportError

__all__ = ["Heartbeat"]

log = logging.getLogger(__name__)


@final
class Heartbeat:
    """Calls ``send`` every ``interval_s`` from a thread it owns, between ``__enter__`` and ``__exit__``.

    ``__exit__`` stops the thread and waits for a send in progress, so no
    heartbeat outlives the work it covers. With ``interval_s`` 0 nothing is sent
    (a PS that does not track liveness).
    """

    def __init__(self, send: Callable[[], None], interval_s: float, *, name: str) -> None:
        """Prepares the heartbeat; nothing is sent until the context is entered.

        Args:
            send: one heartbeat call; it must time out by itself (a network call with a deadline).
            interval_s: seconds between calls; 0 or less: none.
            name: the worker's name, for logs.
        """
        self._send = send
        self._interval_s = interval_s
        self._name = name
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self.sent = 0
        """Heartbeats the PS answered."""

    def __enter__(self) -> Heartbeat:
        if self._interval_s > 0:
            self._thread = threading.Thread(target=self._run, name=f"heartbeat-{self._name}", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._done.wait(self._interval_s):
            try:
                self._send()
                self.sent += 1
            except StaleSession as exc:
                # The PS dropped us; the push that ends this round will hear it too and join again.
                log.warning("worker %s: heartbeat refused (%s); heartbeats stop until the next round", self._name, exc)
                return
            except ClosedError:
                return  # the client was closed under us: the round is over
            except TransportError as exc:  # a blip: the next beat may get through
                log.info("worker %s: heartbeat failed: %s", self._name, exc)
            except EnclaveFLError as exc:  # a PS that cannot take heartbeats: the long-polls must do
                log.warning("worker %s: heartbeats stop: %s", self._name, exc)
                return
