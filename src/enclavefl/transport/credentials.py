"""Credentials: the one piece that decides whom a node talks to.

The server and worker logic never build TLS objects themselves: they receive a
:class:`Credentials` and ask it for gRPC credentials and, for each caller, an
identity. Plain mutual TLS under a per-job CA (:class:`CaCredentials`) is one
implementation; attested TLS (:mod:`enclavefl.transport.attested`) replaces it
without touching server or worker code. Attested credentials identify workers
by an attested join (a signed challenge) and a session token instead of a
client certificate: the optional hooks below (``attested_join``,
``issue_challenge``, ``prove_join``, ``admit``) carry that; plain mTLS keeps
their defaults.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from enclavefl.errors import ConfigError, ProtocolError, VerificationError
from enclavefl.messages import PeerIdentity
from enclavefl.transport.audit import AuditLog
from enclavefl.transport.handshakes import HandshakeWatch

__all__ = ["CaCredentials", "ChannelSetup", "Credentials", "JoinProof", "cert_fingerprint"]


def cert_fingerprint(cert_pem: bytes) -> str:
    """SHA-256 of the certificate's DER encoding, hex: a stable peer identity."""
    try:
        der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    except ValueError as exc:
        raise VerificationError("certificate", "a PEM X.509 certificate", "unparsable bytes") from exc
    return hashlib.sha256(der).hexdigest()


@dataclass(frozen=True, slots=True)
class ChannelSetup:
    """What a client needs to open a channel: credentials and channel options."""

    credentials: grpc.ChannelCredentials
    options: tuple[tuple[str, Any], ...] = ()
    server_cert_sha256: bytes = b""
    """SHA-256 of the DER certificate the channel is pinned to (attested credentials only)."""


@dataclass(frozen=True, slots=True)
class JoinProof:
    """A worker's attested join: its RA-TLS certificate and a signature by that certificate's key.

    The signature covers the PS nonce and the PS certificate the worker saw
    (``ps_cert_sha256``), which binds the evidence to this TLS channel.
    """

    certificate: bytes
    nonce: bytes
    ps_cert_sha256: bytes
    signature: bytes


class Credentials(ABC):
    """Provides TLS credentials and judges peers.

    Implementations must never return insecure credentials: TLS is always on.
    """

    @abstractmethod
    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials for the PS's listening port (requires client certificates)."""

    def close(self) -> None:
        """Stops whatever the credentials watch in the background (the server is stopping). Idempotent."""

    @abstractmethod
    def channel_setup(self, target: str) -> ChannelSetup:
        """Credentials for a worker's channel to ``target`` (``host:port``).

        May block to check the server's evidence before returning.

        Raises:
            VerificationError: the server is not trusted; nothing was sent to it.
            Unavailable: the server could not be reached.
        """

    @abstractmethod
    def identify_peer(self, cert_pem: bytes | None, session: str = "", connection: str = "") -> PeerIdentity:
        """Judges the caller's certificate (already checked by the TLS handshake) or session token.

        Args:
            cert_pem: the client certificate the TLS handshake checked, if any.
            session: the session token the call carries ("" when none).
            connection: gRPC's peer address of the call, which names its HTTP/2
                connection; a session is valid only on the connection that joined.

        Raises:
            VerificationError: the caller is refused; the caller's request is dropped.
            StaleSession: the session token is unknown (the caller must join again).
        """

    @property
    def attested_join(self) -> bool:
        """Whether a worker must join with a :class:`JoinProof` (Challenge, then Join)."""
        return False

    def issue_challenge(self, connection: str = "") -> bytes:
        """A fresh single-use nonce for :meth:`admit` (PS side), valid only on ``connection``.

        Raises:
            ProtocolError: these credentials take no attested joins.
        """
        raise ProtocolError("Challenge: this PS takes no attested joins (attestation.mode is none)")

    def prove_join(self, nonce: bytes, server_cert_sha256: bytes, worker_name: str) -> JoinProof:
        """Signs a PS challenge with this node's attested key (worker side).

        Raises:
            ProtocolError: these credentials have no attested identity.
        """
        raise ProtocolError("attested join: these credentials have no RA-TLS identity (attestation.mode is none)")

    def admit(self, proof: JoinProof | None, worker_name: str, cert_pem: bytes | None,
              connection: str = "") -> tuple[PeerIdentity, str]:
        """Judges a joining worker (PS side): its identity and a session token ("" when none is used).

        ``connection`` is gRPC's peer address of the Join: the nonce must have been
        issued on it, and the session token is valid on it alone.

        Raises:
            VerificationError: the worker is refused; nothing about it is kept.
            ProtocolError: a proof was sent to credentials that take none.
        """
        if proof is not None:
            raise ProtocolError("Join: this PS takes no attested joins (attestation.mode is none)")
        return self.identify_peer(cert_pem, connection=connection), ""

    def observe_call(self, peer: str) -> None:
        """Notes that a call arrived on the connection ``peer`` (gRPC's peer address; PS side).

        The default does nothing; credentials that watch failed handshakes count it.
        """

    def sign_secagg(self, payload: bytes) -> tuple[bytes, bytes]:
        """(certificate PEM, ECDSA signature of ``payload``) with this node's certificate key (worker side).

        Secure aggregation binds a worker's advertised keys to the certificate the PS
        bound at its join.

        Raises:
            ConfigError: these credentials hold no key to sign with.
        """
        raise ConfigError("secure aggregation: these credentials hold no certificate key to sign with")

    def check_secagg_certificate(self, cert_pem: bytes) -> bool:
        """Whether a fellow worker's certificate is one this node trusts (worker side).

        The default trusts none, so secure aggregation refuses every roster.
        """
        return False

    @abstractmethod
    def own_identity(self) -> PeerIdentity:
        """This node as its peers see it: its certificate's fingerprint and what its evidence claims.

        For the management plane's status; nothing here was verified by this node itself.
        """

    @property
    def audit_log(self) -> AuditLog | None:
        """Where these credentials record their trust decisions (None: they record none)."""
        return None


