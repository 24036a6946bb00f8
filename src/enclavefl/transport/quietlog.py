"""A log that any peer can trigger but no peer can flood: at most a few lines per kind of event per window.

How this works: every line names a *kind* (a short fixed string such as
``"malformed request"``, never a value a peer chose). Each kind may log
``lines_per_window`` lines per ``window_s``; further lines of that kind are
counted, not written, and the next line written for it says how many were
left out. Kinds are few and fixed by the code, but the table is bounded all
the same (the stalest kind is forgotten first).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, final

__all__ = ["QuietLog"]

_MAX_KINDS: Final = 256


@dataclass(slots=True)
class _Window:
    started: float
    written: int = 0
    suppressed: int = 0


@final
class QuietLog:
    """Rate-limited lines on one logger, per kind of event. Thread-safe.

    Example::

        quiet = QuietLog(logging.getLogger(__name__))
        quiet.warning("malformed request", "refused a malformed %s from %s", what, peer)
    """

    def __init__(self, logger: logging.Logger, *, lines_per_window: int = 5, window_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """Args:
            logger: where the lines go.
            lines_per_window: lines of one kind written per window (>= 1).
            window_s: the window's length in seconds (> 0).
            clock: monotonic seconds (tests pass their own).

        Raises:
            ValueError: a limit is not positive.
        """
        if lines_per_window < 1 or not window_s > 0:
            raise ValueError(f"QuietLog: lines_per_window >= 1 and window_s > 0, got {lines_per_window}, {window_s}")
        self.logger = logger
        self._per_window = lines_per_window
        self._window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: OrderedDict[str, _Window] = OrderedDict()

    def log(self, level: int, kind: str, msg: str, *args: object) -> bool:
        """Writes ``msg % args`` at ``level`` unless ``kind`` has used up its window; True if written."""
        if not self.logger.isEnabledFor(level):
            return False
        now = self._clock()
        with self._lock:
            window = self._windows.get(kind)
            if window is None or now - window.started >= self._window_s:
                suppressed = window.suppressed if window is not None else 0
                window = _Window(started=now)
                self._windows[kind] = window
                while len(self._windows) > _MAX_KINDS:
                    self._windows.popitem(last=False)
            else:
                suppressed = 0
            self._windows.move_to_end(kind)
            if window.written >= self._per_window:
                window.suppressed += 1
                return False
            window.written += 1
        if suppressed:
            msg += " (%d more %r lines left out in the previous %.0fs)"
            args = (*args, suppressed, kind, self._window_s)
        self.logger.log(level, msg, *args)
        return True

    def warning(self, kind: str, msg: str, *args: object) -> bool:
        """:meth:`log` at WARNING."""
        return self.log(logging.WARNING, kind, msg, *args)

    def error(self, kind: str, msg: str, *args: object) -> bool:
        """:meth:`log` at ERROR."""
        return self.log(logging.ERROR, kind, msg, *args)

    def suppressed(self, kind: str) -> int:
        """Lines of ``kind`` left out in its current window (for tests and status pages)."""
        with self._lock:
            window = self._windows.get(kind)
            return window.suppressed if window is not None else 0
