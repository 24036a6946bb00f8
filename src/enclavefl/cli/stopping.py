"""Stopping on SIGINT, SIGTERM and SIGHUP, and when the process that started us dies.

Ctrl-C, ``kill``, ``timeout``, a CI cancel and a closed terminal all mean
"stop": each command stops the same way whichever it was, and exits with
128 + the signal number (130 SIGINT, 143 SIGTERM, 129 SIGHUP), as a shell
reports a process the signal ended.

How this works: `enclavefl run` (:func:`raise_on_stop_signals`) turns
SIGTERM and SIGHUP into :class:`Stopped`, a ``KeyboardInterrupt``, so the one
clean-up path that Ctrl-C takes serves all three. `enclavefl ps` and
`enclavefl worker` (:class:`StopSignals`) must not stop from inside a signal
handler: the handler runs on the main thread, which may hold the server's
lock at that moment. So the handler only records the signal and a watcher
thread calls the stop callbacks (the PS abandons its open round, checkpoints
the last completed one and tells the workers to finish). The same watcher
notices when the process that started us is gone (``--parent-pid``, which
`run` passes to its children): a killed `run` must not leave its PS and
workers behind, whatever killed it, and polling the parent id works on every
platform and from any thread that started the child.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import final

__all__ = ["PARENT_POLL_S", "STOP_SIGNALS", "StopSignals", "Stopped", "exit_code_for", "raise_on_stop_signals"]

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""The signals that stop a command cleanly."""

PARENT_POLL_S = 0.5
"""How often a child of `enclavefl run` checks that `run` is still its parent."""


def exit_code_for(signum: int) -> int:
    """The exit code of a command a signal stopped: 128 + the signal number, as shells report it."""
    return 128 + signum


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived in `enclavefl run`; caught where Ctrl-C's KeyboardInterrupt is.

    Attributes:
        signum: the signal that arrived.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


@contextmanager
def raise_on_stop_signals() -> Iterator[None]:
    """Within the block SIGTERM and SIGHUP raise :class:`Stopped` on the main thread (SIGINT raises as usual).

    Only the first signal raises: a second one while the first is being handled
    (children being stopped) is ignored, so the clean-up runs to its end. The
    previous handlers come back when the block ends.
    """
    raised = False

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal raised
        if not raised:
            raised = True
            raise Stopped(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@final
class StopSignals:
    """Calls the stop callbacks once, from its own thread, on a stop signal or when the parent is gone.

    Create it on the main thread (signal handlers can only be set there) and
    :meth:`close` it when the command ends; the previous handlers come back then.
    A second stop signal while the first is handled exits at once (Ctrl-C twice).
    """

    def __init__(self, *, parent_pid: int | None = None) -> None:
        """Installs the handlers and starts the watcher thread.

        Args:
            parent_pid: stop as soon as this process is no longer our parent (it died);
                None: do not watch the parent.
        """
        self._parent_pid = parent_pid
        self._event = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self._fired = False
        self.signum: int | None = None
        """The signal that stopped the command (SIGHUP when the parent died), or None."""
        self._previous = {s: signal.signal(s, self._handler) for s in STOP_SIGNALS}
        self._thread = threading.Thread(target=self._watch, name="stop-signals", daemon=True)
        self._thread.start()

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self._event.is_set() and not self._closed.is_set():
            # A second stop signal (Ctrl-C pressed again) while the first is handled: stop now.
            os.write(2, f"{signal.Signals(signum).name} again: exiting at once\n".encode())
            os._exit(exit_code_for(self.signum or signum))
        if self.signum is None:
            self.signum = signum
        self._event.set()

    @property
    def stopped(self) -> bool:
        """Whether a stop was asked for."""
        return self.signum is not None

    def on_stop(self, callback: Callable[[], None]) -> None:
        """Adds a callback; it runs at once (on this thread) if the stop came already."""
        with self._lock:
            if not self._fired:
                self._callbacks.append(callback)
                return
        callback()

    def _watch(self) -> None:
        while not self._closed.is_set():
            if self._event.wait(PARENT_POLL_S):
                break
            if self._parent_pid is not None and os.getppid() != self._parent_pid:
                log.warning("the parent process %d is gone: stopping", self._parent_pid)
                if self.signum is None:
                    self.signum = signal.SIGHUP  # what a terminal's end sends: our starter hung up
                break
        if self._closed.is_set() and self.signum is None:
            return
        if self.signum is not None:
            log.warning("%s: stopping", signal.Signals(self.signum).name)
        with self._lock:
            self._fired = True
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # one failed callback must not keep the others from stopping
                log.exception("stop callback %r failed", callback)

    def close(self) -> None:
        """Stops watching and restores the previous handlers. Idempotent."""
        self._closed.set()
        self._event.set()  # wakes the watcher, which sees the close and ends
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(PARENT_POLL_S + 1.0)
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}
