"""Item: a flood of unauthenticated calls must not void an honest worker's challenge (real gRPC on loopback)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from enclavefl.attest.ratls import create_ratls_identity
from enclavefl.errors import Unavailable
from enclavefl.transport.attested import AttestedCredentials
from enclavefl.transport.audit import AuditLog
from enclavefl.transport.client import FederationClient
from enclavefl.transport.ratelimit import ConnectionLimiter
from tests.unit.transport.attested_server import CHUNK, RunningPs, Sim, challenge, join, make_sim, start_ps

FLOOD = 1100  # more than the 1024 outstanding nonces the PS used to keep


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Sim:
    return make_sim(tmp_path_factory.mktemp("sim"))


@pytest.fixture
def running(tmp_path: Path, sim: Sim) -> Iterator[RunningPs]:
    r = start_ps(tmp_path, sim)
    yield r
    r.server.stop(0.1)


def test_a_challenge_flood_on_another_connection_leaves_a_workers_nonce_valid(running: RunningPs, sim: Sim) -> None:
    worker = create_ratls_identity(sim.provider, common_name="w0", validity=dt.timedelta(hours=1))
    with running.channel() as honest, running.channel() as flooder:
        nonce = challenge(honest)
        for _ in range(FLOOD):
            try:
                challenge(flooder)
            except grpc.RpcError as exc:  # refused for the rate: the flood is still sent
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        reply = join(honest, running, worker.cert_pem, worker.key, nonce)

    assert reply.session_token and reply.worker_id


def test_a_nonce_issued_on_another_connection_is_refused(running: RunningPs, sim: Sim) -> None:
    worker = create_ratls_identity(sim.provider, common_name="w0", validity=dt.timedelta(hours=1))
    with running.channel() as issued_on, running.channel() as other:
        nonce = challenge(issued_on)
        with pytest.raises(grpc.RpcError) as info:
            join(other, running, worker.cert_pem, worker.key, nonce)

    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "join.nonce" in (info.value.details() or "") and "for this connection" in (info.value.details() or "")


def test_a_nonce_is_single_use_on_its_own_connection(running: RunningPs, sim: Sim) -> None:
    worker = create_ratls_identity(sim.provider, common_name="w0", validity=dt.timedelta(hours=1))
    with running.channel() as channel:
        nonce = challenge(channel)
        join(channel, running, worker.cert_pem, worker.key, nonce)
        with pytest.raises(grpc.RpcError) as info:
            join(channel, running, worker.cert_pem, worker.key, nonce)

    assert "join.nonce" in (info.value.details() or "") and "already used" in (info.value.details() or "")


def test_calls_over_a_connections_budget_are_refused_on_that_connection_only(tmp_path: Path, sim: Sim) -> None:
    running = start_ps(tmp_path, sim, limiter=ConnectionLimiter(rate_per_s=0.01, burst=3))
    worker = create_ratls_identity(sim.provider, common_name="w0", validity=dt.timedelta(hours=1))
    try:
        with running.channel() as flooder, running.channel() as honest:
            for _ in range(3):
                challenge(flooder)
            with pytest.raises(grpc.RpcError) as info:
                challenge(flooder)
            reply = join(honest, running, worker.cert_pem, worker.key, challenge(honest))
    finally:
        running.server.stop(0.1)

    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (info.value.details() or "").startswith("rate limited")
    assert reply.session_token


def test_the_worker_client_reads_the_rate_limit_as_unavailable(tmp_path: Path, sim: Sim) -> None:
    running = start_ps(tmp_path, sim, limiter=ConnectionLimiter(rate_per_s=0.01, burst=1))
    creds = AttestedCredentials.create(sim.provider, sim.policy, node="w0", role="worker",
                                       audit=AuditLog(tmp_path / "w0-audit.jsonl"))
    try:
        with FederationClient(running.target, creds, chunk_bytes=CHUNK) as client:
            with pytest.raises(Unavailable, match="the PS refuses calls from this connection for now: rate limited"):
                client.join("w0", 10)  # the Challenge spends the one token, the Join is refused
    finally:
        running.server.stop(0.1)
