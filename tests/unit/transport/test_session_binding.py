"""A session token works only on the connection that joined (real gRPC on loopback)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from enclavefl.attest.ratls import create_ratls_identity
from tests.unit.transport.attested_server import RunningPs, Sim, challenge, join, make_sim, start_ps, wait_task


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
