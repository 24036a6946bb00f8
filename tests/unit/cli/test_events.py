"""Tests for enclavefl.cli.events: the PS's warnings file and the console's rate-limited view of it."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from enclavefl.cli.events import EventFeed, EventsFileHandler, console_text


@pytest.fixture
def handler(tmp_path: Path) -> Iterator[EventsFileHandler]:
    h = EventsFileHandler(tmp_path / "events.jsonl")
    logger = logging.getLogger("enclavefl.test_events")
    logger.addHandler(h)
    logger.setLevel(logging.INFO)
    yield h
    logger.removeHandler(h)
    h.close()


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_handler_writes_warnings_and_marked_events_but_not_plain_info(handler: EventsFileHandler) -> None:
    log = logging.getLogger("enclavefl.test_events")

    log.info("ps %s round %d: accepted update", "abc123abc123", 1)
    log.warning("ps %s round %d: worker %s dropped", "abc123abc123", 2, "w-1")
    log.info("ps %s round %d: the first round opens", "abc123abc123", 1, extra={"event": "first_round"})

    events = read(handler.path)
    assert [(e["level"], e["event"], e["template"]) for e in events] == [
        ("warning", None, "ps %s round %d: worker %s dropped"),
        ("info", "first_round", "ps %s round %d: the first round opens"),
    ]
    assert events[0]["message"] == "ps abc123abc123 round 2: worker w-1 dropped"


def test_handler_ignores_other_libraries(handler: EventsFileHandler) -> None:
    other = logging.getLogger("grpc._server")
    other.addHandler(handler)
    try:
        other.warning("a gRPC warning")
    finally:
        other.removeHandler(handler)

    assert handler.path.read_text() == ""


def test_console_text_drops_the_ps_instance_and_keeps_one_line() -> None:
    assert console_text({"message": "ps 0123456789ab round 3: gave up\nsecond line"}) == "round 3: gave up"


def write(path: Path, *events: dict[str, Any]) -> None:
    with path.open("a") as f:
        for e in events:
            f.write(json.dumps(e) + "\n")


def event(template: str, message: str) -> dict[str, Any]:
    return {"level": "warning", "template": template, "message": message}


def test_feed_shows_one_line_per_template_per_window_and_counts_the_rest(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "events.jsonl"
    shown: list[str] = []
    feed = EventFeed(path, lambda e, text: shown.append(text), repeat_s=10)
    rejected = "rejected update from %s"

    # Execute: three rejections and one drop at t=0, a fourth rejection at t=11.
    write(path, event(rejected, "rejected update from w-1"), event(rejected, "rejected update from w-2"),
          event("dropped %s", "dropped w-3"), event(rejected, "rejected update from w-4"))
    feed.poll(now=0.0)
    write(path, event(rejected, "rejected update from w-5"))
    feed.poll(now=11.0)

    # Assert
    assert shown == ["rejected update from w-1", "dropped w-3", "rejected update from w-5  (+2 more like this)"]


def test_feed_flush_reports_lines_still_held_back(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    shown: list[str] = []
    feed = EventFeed(path, lambda e, text: shown.append(text), repeat_s=10)
    write(path, *(event("retry %d", f"retry {i}") for i in range(4)))

    feed.poll(now=0.0)
    feed.flush()

    assert shown == ["retry 0", "retry 3  (and 2 more like this)"]


def test_feed_waits_for_a_line_to_be_complete_and_skips_old_events(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    write(path, event("old", "from an earlier run"))
    shown: list[str] = []
    feed = EventFeed(path, lambda e, text: shown.append(text))

    with path.open("a") as f:
        f.write('{"level": "warning", "template": "t", "message": "half')
    feed.poll(now=0.0)
    assert shown == []
    with path.open("a") as f:
        f.write(' written"}\n')
    feed.poll(now=0.0)

    assert shown == ["half written"]
