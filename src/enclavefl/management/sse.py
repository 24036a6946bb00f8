"""``GET /api/v1/events``: a job's :class:`~enclavefl.server.events.EventBus` as Server-Sent Events.

How this works: each event becomes one SSE message whose ``id`` is its
sequence number and whose ``event`` is its kind, so a browser's
``EventSource`` that reconnects sends ``Last-Event-ID`` and resumes after
the last event it saw. The bus is read with a short timeout on a worker
thread, never on the event loop, and the reader holds no queue: a slow
client costs the PS nothing, and one that fell too far behind is told how
many events it missed (an ``event: missed`` message). A comment line goes
out every ``heartbeat_s`` while nothing happens, so proxies keep the stream
open. The stream ends when the job has ended and every event was sent, when
the bus is closed, or when the server stops.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Final

from enclavefl.server.events import Event, EventBus

__all__ = ["HEARTBEAT_S", "format_event", "format_missed", "stream_events"]

HEARTBEAT_S: Final = 15.0
_POLL_S: Final = 1.0
_STATE_EVERY_S: Final = 5.0
_BATCH: Final = 200


def format_event(event: Event) -> bytes:
    """One SSE message: ``id`` the sequence number, ``event`` the kind, ``data`` the event as one JSON line."""
    data = json.dumps(event.as_dict(), separators=(",", ":"), default=str)
    return f"id: {event.seq}\nevent: {event.kind}\ndata: {data}\n\n".encode()


def format_missed(missed: int, last_seq: int) -> bytes:
    """The message telling a reader that ``missed`` events fell out of the ring before it read them."""
    return f"event: missed\ndata: {json.dumps({'missed': missed, 'last_seq': last_seq})}\n\n".encode()


async def stream_events(bus: EventBus, after: int, *, ended: Callable[[], bool], stopping: threading.Event,
                        heartbeat_s: float = HEARTBEAT_S, poll_s: float = _POLL_S) -> AsyncIterator[bytes]:
    """The SSE byte stream of ``bus`` from the event after ``after`` on.

    Args:
        after: the last sequence number the client has (0: from the oldest event kept).
        ended: whether the job has ended (called at most every few seconds while idle, on a thread).
        stopping: set when the API server stops; the stream ends at its next poll.
        heartbeat_s: a comment line goes out after this long without an event.
        poll_s: the longest a single read of the bus waits.
    """
    yield b"retry: 3000\n\n"
    last_sent = time.monotonic()
    last_state_check = 0.0
    while not stopping.is_set():
        batch = await asyncio.to_thread(bus.read, after, timeout_s=poll_s, limit=_BATCH)
        if batch.missed:
            yield format_missed(batch.missed, batch.last_seq)
        for event in batch.events:
            yield format_event(event)
        after = batch.last_seq
        now = time.monotonic()
        if batch.events:
            last_sent = now
            continue
        if bus.closed:
            return
        if now - last_state_check >= _STATE_EVERY_S:
            last_state_check = now
            if await asyncio.to_thread(ended):
                # Events published just before the end are still sent: one more read, then stop.
                tail = await asyncio.to_thread(bus.read, after, timeout_s=0.0, limit=_BATCH)
                for event in tail.events:
                    yield format_event(event)
                return
        if now - last_sent >= heartbeat_s:
            last_sent = now
            yield b": heartbeat\n\n"
