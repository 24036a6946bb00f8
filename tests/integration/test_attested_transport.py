"""Attested transport on real gRPC servers on 127.0.0.1: joins, refusals and attacks.

Every test runs a real :class:`FederationServer` in front of a real
:class:`ParameterServer` (a tiny numpy model, no torch) with
:class:`AttestedCredentials` made from simulated evidence.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import select
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from enclavefl.attest.measurement import measure_code
from enclavefl.attest.policy import Policy, parse_policy
from enclavefl.attest.providers import SimulatedProvider
from enclavefl.attest.ratls import RatlsIdentity, create_ratls_identity
from enclavefl.attest.simroot import SimRoot, init_sim_root
from enclavefl.config import parse_job
from enclavefl.errors import StaleSession, Unavailable, VerificationError
from enclavefl.proto import PROTOCOL_VERSION
from enclavefl.proto import federation_pb2 as pb
from enclavefl.proto import federation_pb2_grpc as pb_grpc
from enclavefl.server.ps import ParameterServer
from enclavefl.tensors import ParamSet
from enclavefl.transport.attested import AttestedCredentials, join_message
from enclavefl.transport.audit import AuditLog
from enclavefl.transport.client import FederationClient
from enclavefl.transport.service import FederationServer

CHUNK = 1 << 16


@dataclass(frozen=True)
class Sim:
    root: SimRoot
    provider: SimulatedProvider
    policy: Policy


def policy_for(sim_root: SimRoot, mr_enclave: bytes, mr_signer: bytes) -> Policy:
    return parse_policy({
        "sgx_mrs": [{"mr_enclave": mr_enclave.hex(), "mr_signer": mr_signer.hex(), "isv_prod_id": 0, "isv_svn": 0}],
        "allow_simulated": True,
        "simulated_root_sha256": sim_root.root_fingerprint,
    })


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Sim:
    root = init_sim_root(tmp_path_factory.mktemp("sim") / "root", name="itest")
    provider = SimulatedProvider(root, measure_code())
    return Sim(root, provider, policy_for(root, provider.mr_enclave, provider.mr_signer))


def read_audit(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
    def cert_pem(self) -> bytes:
        return self.credentials.certificate_pem


def start_ps(tmp: Path, sim: Sim, *, port: int = 0, policy: Policy | None = None) -> RunningPs:
    config = parse_job({"job": {"name": "att", "rounds": 1}, "round": {"min_workers": 1, "start_window_s": 5}})
    ps = ParameterServer(config, ParamSet([("w", np.zeros(4, np.float32))]), out_dir=tmp)
    audit_path = tmp / "ps-audit.jsonl"
    creds = AttestedCredentials.create(sim.provider, policy or sim.policy, node="ps", role="ps", audit=AuditLog(audit_path))
    server = FederationServer.start(ps, creds, listen=f"127.0.0.1:{port}", chunk_bytes=CHUNK, max_threads=8)
    return RunningPs(ps, server, creds, audit_path)


@pytest.fixture
def running(tmp_path: Path, sim: Sim) -> Iterator[RunningPs]:
    r = start_ps(tmp_path, sim)
    yield r
    r.server.stop(0.1)


def worker_credentials(tmp: Path, provider: SimulatedProvider, policy: Policy, name: str = "w0") -> AttestedCredentials:
    return AttestedCredentials.create(provider, policy, node=name, role="worker", audit=AuditLog(tmp / f"{name}-audit.jsonl"))


def raw_join(ps: RunningPs, certificate: bytes, key: ec.EllipticCurvePrivateKey, *, nonce: bytes | None = None,
             name: str = "mallory") -> tuple[pb.JoinReply, bytes]:
    """A hand-made attested join over a channel pinned to the real PS certificate."""
    channel = grpc.secure_channel(ps.target, grpc.ssl_channel_credentials(root_certificates=ps.cert_pem),
                                  options=[("grpc.ssl_target_name_override", "enclavefl-ps")])
    with channel:
        stub = pb_grpc.FederationStub(channel)  # type: ignore[no-untyped-call]
        if nonce is None:
            nonce = stub.Challenge(pb.ChallengeRequest(protocol_version=PROTOCOL_VERSION), timeout=5).nonce
        ps_sha = hashlib.sha256(x509.load_pem_x509_certificate(ps.cert_pem).public_bytes(serialization.Encoding.DER)).digest()
        signature = key.sign(join_message(nonce, ps_sha, name), ec.ECDSA(hashes.SHA256()))
        request = pb.JoinRequest(protocol_version=PROTOCOL_VERSION, worker_name=name, num_samples=10,
                                 attestation=pb.JoinAttestation(certificate=certificate, nonce=nonce,
                                                                ps_cert_sha256=ps_sha, signature=signature))
        return stub.Join(request, timeout=5), nonce


def test_attested_worker_joins_and_later_calls_carry_its_session(tmp_path: Path, running: RunningPs, sim: Sim) -> None:
    creds = worker_credentials(tmp_path, sim.provider, sim.policy)
    with FederationClient(running.target, creds, chunk_bytes=CHUNK) as client:
        info = client.join("w0", 10)
        task = client.wait_task(info.worker_id, 0.05)
    assert task.ps_instance == running.ps.instance
    ps_audit = read_audit(running.audit_path)
    assert [r["decision"] for r in ps_audit] == ["accepted"]
    assert ps_audit[0]["mr_enclave"] == sim.provider.mr_enclave.hex() and ps_audit[0]["simulated"] is True
    assert ps_audit[0]["note"] == "SIMULATED evidence, NOT A REAL TEE"
    worker_audit = read_audit(tmp_path / "w0-audit.jsonl")
    assert worker_audit[0]["decision"] == "accepted" and worker_audit[0]["role"] == "worker"


def test_call_without_a_session_is_refused(tmp_path: Path, running: RunningPs, sim: Sim) -> None:
    creds = worker_credentials(tmp_path, sim.provider, sim.policy)
    with FederationClient(running.target, creds, chunk_bytes=CHUNK) as client:
        with pytest.raises(StaleSession, match="no attested session"):
            client.wait_task("w-12345678", 0.05)


def test_join_without_attestation_is_refused(running: RunningPs) -> None:
    channel = grpc.secure_channel(running.target, grpc.ssl_channel_credentials(root_certificates=running.cert_pem),
                                  options=[("grpc.ssl_target_name_override", "enclavefl-ps")])
    with channel:
        stub = pb_grpc.FederationStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as info:
            stub.Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION, worker_name="x", num_samples=1), timeout=5)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "join.attestation" in (info.value.details() or "")


def test_quote_copied_into_another_certificate_is_refused(tmp_path: Path, running: RunningPs, sim: Sim) -> None:
    genuine = create_ratls_identity(sim.provider, common_name="w0", validity=dt.timedelta(hours=1))
    thief = ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateBuilder().subject_name(genuine.certificate.subject).issuer_name(genuine.certificate.subject)
               .public_key(thief.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(genuine.certificate.not_valid_before_utc).not_valid_after(genuine.certificate.not_valid_after_utc))
    for ext in genuine.certificate.extensions:
        if isinstance(ext.value, x509.UnrecognizedExtension):
            builder = builder.add_extension(ext.value, critical=ext.critical)
    forged = builder.sign(thief, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(grpc.RpcError) as info:
        raw_join(running, forged, thief)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "binding" in (info.value.details() or "")
    assert read_audit(running.audit_path)[-1]["field"] == "binding"
    assert not len(running.ps.core.registry)


def test_certificate_replayed_without_its_key_is_refused(running: RunningPs, sim: Sim) -> None:
    genuine = create_ratls_identity(sim.provider, common_name="w0", validity=dt.timedelta(hours=1))
    with pytest.raises(grpc.RpcError) as info:
        raw_join(running, genuine.cert_pem, ec.generate_private_key(ec.SECP256R1()))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "join.signature" in (info.value.details() or "")
    assert not len(running.ps.core.registry)


def test_a_nonce_is_single_use(running: RunningPs, sim: Sim) -> None:
    genuine = create_ratls_identity(sim.provider, common_name="w0", validity=dt.timedelta(hours=1))
    reply, nonce = raw_join(running, genuine.cert_pem, genuine.key)
    assert reply.session_token
    with pytest.raises(grpc.RpcError) as info:
        raw_join(running, genuine.cert_pem, genuine.key, nonce=nonce)
    assert "join.nonce" in (info.value.details() or "")


def test_worker_with_one_changed_line_of_code_is_refused(tmp_path: Path, running: RunningPs, sim: Sim) -> None:
    task = tmp_path / "task.py"
    task.write_text("def make(config):\n    return None\n")
    task_changed = tmp_path / "changed" / "task.py"
    task_changed.parent.mkdir()
    task_changed.write_text("def make(config):\n    return None  # one changed line\n")
    assert measure_code([task]).mr_enclave != measure_code([task_changed]).mr_enclave
    other = SimulatedProvider(sim.root, measure_code([task_changed]))
    creds = worker_credentials(tmp_path, other, sim.policy)
    with FederationClient(running.target, creds, chunk_bytes=CHUNK) as client:
        with pytest.raises(VerificationError) as info:
            client.join("w-changed", 10)
    message = str(info.value)
    assert "mr_enclave" in message and sim.provider.mr_enclave.hex() in message and other.mr_enclave.hex() in message
    refusal = read_audit(running.audit_path)[-1]
    assert refusal["decision"] == "refused" and refusal["field"] == "mr_enclave"
    assert refusal["mr_enclave"] == other.mr_enclave.hex()
    assert not len(running.ps.core.registry)


def test_worker_refuses_a_ps_whose_signer_is_not_in_its_policy(tmp_path: Path, running: RunningPs, sim: Sim) -> None:
    wrong_signer = bytes(31) + b"\x01"
    worker_policy = policy_for(sim.root, sim.provider.mr_enclave, wrong_signer)
    creds = worker_credentials(tmp_path, sim.provider, worker_policy)
    with pytest.raises(VerificationError) as info:
        FederationClient(running.target, creds, chunk_bytes=CHUNK)
    assert info.value.field == "mr_signer"
    assert wrong_signer.hex() in str(info.value.expected) and info.value.actual == sim.provider.mr_signer.hex()
    # Nothing reached the PS: no challenge, no join, no decision in its audit log.
    assert read_audit(running.audit_path) == [] and not len(running.ps.core.registry)
    assert read_audit(tmp_path / "w0-audit.jsonl")[-1]["field"] == "mr_signer"


class TlsProxy:
    """A man in the middle on loopback: terminates TLS with its own RA-TLS certificate, relays to the PS."""

    def __init__(self, identity: RatlsIdentity, upstream: str, tmp: Path) -> None:
        (tmp / "mitm.pem").write_bytes(identity.cert_pem)
        (tmp / "mitm.key").write_bytes(identity.private_key_pem())  # the attacker's own key, test only
        self._server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._server_ctx.load_cert_chain(tmp / "mitm.pem", tmp / "mitm.key")
        self._server_ctx.set_alpn_protocols(["h2"])
        self._client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        # The attacker's upstream leg: it trusts anything, as an attacker would.
        self._client_ctx.check_hostname = False
        self._client_ctx.verify_mode = ssl.CERT_NONE
        self._client_ctx.set_alpn_protocols(["h2"])
        host, _, port = upstream.rpartition(":")
        self._upstream = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._serve, daemon=True)
        self._accept.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            t = threading.Thread(target=self._relay, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _relay(self, conn: socket.socket) -> None:
        try:
            down = self._server_ctx.wrap_socket(conn, server_side=True)
            up = self._client_ctx.wrap_socket(socket.create_connection(self._upstream, timeout=5))
        except (OSError, ssl.SSLError):
            conn.close()
            return

        # One thread does every read and write of both TLS sockets: OpenSSL connections are not safe
        # to read in one thread while another writes (two pump threads corrupted records under load).
        socks = (down, up)
        try:
            while True:
                ready = [sock for sock in socks if sock.pending()] or select.select(socks, [], [], 1.0)[0]
                for src in ready:
                    data = src.recv(65536)
                    if not data:
                        return
                    (up if src is down else down).sendall(data)
        except (OSError, ssl.SSLError, ValueError):
            pass
        finally:
            for sock in socks:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def close(self) -> None:
        self._listener.close()
        self._accept.join(5)


def test_man_in_the_middle_with_its_own_valid_quote_is_refused(tmp_path: Path, running: RunningPs, sim: Sim) -> None:
    # The proxy runs the very same measured code under the same sim root: its evidence passes the worker's policy.
    mitm_identity = create_ratls_identity(sim.provider, common_name="enclavefl-ps", validity=dt.timedelta(hours=1))
    proxy = TlsProxy(mitm_identity, running.target, tmp_path)
    try:
        creds = worker_credentials(tmp_path, sim.provider, sim.policy)
        with FederationClient(f"127.0.0.1:{proxy.port}", creds, chunk_bytes=CHUNK) as client:
            with pytest.raises(VerificationError) as info:
                client.join("w-victim", 10)
    finally:
        proxy.close()
    assert "join.ps_cert_sha256" in str(info.value) and "man in the middle" in str(info.value)
    assert read_audit(tmp_path / "w0-audit.jsonl")[0]["decision"] == "accepted"  # the worker was fooled at first...
    refusal = read_audit(running.audit_path)[-1]  # ...but the real PS refused the relayed join
    assert refusal["decision"] == "refused" and refusal["field"] == "join.ps_cert_sha256"
    assert not len(running.ps.core.registry)


def test_a_restarted_ps_is_verified_anew(tmp_path: Path, sim: Sim) -> None:
    first = start_ps(tmp_path / "a", sim)
    port = first.server.port
    creds = worker_credentials(tmp_path, sim.provider, sim.policy)
    client = FederationClient(first.target, creds, chunk_bytes=CHUNK)
    info = client.join("w0", 10)
    first.server.stop(0.1)
    second = start_ps(tmp_path / "b", sim, port=port)
    try:
        with pytest.raises((Unavailable, StaleSession)):
            client.wait_task(info.worker_id, 0.05)  # the old channel is pinned to the old key
        client.close()
        with FederationClient(second.target, creds, chunk_bytes=CHUNK) as fresh:
            fresh.join("w0", 10)
    finally:
        second.server.stop(0.1)
    checked = [r["peer"] for r in read_audit(tmp_path / "w0-audit.jsonl") if r["decision"] == "accepted"]
    assert len(checked) == 2 and checked[0] != checked[1]  # two different PS certificates, each verified


def test_an_expired_nonce_is_refused(tmp_path: Path, sim: Sim) -> None:
    now = [1000.0]
    ps_identity = create_ratls_identity(sim.provider, common_name="enclavefl-ps", validity=dt.timedelta(hours=1))
    ps = AttestedCredentials(ps_identity, sim.policy, node="ps", role="ps", audit=AuditLog(tmp_path / "a.jsonl"),
                             nonce_ttl_s=30.0, clock=lambda: now[0])
    worker = worker_credentials(tmp_path, sim.provider, sim.policy)
    ps_sha = hashlib.sha256(x509.load_pem_x509_certificate(ps_identity.cert_pem).public_bytes(serialization.Encoding.DER)).digest()
    nonce = ps.issue_challenge()
    now[0] += 31.0
    with pytest.raises(VerificationError) as info:
        ps.admit(worker.prove_join(nonce, ps_sha, "w0"), "w0", None)
    assert info.value.field == "join.nonce"
    fresh = ps.issue_challenge()
    peer, token = ps.admit(worker.prove_join(fresh, ps_sha, "w0"), "w0", None)
    assert ps.identify_peer(None, token) == peer and "SIMULATED" in peer.label
    refusal = read_audit(tmp_path / "a.jsonl")[0]
    assert refusal["field"] == "join.nonce" and refusal["simulated"] is True  # the claimed evidence is simulated
