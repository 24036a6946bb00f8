"""A misbehaving worker over real gRPC + TLS: every bad update is refused and leaves no trace."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from enclavefl.proto import PROTOCOL_VERSION
from enclavefl.proto import federation_pb2 as pb
from enclavefl.server.checkpoint import latest_checkpoint
from enclavefl.tensors import ParamSet, StreamHeader, iter_chunks
from enclavefl.transport import CaCredentials, FederationClient, TaskKind
from enclavefl.transport.wire import header_to_proto
from tests.integration.cluster import Cluster, free_port

pytestmark = pytest.mark.slow


def _truncated_push(client: FederationClient, worker_id: str, round_: int, version: int, update: ParamSet) -> pb.PushReply:
    header = StreamHeader.of(update)

    def messages() -> Iterator[pb.UpdateChunk]:
        yield pb.UpdateChunk(header=pb.UpdateHeader(
            protocol_version=PROTOCOL_VERSION, worker_id=worker_id, round=round_, model_version=version,
            num_samples=10, tensors=header_to_proto(header)))
        chunks = list(iter_chunks(update, 1024))
        for chunk in chunks[:-1]:  # the last chunk never comes
            yield pb.UpdateChunk(data=bytes(chunk))

    return client._stub.PushUpdate(messages(), timeout=30)


def test_bad_updates_are_refused_and_leave_no_trace(make_cluster: type[Cluster]) -> None:
    c = make_cluster.create(job={"rounds": 1, "workers": 1}, round={"min_workers": 1, "update_window_s": 60})
    port = free_port()
    c.start_ps(port)
    certs = c.root / "certs"
    creds = CaCredentials.from_files(certs / "ca.pem", certs / "worker-0.pem", certs / "worker-0.key")
    with FederationClient(f"127.0.0.1:{port}", creds, chunk_bytes=2**21) as client:
        info = client.join("rogue", 100)
        task = client.wait_task(info.worker_id, 30)
        assert task.kind is TaskKind.TRAIN
        version, params, _ = client.pull_model(info.worker_id, task.model_version)
        names = list(params)
        first = names[0]

        def variant(name: str, value: np.ndarray) -> ParamSet:
            return ParamSet((n, value if n == name else np.zeros_like(params[n])) for n in names)

        bad = {
            "wrong shape": variant(first, np.zeros(params[first].shape[:-1] + (params[first].shape[-1] + 1,), np.float32)),
            "wrong dtype": variant(first, np.zeros(params[first].shape, np.float64)),
            "NaN": variant(first, np.full(params[first].shape, np.nan, np.float32)),
            "Inf": variant(first, np.full(params[first].shape, np.inf, np.float32)),
        }
        for what, update in bad.items():
            reply = client.push_update(info.worker_id, task.round, version, update, 100, {"loss": 1.0})
            assert not reply.accepted, what
            assert reply.reason, what
        reply = _truncated_push(client, info.worker_id, task.round, version, variant(first, np.ones(params[first].shape, np.float32)))
        assert not reply.accepted and "ended after" in reply.reason

        # Finally a valid update: the new model is exactly params + delta.
        delta = ParamSet((n, np.full(params[n].shape, 0.25, params[n].dtype)) for n in names)
        reply = client.push_update(info.worker_id, task.round, version, delta, 100, {"loss": 1.0, "accuracy": 0.5})
        assert reply.accepted, reply.reason
        assert client.wait_task(info.worker_id, 30).kind is TaskKind.FINISH
    assert c.wait_all(60) == {"ps": 0}
    log = c.log("ps")
    for reason in ("shape", "dtype", "NaN or Inf", "ended after"):
        assert reason in log, reason
    final = latest_checkpoint(c.root / "checkpoints")
    assert final is not None and final.round == 1
    for n in names:
        np.testing.assert_array_equal(final.params[n], params[n] + np.float32(0.25))
