"""A session token works only on the connection that joined (real gRPC on loopback)."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from enclavefl.attest.ratls import create_ratls_identity
from enclavefl.errors import StaleSession, Unavailable
from enclavefl.transport.attested import AttestedCredentials
from enclavefl.transport.audit import AuditLog
from enclavefl.transport.client import FederationClient
from enclavefl.worker import Worker, WorkerSettings
from enclavefl.worker.runtime import grpc_client_factory
from tests.unit.transport.attested_server import (
    CHUNK,
    RunningPs,
    Sim,
    TcpRelay,
    challenge,
    join,
    make_sim,
    start_ps,
    wait_for,
    wait_task,
)
from tests.unit.worker.federation import AddTrainer


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Sim:
    return make_sim(tmp_path_factory.mktemp("sim"))


@pytest.fixture
def running(tmp_path: Path, sim: Sim) -> Iterator[RunningPs]:
    r = start_ps(tmp_path, sim)
    yield r
    r.server.stop(0.1)


def test_a_session_token_is_refused_on_another_connection(running: RunningPs, sim: Sim) -> None:
    worker = create_ratls_identity(sim.provider, common_name="w0", validity=dt.timedelta(hours=1))
    with running.channel() as joined, running.channel() as other:
        reply = join(joined, running, worker.cert_pem, worker.key, challenge(joined))
        wait_task(joined, reply.worker_id, reply.session_token)  # the joining connection may use it

        with pytest.raises(grpc.RpcError) as info:
            wait_task(other, reply.worker_id, reply.session_token)

    assert info.value.code() == grpc.StatusCode.NOT_FOUND  # StaleSession: the worker would join again
    assert "another connection" in (info.value.details() or "")


def _worker_credentials(tmp_path: Path, sim: Sim) -> AttestedCredentials:
    return AttestedCredentials.create(sim.provider, sim.policy, node="w0", role="worker",
                                      audit=AuditLog(tmp_path / "w0-audit.jsonl"))


def test_a_client_whose_connection_was_cut_is_told_to_join_again_and_can(
    tmp_path: Path, running: RunningPs, sim: Sim
) -> None:
    relay = TcpRelay(running.target)
    try:
        with FederationClient(relay.target, _worker_credentials(tmp_path, sim), chunk_bytes=CHUNK) as client:
            info = client.join("w0", 10)
            client.wait_task(info.worker_id, 0.05)
            relay.cut()

            errors: list[type[Exception]] = []
            while True:  # the channel may first report the cut connection, then it reconnects
                try:
                    client.wait_task(info.worker_id, 0.05)
                except (StaleSession, Unavailable) as exc:
                    errors.append(type(exc))
                    if isinstance(exc, StaleSession):
                        break
                    time.sleep(0.2)  # gRPC waits about a second before it reconnects
                assert len(errors) < 50, errors
            again = client.join("w0", 10)
            client.wait_task(again.worker_id, 0.05)
    finally:
        relay.close()

    # The certificate fetch, the channel's connection, and the one it reconnected with: one channel throughout.
    assert errors[-1] is StaleSession and relay.accepted == 3


def test_a_worker_joins_again_after_its_connection_is_cut_and_finishes_the_job(tmp_path: Path, sim: Sim) -> None:
    running = start_ps(tmp_path, sim, rounds=3)
    relay = TcpRelay(running.target)
    rounds_seen: list[int] = []
    running.ps.metrics.subscribe(lambda row: rounds_seen.append(int(row["round"])))
    worker = Worker(grpc_client_factory(relay.target, _worker_credentials(tmp_path, sim), chunk_bytes=CHUNK),
                    AddTrainer(1.0, 4), WorkerSettings(name="w0", poll_s=0.2, backoff_initial_s=0.05))
    threads = [threading.Thread(target=running.ps.run, daemon=True), threading.Thread(target=worker.run, daemon=True)]
    try:
        for t in threads:
            t.start()
        wait_for(lambda: 1 in rounds_seen, "round 1")
        relay.cut()
        threads[1].join(30)
    finally:
        running.ps.stop()
        threads[0].join(10)
        running.server.stop(0.1)
        relay.close()

    assert not threads[1].is_alive() and rounds_seen == [1, 2, 3]
    accepted = [line for line in running.audit_path.read_text().splitlines() if '"accepted"' in line]
    assert len(accepted) == 2  # joined, then joined again on the new connection
