"""Fuzz targets: one per parser at the PS's boundary, each reached through the entry the PS uses.

A target takes arbitrary bytes. It may return, or raise one of the project's
errors (an :class:`~enclavefl.errors.EnclaveFLError`): that is a refusal, the
expected outcome for garbage. Anything else escaping is a finding. The targets
that drive the gRPC methods go through :func:`enclavefl.transport.service.method_handlers`
(the deserializer and the guarded method a peer's call reaches) with an
in-memory servicer context; there an answer of INTERNAL or UNKNOWN is the
finding, since it means a foreign exception reached the guard.

Seeds are built in code from valid inputs (simulated quotes and RA-TLS
certificates, a valid tensor stream, well-formed requests): nothing is read
from disk unless the caller passes extra seed files.
"""

from __future__ import annotations

import atexit
import datetime as dt
import functools
import hashlib
import json
import logging
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from enclavefl.attest.collateral import Collateral, split_signed_envelope
from enclavefl.attest.measurement import measure_code
from enclavefl.attest.pck import intel_sgx_root_ca
from enclavefl.attest.policy import Policy, parse_policy
from enclavefl.attest.providers import SimulatedProvider
from enclavefl.attest.quote import parse_quote
from enclavefl.attest.ratls import TCG_EVIDENCE_OID, RatlsIdentity, create_ratls_identity, verify_ratls_certificate
from enclavefl.attest.simroot import SimRoot, init_sim_root
from enclavefl.attest.tcg_evidence import decode_tagged_evidence
from enclavefl.attest.verifier import verify_quote
from enclavefl.config import parse_job
from enclavefl.errors import EnclaveFLError, ProtocolError
from enclavefl.compression import CompressedDecoder, encode_tensor
from enclavefl.messages import UpdateKind, UpdateMeta
from enclavefl.proto import PROTOCOL_VERSION
from enclavefl.proto import federation_pb2 as pb
from enclavefl.server.ps import ParameterServer
from enclavefl.tensors import CodecLimits, EncodedUpdate, ParamSet, StreamDecoder, StreamHeader, iter_chunks
from enclavefl.transport.attested import AttestedCredentials
from enclavefl.transport.audit import AuditLog
from enclavefl.transport.certs import make_ca, make_node_cert
from enclavefl.transport.credentials import CaCredentials, JoinProof
from enclavefl.transport.framing import chunk_decoder, chunk_payload, encode_data
from enclavefl.transport.ratelimit import ConnectionLimiter, RefusalLog
from enclavefl.transport.service import method_handlers
from enclavefl.transport.wire import update_meta_from_proto, update_meta_to_proto

__all__ = ["TARGETS", "Finding", "Target", "frame", "run_one", "unframe"]

