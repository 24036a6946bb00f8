"""Tests for enclavefl.server.async_engine, driven in-process like test_ps: no gRPC, real steps on a thread.

The tests play the workers by calling the handler methods (join, wait_task,
model_for, open_update and the sink) while ParameterServer.run() runs the
async engine on its own thread. The model is one float32 vector, the server
optimizer FedAvg with lr 1 (new model = model + weighted mean delta), and the
staleness function (1 + tau) ** -1 unless a test says otherwise, so s(1) = 1/2.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from enclavefl.config import JobConfig, parse_job
from enclavefl.errors import RoundError, UpdateRejected
from enclavefl.messages import PeerIdentity, TaskInfo, TaskKind, UpdateMeta
from enclavefl.server.aggregator import WeightedMean
from enclavefl.server.algorithms import CloseContext
from enclavefl.server.async_engine import AsyncEngine
from enclavefl.server.phases import Phase
from enclavefl.server.ps import ParameterServer
from enclavefl.server.strategy import build_strategy
from enclavefl.tensors import ParamSet, StreamHeader, iter_chunks
from tests.unit.server.test_ps import Engine, engines  # noqa: F401  (the fixture, shared)


def f32(values: Any) -> npt.NDArray[np.float32]:
    return np.asarray(values, dtype=np.float32)


def vec(*values: float) -> ParamSet:
    return ParamSet({"w": f32(values)})


INITIAL = vec(1, 2)
PEERS = {name: PeerIdentity(fingerprint=name * 64, label=f"worker-{name}") for name in "abc"}


def job(rounds: int = 2, **round_section: Any) -> JobConfig:
    section: dict[str, Any] = {
        "mode": "async", "min_workers": 3, "start_window_s": 5, "update_window_s": 3, "max_retries": 0,
        "buffer_size": 2, "max_staleness": 2, "staleness": {"name": "polynomial", "exponent": 1.0},
    }
    section.update(round_section)
    return parse_job({"job": {"rounds": rounds}, "round": section, "attestation": {"mode": "none"}})


class Fed:
    """A running async PS and its workers, by name."""

    def __init__(self, ps: ParameterServer, engine: Engine, ids: dict[str, str]) -> None:
        self.ps = ps
        self.engine = engine
        self.ids = ids

    def task(self, name: str) -> TaskInfo:
        return self.ps.wait_task(PEERS[name], self.ids[name], 5)

    def push(self, name: str, update: ParamSet, num_samples: int, version: int, round_: int = 1) -> None:
        """What the service does with a well-formed stream: open, feed 8-byte chunks, commit."""
        meta = UpdateMeta(self.ids[name], round_, version, num_samples, StreamHeader.of(update), {"loss": 0.5})
        sink = self.ps.open_update(PEERS[name], meta)
        for chunk in iter_chunks(update, 8):
            sink.feed(bytes(chunk))
        sink.commit()

    def wait_version(self, version: int) -> None:
        deadline = time.monotonic() + 5
        with self.ps.core.cond:
            while self.ps.version < version:
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"model version {version} never came (at {self.ps.version})"
                self.ps.core.cond.wait(remaining)

    def finish(self) -> None:
        """Every worker hears FINISH, so the engine stops lingering and returns."""
        for name in self.ids:
            assert self.task(name).kind is TaskKind.FINISH
        self.engine.join()
        assert self.engine.error is None, self.engine.error


def start(ps: ParameterServer, engines: Callable[[ParameterServer], Engine], names: str = "abc") -> Fed:
    """Joins the workers, starts the engine and checks each is told to train step 1 on version 0."""
    ids = {name: ps.join(PEERS[name], name, 10).worker_id for name in names}
    fed = Fed(ps, engines(ps), ids)
    for name in names:
        task = fed.task(name)
        assert (task.kind, task.round, task.model_version) == (TaskKind.TRAIN, 1, 0)
    return fed


def two_steps(tmp_path: Path, engines: Callable[[ParameterServer], Engine]) -> Fed:
    """Step 1: A and B on version 0. Step 2: C, still on version 0 (tau 1), and A on version 1.

    By hand, FedAvg with lr 1; FedBuff's step divides by the samples, not the staleness-weighted samples:
      v1 = [1, 2] + (1 * [2, 0] + 3 * [0, 4]) / (1 + 3) = [1, 2] + [0.5, 3] = [1.5, 5]
      step 2 weights: C 2 samples * s(1) = 2 * 1/2 = 1, A 1 sample * s(0) = 1
      v2 = [1.5, 5] + (1 * [4, 4] + 1 * [0, -2]) / (2 + 1) = [1.5, 5] + [4/3, 2/3] = [2.8333, 5.6667]
    """
    ps = ParameterServer(job(), INITIAL, out_dir=tmp_path)
    fed = start(ps, engines)
    fed.push("a", vec(2, 0), 1, version=0)
    fed.push("b", vec(0, 4), 3, version=0)
    fed.wait_version(1)
    task = fed.task("a")
    assert (task.kind, task.round, task.model_version) == (TaskKind.TRAIN, 2, 1)
    fed.push("c", vec(4, 4), 2, version=0)
    fed.push("a", vec(0, -2), 1, version=1, round_=2)
    fed.finish()
    return fed


# -------------------------------------------------------------- steps and weights


def test_facade_builds_the_async_engine_with_its_staleness_function(tmp_path: Path) -> None:
    ps = ParameterServer(job(), INITIAL, out_dir=tmp_path)

    assert isinstance(ps.engine, AsyncEngine)
    assert ps.engine.staleness_weight(1) == 0.5  # (1 + 1) ** -1


def test_model_steps_after_every_buffer_size_updates(
    tmp_path: Path, engines: Callable[[ParameterServer], Engine]
) -> None:
    # Prepare
    ps = ParameterServer(job(), INITIAL, out_dir=tmp_path)
    fed = start(ps, engines)

    # Execute: one update is half a buffer; the second fills it.
    fed.push("a", vec(2, 0), 1, version=0)
    time.sleep(0.3)
    version_after_one, rows_after_one = ps.version, len(ps.metrics.history)
    fed.push("b", vec(0, 4), 3, version=0)
    fed.wait_version(1)

    # Assert: v1 = [1, 2] + (1 * [2, 0] + 3 * [0, 4]) / 4 = [1.5, 5]
    assert (version_after_one, rows_after_one) == (0, 0)
    assert ps.params == vec(1.5, 5)
    assert ps.metrics.history[0]["updates"] == 2


def test_stale_update_is_weighed_by_the_staleness_function(
    tmp_path: Path, engines: Callable[[ParameterServer], Engine]
) -> None:
    fed = two_steps(tmp_path, engines)

    assert fed.ps.version == 2
    # By hand in two_steps; with s = 1 it would be [1.5 + 8/3, 7], and normalised by the weights [3.5, 6].
    np.testing.assert_allclose(fed.ps.params["w"], [1.5 + 4 / 3, 5 + 2 / 3], rtol=1e-6)


def test_metrics_rows_carry_step_staleness_and_mode(
    tmp_path: Path, engines: Callable[[ParameterServer], Engine]
) -> None:
    fed = two_steps(tmp_path, engines)

    first, second = fed.ps.metrics.history
    assert (first["round"], first["model_version"], first["mode"]) == (1, 1, "async")
    assert (first["staleness_mean"], first["staleness_max"], first["updates"]) == (0.0, 0, 2)
    assert (second["round"], second["model_version"], second["mode"]) == (2, 2, "async")
    # C was 1 step old, A 0: mean 0.5, max 1; weights 1 + 1, samples 2 + 1.
    assert (second["staleness_mean"], second["staleness_max"], second["updates"]) == (0.5, 1, 2)
    assert (second["participants"], second["num_samples"], second["weight"]) == (2, 3, 2.0)
    assert second["bytes_in"] == second["bytes_in_dense"] == 2 * INITIAL.nbytes


def test_job_ends_after_its_steps_and_every_worker_hears_finish(
    tmp_path: Path, engines: Callable[[ParameterServer], Engine]
) -> None:
    fed = two_steps(tmp_path, engines)  # finish() asserts FINISH for a, b and c and a clean engine exit

    assert [row["round"] for row in fed.ps.metrics.history] == [1, 2]
    assert fed.ps.core.phase is Phase.FINISHED


def test_worker_keeps_getting_tasks_on_the_newest_version(
    tmp_path: Path, engines: Callable[[ParameterServer], Engine]
) -> None:
    # Prepare: one worker, a buffer of one: every update is a step.
    ps = ParameterServer(job(rounds=3, min_workers=1, buffer_size=1), INITIAL, out_dir=tmp_path)
    fed = start(ps, engines, names="a")

    # Execute
    seen = []
    for version in range(3):
        if version:
            task = fed.task("a")
            seen.append((task.kind, task.round, task.model_version))
        fed.push("a", vec(1, 1), 1, version=version, round_=version + 1)
    fed.finish()

    # Assert: each task is on the version the previous update made; v3 = [1, 2] + 3 * [1, 1].
    assert seen == [(TaskKind.TRAIN, 2, 1), (TaskKind.TRAIN, 3, 2)]
    assert ps.params == vec(4, 5)


def test_worker_may_push_on_the_newer_version_it_downloaded(
    tmp_path: Path, engines: Callable[[ParameterServer], Engine]
) -> None:
    # Prepare: B's task is on version 0, but A's update makes version 1 before B downloads.
    ps = ParameterServer(job(min_workers=2, buffer_size=1), INITIAL, out_dir=tmp_path)
    fed = start(ps, engines, names="ab")
    fed.push("a", vec(2, 2), 1, version=0)
    fed.wait_version(1)

    # Execute
    version, model = ps.model_for(PEERS["b"], fed.ids["b"], 0)
    fed.push("b", vec(0, 2), 1, version=version)
    fed.finish()

    # Assert: v1 = [3, 4], v2 = v1 + [0, 2]; B's update was fresh (tau 0).
    assert (version, model) == (1, vec(3, 4))
    assert ps.params == vec(3, 6)
    assert ps.metrics.history[1]["staleness_max"] == 0


# -------------------------------------------------------------- refused updates


def test_update_older_than_max_staleness_is_refused_without_trace(
    tmp_path: Path, engines: Callable[[ParameterServer], Engine]
) -> None:
    # Prepare: max_staleness 0; A's update makes version 1 while B trains on version 0.
    ps = ParameterServer(job(min_workers=2, buffer_size=1, max_staleness=0), INITIAL, out_dir=tmp_path)
    fed = start(ps, engines, names="ab")
    fed.push("a", vec(2, 2), 1, version=0)
    fed.wait_version(1)

    # Execute: B's version-0 update is 1 step old; then B trains on version 1.
    with pytest.raises(UpdateRejected, match="tau=1 server steps old, max_staleness=0"):
        fed.push("b", vec(100, 100), 1, version=0)
    task = fed.task("b")
    fed.push("b", vec(0, 2), 1, version=task.model_version, round_=task.round)
    fed.finish()

    # Assert: v2 = [1, 2] + [2, 2] + [0, 2]; the refusal is counted, the stale update nowhere.
    assert ps.params == vec(3, 6)
    second = ps.metrics.history[1]
    assert (second["updates"], second["staleness_max"], second["rejected"]) == (1, 0, 1)


def test_update_on_a_version_the_worker_was_not_given_is_refused(
    tmp_path: Path, engines: Callable[[ParameterServer], Engine]
) -> None:
    # Prepare
    ps = ParameterServer(job(min_workers=2), INITIAL, out_dir=tmp_path)
    fed = start(ps, engines, names="ab")
    fed.push("a", vec(2, 0), 1, version=0)

    # Execute: A's task was used up by its first update; it pushes again without asking.
    with pytest.raises(UpdateRejected, match="but was given no task"):
        fed.push("a", vec(100, 100), 1, version=0)
    fed.push("b", vec(0, 4), 3, version=0)
    fed.wait_version(1)
    for name in "ab":
        task = fed.task(name)
        fed.push(name, vec(0, 0), 1, version=task.model_version, round_=task.round)
    fed.finish()

    # Assert: v1 = [1, 2] + (1 * [2, 0] + 3 * [0, 4]) / 4 = [1.5, 5]; step 2 adds zero.
    first = ps.metrics.history[0]
    assert (first["updates"], first["rejected"]) == (2, 1)
    assert ps.params == vec(1.5, 5)


def test_step_is_closed_by_its_window_with_at_least_min_updates(
    tmp_path: Path, engines: Callable[[ParameterServer], Engine]
) -> None:
    # Prepare: a buffer of 3, but 1 update is enough once the window passes.
    ps = ParameterServer(job(rounds=1, min_workers=1, buffer_size=3, update_window_s=0.3), INITIAL, out_dir=tmp_path)
    fed = start(ps, engines, names="a")

    # Execute
    fed.push("a", vec(2, 2), 1, version=0)
    fed.wait_version(1)
    fed.finish()

    # Assert
    (row,) = ps.metrics.history
    assert (row["updates"], row["attempt"]) == (1, 0)
    assert ps.params == vec(3, 4)


def test_empty_window_is_a_retry_and_the_buffer_keeps_its_updates(
    tmp_path: Path, engines: Callable[[ParameterServer], Engine]
) -> None:
    # Prepare: min_updates 2; one update arrives in the first window, the second in the next one.
    config = job(rounds=1, min_workers=2, buffer_size=3, min_updates=2, update_window_s=0.4, max_retries=1)
    ps = ParameterServer(config, INITIAL, out_dir=tmp_path)
    fed = start(ps, engines, names="ab")

    # Execute
    fed.push("a", vec(2, 0), 1, version=0)
    time.sleep(0.6)
    fed.push("b", vec(0, 2), 1, version=0)
    fed.wait_version(1)
    fed.finish()

    # Assert: both updates in the one step, counted as its attempt 1; v1 = [1, 2] + ([2, 0] + [0, 2]) / 2.
    (row,) = ps.metrics.history
    assert (row["updates"], row["attempt"]) == (2, 1)
    assert ps.params == vec(2, 3)


def test_too_few_updates_after_max_retries_fails_the_job(
    tmp_path: Path, engines: Callable[[ParameterServer], Engine]
) -> None:
    # Prepare
    config = job(rounds=1, min_workers=1, buffer_size=3, min_updates=2, update_window_s=0.3, max_retries=0)
    ps = ParameterServer(config, INITIAL, out_dir=tmp_path)
    fed = start(ps, engines, names="a")

    # Execute
    fed.push("a", vec(2, 0), 1, version=0)
    task = fed.task("a")
    while task.kind is TaskKind.TRAIN:  # A trains on until it is told why the job ended
        time.sleep(0.05)
        task = fed.task("a")
    fed.engine.join()

    # Assert: no step was faked.
    assert isinstance(fed.engine.error, RoundError)
    assert "step 1 got 1 updates within update_window_s=0.3, min_updates=2" in str(fed.engine.error)
    assert task.kind is TaskKind.FINISH
    assert ps.version == 0 and ps.metrics.history == []


# -------------------------------------------------------------- updates racing a step's close


def with_close_hook(config: JobConfig, tmp_path: Path, action: Callable[[], None]) -> tuple[ParameterServer, list[Any]]:
    """A PS whose strategy runs ``action`` once, in the middle of step 1's close; notes the phase and the outcome."""
    seen: list[Any] = []
    box: list[ParameterServer] = []

    def hook(aggregate: ParamSet, context: CloseContext) -> ParamSet:
        if context.round == 1:
            seen.append(box[0].core.phase)
            try:
                action()
                seen.append("accepted")
            except UpdateRejected as exc:
                seen.append(str(exc))
        return aggregate

    strategy = build_strategy(config, StreamHeader.of(INITIAL), spill_dir=tmp_path / "spill")
    box.append(ParameterServer(config, INITIAL, out_dir=tmp_path, strategy=replace(strategy, post_process=(hook,))))
    return box[0], seen


