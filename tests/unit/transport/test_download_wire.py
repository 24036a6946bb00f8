"""Downloads of changed rows and 8-bit blocks over the real gRPC transport (TLS on 127.0.0.1, in this process)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization

from enclavefl.download_codec import NO_MODEL, quantize_download, resolve_download
from enclavefl.messages import JoinInfo, PeerIdentity, TaskInfo, TaskKind, UpdateMeta, UpdateSink
from enclavefl.tensors import ParamSet, SparseRows
from enclavefl.transport.certs import make_ca, make_node_cert
from enclavefl.transport.client import FederationClient
from enclavefl.transport.credentials import CaCredentials
from enclavefl.transport.service import FederationServer

CHUNK = 4096
BASE = ParamSet({"emb": np.arange(12, dtype=np.float32).reshape(6, 2), "w": np.linspace(0, 1, 2048, dtype=np.float32)})


@dataclass
class DownloadHandler:
    """Sends rows 1 and 4 changed to a worker that holds a model, and the quantized model to one that does not."""

    asked: list[int] = field(default_factory=list)

    def join(self, peer: PeerIdentity, worker_name: str, num_samples: int) -> JoinInfo:
        return JoinInfo(f"id-{worker_name}", "job", "ps-1", 3)

    def wait_task(self, peer: PeerIdentity, worker_id: str, max_wait_s: float) -> TaskInfo:
        return TaskInfo(kind=TaskKind.WAIT, ps_instance="ps-1")

    def model_for(self, peer: PeerIdentity, worker_id: str, model_version: int) -> tuple[int, ParamSet]:
        self.asked.append(model_version)
        if model_version == NO_MODEL:
            return 7, quantize_download(BASE)
        rows = SparseRows(np.asarray([1, 4]), np.full((2, 2), -1, np.float32), (6, 2))
        return 8, ParamSet({"emb": rows, "w": BASE["w"]})

    def open_update(self, peer: PeerIdentity, meta: UpdateMeta) -> UpdateSink:
        raise NotImplementedError

    def leave(self, peer: PeerIdentity, worker_id: str, reason: str) -> None:
        pass


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[DownloadHandler, FederationClient]]:
    ca_cert, ca_key = make_ca("download-test")
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    ps = make_node_cert(ca_cert, ca_key, "enclavefl ps", server_names=("enclavefl-ps",))
    worker = make_node_cert(ca_cert, ca_key, "enclavefl worker-0")
    handler = DownloadHandler()
    server = FederationServer.start(handler, CaCredentials(ca_pem, ps.cert_pem, ps.key_pem), listen="127.0.0.1:0",
                                    chunk_bytes=CHUNK, max_threads=4)
    try:
        with FederationClient(f"127.0.0.1:{server.port}", CaCredentials(ca_pem, worker.cert_pem, worker.key_pem),
                              chunk_bytes=CHUNK) as client:
            yield handler, client
    finally:
        server.stop(0.5)


def test_a_worker_without_a_model_announces_minus_one_and_gets_the_quantized_model(
        served: tuple[DownloadHandler, FederationClient]) -> None:
    handler, client = served
    version, download, nbytes = client.pull_model("id-w", NO_MODEL)
    assert handler.asked[-1] == NO_MODEL
    # 12 floats dense (48 B) + 2048 codes + 2 blocks x (lo, step) float32 (16 B).
    assert (version, nbytes) == (7, 48 + 2048 + 16)
    model = resolve_download(download, None, NO_MODEL)
    assert model["emb"] == pytest.approx(BASE["emb"]) and np.abs(model["w"] - BASE["w"]).max() <= 0.5 / 255 * 1.001


def test_changed_rows_reach_the_worker_and_apply_to_its_copy(served: tuple[DownloadHandler, FederationClient]) -> None:
    handler, client = served
    version, download, _ = client.pull_model("id-w", 7)
    assert handler.asked[-1] == 7
    model = resolve_download(download, BASE, 7)
    assert version == 8
    assert model["emb"].tolist() == [[0, 1], [-1, -1], [4, 5], [6, 7], [-1, -1], [10, 11]]