CHUNK_BYTES = 4096
# Small limits, so a hostile header cannot make one fuzz iteration allocate much.
LIMITS = CodecLimits(max_total_bytes=1 << 20, max_tensor_bytes=1 << 20, max_chunk_bytes=CHUNK_BYTES)
MODEL = ParamSet({"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float32)})
_FRAME = struct.Struct("<H")


class Finding(Exception):
    """A target let through something other than a project error (or the PS answered INTERNAL)."""


@dataclass(frozen=True)
class Target:
    """A named fuzz target: ``run`` takes arbitrary bytes, ``seeds`` builds valid inputs."""

    name: str
    run: Callable[[bytes], None]
    seeds: Callable[[], list[bytes]]


def run_one(target: Target, data: bytes) -> None:
    """Runs ``target`` on ``data``; a project error is a refusal, anything else propagates (a finding)."""
    try:
        target.run(data)
    except EnclaveFLError:
        pass


def frame(messages: list[bytes]) -> bytes:
    """Several messages in one input: each prefixed with its length (u16 LE)."""
    return b"".join(_FRAME.pack(len(m)) + m for m in messages)


def unframe(data: bytes) -> list[bytes]:
    """The inverse of :func:`frame`; a short last frame is taken as it is."""
    out, pos = [], 0
    while pos + _FRAME.size <= len(data):
        (size,) = _FRAME.unpack_from(data, pos)
        pos += _FRAME.size
        out.append(data[pos : pos + size])
        pos += size
    return out


# ---------------------------------------------------------------------------------------------- the world


@dataclass(frozen=True)
class _World:
    """Everything the targets share, made once per process: simulated evidence, credentials, a PS."""

    directory: Path
    sim: SimRoot
    provider: SimulatedProvider
    policy: Policy
    identity: RatlsIdentity
    ps_credentials: AttestedCredentials
    ps_cert_sha256: bytes
    ca_ps: CaCredentials
    worker_cert_pem: bytes
    ps: ParameterServer


@functools.cache
def world() -> _World:
    directory = Path(tempfile.mkdtemp(prefix="enclavefl-fuzz-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    sim = init_sim_root(directory / "root", name="fuzz")
    provider = SimulatedProvider(sim, measure_code())
    policy = parse_policy({
        "sgx_mrs": [{"mr_enclave": provider.mr_enclave.hex(), "mr_signer": provider.mr_signer.hex(),
                     "isv_prod_id": 0, "isv_svn": 0}],
        "allow_simulated": True,
        "simulated_root_sha256": sim.root_fingerprint,
    })
    identity = create_ratls_identity(provider, common_name="fuzz-worker", validity=dt.timedelta(days=1))
    ps_credentials = AttestedCredentials.create(provider, policy, node="ps", role="ps", audit=AuditLog(None))
    ps_der = x509.load_pem_x509_certificate(ps_credentials.certificate_pem).public_bytes(serialization.Encoding.DER)
    ca_cert, ca_key = make_ca("fuzz")
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    ps_bundle = make_node_cert(ca_cert, ca_key, "enclavefl ps", server_names=("enclavefl-ps",))
    worker_bundle = make_node_cert(ca_cert, ca_key, "enclavefl worker-0")
    config = parse_job({"job": {"name": "fuzz", "rounds": 1}, "round": {"min_workers": 1, "heartbeat_s": 1},
                        "attestation": {"mode": "none"}})
    ps = ParameterServer(config, MODEL, out_dir=directory / "ps")
    return _World(directory, sim, provider, policy, identity, ps_credentials, hashlib.sha256(ps_der).digest(),
                  CaCredentials(ca_pem, ps_bundle.cert_pem, ps_bundle.key_pem), worker_bundle.cert_pem, ps)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# ---------------------------------------------------------------------------------------------- attestation


def _quote(data: bytes) -> None:
    quote = parse_quote(data)
    verify_quote(quote, at=_now(), trusted_roots=[intel_sgx_root_ca(), world().sim.root_cert])


def _quote_seeds() -> list[bytes]:
    return [world().provider.quote(bytes(range(64)))]


def _certificate_seeds() -> list[bytes]:
    pem = world().identity.cert_pem
    return [pem, x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)]


def _ratls_certificate(data: bytes) -> None:
    verify_ratls_certificate(data, policy=world().policy, at=_now())


def _join_certificate(data: bytes) -> None:
    """What AttestedCredentials.admit does with a join's certificate (fresh nonce, right PS hash, bad signature)."""
    w = world()
    nonce = w.ps_credentials.issue_challenge()
    w.ps_credentials.admit(JoinProof(data, nonce, w.ps_cert_sha256, b"\x30\x06\x02\x01\x01\x02\x01\x01"), "fuzz", None)


def _cbor(data: bytes) -> None:
    decode_tagged_evidence(data)


def _cbor_seeds() -> list[bytes]:
    cert = x509.load_pem_x509_certificate(world().identity.cert_pem)
    value = cert.extensions.get_extension_for_oid(TCG_EVIDENCE_OID).value
    assert isinstance(value, x509.UnrecognizedExtension)
    return [value.value]


def _collateral_file(data: bytes) -> None:
    path = world().directory / "collateral.json"
    path.write_bytes(data)
    Collateral.from_file(path)


def _collateral_envelope(data: bytes) -> None:
    split_signed_envelope(data, "tcbInfo")


@functools.cache
def _collateral_pieces() -> dict[str, str]:
    """Collateral in the combined JSON layout, signed by a throwaway CA (well-formed, not Intel's)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fuzz collateral CA")])
    start = _now() - dt.timedelta(days=1)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(start).not_valid_after(start + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(key, hashes.SHA256()))
    crl = (x509.CertificateRevocationListBuilder().issuer_name(name).last_update(start)
           .next_update(start + dt.timedelta(days=30)).sign(key, hashes.SHA256()))
    chain = cert.public_bytes(serialization.Encoding.PEM).decode()
    crl_hex = crl.public_bytes(serialization.Encoding.DER).hex()
    tcb_info = json.dumps({"id": "SGX", "version": 3, "issueDate": "2025-01-01T00:00:00Z",
                           "nextUpdate": "2025-02-01T00:00:00Z", "fmspc": "00906ed50000", "pceId": "0000",
                           "tcbType": 0, "tcbEvaluationDataNumber": 17,
                           "tcbLevels": [{"tcb": {"sgxtcbcomponents": [{"svn": 1}] * 16, "pcesvn": 13},
                                          "tcbDate": "2024-01-01T00:00:00Z", "tcbStatus": "UpToDate"}]},
                          separators=(",", ":"))
    qe_identity = json.dumps({"id": "QE", "version": 2, "issueDate": "2025-01-01T00:00:00Z",
                              "nextUpdate": "2025-02-01T00:00:00Z", "tcbEvaluationDataNumber": 17,
                              "miscselect": "00000000", "miscselectMask": "FFFFFFFF",
                              "attributes": "11000000000000000000000000000000",
                              "attributesMask": "FBFFFFFFFFFFFFFF0000000000000000",
                              "mrsigner": "8C4F5775D796503E96137F77C68A829A0056AC8DED70140B081B094490C57BFF",
                              "isvprodid": 1,
                              "tcbLevels": [{"tcb": {"isvsvn": 8}, "tcbDate": "2024-01-01T00:00:00Z",
                                             "tcbStatus": "UpToDate"}]}, separators=(",", ":"))
    signature = "00" * 64
    return {"pck_crl_issuer_chain": chain, "root_ca_crl": crl_hex, "pck_crl": crl_hex,
            "tcb_info_issuer_chain": chain, "tcb_info": tcb_info, "tcb_info_signature": signature,
            "qe_identity_issuer_chain": chain, "qe_identity": qe_identity, "qe_identity_signature": signature}


def _collateral_file_seeds() -> list[bytes]:
    return [json.dumps(_collateral_pieces()).encode()]


def _collateral_envelope_seeds() -> list[bytes]:
    pieces = _collateral_pieces()
    return [f'{{"tcbInfo":{pieces["tcb_info"]},"signature":"{pieces["tcb_info_signature"]}"}}'.encode()]


# ---------------------------------------------------------------------------------------------- tensors


def _tensor_stream(data: bytes) -> None:
    """An update as the PS reads it: header envelope, then chunks through the framing decoder."""
    messages = unframe(data)
    if not messages:
        return
    decode = chunk_decoder(pb.UpdateChunk)
    first = decode(messages[0])
    if not isinstance(first, pb.UpdateChunk) or first.WhichOneof("part") != "header":
        raise ProtocolError("the first message must be the update header")
    meta = update_meta_from_proto(first.header)
    decoder = StreamDecoder(meta.tensors, LIMITS)
    for raw in messages[1:]:
        payload = chunk_payload(decode(raw))
        if payload is None:
            raise ProtocolError("a second header")
        decoder.feed(payload)
    decoder.finish()


def _update_messages() -> list[bytes]:
    meta = pb.UpdateChunk(header=update_meta_to_proto_for(MODEL))
    return [meta.SerializeToString(), *(encode_data(c) for c in iter_chunks(MODEL, 8))]


def update_meta_to_proto_for(params: ParamSet, worker_id: str = "w-1") -> pb.UpdateHeader:
    """A well-formed update header for ``params`` (round 1, version 0)."""
    return update_meta_to_proto(UpdateMeta(worker_id, 1, 0, 3, StreamHeader.of(params), {"loss": 0.5}))


def _tensor_stream_seeds() -> list[bytes]:
    return [frame(_update_messages())]


def _compressed_stream(data: bytes) -> None:
    """A QUANTIZED update as the PS reads it: header envelope, then chunks decoded as they arrive."""
    messages = unframe(data)
    if not messages:
        return
    decode = chunk_decoder(pb.UpdateChunk)
    first = decode(messages[0])
    if not isinstance(first, pb.UpdateChunk) or first.WhichOneof("part") != "header":
        raise ProtocolError("the first message must be the update header")
    decoder = CompressedDecoder(update_meta_from_proto(first.header).tensors, LIMITS)
    for raw in messages[1:]:
        payload = chunk_payload(decode(raw))
        if payload is None:
            raise ProtocolError("a second header")
        decoder.feed(payload)
    decoder.finish()


def _compressed_stream_seeds() -> list[bytes]:
    rng = np.random.default_rng(0)
    bell = rng.normal(size=300).astype(np.float32)  # its 8-bit codes deflate
    update = EncodedUpdate([
        ("q8", encode_tensor(bell, "q8", rng)),
        ("topk_q4", encode_tensor(bell[:21], "topk_q4", rng, sparse_rate=0.3)),
        ("topk", encode_tensor(bell[:10], "topk", rng, sparse_rate=0.5)),
        *MODEL.items(),
    ])
    header = update_meta_to_proto(UpdateMeta("w-1", 1, 0, 3, StreamHeader.of(update), {"loss": 0.5},
                                             kind=UpdateKind.QUANTIZED))
    return [frame([pb.UpdateChunk(header=header).SerializeToString(), *(encode_data(c) for c in iter_chunks(update, 16))])]


def _tensor_header_json(data: bytes) -> None:
    StreamHeader.from_json(data, LIMITS)


def _tensor_header_json_seeds() -> list[bytes]:
    return [StreamHeader.of(MODEL).to_json()]


# ---------------------------------------------------------------------------------------------- the gRPC methods


class _Aborted(Exception):
    """What FuzzContext.abort raises, as grpc's own context does."""


class FuzzContext:
    """An in-memory servicer context: a worker with a job-CA certificate calling from a fixed address."""

    def __init__(self, cert_pem: bytes) -> None:
        self._cert_pem = cert_pem
        self.status: grpc.StatusCode | None = None
        self.details = ""

    def peer(self) -> str:
        return "ipv4:127.0.0.1:9"

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def auth_context(self) -> dict[str, list[bytes]]:
        return {"x509_pem_cert": [self._cert_pem]}

    def is_active(self) -> bool:
        return True

    def code(self) -> grpc.StatusCode | None:
        return self.status

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.status, self.details = code, details
        raise _Aborted(details)


@functools.cache
def _handlers() -> dict[str, grpc.RpcMethodHandler]:
    w = world()
    # Every fuzz call comes from one address: an unbounded budget keeps the
    # inputs reaching the parsers (the limiter has its own tests). Refusals are
    # the expected outcome: they go to a logger that writes nothing, so the
    # summaries its timer writes later reach no other test's log.
    refusals_log = logging.getLogger("fuzz.refusals")
    refusals_log.propagate = False
    refusals_log.addHandler(logging.NullHandler())
    return method_handlers(w.ps, w.ca_ps, chunk_bytes=CHUNK_BYTES, max_downloads=2,
                           limiter=ConnectionLimiter(rate_per_s=1e9, burst=1e9), refusals=RefusalLog(refusals_log))


def _call(method: str, context: FuzzContext, request: Any) -> None:
    handler = _handlers()[method]
    try:
        if handler.unary_unary is not None:
            handler.unary_unary(request, context)
        elif handler.unary_stream is not None:
            for _ in handler.unary_stream(request, context):
                pass
        else:
            handler.stream_unary(request, context)
    except _Aborted:
        pass
    if context.status in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        raise Finding(f"{method} answered {context.status.name}: {context.details}")


def _rpc_target(method: str) -> Callable[[bytes], None]:
    def run(data: bytes) -> None:
        handler = _handlers()[method]
        context = FuzzContext(world().worker_cert_pem)
        if method == "PushUpdate":
            decode = handler.request_deserializer
            requests: Iterator[Any] = (decode(raw) for raw in unframe(data))
            _call(method, context, requests)
        else:
            _call(method, context, handler.request_deserializer(data))

    return run


def _rpc_seeds(method: str) -> Callable[[], list[bytes]]:
    def seeds() -> list[bytes]:
        v = PROTOCOL_VERSION
        messages: dict[str, list[Any]] = {
            "Challenge": [pb.ChallengeRequest(protocol_version=v)],
            "Join": [pb.JoinRequest(protocol_version=v, worker_name="w", num_samples=3),
                     pb.JoinRequest(protocol_version=v, worker_name="w", num_samples=3, attestation=pb.JoinAttestation(
                         certificate=world().identity.cert_pem, nonce=bytes(32), ps_cert_sha256=bytes(32)))],
            "WaitTask": [pb.WaitTaskRequest(protocol_version=v, worker_id="w-1", max_wait_s=0.0)],
            "PullModel": [pb.PullRequest(protocol_version=v, worker_id="w-1", model_version=0)],
            "Leave": [pb.LeaveRequest(protocol_version=v, worker_id="w-1", reason="done")],
            "Heartbeat": [pb.HeartbeatRequest(protocol_version=v, worker_id="w-1")],
            "SecAggExchange": [
                pb.SecAggRequest(protocol_version=v, worker_id="w-1", round=1, nonce=bytes(16), stage="advertise",
                                 advert=pb.SecAggAdvert(sender="w-1", enc_public=bytes(32), mask_public=bytes(32),
                                                        signature=b"s", certificate=world().worker_cert_pem)),
                pb.SecAggRequest(protocol_version=v, worker_id="w-1", round=1, nonce=bytes(16), stage="share",
                                 shares=[pb.SecAggShare(sender="w-1", recipient="w-2", sealed=bytes(94))]),
                pb.SecAggRequest(protocol_version=v, worker_id="w-1", round=1, nonce=bytes(16), stage="unmask",
                                 seed_shares={"w-2": bytes(33)}, key_shares={"w-3": bytes(33)}),
            ],
        }
        if method == "PushUpdate":
            return [frame(_update_messages())]
        return [m.SerializeToString() for m in messages[method]]

    return seeds


_METHODS = ("Challenge", "Join", "WaitTask", "PullModel", "PushUpdate", "Leave", "Heartbeat", "SecAggExchange")

TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("quote", _quote, _quote_seeds),
        Target("ratls_certificate", _ratls_certificate, _certificate_seeds),
        Target("join_certificate", _join_certificate, _certificate_seeds),
        Target("cbor", _cbor, _cbor_seeds),
        Target("collateral_file", _collateral_file, _collateral_file_seeds),
        Target("collateral_envelope", _collateral_envelope, _collateral_envelope_seeds),
        Target("tensor_stream", _tensor_stream, _tensor_stream_seeds),
        Target("tensor_header_json", _tensor_header_json, _tensor_header_json_seeds),
        Target("compressed_stream", _compressed_stream, _compressed_stream_seeds),
        *(Target(f"rpc_{m}", _rpc_target(m), _rpc_seeds(m)) for m in _METHODS),
    )
}
"""Every target by name."""


def quiet_logs() -> None:
    """Refusals are the expected outcome here: keep the PS's lines about them out of the output."""
    logging.getLogger("enclavefl").setLevel(logging.CRITICAL)

