"""InMemoryClient against a real ParameterServer: the same staging as gRPC, copies out, closed means closed."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from enclavefl.errors import ClosedError, StaleSession
from enclavefl.messages import PeerIdentity, TaskKind, UpdateKind
from enclavefl.server.ps import ParameterServer
from enclavefl.tensors import ParamSet
from enclavefl.worker import InMemoryClient
from tests.unit.worker.federation import f32, job, peer

INITIAL = ParamSet({"w": f32([[1, 2], [3, 4]]), "b": f32([0, 0])})


@pytest.fixture
def idle_ps(tmp_path: Path) -> ParameterServer:
    """A one-worker, one-round PS whose engine does not run."""
    return ParameterServer(job(rounds=1, workers=1), INITIAL.copy(), out_dir=tmp_path)


@pytest.fixture
def ps(idle_ps: ParameterServer) -> Iterator[ParameterServer]:
    """The PS with its engine on a thread; each test finishes the round, so the engine returns."""
    ps = idle_ps
    thread = threading.Thread(target=lambda: _run_quietly(ps), daemon=True)
    thread.start()
    yield ps
    ps.stop()  # a test that left the round open must not leave the engine running
    for record in ps.core.registry.records():  # a worker that hears FINISH lets the engine return
        try:
            ps.wait_task(PeerIdentity(record.fingerprint, "cleanup"), record.worker_id, 0.2)
        except StaleSession:
            pass
    thread.join(15)


def _run_quietly(server: ParameterServer) -> None:
    try:
        server.run()
    except Exception:  # a test that stops early leaves the round unfinished: not this fixture's business
        pass


def training(client: InMemoryClient) -> str:
    """Joins and waits until the round opens; returns the worker id."""
    worker_id = client.join("a", 10).worker_id
    task = client.wait_task(worker_id, 10)
    assert task.kind is TaskKind.TRAIN and task.round == 1
    return worker_id


def test_pull_model_returns_copies_the_worker_cannot_use_to_change_the_global_model(ps: ParameterServer) -> None:
    # Prepare
    client = InMemoryClient(ps, peer("a"))
    worker_id = training(client)

    # Execute
    version, params, nbytes = client.pull_model(worker_id, 0)
    w = params["w"]
    assert isinstance(w, np.ndarray)
    w += 100  # a careless (or hostile) trainer writes into the arrays it got

    # Assert
    assert version == 0 and nbytes == INITIAL.nbytes == 24
    assert ps.params == INITIAL
    assert not any(np.shares_memory(params[name], ps.params[name]) for name in INITIAL)
    assert client.push_update(worker_id, 1, 0, INITIAL, 10, {}).accepted  # ends the round


def test_push_update_goes_through_the_ps_staging_and_is_aggregated(ps: ParameterServer) -> None:
    # Prepare: 8-byte chunks, so the 24-byte update arrives in three feeds.
    client = InMemoryClient(ps, peer("a"), chunk_bytes=8)
    worker_id = training(client)
    delta = ParamSet({"w": f32([[1, 1], [1, 1]]), "b": f32([2, -2])})

    # Execute
    result = client.push_update(worker_id, 1, 0, delta, 10, {"loss": 0.5}, kind=UpdateKind.DELTA)
    assert client.wait_task(worker_id, 10).kind is TaskKind.FINISH

    # Assert: one worker, server lr 1: INITIAL + delta.
    assert (result.accepted, result.reason, result.bytes_sent) == (True, "", 24)
    assert ps.params == ParamSet({"w": f32([[2, 3], [4, 5]]), "b": f32([2, -2])})


def test_push_update_refused_by_the_ps_is_a_result_not_an_error(ps: ParameterServer) -> None:
    client = InMemoryClient(ps, peer("a"))
    worker_id = training(client)
    wrong = ParamSet({"w": f32([1, 2, 3, 4]), "b": f32([0, 0])})

    result = client.push_update(worker_id, 1, 0, wrong, 10, {})

    assert not result.accepted
    assert "tensor 'w': shape (4,) != expected (2, 2)" in result.reason
    assert client.push_update(worker_id, 1, 0, INITIAL, 10, {}).accepted  # ends the round


def test_chunks_over_the_ps_limit_are_refused_and_the_upload_slot_is_freed(tmp_path: Path) -> None:
    # Prepare: the job's transport.chunk_bytes is 2 MiB; a 4 MiB update in one 4 MiB chunk breaks it.
    big = ParameterServer(job(rounds=1, workers=1), ParamSet({"w": np.zeros(2**20, dtype=np.float32)}),
                          out_dir=tmp_path)
    thread = threading.Thread(target=lambda: _run_quietly(big), daemon=True)
    thread.start()
    oversized = InMemoryClient(big, peer("a"), chunk_bytes=4 * 2**20)
    worker_id = training(oversized)
    update = ParamSet({"w": np.ones(2**20, dtype=np.float32)})

    # Execute
    refused = oversized.push_update(worker_id, 1, 0, update, 10, {})
    accepted = InMemoryClient(big, peer("a")).push_update(worker_id, 1, 0, update, 10, {})

    # Assert
    assert not refused.accepted and "over max_chunk_bytes" in refused.reason
    assert accepted.accepted  # the refused stream was aborted: its upload slot and the round's reservation are free
    assert oversized.wait_task(worker_id, 10).kind is TaskKind.FINISH
    thread.join(15)


def test_join_passes_this_clients_peer_to_the_ps(ps: ParameterServer) -> None:
    client = InMemoryClient(ps, peer("a"))
    worker_id = client.join("a", 10).worker_id

    # Another certificate cannot act for this worker.
    with pytest.raises(StaleSession, match="bound to another certificate"):
        InMemoryClient(ps, peer("b")).wait_task(worker_id, 0.1)
    assert client.wait_task(worker_id, 10).kind is TaskKind.TRAIN
    assert client.push_update(worker_id, 1, 0, INITIAL, 10, {}).accepted  # ends the round


@pytest.mark.parametrize("call", ["join", "wait_task", "pull_model", "push_update", "leave"])
def test_every_call_after_close_raises_closed_error(idle_ps: ParameterServer, call: str) -> None:
    ps = idle_ps
    client = InMemoryClient(ps, peer("a"))
    client.close()
    client.close()  # idempotent
    calls = {
        "join": lambda: client.join("a", 10),
        "wait_task": lambda: client.wait_task("w", 0.1),
        "pull_model": lambda: client.pull_model("w", 0),
        "push_update": lambda: client.push_update("w", 1, 0, INITIAL, 10, {}),
        "leave": lambda: client.leave("w", "done"),
    }

    with pytest.raises(ClosedError, match="used after close"):
        calls[call]()
    assert len(ps.core.registry) == 0  # nothing reached the PS


@pytest.mark.parametrize("chunk_bytes", [0, -1, 1.5, True])
def test_chunk_bytes_must_be_a_positive_int(idle_ps: ParameterServer, chunk_bytes: object) -> None:
    with pytest.raises(ValueError, match="chunk_bytes must be an int >= 1"):
        InMemoryClient(idle_ps, peer("a"), chunk_bytes=chunk_bytes)  # type: ignore[arg-type]
