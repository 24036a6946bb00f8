"""Item: a flood of unauthenticated calls must not void an honest worker's challenge (real gRPC on loopback)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from enclavefl.attest.ratls import create_ratls_identity
from tests.unit.transport.attested_server import RunningPs, Sim, challenge, join, make_sim, start_ps

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
