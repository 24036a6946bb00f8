from __future__ import annotations

import asyncio
import threading

from enclavefl.management.sse import format_event, format_missed, stream_events
from enclavefl.server.events import EventBus


async def _collect(bus: EventBus, after: int, *, ended: bool = False, limit: int = 100) -> list[bytes]:
    chunks: list[bytes] = []
    async for chunk in stream_events(bus, after, ended=lambda: ended, stopping=threading.Event(),
                                     heartbeat_s=0.05, poll_s=0.05):
        chunks.append(chunk)
        if len(chunks) >= limit:
            break
    return chunks


def test_an_event_is_one_message_with_its_sequence_number_as_id() -> None:
    bus = EventBus()
    event = bus.publish("round", round=3)

    text = format_event(event).decode()

    assert text.startswith("id: 1\nevent: round\ndata: {")
    assert '"round":3' in text and text.endswith("\n\n")


def test_missed_events_are_announced() -> None:
    assert format_missed(5, 12) == b'event: missed\ndata: {"missed": 5, "last_seq": 12}\n\n'


def test_the_stream_resumes_after_the_last_event_id_and_ends_with_the_bus() -> None:
    bus = EventBus()
    for i in range(4):
        bus.publish("phase", i=i)
    bus.close()

    chunks = asyncio.run(_collect(bus, after=2))

    ids = [c.decode().split("\n")[0] for c in chunks if c.startswith(b"id:")]
    assert ids == ["id: 3", "id: 4"]


def test_the_stream_ends_when_the_job_has_ended() -> None:
    bus = EventBus()
    bus.publish("job", state="finished")

    chunks = asyncio.run(_collect(bus, after=0, ended=True))

    assert sum(c.startswith(b"id:") for c in chunks) == 1  # the stream returned by itself


def test_a_quiet_stream_sends_heartbeat_comments() -> None:
    bus = EventBus()

    chunks = asyncio.run(_collect(bus, after=0, limit=3))

    assert b": heartbeat\n\n" in chunks


def test_a_reader_behind_the_ring_is_told_what_it_missed() -> None:
    bus = EventBus(capacity=2)
    for i in range(5):
        bus.publish("phase", i=i)
    bus.close()

    chunks = asyncio.run(_collect(bus, after=0))

    assert chunks[1].startswith(b"event: missed")  # after the retry hint; events 1..3 fell out of the ring