def test_update_completed_during_a_close_goes_into_the_next_step(
    tmp_path: Path, engines: Callable[[ParameterServer], Engine]
) -> None:
    # Prepare: C's version-0 update completes while step 1 (A and B) is being closed.
    feds: list[Fed] = []
    ps, seen = with_close_hook(job(), tmp_path, lambda: feds[0].push("c", vec(4, 4), 2, version=0))
    feds.append(start(ps, engines))
    fed = feds[0]

    # Execute
    fed.push("a", vec(2, 0), 1, version=0)
    fed.push("b", vec(0, 4), 3, version=0)
    fed.wait_version(1)
    task = fed.task("a")
    fed.push("a", vec(0, -2), 1, version=task.model_version, round_=task.round)
    fed.finish()

    # Assert: C is in step 2 only, 1 step old (tau against the version it is applied to,
    # although version 1 did not exist yet when it arrived): the model is two_steps' one.
    assert seen == [Phase.AGGREGATING, "accepted"]
    first, second = ps.metrics.history
    assert (first["updates"], second["updates"]) == (2, 2)
    assert (second["staleness_mean"], second["staleness_max"]) == (0.5, 1)
    np.testing.assert_allclose(ps.params["w"], [1.5 + 4 / 3, 5 + 2 / 3], rtol=1e-6)


