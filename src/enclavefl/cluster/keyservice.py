"""The cluster key, handed by the scheduler only to servers whose attestation passes the policy.

How this works: the scheduler serves two gRPC methods over its own
credentials (RA-TLS, or mutual TLS under the job CA with ``attestation.mode:
none``), with raw bytes as messages (no protobuf to change):

- ``Challenge``: a fresh single-use nonce, bound to the caller's connection;
- ``Key``: a server's proof, exactly a worker's attested join
  (:class:`~enclavefl.transport.credentials.JoinProof`): its RA-TLS
  certificate and a signature by that certificate's key over the nonce, the
  SHA-256 of the scheduler certificate it saw, and its server id. The
  scheduler checks it with the same ``admit`` a PS uses for workers (policy,
  nonce, channel binding, signature; every decision in the audit log), and
  only then answers with the 32-byte key, inside the attested channel.

A server, in turn, verifies the scheduler's evidence before it sends anything
(``channel_setup`` pins the channel to the certificate it verified), so the
key travels only between attested enclaves. With ``attestation.mode: none`` the
job CA's mutual TLS is the only check (development, no TEE).
"""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final

import grpc

from enclavefl.errors import ProtocolError, Unavailable, VerificationError
from enclavefl.messages import PeerIdentity
from enclavefl.transport.credentials import Credentials, JoinProof

__all__ = ["KEY_BYTES", "Grant", "KeyService", "fetch_cluster_key"]

log = logging.getLogger(__name__)

KEY_BYTES: Final = 32
_SERVICE: Final = "enclavefl.cluster.KeyService"
_MAX_REQUEST_BYTES: Final = 256 * 1024
_MAX_ID_CHARS: Final = 64


@dataclass(frozen=True, slots=True)
class Grant:
    """A server that received the key: its id and what its attestation proved."""

    server_id: str
    identity: PeerIdentity


def _hex(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise ProtocolError(f"cluster key request: {what} must be a hex string")
    try:
        return bytes.fromhex(value)
    except ValueError as exc:
        raise ProtocolError(f"cluster key request: {what} is not hex") from exc


def _parse_request(request: bytes) -> tuple[str, JoinProof | None]:
    try:
        body = json.loads(request)
    except ValueError as exc:
        raise ProtocolError(f"cluster key request: not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise ProtocolError("cluster key request: expected a JSON object")
    server_id = body.get("server")
    if not isinstance(server_id, str) or not 0 < len(server_id) <= _MAX_ID_CHARS:
        raise ProtocolError(f"cluster key request: server must be 1..{_MAX_ID_CHARS} characters")
    if "certificate" not in body:
        return server_id, None
    certificate = body["certificate"]
    if not isinstance(certificate, str):
        raise ProtocolError("cluster key request: certificate must be PEM text")
    return server_id, JoinProof(certificate.encode("ascii", "replace"), _hex(body.get("nonce"), "nonce"),
                                _hex(body.get("cert_sha256"), "cert_sha256"), _hex(body.get("signature"), "signature"))


class KeyService:
    """Serves the cluster key to attested servers on ``listen`` until :meth:`close`.

    Args:
        credentials: the scheduler's credentials; their ``admit`` judges each server.
        key: the cluster key (32 bytes), held in memory only.
        listen: ``host:port`` (port 0: any free port, see :attr:`port`).

    Raises:
        ValueError: the key is not 32 bytes.
        Unavailable: the address cannot be bound.
    """

    def __init__(self, credentials: Credentials, key: bytes, *, listen: str) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"the cluster key must be {KEY_BYTES} bytes, got {len(key)}")
        self._credentials = credentials
        self._key = bytes(key)
        self._lock = threading.Lock()
        self._grants: dict[str, Grant] = {}
        handler = grpc.method_handlers_generic_handler(_SERVICE, {
            "Challenge": grpc.unary_unary_rpc_method_handler(self._challenge),
            "Key": grpc.unary_unary_rpc_method_handler(self._grant),
        })
        self._server = grpc.server(ThreadPoolExecutor(max_workers=4, thread_name_prefix="key-service"),
                                   options=[("grpc.max_receive_message_length", _MAX_REQUEST_BYTES)])
        self._server.add_generic_rpc_handlers((handler,))
        try:
            self.port = self._server.add_secure_port(listen, credentials.server_credentials())
        except RuntimeError as exc:
            raise Unavailable(f"cluster key service: cannot listen on {listen}: {exc}") from exc
        if self.port == 0:
            raise Unavailable(f"cluster key service: cannot listen on {listen}")
        self._server.start()

    def grants(self) -> list[Grant]:
        """The servers that received the key, by id (the latest grant of each)."""
        with self._lock:
            return [self._grants[k] for k in sorted(self._grants)]

    def _challenge(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            return self._credentials.issue_challenge(context.peer())
        except ProtocolError as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
            raise  # abort raised already; for the type checker

    def _grant(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            server_id, proof = _parse_request(request)
            certs = context.auth_context().get("x509_pem_cert") or [None]
            identity, _ = self._credentials.admit(proof, server_id, certs[0], connection=context.peer())
        except (VerificationError, ProtocolError) as exc:
            log.warning("scheduler: refused the cluster key to %s: %s", context.peer(), exc,
                        extra={"event": "key_refused"})
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"cluster key refused: {exc}")
            raise  # abort raised already; for the type checker
        with self._lock:
            self._grants[server_id] = Grant(server_id, identity)
        log.info("scheduler: cluster key handed to server %s (%s, evidence %s, measurement %s)", server_id,
                 identity.fingerprint[:16], identity.evidence, identity.measurement[:16] or "none",
                 extra={"event": "key_granted"})
        return self._key

    def close(self) -> None:
        """Stops serving (calls in progress get a second to finish). Idempotent."""
        self._server.stop(1.0).wait(5.0)


def fetch_cluster_key(target: str, credentials: Credentials, server_id: str, *, timeout_s: float = 30.0) -> bytes:
    """Asks the scheduler at ``target`` for the cluster key, proving this server's attestation.

    Raises:
        VerificationError: the scheduler's evidence fails this server's policy (nothing was sent),
            or the scheduler refused this server's.
        Unavailable: the scheduler cannot be reached.
        ProtocolError: the scheduler answered with something that is not a key.
    """
    setup = credentials.channel_setup(target)
    channel = grpc.secure_channel(target, setup.credentials, options=setup.options)
    try:
        body: dict[str, str] = {"server": server_id}
        if credentials.attested_join:
            nonce = channel.unary_unary(f"/{_SERVICE}/Challenge")(b"", timeout=timeout_s)
            proof = credentials.prove_join(nonce, setup.server_cert_sha256, server_id)
            body.update(certificate=proof.certificate.decode("ascii"), nonce=proof.nonce.hex(),
                        cert_sha256=proof.ps_cert_sha256.hex(), signature=proof.signature.hex())
        key = channel.unary_unary(f"/{_SERVICE}/Key")(json.dumps(body).encode(), timeout=timeout_s)
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details()
        if code == grpc.StatusCode.PERMISSION_DENIED:
            raise VerificationError("cluster key", "the scheduler to accept this server's attestation",
                                    str(details)) from exc
        raise Unavailable(f"scheduler {target}: cannot get the cluster key: {code.name}: {details}") from exc
    finally:
        channel.close()
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise ProtocolError(f"scheduler {target}: expected a {KEY_BYTES}-byte cluster key, got "
                            f"{len(key) if isinstance(key, bytes) else type(key).__name__}")
    return key