def _subject(cert_pem: bytes) -> str:
    """A certificate's common name, for messages ("?" when it has none or does not parse)."""
    try:
        names = x509.load_pem_x509_certificate(cert_pem).subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    except ValueError:
        return "?"
    return str(names[0].value) if names else "?"


class CaCredentials(Credentials):
    """Mutual TLS where every node holds a certificate issued by the per-job CA."""

    def __init__(self, ca_cert: bytes, cert: bytes, key: bytes, *, server_name: str = "enclavefl-ps") -> None:
        self._ca = ca_cert
        self._cert = cert
        self._key = key
        self._server_name = server_name
        self.handshakes = HandshakeWatch(f"this PS trusts the CA {_subject(ca_cert)!r} (its ca.pem); "
                                         "the worker's log says what its side saw")
        """Incoming connections that failed their handshake (PS side), logged rate-limited."""

    def close(self) -> None:
        self.handshakes.close()

    @classmethod
    def from_files(cls, ca_cert: str | Path, cert: str | Path, key: str | Path, *, server_name: str = "enclavefl-ps") -> CaCredentials:
        """Reads the three PEM files.

        Raises:
            ConfigError: a file is missing or is not PEM.
        """
        blobs = []
        for what, path in (("transport.tls.ca_cert", ca_cert), ("transport.tls.cert", cert), ("transport.tls.key", key)):
            try:
                data = Path(path).read_bytes()
            except OSError as exc:
                raise ConfigError(f"{what}: cannot read {path}: {exc.strerror or exc}") from exc
            if b"-----BEGIN" not in data:
                raise ConfigError(f"{what}: {path} is not a PEM file")
            blobs.append(data)
        return cls(blobs[0], blobs[1], blobs[2], server_name=server_name)

    def server_credentials(self) -> grpc.ServerCredentials:
        # The dynamic form only to hear of every connection before its handshake: the certificate never changes.
        config = grpc.ssl_server_certificate_configuration([(self._key, self._cert)], root_certificates=self._ca)

        def before_handshake() -> None:
            self.handshakes.connection_started()

        return grpc.dynamic_ssl_server_credentials(config, before_handshake, require_client_authentication=True)

    def observe_call(self, peer: str) -> None:
        self.handshakes.call_seen(peer)

    def own_identity(self) -> PeerIdentity:
        """The node's CA-issued certificate; plain mTLS proves no code identity (evidence ``none``)."""
        return PeerIdentity(fingerprint=cert_fingerprint(self._cert), label=_subject(self._cert))

    def channel_setup(self, target: str) -> ChannelSetup:
        creds = grpc.ssl_channel_credentials(
            root_certificates=self._ca, private_key=self._key, certificate_chain=self._cert
        )
        return ChannelSetup(creds, (("grpc.ssl_target_name_override", self._server_name),))

    def sign_secagg(self, payload: bytes) -> tuple[bytes, bytes]:
        key = serialization.load_pem_private_key(self._key, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError("secure aggregation signs with an EC key; this node's TLS key is not one")
        return self._cert, key.sign(payload, ec.ECDSA(hashes.SHA256()))

    def check_secagg_certificate(self, cert_pem: bytes) -> bool:
        """Trusted if the job CA issued it and it is valid now (what the TLS handshake would check)."""
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
            cert.verify_directly_issued_by(x509.load_pem_x509_certificate(self._ca))
        except (ValueError, TypeError, InvalidSignature):
            return False
        now = dt.datetime.now(dt.timezone.utc)
        return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc

    def identify_peer(self, cert_pem: bytes | None, session: str = "", connection: str = "") -> PeerIdentity:
        # The certificate itself belongs to the connection: the TLS handshake checked it.
        if not cert_pem:
            raise VerificationError("client certificate", "a certificate from the job CA", "none")
        cert = x509.load_pem_x509_certificate(cert_pem)
        names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        label = str(names[0].value) if names else "?"
        return PeerIdentity(fingerprint=cert_fingerprint(cert_pem), label=label, evidence="none")
