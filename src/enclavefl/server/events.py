"""What happens in a running job, as a numbered stream of events that any number of readers follow.

How this works: parts of the PS :meth:`EventBus.publish` small JSON-able
events (a phase change, an accepted or refused update, an attestation
decision, a round's metrics row). The bus keeps the last ``capacity`` of them
in a ring, each with a sequence number. A reader (the management API's
Server-Sent Events stream, the Prometheus exporter) asks for the events after
the last number it saw, waiting up to a timeout for new ones. Readers hold no
queue of their own, so a slow or vanished reader costs the PS nothing; a
reader that fell more than ``capacity`` events behind is told how many it
missed. Publishing never blocks on a reader and never raises.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = ["EVENT_KINDS", "Event", "EventBus", "EventBatch"]

EVENT_KINDS: Final = frozenset({
    "phase",        # {"phase": "training", "round": 3}
    "round",        # a metrics row, as written to metrics.jsonl
    "update",       # {"round", "worker_id", "worker", "accepted": bool, "reason", "bytes"}
    "worker",       # {"worker_id", "worker", "state": joined|training|uploaded|dropped|left, "reason"}
    "attestation",  # {"peer", "decision": accepted|refused, "field", "reason", "evidence", "mr_enclave", "weaker"}
    "control",      # {"action": stop|pause|resume|config, "by", ...}: what an operator asked for
    "job",          # {"state": running|finished|failed|stopped, "reason"}
    "cluster",      # a scheduler's: {"event": servers|leader|store_down|store_back|store_emptied,
                    #  "servers", "joined", "left", "leader", "reason"}
})
"""The kinds of event a PS publishes, with the data each carries."""


@dataclass(frozen=True, slots=True)
class Event:
    """One thing that happened. ``seq`` increases by one per event of a bus, from 1."""

    seq: int
    time: float
    kind: str
    data: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The data with the event's own ``seq``, ``time`` and ``kind`` beside it (they win over data keys)."""
        return {**dict(self.data), "seq": self.seq, "time": round(self.time, 3), "kind": self.kind}


@dataclass(frozen=True, slots=True)
class EventBatch:
    """What a reader gets: the events after its last, and how many it missed by falling behind."""

    events: tuple[Event, ...]
    missed: int
    last_seq: int
    """The sequence number to ask after next time (the last event's, or the bus's latest if none)."""


class EventBus:
    """A bounded, thread-safe ring of events with blocking reads by sequence number."""

    def __init__(self, capacity: int = 2048) -> None:
        if capacity < 1:
            raise ValueError(f"EventBus capacity must be >= 1, got {capacity}")
        self._ring: deque[Event] = deque(maxlen=capacity)
        self._cond = threading.Condition()
        self._seq = 0
        self._closed = False

    @property
    def last_seq(self) -> int:
        """The number of the newest event (0 before the first)."""
        with self._cond:
            return self._seq

    def publish(self, kind: str, **data: Any) -> Event:
        """Adds an event and wakes every waiting reader. Values must be JSON-able."""
        with self._cond:
            self._seq += 1
            event = Event(self._seq, time.time(), kind, data)
            self._ring.append(event)
            self._cond.notify_all()
        return event

    def read(self, after: int, *, timeout_s: float = 0.0, limit: int = 1000) -> EventBatch:
        """The events numbered above ``after`` (at most ``limit``), waiting up to ``timeout_s`` for one.

        Returns an empty batch when the timeout passes or the bus is closed.
        """
        deadline = time.monotonic() + max(timeout_s, 0.0)
        with self._cond:
            while self._seq <= after and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or math.isnan(remaining):
                    break
                self._cond.wait(remaining)
            if self._seq <= after:
                return EventBatch((), 0, self._seq)
            oldest = self._ring[0].seq
            missed = max(0, oldest - after - 1)
            start = max(after + 1, oldest) - oldest
            events = tuple(itertools.islice(self._ring, start, start + max(limit, 1)))
            return EventBatch(events, missed, events[-1].seq)

    def close(self) -> None:
        """Wakes every reader; later reads return at once. Publishing still works (late events are kept)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        with self._cond:
            return self._closed