def test_update_completed_during_the_last_close_is_refused(
    tmp_path: Path, engines: Callable[[ParameterServer], Engine]
) -> None:
    # Prepare
    feds: list[Fed] = []
    ps, seen = with_close_hook(job(rounds=1), tmp_path, lambda: feds[0].push("c", vec(100, 100), 2, version=0))
    feds.append(start(ps, engines))
    fed = feds[0]

    # Execute
    fed.push("a", vec(2, 0), 1, version=0)
    fed.push("b", vec(0, 4), 3, version=0)
    fed.finish()

    # Assert: no buffer is left after the last step; C's update is refused and nowhere.
    assert seen == [Phase.AGGREGATING, "no buffer is open (phase aggregating)"]
    (row,) = ps.metrics.history
    assert row["updates"] == 2
    assert ps.params == vec(1.5, 5)


class _SlowSecondAdd(WeightedMean):
    """A WeightedMean whose second add() takes longer than the step's window."""

    def add(self, update: ParamSet, weight: float) -> None:
        if self.count == 1:
            time.sleep(0.8)
        super().add(update, weight)


def test_fold_in_progress_when_the_window_closes_the_step_is_in_that_step(
    tmp_path: Path, engines: Callable[[ParameterServer], Engine]
) -> None:
    # Prepare: a buffer of 3 that the 0.3 s window closes with A's update while B's is still folding.
    config = job(rounds=1, min_workers=2, buffer_size=3, update_window_s=0.3)
    strategy = replace(build_strategy(config, StreamHeader.of(INITIAL), spill_dir=tmp_path), aggregator=_SlowSecondAdd)
    ps = ParameterServer(config, INITIAL, out_dir=tmp_path, strategy=strategy)
    fed = start(ps, engines, names="ab")

    # Execute
    fed.push("a", vec(2, 0), 1, version=0)
    started = time.monotonic()
    fed.push("b", vec(0, 2), 1, version=0)
    folding_s = time.monotonic() - started
    fed.wait_version(1)
    fed.finish()

    # Assert: the close waited for B's fold: both in the one step; v1 = [1, 2] + ([2, 0] + [0, 2]) / 2.
    assert folding_s >= 0.8
    (row,) = ps.metrics.history
    assert (row["updates"], row["participants"]) == (2, 2)
    assert ps.params == vec(2, 3)


