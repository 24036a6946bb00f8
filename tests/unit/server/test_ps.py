"""Tests for enclavefl.server.ps, driven in-process: no gRPC, real rounds on a thread.

Each test plays the workers itself by calling the handler methods the gRPC
service calls (join, wait_task, model_for, open_update, then the sink's
feed/commit/abort) with a PeerIdentity, while ParameterServer.run() runs the
rounds on its own thread with short windows.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from enclavefl.config import JobConfig, parse_job
from enclavefl.errors import ProtocolError, RoundError, StaleSession, UpdateRejected
from enclavefl.server.checkpoint import latest_checkpoint
from enclavefl.server.ps import ParameterServer
from enclavefl.tensors import ParamSet, StreamHeader, TensorSpec, iter_chunks
from enclavefl.messages import PeerIdentity
from enclavefl.messages import TaskKind, UpdateMeta

PS_LOGGER = "enclavefl.server"


def f32(values: Any) -> npt.NDArray[np.float32]:
    return np.asarray(values, dtype=np.float32)


INITIAL = ParamSet({"w": f32([[1, 2], [3, 4]]), "b": f32([0, 0])})
DELTA_A = ParamSet({"w": f32([[4, 0], [0, 4]]), "b": f32([8, -8])})   # 1 sample
DELTA_B = ParamSet({"w": f32([[0, 4], [4, 0]]), "b": f32([0, 0])})    # 3 samples
# INITIAL + (1 * DELTA_A + 3 * DELTA_B) / 4, by hand.
EXPECTED_AB = ParamSet({"w": f32([[2, 5], [6, 5]]), "b": f32([2, -2])})
# INITIAL + DELTA_A, by hand.
EXPECTED_A = ParamSet({"w": f32([[5, 2], [3, 8]]), "b": f32([8, -8])})

PEER_A = PeerIdentity(fingerprint="a" * 64, label="worker-a")
PEER_B = PeerIdentity(fingerprint="b" * 64, label="worker-b")


def job(**round_section: Any) -> JobConfig:
    section = {"min_workers": 2, "start_window_s": 5, "update_window_s": 3, "max_retries": 0}
    section.update(round_section)
    return parse_job({"job": {"rounds": 1}, "round": section, "attestation": {"mode": "none"}})


class Engine:
    """ps.run() on a thread; remembers what it raised."""

    def __init__(self, ps: ParameterServer) -> None:
        self.ps = ps
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="ps-engine", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.ps.run()
        except BaseException as exc:  # reported by the test, not by the thread hook
            self.error = exc

    def join(self, timeout_s: float = 5.0) -> None:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "ps.run() did not return"


@pytest.fixture(params=["ps", "cluster-memory", "cluster-redis"])
def make_ps(request: pytest.FixtureRequest) -> Iterator[Callable[[JobConfig, Path], ParameterServer]]:
    """The PS of a test: one PS, or one server of a cluster over the memory store or a real Redis.

    The cluster's one server runs the same rounds through the store (its leader opens and closes them), so
    every behaviour these tests pin down holds for both (docs/cluster.md).
    """
    stores: list[Any] = []

    def make(config: JobConfig, out_dir: Path) -> ParameterServer:
        if request.param == "ps":
            return ParameterServer(config, INITIAL, out_dir=out_dir)
        from enclavefl.cluster import MemoryStore
        from enclavefl.cluster.engine import cluster_engine

        if request.param == "cluster-memory":
            store: Any = MemoryStore()
        else:
            from tests.unit.cluster.conftest import redis_store

            store = redis_store(request.getfixturevalue("redis_server"))
        stores.append(store)
        return ParameterServer(config, INITIAL, out_dir=out_dir, engine=cluster_engine(store, "server-0", config.cluster,
                                                                                     address="127.0.0.1:7000"))

    yield make
    for store in stores:
        store.close()


@pytest.fixture
def engines() -> Iterator[Callable[[ParameterServer], Engine]]:
    started: list[Engine] = []

    def start(ps: ParameterServer) -> Engine:
        engine = Engine(ps)
        started.append(engine)
        return engine

    yield start
    for engine in started:  # a failed test must not leave the engine lingering
        deadline = time.monotonic() + 15
        while engine.thread.is_alive() and time.monotonic() < deadline:
            for w in engine.ps.core.registry.records():
                try:
                    engine.ps.wait_task(PeerIdentity(w.fingerprint, "cleanup"), w.worker_id, 0.2)
                except StaleSession:
                    pass
        engine.thread.join(1)


def meta_for(worker_id: str, update: ParamSet | StreamHeader, num_samples: int, round_: int = 1) -> UpdateMeta:
    header = update if isinstance(update, StreamHeader) else StreamHeader.of(update)
    return UpdateMeta(worker_id, round_, 0, num_samples, header, {"loss": 0.5, "accuracy": 0.75})


def push(ps: ParameterServer, peer: PeerIdentity, worker_id: str, update: ParamSet, num_samples: int) -> None:
    """What the service does with a well-formed stream: open, feed 8-byte chunks, commit."""
    sink = ps.open_update(peer, meta_for(worker_id, update, num_samples))
    for chunk in iter_chunks(update, 8):
        sink.feed(bytes(chunk))
    sink.commit()


def payload(update: ParamSet) -> bytes:
    return b"".join(bytes(c) for c in iter_chunks(update, 1 << 20))


def open_round(ps: ParameterServer, engines: Callable[[ParameterServer], Engine]) -> tuple[Engine, str, str]:
    """Joins A and B, starts the engine, and waits until both are told to train round 1."""
    a = ps.join(PEER_A, "a", 10).worker_id
    b = ps.join(PEER_B, "b", 30).worker_id
    engine = engines(ps)
    for peer, worker_id in ((PEER_A, a), (PEER_B, b)):
        task = ps.wait_task(peer, worker_id, 5)
        assert (task.kind, task.round, task.model_version) == (TaskKind.TRAIN, 1, 0)
    return engine, a, b


def finish(ps: ParameterServer, engine: Engine, workers: list[tuple[PeerIdentity, str]]) -> None:
    """Every worker hears FINISH, so the engine stops lingering and returns."""
    for peer, worker_id in workers:
        assert ps.wait_task(peer, worker_id, 5).kind is TaskKind.FINISH
    engine.join()
    assert engine.error is None, engine.error


def rejections(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith(PS_LOGGER) and "rejected update" in r.getMessage()]


# -------------------------------------------------------------- the happy path


def test_round_aggregates_weighted_by_num_samples(tmp_path: Path, make_ps: Callable[[JobConfig, Path], ParameterServer], engines: Callable[[ParameterServer], Engine]) -> None:
    # Prepare
    ps = make_ps(job(), tmp_path)
    engine, a, b = open_round(ps, engines)
    version, model = ps.model_for(PEER_A, a, 0)
    assert version == 0 and model == INITIAL

    # Execute
    push(ps, PEER_A, a, DELTA_A, 1)
    push(ps, PEER_B, b, DELTA_B, 3)
    finish(ps, engine, [(PEER_A, a), (PEER_B, b)])

    # Assert
    assert ps.params == EXPECTED_AB
    assert ps.version == 1
    (row,) = ps.metrics.history
    assert (row["round"], row["participants"], row["num_samples"], row["rejected"]) == (1, 2, 4, 0)
    assert row["bytes_in"] == 2 * INITIAL.nbytes
    assert row["train_loss"] == 0.5
    ckpt = latest_checkpoint(tmp_path / "checkpoints")
    assert ckpt is not None and ckpt.params == EXPECTED_AB and ckpt.round == 1


# -------------------------------------------------------------- rejected updates


def bad_header(change: str) -> StreamHeader:
    specs = list(StreamHeader.of(INITIAL).tensors)
    if change == "shape":
        specs[0] = TensorSpec("w", "float32", (4,))
    elif change == "dtype":
        specs[1] = TensorSpec("b", "float64", (2,))
    elif change == "names":
        specs = specs[:1]
    return StreamHeader(tuple(specs))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("shape", "tensor 'w': shape (4,) != expected (2, 2)"),
        ("dtype", "tensor 'b': dtype float64 != expected float32"),
        ("names", "missing 'b'"),
    ],
)
def test_update_with_wrong_header_is_rejected_without_trace(
    tmp_path: Path, make_ps: Callable[[JobConfig, Path], ParameterServer],
    engines: Callable[[ParameterServer], Engine],
    caplog: pytest.LogCaptureFixture,
    change: str,
    reason: str,
) -> None:
    # Prepare
    caplog.set_level(logging.INFO, logger=PS_LOGGER)
    ps = make_ps(job(), tmp_path)
    engine, a, b = open_round(ps, engines)
    push(ps, PEER_A, a, DELTA_A, 1)

    # Execute: B announces a bad header, then sends a good update.
    with pytest.raises(UpdateRejected, match=reason.replace("(", r"\(").replace(")", r"\)")):
        ps.open_update(PEER_B, meta_for(b, bad_header(change), 100))
    push(ps, PEER_B, b, DELTA_B, 3)
    finish(ps, engine, [(PEER_A, a), (PEER_B, b)])

    # Assert
    assert any(reason in line for line in rejections(caplog))
    assert ps.params == EXPECTED_AB
    assert ps.metrics.history[0]["rejected"] == 1


def nan_update() -> bytes:
    return payload(ParamSet({"w": f32([[np.nan, 100], [100, 100]]), "b": f32([100, 100])}))


def inf_update() -> bytes:
    return payload(ParamSet({"w": f32([[100, 100], [100, 100]]), "b": f32([100, -np.inf])}))


def truncated_update() -> bytes:
    return payload(ParamSet({"w": f32([[100, 100], [100, 100]]), "b": f32([100, 100])}))[:-4]


@pytest.mark.parametrize(
    ("make_payload", "reason"),
    [
        (nan_update, "tensor 'w' holds NaN or Inf values"),
        (inf_update, "tensor 'b' holds NaN or Inf values"),
        (truncated_update, "stream ended after 20 of 24 bytes"),
    ],
    ids=["nan", "inf", "truncated"],
)
def test_update_with_bad_payload_is_rejected_without_trace(
    tmp_path: Path, make_ps: Callable[[JobConfig, Path], ParameterServer],
    engines: Callable[[ParameterServer], Engine],
    caplog: pytest.LogCaptureFixture,
    make_payload: Callable[[], bytes],
    reason: str,
) -> None:
    # Prepare
    caplog.set_level(logging.INFO, logger=PS_LOGGER)
    ps = make_ps(job(), tmp_path)
    engine, a, b = open_round(ps, engines)
    push(ps, PEER_A, a, DELTA_A, 1)

    # Execute: B streams a bad payload under a good header and commits, then sends a good one.
    sink = ps.open_update(PEER_B, meta_for(b, INITIAL, 100))
    data = make_payload()
    for start in range(0, len(data), 8):
        sink.feed(data[start : start + 8])
    with pytest.raises(UpdateRejected, match=reason):
        sink.commit()
    push(ps, PEER_B, b, DELTA_B, 3)
    finish(ps, engine, [(PEER_A, a), (PEER_B, b)])

    # Assert
    assert any(reason in line for line in rejections(caplog))
    assert ps.params == EXPECTED_AB
    assert ps.metrics.history[0]["rejected"] == 1


def test_sparse_update_with_bad_row_ids_is_rejected_without_trace(
    tmp_path: Path, make_ps: Callable[[JobConfig, Path], ParameterServer], engines: Callable[[ParameterServer], Engine], caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: a sparse_rows 'w' whose ids go down (1, then 0), which SparseRows cannot even build.
    caplog.set_level(logging.INFO, logger=PS_LOGGER)
    ps = make_ps(job(), tmp_path)
    engine, a, b = open_round(ps, engines)
    push(ps, PEER_A, a, DELTA_A, 1)
    header = StreamHeader((TensorSpec("w", "float32", (2, 2), "sparse_rows", 2), TensorSpec("b", "float32", (2,))))
    data = struct.pack("<2q", 1, 0) + f32([[100, 100], [100, 100]]).tobytes() + f32([100, 100]).tobytes()

    # Execute
    sink = ps.open_update(PEER_B, meta_for(b, header, 100))
    sink.feed(data)
    with pytest.raises(UpdateRejected, match="strictly increasing"):
        sink.commit()
    push(ps, PEER_B, b, DELTA_B, 3)
    finish(ps, engine, [(PEER_A, a), (PEER_B, b)])

    # Assert
    assert any("strictly increasing" in line for line in rejections(caplog))
    assert ps.params == EXPECTED_AB


def test_overlong_stream_is_refused_and_aborted_without_trace(
    tmp_path: Path, make_ps: Callable[[JobConfig, Path], ParameterServer], engines: Callable[[ParameterServer], Engine], caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    caplog.set_level(logging.INFO, logger=PS_LOGGER)
    ps = make_ps(job(), tmp_path)
    engine, a, b = open_round(ps, engines)
    push(ps, PEER_A, a, DELTA_A, 1)
    data = payload(ParamSet({"w": f32([[100, 100], [100, 100]]), "b": f32([100, 100])}))

    # Execute: a chunk past the announced 24 bytes; the service then aborts the sink.
    sink = ps.open_update(PEER_B, meta_for(b, INITIAL, 100))
    sink.feed(data)
    with pytest.raises(ProtocolError, match="stream too long") as info:
        sink.feed(b"\0" * 4)
    sink.abort(str(info.value))
    sink.abort(str(info.value))  # idempotent
    push(ps, PEER_B, b, DELTA_B, 3)
    finish(ps, engine, [(PEER_A, a), (PEER_B, b)])

    # Assert
    assert sum("stream too long" in line for line in rejections(caplog)) == 1
    assert ps.params == EXPECTED_AB
    assert ps.metrics.history[0]["rejected"] == 1


def test_round_closes_by_its_window_with_the_valid_updates_only(
    tmp_path: Path, make_ps: Callable[[JobConfig, Path], ParameterServer], engines: Callable[[ParameterServer], Engine], caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    caplog.set_level(logging.INFO, logger=PS_LOGGER)
    ps = make_ps(job(update_window_s=0.5), tmp_path)
    engine, a, b = open_round(ps, engines)

    # Execute: A's update is good, B's only one is NaN; the window then closes the round.
    push(ps, PEER_A, a, DELTA_A, 1)
    sink = ps.open_update(PEER_B, meta_for(b, INITIAL, 3))
    sink.feed(nan_update())
    with pytest.raises(UpdateRejected):
        sink.commit()
    finish(ps, engine, [(PEER_A, a)])

    # Assert: B was dropped for not delivering; the result is A's update alone.
    assert ps.params == EXPECTED_A
    assert ps.metrics.history[0]["participants"] == 1
    with pytest.raises(StaleSession):
        ps.wait_task(PEER_B, b, 0)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"round": 2}, "update for round 2 v0, open is round 1 v0"),
        ({"model_version": 3}, "update for round 1 v3, open is round 1 v0"),
        ({"num_samples": 0}, "num_samples must be positive"),
    ],
)
def test_update_for_the_wrong_round_is_rejected(
    tmp_path: Path, make_ps: Callable[[JobConfig, Path], ParameterServer],
    engines: Callable[[ParameterServer], Engine],
    change: dict[str, int],
    reason: str,
) -> None:
    ps = make_ps(job(), tmp_path)
    engine, a, b = open_round(ps, engines)
    fields = {"worker_id": a, "round": 1, "model_version": 0, "num_samples": 1, "tensors": StreamHeader.of(INITIAL)}
    fields.update(change)

    with pytest.raises(UpdateRejected, match=reason):
        ps.open_update(PEER_A, UpdateMeta(**fields))  # type: ignore[arg-type]

    push(ps, PEER_A, a, DELTA_A, 1)
    push(ps, PEER_B, b, DELTA_B, 3)
    finish(ps, engine, [(PEER_A, a), (PEER_B, b)])
    assert ps.params == EXPECTED_AB


def test_second_update_from_one_worker_is_rejected(
    tmp_path: Path, make_ps: Callable[[JobConfig, Path], ParameterServer], engines: Callable[[ParameterServer], Engine]
) -> None:
    ps = make_ps(job(), tmp_path)
    engine, a, b = open_round(ps, engines)
    push(ps, PEER_A, a, DELTA_A, 1)

    with pytest.raises(UpdateRejected, match="already pushed"):
        push(ps, PEER_A, a, DELTA_B, 1000)

    push(ps, PEER_B, b, DELTA_B, 3)
    finish(ps, engine, [(PEER_A, a), (PEER_B, b)])
    assert ps.params == EXPECTED_AB


def test_worker_id_is_bound_to_its_certificate(tmp_path: Path, make_ps: Callable[[JobConfig, Path], ParameterServer]) -> None:
    ps = make_ps(job(), tmp_path)
    a = ps.join(PEER_A, "a", 10).worker_id

    with pytest.raises(StaleSession, match="another certificate"):
        ps.model_for(PEER_B, a, 0)
    with pytest.raises(StaleSession, match="not joined"):
        ps.wait_task(PEER_A, "w-unknown", 0)


# -------------------------------------------------------------- rounds without updates


def wait_until_dropped(ps: ParameterServer, peer: PeerIdentity, worker_id: str) -> None:
    """Asks for work (without doing it) until the PS drops the worker at the round's end."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            ps.wait_task(peer, worker_id, 0.2)
        except StaleSession:
            return
        time.sleep(0.05)
    raise AssertionError(f"worker {worker_id} was not dropped")


