"""Tests for worker liveness (enclavefl.server.liveness and the PS around it), driven in-process.

The test plays the workers by calling the handler methods the gRPC service
calls, while ParameterServer.run() runs the rounds on its own thread. Windows
are long (30 s) and the liveness timeout short (0.4 s), so a round that closes
within a couple of seconds closed because a silent worker was dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from enclavefl.config import JobConfig, parse_job
from enclavefl.errors import ConfigError, RoundError, StaleSession, UpdateRejected
from enclavefl.messages import PeerIdentity, TaskInfo, TaskKind, UpdateMeta
from enclavefl.server.checkpoint import latest_checkpoint
from enclavefl.server.ps import ParameterServer
from enclavefl.tensors import ParamSet, StreamHeader, iter_chunks

INITIAL = ParamSet({"w": np.asarray([1, 2], dtype=np.float32)})
DELTA = ParamSet({"w": np.asarray([2, 4], dtype=np.float32)})

PEER_A = PeerIdentity(fingerprint="a" * 64, label="worker-a")
PEER_B = PeerIdentity(fingerprint="b" * 64, label="worker-b")

TIMEOUT_S = 0.4


def job(**round_section: Any) -> JobConfig:
    section: dict[str, Any] = {"min_workers": 2, "start_window_s": 30, "update_window_s": 30, "max_retries": 0,
                               "heartbeat_s": 0.1, "worker_timeout_s": TIMEOUT_S}
    section.update(round_section)
    rounds = section.pop("rounds", 1)
    return parse_job({"job": {"rounds": rounds}, "round": section, "server": {"checkpoint_every": 10},
                      "attestation": {"mode": "none"}})


class Running:
    """ps.run() on a thread; remembers what it raised and when it returned."""

    def __init__(self, ps: ParameterServer) -> None:
        self.ps = ps
        self.error: BaseException | None = None
        self.ended_at: float | None = None
        self.thread = threading.Thread(target=self._run, name="ps-engine", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.ps.run()
        except BaseException as exc:  # reported by the test
            self.error = exc
        self.ended_at = time.monotonic()

    def join(self, timeout_s: float) -> None:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "ps.run() did not return"


class LiveWorker:
    """A worker on a thread that polls, pushes DELTA when told to train, and stops at FINISH or stop()."""

    def __init__(self, ps: ParameterServer, peer: PeerIdentity, worker_id: str) -> None:
        self.ps, self.peer, self.worker_id = ps, peer, worker_id
        self.pushed: list[int] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"live-{peer.label}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                task = self.ps.wait_task(self.peer, self.worker_id, 0.1)
            except StaleSession:
                return
            if task.kind is TaskKind.FINISH:
                return
            if task.kind is TaskKind.TRAIN and task.round not in self.pushed:
                push(self.ps, self.peer, self.worker_id, task.round, task.model_version)
                self.pushed.append(task.round)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(5)


@pytest.fixture
def running() -> Iterator[Callable[[ParameterServer], Running]]:
    started: list[tuple[Running, ParameterServer]] = []

    def start(ps: ParameterServer) -> Running:
        r = Running(ps)
        started.append((r, ps))
        return r

    yield start
    for r, ps in started:  # a failed test must not leave the engine running
        ps.stop()
        r.thread.join(15)


def push(ps: ParameterServer, peer: PeerIdentity, worker_id: str, round_: int = 1, version: int = 0) -> None:
    meta = UpdateMeta(worker_id, round_, version, 1, StreamHeader.of(DELTA), {"loss": 0.5})
    sink = ps.open_update(peer, meta)
    for chunk in iter_chunks(DELTA, 8):
        sink.feed(bytes(chunk))
    sink.commit()


def next_task(ps: ParameterServer, peer: PeerIdentity, worker_id: str, timeout_s: float = 5.0) -> TaskInfo:
    """Polls (as a worker does) until the PS says something other than WAIT."""
    deadline = time.monotonic() + timeout_s
    while True:
        task = ps.wait_task(peer, worker_id, 1.0)
        if task.kind is not TaskKind.WAIT or time.monotonic() > deadline:
            return task


def wait_for(predicate: Callable[[], bool], timeout_s: float) -> float:
    """Waits until ``predicate()``; returns when it became true (time.monotonic)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"not true within {timeout_s}s"
        time.sleep(0.02)
    return time.monotonic()


