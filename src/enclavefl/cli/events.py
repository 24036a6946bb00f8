"""``events.jsonl``: what went wrong in the PS, for the ``enclavefl run`` console.

How this works: the PS process logs as always (``logs/ps.log``); a second
logging handler, :class:`EventsFileHandler`, also appends every enclavefl
record at WARNING or above, and every record logged with an ``event`` extra
(``log.info(..., extra={"event": "first_round"})``), to ``events.jsonl`` as one
JSON object per line: ``time``, ``level``, ``logger``, ``event``, ``template``
(the unformatted message, which names the kind of event) and ``message``. The
``run`` parent reads new complete lines as it reads ``metrics.jsonl``
(:class:`EventFeed`) and shows each as one console line, at most one line per
template every :data:`REPEAT_S` seconds; the lines it holds back are counted
and the count shown with the next line of that template or at the end.

A file, rather than parsing ``ps.log``: the log's format is for people and may
change, and a PS on another host writes the same file into its ``--out``.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, final

__all__ = ["REPEAT_S", "EventFeed", "EventsFileHandler", "console_text"]

REPEAT_S = 10.0
"""The console shows at most one line per kind of event (template) in this many seconds."""

_PS_PREFIX = re.compile(r"^ps [0-9a-f]{6,} ")


@final
class EventsFileHandler(logging.Handler):
    """Appends enclavefl's warnings and marked events to a JSON-lines file, flushed line by line."""

    def __init__(self, path: Path) -> None:
        super().__init__(logging.INFO)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file: IO[str] | None = path.open("a", encoding="utf-8")

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "event", None)
        if not record.name.startswith("enclavefl") or (record.levelno < logging.WARNING and event is None):
            return
        try:
            line = json.dumps({
                "time": round(record.created, 3),
                "level": record.levelname.lower(),
                "logger": record.name,
                "event": event,
                "template": str(record.msg),
                "message": record.getMessage(),
            }, separators=(",", ":"))
            if self._file is not None:
                self._file.write(line + "\n")
                self._file.flush()
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self.acquire()
        try:
            if self._file is not None:
                self._file.close()
                self._file = None
        finally:
            self.release()
        super().close()


def console_text(event: dict[str, Any]) -> str:
    """An event as one console line: the PS instance prefix dropped, only the first line kept."""
    message = str(event.get("message", "")).strip()
    message = message.splitlines()[0] if message else "(empty event)"
    return _PS_PREFIX.sub("", message)


@dataclass
class _Held:
    last_shown: float
    held: int = 0
    last_text: str = ""


@final
class EventFeed:
    """Reads the events a PS appends and shows them, rate-limited per template."""

    def __init__(self, path: Path, show: Callable[[dict[str, Any], str], None], *,
                 repeat_s: float = REPEAT_S) -> None:
        """Follows ``path`` from its current end (a resumed run's old events are not shown again).

        Args:
            show: prints one event: the event and its text (with a "+N like this" note if lines were held).
            repeat_s: the least time between two lines of one template.
        """
        self._path = path
        self._show = show
        self._repeat_s = repeat_s
        self._offset = path.stat().st_size if path.exists() else 0
        self._templates: dict[str, _Held] = {}
        self.seen: list[dict[str, Any]] = []
        """Every event read, shown or held."""

    def poll(self, now: float | None = None) -> None:
        """Shows the events appended since the last poll (complete lines only)."""
        now = time.monotonic() if now is None else now
        try:
            with self._path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1
        self._offset += end
        for raw in data[:end].splitlines():
            try:
                event = json.loads(raw)
            except ValueError:
                continue  # a torn or foreign line: the log has it
            if isinstance(event, dict):
                self.seen.append(event)
                self._offer(event, now)

    def _offer(self, event: dict[str, Any], now: float) -> None:
        text = console_text(event)
        key = str(event.get("template", text))
        state = self._templates.get(key)
        if state is not None and now - state.last_shown < self._repeat_s:
            state.held += 1
            state.last_text = text
            return
        if state is not None and state.held:
            text += f"  (+{state.held} more like this)"
        self._templates[key] = _Held(now)
        self._show(event, text)

    def flush(self) -> None:
        """Says how many lines were held back at the end, one line per template."""
        for state in self._templates.values():
            if state.held:
                self._show({"level": "warning"}, f"{state.last_text}  (and {state.held - 1} more like this)"
                           if state.held > 1 else state.last_text)
                state.held = 0
