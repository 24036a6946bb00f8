"""Tests for the settings seam behind enclavefl.server.handle: changes between rounds, validated like the job file."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from enclavefl.errors import ConfigError
from tests.unit.server.live_job import Gate, LiveJob, job, start, wait_for


def test_settings_list_the_changeable_keys_of_a_sync_job(live: list[LiveJob], tmp_path: Path) -> None:
    j = start(live, tmp_path, Gate(0), rounds=3)

    settings = j.handle.settings()

    assert settings == {
        "job.rounds": 3, "round.min_workers": 2, "round.start_window_s": 20.0, "round.fraction": 1.0,
        "round.update_ratio": 1.0, "round.update_window_s": 20.0, "round.min_updates": 1, "round.max_retries": 0,
        "client.epochs": 1, "client.batch_size": 4, "client.lr": 0.5,
    }


def test_settings_of_an_async_job_have_buffer_size_not_fraction(live: list[LiveJob], tmp_path: Path) -> None:
    j = start(live, tmp_path, Gate(0), mode="async")

    settings = j.handle.settings()

    assert settings["round.buffer_size"] == 2
    assert "round.fraction" not in settings and "round.update_ratio" not in settings


def test_patched_fraction_samples_fewer_from_the_next_round(live: list[LiveJob], tmp_path: Path) -> None:
    gate = Gate(0)
    j = start(live, tmp_path, gate, rounds=2, workers=4)
    wait_for(lambda: j.handle.status().participants == 4, what="round 1 open")

    after = j.handle.patch_settings({"round.fraction": 0.5, "round.min_workers": 2}, by="erin")
    gate.allow(10)
    j.wait_done()

    assert (after["round.fraction"], after["round.min_workers"]) == (0.5, 2)
    # Round 2 samples max(min_workers 2, ceil(0.5 * 4 workers)) = 2; round 1 had opened with all 4.
    assert [r["sampled"] for r in j.ps.metrics.history] == [4, 2]
    events = [dict(e.data) for e in j.handle.events.read(0).events if e.kind == "control"]
    assert events == [{"action": "config", "by": "erin", "changes": {"round.fraction": 0.5, "round.min_workers": 2}}]


def test_patched_client_lr_reaches_the_workers_from_the_next_round(live: list[LiveJob], tmp_path: Path) -> None:
    gate = Gate(0)
    j = start(live, tmp_path, gate, rounds=2)
    wait_for(lambda: j.handle.status().participants == 2, what="round 1 open")

    j.handle.patch_settings({"client.lr": 0.25}, by="op")
    gate.allow(10)
    j.wait_done()

    assert [[c.lr for c in t.configs] for t in j.trainers] == [[0.5, 0.25], [0.5, 0.25]]


def test_patched_rounds_lengthen_the_job(live: list[LiveJob], tmp_path: Path) -> None:
    gate = Gate(0)
    j = start(live, tmp_path, gate, rounds=1)
    wait_for(lambda: j.handle.status().participants == 2, what="round 1 open")

    j.handle.patch_settings({"job.rounds": 3}, by="op")
    gate.allow(10)
    j.wait_done()

    assert [r["round"] for r in j.ps.metrics.history] == [1, 2, 3]
    assert (j.handle.status().rounds, j.handle.status().state) == (3, "finished")


def test_rounds_below_the_open_round_are_refused(live: list[LiveJob], tmp_path: Path) -> None:
    gate = Gate(1)
    j = start(live, tmp_path, gate, rounds=4)
    wait_for(lambda: j.handle.status().rounds_done == 1 and j.handle.status().participants == 2,
             what="round 2 open")

    with pytest.raises(ConfigError, match=r"job.rounds = 1: must be at least 2 \(round 2 is open\)"):
        j.handle.patch_settings({"job.rounds": 1}, by="op")
    assert j.handle.settings()["job.rounds"] == 4


@pytest.mark.parametrize(("changes", "message"), [
    ({"round.fraction": 2}, r"round\.fraction"),
    ({"round.min_workers": 0}, r"round\.min_workers"),
    ({"client.lr": "fast"}, r"client\.lr"),
    ({"round.nope": 1}, r"round\.nope: is not a setting"),
    ({"round.mode": "async"}, r"round\.mode: may not change while the job runs"),
    ({"round.buffer_size": 8}, r"round\.buffer_size: may not change while the job runs"),
])
def test_bad_patches_are_refused_naming_the_key(live: list[LiveJob], tmp_path: Path, changes: dict[str, Any],
                                                message: str) -> None:
    j = start(live, tmp_path, Gate(0), rounds=2)
    before = j.handle.settings()

    with pytest.raises(ConfigError, match=message):
        j.handle.patch_settings(changes, by="op")
    assert j.handle.settings() == before


def test_a_patch_is_applied_whole_or_not_at_all(live: list[LiveJob], tmp_path: Path) -> None:
    j = start(live, tmp_path, Gate(0), rounds=2)

    with pytest.raises(ConfigError, match=r"round\.update_ratio"):
        j.handle.patch_settings({"client.lr": 0.1, "round.update_ratio": 0}, by="op")

    assert j.handle.settings()["client.lr"] == 0.5


def test_reads_and_control_from_many_threads_while_rounds_run(live: list[LiveJob], tmp_path: Path) -> None:
    j = start(live, tmp_path, Gate(), rounds=4)
    errors: list[BaseException] = []
    done = threading.Event()

    def poll() -> None:
        try:
            while not done.is_set():
                j.handle.status()
                j.handle.workers()
                j.handle.rounds(0, 10)
                j.handle.settings()
                j.handle.patch_settings({"client.epochs": 1}, by="poller")
        except BaseException as exc:  # reported below
            errors.append(exc)

    pollers = [threading.Thread(target=poll, daemon=True) for _ in range(3)]
    for t in pollers:
        t.start()
    j.wait_done()
    done.set()
    for t in pollers:
        t.join(5)

    assert errors == []
    assert j.handle.status().rounds_done == 4