def test_join_tells_the_worker_how_often_to_be_heard(tmp_path: Path) -> None:
    ps = ParameterServer(job(heartbeat_s=0.25, worker_timeout_s=1), INITIAL, out_dir=tmp_path)

    info = ps.join(PEER_A, "a", 10)

    assert info.heartbeat_s == 0.25


def test_long_poll_ends_by_heartbeat_s(tmp_path: Path) -> None:
    # No round opens (one of min_workers=2 joined): the poll returns WAIT at heartbeat_s, not at max_wait_s.
    ps = ParameterServer(job(heartbeat_s=0.1), INITIAL, out_dir=tmp_path)
    a = ps.join(PEER_A, "a", 10).worker_id

    t0 = time.monotonic()
    task = ps.wait_task(PEER_A, a, 5.0)

    assert task.kind is TaskKind.WAIT
    assert time.monotonic() - t0 < 1.0


def test_silent_worker_is_dropped_after_worker_timeout_s(
    tmp_path: Path, running: Callable[[ParameterServer], Running], caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: A and B are told to train; A keeps beating, B says nothing more.
    caplog.set_level(logging.INFO, logger="enclavefl.server")
    ps = ParameterServer(job(), INITIAL, out_dir=tmp_path)
    a = ps.join(PEER_A, "a", 10).worker_id
    b = ps.join(PEER_B, "b", 10).worker_id
    running(ps)
    assert next_task(ps, PEER_A, a).kind is TaskKind.TRAIN
    assert next_task(ps, PEER_B, b).kind is TaskKind.TRAIN
    b_last_heard = time.monotonic()

    # Execute
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(0.05):
            ps.heartbeat(PEER_A, a)

    beater = threading.Thread(target=beat, daemon=True)
    beater.start()
    try:
        dropped_at = wait_for(lambda: b not in ps.core.registry, 3.0)
        assert a in ps.core.registry
    finally:
        stop.set()
        beater.join(2)

    # Assert: not before the timeout, well before the 30 s window; said once, as a warning naming B.
    assert dropped_at - b_last_heard >= TIMEOUT_S
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "dropped" in r.getMessage()]
    assert len(warnings) == 1 and f"worker {b} (b) dropped (silent for" in warnings[0]
    with pytest.raises(StaleSession):
        ps.heartbeat(PEER_B, b)


def test_round_closes_at_once_when_the_other_sampled_workers_are_done(
    tmp_path: Path, running: Callable[[ParameterServer], Running]
) -> None:
    # Prepare
    ps = ParameterServer(job(), INITIAL, out_dir=tmp_path)
    a = ps.join(PEER_A, "a", 10).worker_id
    b = ps.join(PEER_B, "b", 10).worker_id
    engine = running(ps)
    assert next_task(ps, PEER_B, b).kind is TaskKind.TRAIN
    t0 = time.monotonic()

    # Execute: A trains and pushes; B went silent after its task.
    live = LiveWorker(ps, PEER_A, a)
    engine.join(10)
    live.stop()

    # Assert: the round closed when B was dropped, not by its 30 s window, with A's update alone.
    assert engine.error is None, engine.error
    assert engine.ended_at is not None and engine.ended_at - t0 < 5.0
    (row,) = ps.metrics.history
    assert (row["participants"], row["sampled"], row["dropped"], row["dropped_ids"]) == (1, 2, 1, [b])
    assert ps.params == ParamSet({"w": np.asarray([3, 6], dtype=np.float32)})  # [1, 2] + [2, 4], by hand


def test_worker_heard_through_heartbeats_is_kept_while_it_trains(
    tmp_path: Path, running: Callable[[ParameterServer], Running]
) -> None:
    # A "trains" for five timeouts, beating meanwhile, then pushes: kept, and its update counts.
    ps = ParameterServer(job(min_workers=1), INITIAL, out_dir=tmp_path)
    a = ps.join(PEER_A, "a", 10).worker_id
    engine = running(ps)
    assert next_task(ps, PEER_A, a).kind is TaskKind.TRAIN

    end = time.monotonic() + 5 * TIMEOUT_S
    while time.monotonic() < end:
        ps.heartbeat(PEER_A, a)
        time.sleep(0.05)
    push(ps, PEER_A, a)
    assert next_task(ps, PEER_A, a).kind is TaskKind.FINISH
    engine.join(15)

    assert engine.error is None, engine.error
    (row,) = ps.metrics.history
    assert (row["participants"], row["dropped"], row["dropped_ids"]) == (1, 0, [])


