"""A real attested PS on 127.0.0.1 for the transport tests, and hand-made channels and calls to it.

The PS is a :class:`ParameterServer` (a tiny numpy model) behind a
:class:`FederationServer` with :class:`AttestedCredentials` made from
simulated evidence. Every channel opened here is its own HTTP/2 connection
(a local subchannel pool), as two workers' channels are.
"""

from __future__ import annotations

import hashlib
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from enclavefl.attest.measurement import measure_code
from enclavefl.attest.policy import Policy, parse_policy
from enclavefl.attest.providers import SimulatedProvider
from enclavefl.attest.simroot import SimRoot, init_sim_root
from enclavefl.config import parse_job
from enclavefl.proto import PROTOCOL_VERSION
from enclavefl.proto import federation_pb2 as pb
from enclavefl.proto import federation_pb2_grpc as pb_grpc
from enclavefl.server.ps import ParameterServer
from enclavefl.tensors import ParamSet
from enclavefl.transport.attested import AttestedCredentials, join_message
from enclavefl.transport.audit import AuditLog
from enclavefl.transport.ratelimit import ConnectionLimiter
from enclavefl.transport.service import SESSION_METADATA_KEY, FederationServer

CHUNK = 1 << 16


@dataclass(frozen=True)
class Sim:
    root: SimRoot
    provider: SimulatedProvider
    policy: Policy


def make_sim(folder: Path) -> Sim:
    root = init_sim_root(folder / "root", name="utest")
    provider = SimulatedProvider(root, measure_code())
    policy = parse_policy({
        "sgx_mrs": [{"mr_enclave": provider.mr_enclave.hex(), "mr_signer": provider.mr_signer.hex(),
                     "isv_prod_id": 0, "isv_svn": 0}],
        "allow_simulated": True,
        "simulated_root_sha256": root.root_fingerprint,
    })
    return Sim(root, provider, policy)


@dataclass
class RunningPs:
    ps: ParameterServer
    server: FederationServer
    credentials: AttestedCredentials
    audit_path: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def ps_cert_sha256(self) -> bytes:
        cert = x509.load_pem_x509_certificate(self.credentials.certificate_pem)
        return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()

    def channel(self, target: str | None = None) -> grpc.Channel:
        """A new channel pinned to the PS certificate, on a connection of its own."""
        return grpc.secure_channel(
            target or self.target, grpc.ssl_channel_credentials(root_certificates=self.credentials.certificate_pem),
            options=[("grpc.ssl_target_name_override", "enclavefl-ps"), ("grpc.use_local_subchannel_pool", 1)],
        )


def start_ps(tmp: Path, sim: Sim, *, rounds: int = 1, min_workers: int = 1,
             limiter: ConnectionLimiter | None = None) -> RunningPs:
    config = parse_job({"job": {"name": "att", "rounds": rounds},
                        "round": {"min_workers": min_workers, "start_window_s": 20, "update_window_s": 20}})
    ps = ParameterServer(config, ParamSet([("w", np.zeros(4, np.float32))]), out_dir=tmp)
    audit_path = tmp / "ps-audit.jsonl"
    creds = AttestedCredentials.create(sim.provider, sim.policy, node="ps", role="ps", audit=AuditLog(audit_path))
    server = FederationServer.start(ps, creds, listen="127.0.0.1:0", chunk_bytes=CHUNK, max_threads=8,
                                    limiter=limiter)
    return RunningPs(ps, server, creds, audit_path)


def wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.02)


def challenge(channel: grpc.Channel) -> bytes:
    stub = pb_grpc.FederationStub(channel)  # type: ignore[no-untyped-call]
    nonce: bytes = stub.Challenge(pb.ChallengeRequest(protocol_version=PROTOCOL_VERSION), timeout=5).nonce
    return nonce


def join(channel: grpc.Channel, ps: RunningPs, certificate: bytes, key: ec.EllipticCurvePrivateKey, nonce: bytes,
         name: str = "w0") -> pb.JoinReply:
    """An attested join over ``channel`` with a nonce the caller got (on this channel or another)."""
    stub = pb_grpc.FederationStub(channel)  # type: ignore[no-untyped-call]
    signature = key.sign(join_message(nonce, ps.ps_cert_sha256, name), ec.ECDSA(hashes.SHA256()))
    request = pb.JoinRequest(protocol_version=PROTOCOL_VERSION, worker_name=name, num_samples=10,
                             attestation=pb.JoinAttestation(certificate=certificate, nonce=nonce,
                                                            ps_cert_sha256=ps.ps_cert_sha256, signature=signature))
    reply: pb.JoinReply = stub.Join(request, timeout=5)
    return reply


def wait_task(channel: grpc.Channel, worker_id: str, token: str) -> pb.Task:
    stub = pb_grpc.FederationStub(channel)  # type: ignore[no-untyped-call]
    task: pb.Task = stub.WaitTask(
        pb.WaitTaskRequest(protocol_version=PROTOCOL_VERSION, worker_id=worker_id, max_wait_s=0.05),
        timeout=5, metadata=((SESSION_METADATA_KEY, token),),
    )
    return task


class TcpRelay:
    """A plain TCP relay on loopback (it sees TLS bytes only) whose connections the test can cut."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self._upstream = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self.accepted = 0
        self._accept = threading.Thread(target=self._serve, daemon=True)
        self._accept.start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while True:
            try:
                down, _ = self._listener.accept()
            except OSError:
                return
            up = socket.create_connection(self._upstream, timeout=5)
            with self._lock:
                self._pairs.append((down, up))
                self.accepted += 1
            threading.Thread(target=self._pump, args=(down, up), daemon=True).start()

    @staticmethod
    def _pump(down: socket.socket, up: socket.socket) -> None:
        try:
            while True:
                for src in select.select((down, up), [], [], 1.0)[0]:
                    data = src.recv(65536)
                    if not data:
                        return
                    (up if src is down else down).sendall(data)
        except (OSError, ValueError):
            pass
        finally:
            for sock in (down, up):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def cut(self) -> None:
        """Cuts every open connection (both ends see a reset or EOF); new ones are relayed again."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for sock in pair:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._listener.close()
        self.cut()
        self._accept.join(5)
