"""Protocol 2 end to end: FederationClient and FederationServer over TLS on 127.0.0.1, in this process.

The handler is an in-memory one that records what reaches it, so each test
sees exactly what the PS logic would see after the wire.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization

from enclavefl.errors import ProtocolError, VersionMismatch
from enclavefl.messages import (
    ClientSettings,
    JoinInfo,
    PeerIdentity,
    TaskInfo,
    TaskKind,
    UpdateKind,
    UpdateMeta,
    UpdateSink,
)
from enclavefl.proto import PROTOCOL_VERSION
from enclavefl.proto import federation_pb2 as pb
from enclavefl.proto import federation_pb2_grpc as pb_grpc
from enclavefl.tensors import ParamSet, StreamHeader
from enclavefl.transport.certs import make_ca, make_node_cert
from enclavefl.transport.client import FederationClient
from enclavefl.transport.credentials import CaCredentials
from enclavefl.transport.service import FederationServer, message_limit
from enclavefl.transport.wire import (
    MAX_EXTENSION_KEY_BYTES,
    MAX_EXTENSIONS,
    MAX_EXTENSIONS_TOTAL_BYTES,
    error_from_rpc,
    update_meta_to_proto,
)

CHUNK = 4096


class RecordingSink(UpdateSink):
    def __init__(self) -> None:
        self.received = 0
        self.committed = False

    def feed(self, chunk: bytes | memoryview) -> None:
        self.received += len(chunk)

    def commit(self) -> None:
        self.committed = True

    def abort(self, reason: str) -> None:
        pass


@dataclass
class RecordingHandler:
    """A FederationHandler that hands out ``task`` and keeps every update header it is given."""

    task: TaskInfo = TaskInfo(kind=TaskKind.WAIT, ps_instance="ps-1")
    updates: list[UpdateMeta] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def join(self, peer: PeerIdentity, worker_name: str, num_samples: int) -> JoinInfo:
        return JoinInfo(f"id-{worker_name}", "job", "ps-1", 3)

    def wait_task(self, peer: PeerIdentity, worker_id: str, max_wait_s: float) -> TaskInfo:
        return self.task

    def model_for(self, peer: PeerIdentity, worker_id: str, model_version: int) -> tuple[int, ParamSet]:
        return 0, ParamSet({"w": np.zeros(2, np.float32)})

    def open_update(self, peer: PeerIdentity, meta: UpdateMeta) -> UpdateSink:
        with self.lock:
            self.updates.append(meta)
        return RecordingSink()

    def leave(self, peer: PeerIdentity, worker_id: str, reason: str) -> None:
        pass


@dataclass(frozen=True)
class Pki:
    ps: CaCredentials
    worker: CaCredentials


@pytest.fixture(scope="module")
def pki() -> Pki:
    ca_cert, ca_key = make_ca("proto-test")
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    ps = make_node_cert(ca_cert, ca_key, "enclavefl ps", server_names=("enclavefl-ps",))
    worker = make_node_cert(ca_cert, ca_key, "enclavefl worker-0")
    return Pki(CaCredentials(ca_pem, ps.cert_pem, ps.key_pem), CaCredentials(ca_pem, worker.cert_pem, worker.key_pem))


@dataclass
class Running:
    handler: RecordingHandler
    target: str


@pytest.fixture(scope="module")
def running(pki: Pki) -> Iterator[Running]:
    handler = RecordingHandler()
    server = FederationServer.start(handler, pki.ps, listen="127.0.0.1:0", chunk_bytes=CHUNK, max_threads=4)
    try:
        yield Running(handler, f"127.0.0.1:{server.port}")
    finally:
        server.stop(0.5)


@pytest.fixture
def client(running: Running, pki: Pki) -> Iterator[FederationClient]:
    with FederationClient(running.target, pki.worker, chunk_bytes=CHUNK) as c:
        yield c


def test_task_settings_and_config_reach_the_worker(running: Running, client: FederationClient) -> None:
    # Prepare
    settings = ClientSettings(epochs=2, batch_size=8, lr=0.5, optimizer="adam", momentum=0.25, weight_decay=0.125,
                              algorithm="scaffold", proximal_mu=0.0)
    running.handler.task = TaskInfo(kind=TaskKind.TRAIN, ps_instance="ps-1", round=1, model_version=0,
                                    client=settings, config={"secagg.threshold": 2, "dp.mechanism": "gaussian"})

    # Execute
    task = client.wait_task("id-w", 0.0)

    # Assert
    assert task == running.handler.task


def test_update_kind_and_extensions_reach_the_ps(running: Running, client: FederationClient) -> None:
    # Prepare
    update = ParamSet({"w": np.arange(3000, dtype=np.float32)})  # 12000 bytes: three chunks
    extensions = {"secagg.share": bytes(range(256)) * 8, "empty": b""}

    # Execute
    result = client.push_update("id-w", 1, 0, update, 10, {"loss": 0.5}, kind=UpdateKind.MASKED,
                                extensions=extensions)

    # Assert
    assert result.accepted
    meta = running.handler.updates[-1]
    assert meta.kind is UpdateKind.MASKED
    assert meta.extensions == extensions
    assert meta.metrics == {"loss": 0.5}


def test_push_update_defaults_to_a_delta_without_extensions(running: Running, client: FederationClient) -> None:
    client.push_update("id-w", 1, 0, ParamSet({"w": np.zeros(2, np.float32)}), 10, {})

    meta = running.handler.updates[-1]
    assert meta.kind is UpdateKind.DELTA
    assert meta.extensions == {}


def test_ps_refuses_extensions_over_their_limit_naming_it(running: Running, client: FederationClient) -> None:
    extensions = {f"e{i}": b"" for i in range(MAX_EXTENSIONS + 1)}
    before = len(running.handler.updates)

    with pytest.raises(ProtocolError, match=f"UpdateHeader.extensions: {MAX_EXTENSIONS + 1} entries"):
        client.push_update("id-w", 1, 0, ParamSet({"w": np.zeros(2, np.float32)}), 10, {}, extensions=extensions)
    assert len(running.handler.updates) == before


def test_largest_allowed_update_header_fits_in_one_message_at_the_smallest_chunk_size() -> None:
    # 64 values of 128 KiB (8 MiB together) under 128-byte keys, plus a header of 1000 tensors.
    per_value = MAX_EXTENSIONS_TOTAL_BYTES // MAX_EXTENSIONS
    extensions = {f"{i:03d}".ljust(MAX_EXTENSION_KEY_BYTES, "k"): bytes(per_value) for i in range(MAX_EXTENSIONS)}
    params = ParamSet({f"layer{i}.weight": np.zeros((1, 1), np.float32) for i in range(1000)})
    meta = UpdateMeta("w" * 64, 1, 0, 1, StreamHeader.of(params), metrics={f"m{i}": 1.0 for i in range(100)},
                      kind=UpdateKind.MASKED, extensions=extensions)

    size = pb.UpdateChunk(header=update_meta_to_proto(meta)).ByteSize()

    assert size <= message_limit(4096)


def test_ps_refuses_a_protocol_1_worker_with_both_versions(running: Running, pki: Pki) -> None:
    setup = pki.worker.channel_setup(running.target)
    with grpc.secure_channel(running.target, setup.credentials, options=list(setup.options)) as channel:
        stub = pb_grpc.FederationStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as caught:
            stub.Join(pb.JoinRequest(protocol_version=1, worker_name="old", num_samples=1), timeout=5)

    error = error_from_rpc(caught.value, "Join")

    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert isinstance(error, VersionMismatch)
    assert f"upgrade the worker: this PS speaks protocol {PROTOCOL_VERSION}, the worker 1" in str(error)


def _join_reply_of_protocol_1(request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
    return pb.JoinReply(protocol_version=1, worker_id="id-x", job_name="job", ps_instance="old", rounds=1)


def test_worker_refuses_a_protocol_1_ps_with_both_versions(pki: Pki) -> None:
    # Prepare: a stand-in PS of protocol 1 that answers Join without checking the request.
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    handlers: Mapping[str, Any] = {
        "Join": grpc.unary_unary_rpc_method_handler(
            _join_reply_of_protocol_1, request_deserializer=pb.JoinRequest.FromString,
            response_serializer=pb.JoinReply.SerializeToString,
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("enclavefl.v1.Federation", handlers),))
    port = server.add_secure_port("127.0.0.1:0", pki.ps.server_credentials())
    server.start()
    try:
        with FederationClient(f"127.0.0.1:{port}", pki.worker, chunk_bytes=CHUNK) as c:
            # Execute / Assert
            with pytest.raises(VersionMismatch, match=(
                f"JoinReply: protocol version mismatch: upgrade the PS: this worker speaks protocol "
                f"{PROTOCOL_VERSION}, the PS 1"
            )):
                c.join("w", 1)
    finally:
        server.stop(0).wait(2)
