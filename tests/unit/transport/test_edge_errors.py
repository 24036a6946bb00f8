"""Failures at the PS's edge: only our error types, a short answer to the peer, one log line, no traceback.

Each test runs a real :class:`FederationServer` on 127.0.0.1 and talks to it
with a raw gRPC channel, so it sees exactly what a hostile peer would send and
get back, and what the PS logs meanwhile.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from enclavefl.attest.measurement import measure_code
from enclavefl.attest.policy import Policy, parse_policy
from enclavefl.attest.providers import SimulatedProvider
from enclavefl.attest.ratls import RatlsIdentity, create_ratls_identity
from enclavefl.attest.simroot import init_sim_root
from enclavefl.messages import JoinInfo, PeerIdentity, TaskInfo, UpdateMeta, UpdateSink
from enclavefl.proto import PROTOCOL_VERSION
from enclavefl.proto import federation_pb2 as pb
from enclavefl.tensors import ParamSet
from enclavefl.transport.attested import AttestedCredentials
from enclavefl.transport.audit import AuditLog
from enclavefl.transport.certs import make_ca, make_node_cert
from enclavefl.transport.credentials import CaCredentials, Credentials
from enclavefl.transport.service import FederationServer

CHUNK = 4096
SERVICE = "/enclavefl.v1.Federation/"
P256_OID_DER = bytes.fromhex("06082a8648ce3d030107")  # OBJECT IDENTIFIER 1.2.840.10045.3.1.7 (prime256v1)
UNKNOWN_CURVE_OID_DER = bytes.fromhex("06082a8648ce3d030108")  # 1.2.840.10045.3.1.8: no such named curve
TRUNCATED = b"\x0a\x05ab"  # field 1, length 5, then only 2 bytes: not a protobuf message


class Broken:
    """A handler whose every call fails with an internal error the peer must never read."""

    def join(self, peer: PeerIdentity, worker_name: str, num_samples: int) -> JoinInfo:
        return JoinInfo(f"id-{worker_name}", "job", "ps-1", 3)

    def wait_task(self, peer: PeerIdentity, worker_id: str, max_wait_s: float) -> TaskInfo:
        raise RuntimeError("internal detail: /srv/secret/db.sqlite is locked")

    def model_for(self, peer: PeerIdentity, worker_id: str, model_version: int) -> tuple[int, ParamSet]:
        return 0, ParamSet({"w": np.zeros(2, np.float32)})

    def open_update(self, peer: PeerIdentity, meta: UpdateMeta) -> UpdateSink:
        raise RuntimeError("internal detail: staging area full")

    def leave(self, peer: PeerIdentity, worker_id: str, reason: str) -> None:
        pass

    def heartbeat(self, peer: PeerIdentity, worker_id: str) -> None:
        pass


def _ca_pair() -> tuple[CaCredentials, CaCredentials]:
    ca_cert, ca_key = make_ca("edge-errors")
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    ps = make_node_cert(ca_cert, ca_key, "enclavefl ps", server_names=("enclavefl-ps",))
    worker = make_node_cert(ca_cert, ca_key, "enclavefl worker-0")
    return CaCredentials(ca_pem, ps.cert_pem, ps.key_pem), CaCredentials(ca_pem, worker.cert_pem, worker.key_pem)


@pytest.fixture(scope="module")
def ca_pair() -> tuple[CaCredentials, CaCredentials]:
    return _ca_pair()


def _serve(credentials: Credentials) -> FederationServer:
    return FederationServer.start(Broken(), credentials, listen="127.0.0.1:0", chunk_bytes=CHUNK, max_threads=4)


@pytest.fixture
def ca_server(ca_pair: tuple[CaCredentials, CaCredentials]) -> Iterator[grpc.Channel]:
    running = _serve(ca_pair[0])
    worker = ca_pair[1]
    setup = worker.channel_setup(f"127.0.0.1:{running.port}")
    channel = grpc.secure_channel(f"127.0.0.1:{running.port}", setup.credentials, options=list(setup.options))
    try:
        yield channel
    finally:
        channel.close()
        running.stop(0.2)


def _tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]


def _raw_unary(channel: grpc.Channel, method: str, request: bytes) -> grpc.RpcError:
    call = channel.unary_unary(SERVICE + method)
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=5)
    return info.value


# ------------------------------------------------------------------ malformed protobuf


@pytest.mark.parametrize("method", ["Challenge", "Join", "WaitTask", "Leave", "Heartbeat"])
def test_a_malformed_request_is_invalid_argument_without_a_traceback(
    ca_server: grpc.Channel, caplog: pytest.LogCaptureFixture, method: str
) -> None:
    caplog.set_level(logging.INFO)

    error = _raw_unary(ca_server, method, TRUNCATED)

    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "malformed" in error.details()  # type: ignore[attr-defined]
    assert _tracebacks(caplog) == []


def test_a_malformed_pull_request_is_invalid_argument_without_a_traceback(
    ca_server: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    call = ca_server.unary_stream(SERVICE + "PullModel")

    with pytest.raises(grpc.RpcError) as info:
        list(call(TRUNCATED, timeout=5))

    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert _tracebacks(caplog) == []


def test_a_malformed_first_update_chunk_is_invalid_argument_without_a_traceback(
    ca_server: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    call = ca_server.stream_unary(SERVICE + "PushUpdate")

    with pytest.raises(grpc.RpcError) as info:
        call(iter([TRUNCATED]), timeout=5)

    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert _tracebacks(caplog) == []


def test_a_flood_of_malformed_requests_logs_a_bounded_number_of_lines(
    ca_server: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)

    for _ in range(60):
        _raw_unary(ca_server, "Heartbeat", TRUNCATED)

    lines = [r for r in caplog.records if r.name.startswith("enclavefl")]
    assert 1 <= len(lines) <= 12


# ------------------------------------------------------------------ unexpected exceptions


def test_an_unexpected_handler_error_is_internal_with_a_generic_message(
    ca_server: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    request = pb.WaitTaskRequest(protocol_version=PROTOCOL_VERSION, worker_id="w", max_wait_s=0.0)

    error = _raw_unary(ca_server, "WaitTask", request.SerializeToString())

    assert error.code() is grpc.StatusCode.INTERNAL  # type: ignore[attr-defined]
    assert "secret" not in error.details() and "Exception calling application" not in error.details()  # type: ignore[attr-defined]
    assert _tracebacks(caplog) == []
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("enclavefl") and "WaitTask" in r.getMessage()]
    assert len(ours) == 1 and "RuntimeError" in ours[0]


# ------------------------------------------------------------------ a join certificate with an unknown curve


def _sim_policy(tmp: Path) -> tuple[SimulatedProvider, Policy]:
    root = init_sim_root(tmp / "root", name="edge")
    provider = SimulatedProvider(root, measure_code())
    policy = parse_policy({
        "sgx_mrs": [{"mr_enclave": provider.mr_enclave.hex(), "mr_signer": provider.mr_signer.hex(),
                     "isv_prod_id": 0, "isv_svn": 0}],
        "allow_simulated": True,
        "simulated_root_sha256": root.root_fingerprint,
    })
    return provider, policy


def _unknown_curve_certificate(provider: SimulatedProvider) -> bytes:
    """A real RA-TLS certificate whose key's curve OID is changed to one no library knows."""
    import datetime as dt

    identity = create_ratls_identity(provider, common_name="mallory", validity=dt.timedelta(hours=1))
    der = x509.load_pem_x509_certificate(identity.cert_pem).public_bytes(serialization.Encoding.DER)
    assert P256_OID_DER in der
    changed = der.replace(P256_OID_DER, UNKNOWN_CURVE_OID_DER, 1)
    return x509.load_der_x509_certificate(changed).public_bytes(serialization.Encoding.PEM)