def test_concurrent_updates_each_land_in_exactly_one_step(
    tmp_path: Path, engines: Callable[[ParameterServer], Engine]
) -> None:
    # Prepare: buffer of 1, three workers push at once: each update is its own step, or refused.
    # Constant staleness: every step is its update whole, whatever order they land in.
    ps = ParameterServer(job(rounds=3, buffer_size=1, max_staleness=5, staleness="constant"), INITIAL, out_dir=tmp_path)
    fed = start(ps, engines)
    outcome: dict[str, str] = {}

    def push(name: str, value: float) -> None:
        try:
            fed.push(name, vec(value, 0), 1, version=0)
            outcome[name] = "accepted"
        except UpdateRejected as exc:
            outcome[name] = str(exc)

    # Execute
    threads = [threading.Thread(target=push, args=(name, value)) for name, value in zip("abc", (1.0, 10.0, 100.0))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    fed.finish()

    # Assert: three steps of one update each; the sum of the steps' deltas is each update once.
    assert outcome == {"a": "accepted", "b": "accepted", "c": "accepted"}
    rows = ps.metrics.history
    assert [row["updates"] for row in rows] == [1, 1, 1]
    assert sorted(row["staleness_max"] for row in rows) == [0, 1, 2]
    assert ps.params == vec(1 + 1 + 10 + 100, 2)