def test_job_fails_after_one_start_window_when_a_lost_worker_does_not_return(
    tmp_path: Path, running: Callable[[ParameterServer], Running]
) -> None:
    # Prepare: 3 rounds, both workers needed; B goes silent in round 2. max_retries=5 would
    # allow five more start windows: a lost worker is not waited for more than one.
    ps = ParameterServer(job(rounds=3, start_window_s=0.5, max_retries=5), INITIAL, out_dir=tmp_path)
    a = ps.join(PEER_A, "a", 10).worker_id
    b = ps.join(PEER_B, "b", 10).worker_id
    engine = running(ps)
    live = LiveWorker(ps, PEER_A, a)
    assert next_task(ps, PEER_B, b).kind is TaskKind.TRAIN
    push(ps, PEER_B, b, 1, 0)
    assert next_task(ps, PEER_B, b).round == 2  # B's round-2 task; then B is silent
    t0 = time.monotonic()

    # Execute
    engine.join(10)
    live.stop()

    # Assert: round 2 closed with A alone, round 3 never opened, and the job failed after one start window.
    assert isinstance(engine.error, RoundError)
    assert "fewer than min_workers=2" in str(engine.error) and "b (lost)" in str(engine.error)
    assert engine.ended_at is not None and engine.ended_at - t0 < TIMEOUT_S + 0.5 + 3.0
    assert [r["round"] for r in ps.metrics.history] == [1, 2]
    assert ps.metrics.history[1]["dropped_ids"] == [b]
    ckpt = latest_checkpoint(tmp_path / "checkpoints")  # checkpoint_every=10: written because the job failed
    assert ckpt is not None and ckpt.round == 2


def test_rejected_updates_are_named_in_the_metrics_row(
    tmp_path: Path, running: Callable[[ParameterServer], Running]
) -> None:
    ps = ParameterServer(job(min_workers=1), INITIAL, out_dir=tmp_path)
    a = ps.join(PEER_A, "a", 10).worker_id
    engine = running(ps)
    assert next_task(ps, PEER_A, a).kind is TaskKind.TRAIN

    bad = UpdateMeta(a, 7, 0, 1, StreamHeader.of(DELTA), {})  # round 7 is not open
    with pytest.raises(UpdateRejected, match="open is round 1"):
        ps.open_update(PEER_A, bad)
    push(ps, PEER_A, a)
    assert next_task(ps, PEER_A, a).kind is TaskKind.FINISH
    engine.join(15)

    (row,) = ps.metrics.history
    assert (row["rejected"], row["rejected_ids"]) == (1, [a])


def test_worker_timeout_below_two_heartbeats_is_refused_naming_both_keys() -> None:
    with pytest.raises(ConfigError, match=r"round.worker_timeout_s=3 must be at least twice round.heartbeat_s=2"):
        parse_job({"round": {"heartbeat_s": 2, "worker_timeout_s": 3}})


def test_worker_that_joins_again_mid_round_replaces_its_old_session_and_the_round_closes(
    tmp_path: Path, running: Callable[[ParameterServer], Running]
) -> None:
    # A restarted worker joins again with its certificate while its old session is sampled in the open round.
    ps = ParameterServer(job(worker_timeout_s=30), INITIAL, out_dir=tmp_path)
    a = ps.join(PEER_A, "a", 10).worker_id
    b_old = ps.join(PEER_B, "b", 10).worker_id
    engine = running(ps)
    assert next_task(ps, PEER_B, b_old).kind is TaskKind.TRAIN
    live = LiveWorker(ps, PEER_A, a)

    joined: list[str] = []
    rejoin = threading.Thread(target=lambda: joined.append(ps.join(PEER_B, "b", 10).worker_id), daemon=True)
    rejoin.start()
    rejoin.join(3)
    assert joined, "join of a sampled worker's new session hung the PS"
    b_new = joined[0]
    LiveWorker(ps, PEER_B, b_new)  # not sampled in round 1: it only hears FINISH
    engine.join(10)
    live.stop()

    assert engine.error is None, engine.error
    (row,) = ps.metrics.history
    assert (row["participants"], row["dropped_ids"]) == (1, [b_old])