def test_a_join_certificate_with_an_unknown_curve_is_refused_audited_and_logged_without_a_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    caplog.set_level(logging.INFO)
    provider, policy = _sim_policy(tmp_path)
    audit_path = tmp_path / "audit.jsonl"
    creds = AttestedCredentials.create(provider, policy, node="ps", role="ps", audit=AuditLog(audit_path))
    running = _serve(creds)
    target = f"127.0.0.1:{running.port}"
    certificate = _unknown_curve_certificate(provider)
    ps_sha = hashlib.sha256(
        x509.load_pem_x509_certificate(creds.certificate_pem).public_bytes(serialization.Encoding.DER)
    ).digest()
    channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=creds.certificate_pem),
                                  options=[("grpc.ssl_target_name_override", "enclavefl-ps")])
    try:
        challenge = channel.unary_unary(SERVICE + "Challenge", request_serializer=pb.ChallengeRequest.SerializeToString,
                                        response_deserializer=pb.ChallengeReply.FromString)
        nonce = challenge(pb.ChallengeRequest(protocol_version=PROTOCOL_VERSION), timeout=5).nonce
        request = pb.JoinRequest(protocol_version=PROTOCOL_VERSION, worker_name="mallory", num_samples=1,
                                 attestation=pb.JoinAttestation(certificate=certificate, nonce=nonce,
                                                                ps_cert_sha256=ps_sha, signature=b"\x30\x00"))

        # Execute
        error = _raw_unary(channel, "Join", request.SerializeToString())
    finally:
        channel.close()
        running.stop(0.2)

    # Assert
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    assert error.details().startswith("certificate:")  # type: ignore[attr-defined]
    assert "is not supported" in error.details()  # type: ignore[attr-defined]
    records = [json.loads(line) for line in audit_path.read_text().splitlines()]
    assert [(r["decision"], r["field"]) for r in records] == [("refused", "certificate")]
    assert _tracebacks(caplog) == []