def test_round_with_zero_updates_is_retried_not_aggregated(
    tmp_path: Path, make_ps: Callable[[JobConfig, Path], ParameterServer], engines: Callable[[ParameterServer], Engine], caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    caplog.set_level(logging.INFO, logger=PS_LOGGER)
    ps = make_ps(job(min_workers=1, update_window_s=0.5, max_retries=1), tmp_path)
    a = ps.join(PEER_A, "a", 10).worker_id
    engine = engines(ps)
    first = ps.wait_task(PEER_A, a, 5)
    assert (first.kind, first.round, first.model_version) == (TaskKind.TRAIN, 1, 0)

    # Execute: no update in attempt 0; A re-joins and pushes in attempt 1.
    wait_until_dropped(ps, PEER_A, a)
    assert ps.version == 0 and ps.metrics.history == []
    a = ps.join(PEER_A, "a", 10).worker_id
    retry = ps.wait_task(PEER_A, a, 5)
    assert (retry.kind, retry.round, retry.model_version) == (TaskKind.TRAIN, 1, 0)
    push(ps, PEER_A, a, DELTA_A, 1)
    finish(ps, engine, [(PEER_A, a)])

    # Assert: one aggregated round, from the second attempt, of A's update alone.
    (row,) = ps.metrics.history
    assert (row["round"], row["attempt"], row["participants"], row["model_version"]) == (1, 1, 1, 1)
    assert ps.params == EXPECTED_A
    assert any("got 0 updates" in r.getMessage() and "retry 1 of 1" in r.getMessage() for r in caplog.records)


def test_round_without_updates_fails_after_max_retries(
    tmp_path: Path, make_ps: Callable[[JobConfig, Path], ParameterServer], engines: Callable[[ParameterServer], Engine]
) -> None:
    # Prepare
    ps = make_ps(job(min_workers=1, update_window_s=0.5, max_retries=0), tmp_path)
    a = ps.join(PEER_A, "a", 10).worker_id
    engine = engines(ps)
    assert ps.wait_task(PEER_A, a, 5).kind is TaskKind.TRAIN

    # Execute
    engine.join()

    # Assert: nothing was faked: no new version, no metrics row, no checkpoint.
    assert isinstance(engine.error, RoundError)
    assert "round 1 got 0 updates, min_updates=1" in str(engine.error)
    assert ps.params == INITIAL and ps.version == 0
    assert ps.metrics.history == []
    assert ps.metrics.path.read_text(encoding="utf-8") == ""
    assert latest_checkpoint(tmp_path / "checkpoints") is None


def test_too_few_workers_within_the_start_window_fails(
    tmp_path: Path, make_ps: Callable[[JobConfig, Path], ParameterServer], engines: Callable[[ParameterServer], Engine]
) -> None:
    ps = make_ps(job(min_workers=2, start_window_s=0.3, max_retries=0), tmp_path)
    a = ps.join(PEER_A, "a", 10).worker_id

    engine = engines(ps)
    task = ps.wait_task(PEER_A, a, 5)  # the joined worker is told why the job ended
    engine.join()

    assert isinstance(engine.error, RoundError)
    assert "fewer than min_workers=2" in str(engine.error)
    assert task.kind is TaskKind.FINISH and "fewer than min_workers=2" in task.message
    assert ps.version == 0 and ps.metrics.history == []


def test_update_of_a_kind_the_job_does_not_aggregate_is_rejected(
    tmp_path: Path, make_ps: Callable[[JobConfig, Path], ParameterServer], engines: Callable[[ParameterServer], Engine]
) -> None:
    from dataclasses import replace

    from enclavefl.messages import UpdateKind

    ps = make_ps(job(), tmp_path)
    engine, a, b = open_round(ps, engines)
    with pytest.raises(UpdateRejected, match="update kind masked"):
        ps.open_update(PEER_A, replace(meta_for(a, DELTA_A, 1), kind=UpdateKind.MASKED))

    push(ps, PEER_A, a, DELTA_A, 1)
    push(ps, PEER_B, b, DELTA_B, 3)
    finish(ps, engine, [(PEER_A, a), (PEER_B, b)])
    assert ps.params == EXPECTED_AB and ps.metrics.history[0]["rejected"] == 1


def test_a_wait_answer_carries_what_the_engine_adds_to_it(tmp_path: Path) -> None:
    # Prepare: an engine that names something in every WAIT answer (as a cluster server names servers).
    from enclavefl.server.engine import SyncEngine
    from enclavefl.server.registry import WorkerRecord

    class Naming(SyncEngine):
        def wait_config(self, worker: WorkerRecord) -> dict[str, Any]:
            return {"cluster.servers": f"127.0.0.1:7000,{worker.name}.test:7001"}

    ps = ParameterServer(job(), INITIAL, out_dir=tmp_path, engine=Naming)
    worker_id = ps.join(PEER_A, "worker-a", 1).worker_id

    # Execute: no round is open, so the long-poll ends with WAIT.
    task = ps.wait_task(PEER_A, worker_id, 0.05)

    # Assert
    assert task.kind is TaskKind.WAIT
    assert task.config == {"cluster.servers": "127.0.0.1:7000,worker-a.test:7001"}
