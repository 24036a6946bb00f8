"""Tests for the stop seam behind enclavefl.server.handle: stop(finish) and stop(abort) on a real running PS."""

from __future__ import annotations

from pathlib import Path

import pytest

from enclavefl.errors import ConfigError
from enclavefl.server.checkpoint import latest_checkpoint
from tests.unit.server.live_job import Gate, LiveJob, controls, job, start, wait_for


def test_stop_finish_completes_the_open_round_then_ends(live: list[LiveJob], tmp_path: Path) -> None:
    gate = Gate(0)
    j = start(live, tmp_path, gate, rounds=5, checkpoint_every=100)
    wait_for(lambda: j.handle.status().participants == 2, what="round 1 open")

    j.handle.stop("finish", by="carol")
    gate.allow(10)
    j.wait_done()  # the workers returned: FINISH reached them
    status = j.handle.status()
    checkpoint = latest_checkpoint(tmp_path / "checkpoints")

    assert (status.state, status.rounds_done, status.failure) == ("stopped", 1, None)
    assert [r["round"] for r in j.ps.metrics.history] == [1]
    assert checkpoint is not None and checkpoint.round == 1 and checkpoint.model_version == 1
    assert [len(t.configs) for t in j.trainers] == [1, 1]
    ends = [dict(e.data) for e in j.handle.events.read(0).events if e.kind == "job"]
    assert [e["state"] for e in ends] == ["stopped"]
    assert controls(j) == [{"action": "stop", "by": "carol", "mode": "finish"}]


def test_stop_abort_abandons_the_open_round_and_keeps_the_last_completed(live: list[LiveJob],
                                                                        tmp_path: Path) -> None:
    gate = Gate(1)
    j = start(live, tmp_path, gate, rounds=5, checkpoint_every=100)
    wait_for(lambda: j.handle.status().rounds_done == 1 and j.handle.status().participants == 2,
             what="round 2 open")

    j.handle.stop("abort", by="dave")
    wait_for(lambda: j.handle.status().state == "stopped", what="the job to end")
    gate.allow(10)  # the workers' round-2 fits end; their pushes are refused, then they hear FINISH
    j.wait_done()
    checkpoint = latest_checkpoint(tmp_path / "checkpoints")

    assert j.handle.status().rounds_done == 1
    assert [r["round"] for r in j.ps.metrics.history] == [1]
    assert checkpoint is not None and checkpoint.round == 1


def test_stop_finish_while_paused_between_rounds_ends_at_once(live: list[LiveJob], tmp_path: Path) -> None:
    gate = Gate(0)
    j = start(live, tmp_path, gate, rounds=5)
    wait_for(lambda: j.handle.status().participants == 2, what="round 1 open")
    j.handle.pause(by="op")
    gate.allow(1)
    wait_for(lambda: j.handle.status().rounds_done == 1, what="round 1 done")

    j.handle.stop("finish", by="op")
    j.wait_done()

    assert j.handle.status().state == "stopped"
    assert [r["round"] for r in j.ps.metrics.history] == [1]


def test_stop_after_the_job_ended_changes_nothing(live: list[LiveJob], tmp_path: Path) -> None:
    j = start(live, tmp_path, Gate(), rounds=1)
    j.wait_done()

    j.handle.stop("abort", by="late")

    assert j.handle.status().state == "finished"
    assert controls(j) == []
    assert j.handle.pause(by="late") is False


def test_stop_refuses_an_unknown_mode(live: list[LiveJob], tmp_path: Path) -> None:
    j = start(live, tmp_path, Gate(0), rounds=1)

    with pytest.raises(ConfigError, match="'later'"):
        j.handle.stop("later", by="x")  # type: ignore[arg-type]


def test_async_stop_finish_completes_the_open_step_then_ends(live: list[LiveJob], tmp_path: Path) -> None:
    gate = Gate(0)
    j = start(live, tmp_path, gate, rounds=5, mode="async", checkpoint_every=100)
    wait_for(lambda: [w.state for w in j.handle.workers()] == ["training", "training"], what="tasks handed")

    j.handle.stop("finish", by="op")
    gate.allow(10)
    j.wait_done()
    checkpoint = latest_checkpoint(tmp_path / "checkpoints")

    assert j.handle.status().state == "stopped"
    assert [r["round"] for r in j.ps.metrics.history] == [1]
    assert checkpoint is not None and checkpoint.round == 1