# ------------------------------------------------------------------ certificates the fuzzer found


def _sim_identity(provider: SimulatedProvider) -> RatlsIdentity:
    import datetime as dt

    return create_ratls_identity(provider, common_name="mallory", validity=dt.timedelta(hours=1))


def _sim_der(provider: SimulatedProvider) -> bytes:
    return x509.load_pem_x509_certificate(_sim_identity(provider).cert_pem).public_bytes(serialization.Encoding.DER)


def _der_sequence(content: bytes) -> bytes:
    size = len(content)
    length = bytes([size]) if size < 0x80 else bytes([0x80 | ((size.bit_length() + 7) // 8)]) + size.to_bytes(
        (size.bit_length() + 7) // 8, "big")
    return b"\x30" + length + content


def _resigned(identity: RatlsIdentity, spoiled_der: bytes) -> bytes:
    """A spoiled certificate signed again by its own key, so that its self-signature holds."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    tbs = x509.load_der_x509_certificate(spoiled_der).tbs_certificate_bytes
    signature = identity.key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    ecdsa_with_sha256 = bytes.fromhex("300a06082a8648ce3d040302")
    bit_string = b"\x03" + bytes([len(signature) + 1, 0]) + signature
    return _der_sequence(tbs + ecdsa_with_sha256 + bit_string)


def _version_10(der: bytes) -> bytes:
    """The certificate with its version field [0] INTEGER 2 (v3) changed to 10, which X.509 does not define."""
    return der.replace(bytes.fromhex("a003020102"), bytes.fromhex("a00302010a"), 1)


def _duplicate_extension(der: bytes) -> bytes:
    """The certificate with its authority key identifier's OID (2.5.29.35) changed to the subject key identifier's."""
    return der.replace(bytes.fromhex("0603551d23"), bytes.fromhex("0603551d0e"), 1)


def _pem(der: bytes) -> bytes:
    import base64

    body = base64.encodebytes(der).replace(b"\n", b"")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return b"-----BEGIN CERTIFICATE-----\n" + b"\n".join(lines) + b"\n-----END CERTIFICATE-----\n"


@pytest.mark.parametrize("spoil, field", [(_version_10, "certificate"), (_duplicate_extension, "certificate")])
@pytest.mark.parametrize("encode", [bytes, _pem], ids=["der", "pem"])
def test_a_certificate_cryptography_cannot_read_is_a_verification_error(
    tmp_path: Path, spoil: Callable[[bytes], bytes], field: str, encode: Callable[[bytes], bytes]
) -> None:
    import datetime as dt

    from enclavefl.attest.ratls import verify_ratls_certificate
    from enclavefl.errors import VerificationError

    provider, policy = _sim_policy(tmp_path)
    identity = _sim_identity(provider)
    der = x509.load_pem_x509_certificate(identity.cert_pem).public_bytes(serialization.Encoding.DER)
    spoiled = spoil(der) if spoil is _version_10 else _resigned(identity, spoil(der))

    with pytest.raises(VerificationError) as info:
        verify_ratls_certificate(encode(spoiled), policy=policy, at=dt.datetime.now(dt.timezone.utc))
    assert info.value.field == field


@pytest.mark.parametrize("spoil", [_version_10, _duplicate_extension])
def test_a_join_with_a_certificate_cryptography_cannot_read_is_refused_and_audited(
    tmp_path: Path, spoil: Callable[[bytes], bytes]
) -> None:
    from enclavefl.errors import VerificationError
    from enclavefl.transport.credentials import JoinProof

    provider, policy = _sim_policy(tmp_path)
    audit_path = tmp_path / "audit.jsonl"
    creds = AttestedCredentials.create(provider, policy, node="ps", role="ps", audit=AuditLog(audit_path))
    ps_sha = hashlib.sha256(
        x509.load_pem_x509_certificate(creds.certificate_pem).public_bytes(serialization.Encoding.DER)
    ).digest()
    proof = JoinProof(_pem(spoil(_sim_der(provider))), creds.issue_challenge(), ps_sha, b"\x30\x00")

    with pytest.raises(VerificationError):
        creds.admit(proof, "mallory", None)

    records = [json.loads(line) for line in audit_path.read_text().splitlines()]
    assert [r["decision"] for r in records] == ["refused"]
