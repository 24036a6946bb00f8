"""Tests for the pause seam behind enclavefl.server.handle: pause and resume on a real running PS."""

from __future__ import annotations

import time
from pathlib import Path

from tests.unit.server.live_job import Gate, LiveJob, controls, start, wait_for

SETTLE_S = 0.6
"""How long a test watches for something that must NOT happen (a round opening while paused)."""


def test_pause_holds_the_next_round_and_resume_continues(live: list[LiveJob], tmp_path: Path) -> None:
    gate = Gate(0)
    j = start(live, tmp_path, gate, rounds=2)
    wait_for(lambda: j.handle.status().participants == 2, what="round 1 open")

    assert j.handle.pause(by="alice") is True
    gate.allow(2)  # round 1 runs on; round 2 may not open
    wait_for(lambda: j.handle.status().rounds_done == 1, what="round 1 done")
    time.sleep(SETTLE_S)
    paused = j.handle.status()
    fits_while_paused = [len(t.configs) for t in j.trainers]
    assert j.handle.resume(by="bob") is True
    j.wait_done()

    assert (paused.state, paused.phase, paused.round, paused.participants) == ("paused", "waiting", 2, 0)
    assert fits_while_paused == [1, 1]
    assert j.handle.status().rounds_done == 2
    assert controls(j) == [{"action": "pause", "by": "alice"}, {"action": "resume", "by": "bob"}]


def test_pause_twice_and_resume_when_running_say_false(live: list[LiveJob], tmp_path: Path) -> None:
    j = start(live, tmp_path, Gate(0), rounds=1)

    first, second = j.handle.pause(by="a"), j.handle.pause(by="a")
    resumed, again = j.handle.resume(by="a"), j.handle.resume(by="a")

    assert (first, second, resumed, again) == (True, False, True, False)
    assert len(controls(j)) == 2


def test_async_pause_hands_out_no_task_and_resume_continues(live: list[LiveJob], tmp_path: Path) -> None:
    gate = Gate(0)
    j = start(live, tmp_path, gate, rounds=2, mode="async", update_window_s=2)
    wait_for(lambda: [w.state for w in j.handle.workers()] == ["training", "training"], what="tasks handed")

    j.handle.pause(by="op")
    gate.allow(10)  # the step in progress runs on and closes
    wait_for(lambda: j.handle.status().rounds_done == 1, what="step 1 done")
    time.sleep(SETTLE_S)
    paused = j.handle.status()
    fits_while_paused = [len(t.configs) for t in j.trainers]
    j.handle.resume(by="op")
    j.wait_done()

    assert (paused.state, paused.rounds_done, paused.updates) == ("paused", 1, 0)
    assert fits_while_paused == [1, 1]
    assert j.handle.status().state == "finished"
    assert len(j.ps.metrics.history) == 2
