"""Credentials: the one piece that decides whom a node talks to.

The server and worker logic never build TLS objects themselves: they receive a
:class:`Credentials` and ask it for gRPC credentials and, for each caller, an
identity. Plain mutual TLS under a per-job CA (:class:`CaCredentials`) is one
implementation; attested TLS replaces it without touching server or worker code.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from enclavefl.errors import ConfigError, VerificationError

__all__ = ["CaCredentials", "ChannelSetup", "Credentials", "PeerIdentity", "cert_fingerprint"]


def cert_fingerprint(cert_pem: bytes) -> str:
    """SHA-256 of the certificate's DER encoding, hex: a stable peer identity."""
    try:
        der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    except ValueError as exc:
        raise VerificationError("certificate", "a PEM X.509 certificate", "unparsable bytes") from exc
    return hashlib.sha256(der).hexdigest()


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """Who is calling: the fingerprint of its TLS certificate and a short label for logs."""

    fingerprint: str
    label: str
    measurement: str = ""


@dataclass(frozen=True, slots=True)
class ChannelSetup:
    """What a client needs to open a channel: credentials and channel options."""

    credentials: grpc.ChannelCredentials
    options: tuple[tuple[str, Any], ...] = ()


class Credentials(ABC):
    """Provides TLS credentials and judges peers.

    Implementations must never return insecure credentials: TLS is always on.
    """

    @abstractmethod
    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials for the PS's listening port (requires client certificates)."""

    @abstractmethod
    def channel_setup(self, target: str) -> ChannelSetup:
        """Credentials for a worker's channel to ``target`` (``host:port``).

        May block to check the server's evidence before returning.

        Raises:
            VerificationError: the server is not trusted; nothing was sent to it.
            Unavailable: the server could not be reached.
        """

    @abstractmethod
    def identify_peer(self, cert_pem: bytes | None) -> PeerIdentity:
        """Judges the caller's certificate (already checked by the TLS handshake).

        Raises:
            VerificationError: the caller is refused; the caller's request is dropped.
        """


class CaCredentials(Credentials):
    """Mutual TLS where every node holds a certificate issued by the per-job CA."""

    def __init__(self, ca_cert: bytes, cert: bytes, key: bytes, *, server_name: str = "enclavefl-ps") -> None:
        self._ca = ca_cert
        self._cert = cert
        self._key = key
        self._server_name = server_name

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
        return grpc.ssl_server_credentials(
            [(self._key, self._cert)], root_certificates=self._ca, require_client_auth=True
        )

    def channel_setup(self, target: str) -> ChannelSetup:
        creds = grpc.ssl_channel_credentials(
            root_certificates=self._ca, private_key=self._key, certificate_chain=self._cert
        )
        return ChannelSetup(creds, (("grpc.ssl_target_name_override", self._server_name),))

    def identify_peer(self, cert_pem: bytes | None) -> PeerIdentity:
        if not cert_pem:
            raise VerificationError("client certificate", "a certificate from the job CA", "none")
        cert = x509.load_pem_x509_certificate(cert_pem)
        names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        label = str(names[0].value) if names else "?"
        return PeerIdentity(fingerprint=cert_fingerprint(cert_pem), label=label)
