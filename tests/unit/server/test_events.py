from __future__ import annotations

import threading
import time

import pytest

from enclavefl.server.events import EventBus


def test_events_are_numbered_from_one_and_read_after_a_number() -> None:
    bus = EventBus()
    for round_ in (1, 2, 3):
        bus.publish("round", round=round_)

    batch = bus.read(1)

    assert [e.seq for e in batch.events] == [2, 3]
    assert [e.data["round"] for e in batch.events] == [2, 3]
    assert batch.missed == 0 and batch.last_seq == 3


def test_a_reader_that_fell_behind_the_ring_is_told_how_many_it_missed() -> None:
    bus = EventBus(capacity=3)
    for i in range(10):  # events 1..10; the ring keeps 8, 9, 10
        bus.publish("phase", i=i)

    batch = bus.read(2)

    assert [e.seq for e in batch.events] == [8, 9, 10]
    assert batch.missed == 5  # 3, 4, 5, 6, 7


def test_read_returns_at_most_limit_events_and_where_to_go_on() -> None:
    bus = EventBus()
    for i in range(5):
        bus.publish("phase", i=i)

    first = bus.read(0, limit=2)
    rest = bus.read(first.last_seq)

    assert [e.seq for e in first.events] == [1, 2]
    assert [e.seq for e in rest.events] == [3, 4, 5]


def test_a_waiting_reader_wakes_when_an_event_is_published() -> None:
    bus = EventBus()
    threading.Timer(0.05, lambda: bus.publish("job", state="finished")).start()

    batch = bus.read(0, timeout_s=5.0)

    assert [e.kind for e in batch.events] == ["job"]


def test_read_with_nothing_new_returns_empty_after_the_timeout() -> None:
    bus = EventBus()
    bus.publish("phase", phase="waiting")
    started = time.monotonic()

    batch = bus.read(1, timeout_s=0.05)

    assert batch.events == () and batch.last_seq == 1
    assert time.monotonic() - started >= 0.04


def test_close_wakes_waiting_readers_at_once() -> None:
    bus = EventBus()
    threading.Timer(0.05, bus.close).start()
    started = time.monotonic()

    batch = bus.read(0, timeout_s=10.0)

    assert batch.events == () and time.monotonic() - started < 5.0


def test_as_dict_flattens_the_data_beside_seq_time_and_kind() -> None:
    event = EventBus().publish("update", worker="w1", accepted=True)

    assert event.as_dict() | {"time": 0} == {"seq": 1, "time": 0, "kind": "update", "worker": "w1", "accepted": True}


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity"):
        EventBus(capacity=0)


def test_the_events_own_keys_win_over_data_keys_of_the_same_name() -> None:
    event = EventBus().publish("round", round=1, time=123.0)  # a metrics row has its own "time"

    assert event.as_dict()["time"] == round(event.time, 3) and event.as_dict()["round"] == 1
