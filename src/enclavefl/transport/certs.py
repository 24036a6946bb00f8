"""A per-job certificate authority for plain mutual TLS (``attestation.mode: none``).

`enclavefl run` makes one automatically inside the run directory; `enclavefl certs`
makes the same files for a multi-host deployment, where the operator copies the
CA certificate to every host and each host's own certificate and key to it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from enclavefl.errors import ConfigError

__all__ = ["CertBundle", "create_job_certs", "make_ca", "make_node_cert"]

DEFAULT_VALIDITY = dt.timedelta(days=30)


@dataclass(frozen=True, slots=True)
class CertBundle:
    """PEM bytes of one node's certificate and key, plus the CA that signed it."""

    ca_cert_pem: bytes
    cert_pem: bytes
    key_pem: bytes


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "enclavefl job CA"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_ca(job_name: str, validity: dt.timedelta = DEFAULT_VALIDITY) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Creates a self-signed P-256 CA that can sign only end-entity certificates."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    name = _name(f"enclavefl CA for {job_name}")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def make_node_cert(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    *,
    server_names: tuple[str, ...] = (),
    validity: dt.timedelta = DEFAULT_VALIDITY,
) -> CertBundle:
    """Issues a node certificate; with ``server_names`` it is also valid as a TLS server."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if server_names:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        alt: list[x509.GeneralName] = []
        for entry in server_names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(entry)))
            except ValueError:
                alt.append(x509.DNSName(entry))
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    cert = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False).sign(ca_key, hashes.SHA256())
    return CertBundle(
        ca_cert_pem=ca_cert.public_bytes(serialization.Encoding.PEM),
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=_key_pem(key),
    )


def _write(path: Path, data: bytes, private: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def create_job_certs(
    out_dir: Path,
    job_name: str,
    *,
    workers: int,
    server_names: tuple[str, ...] = ("enclavefl-ps", "localhost", "127.0.0.1"),
    validity: dt.timedelta = DEFAULT_VALIDITY,
) -> dict[str, Path]:
    """Writes ``ca.pem``, ``ps.pem``/``ps.key`` and ``worker-<i>.pem``/``.key`` into ``out_dir``.

    The CA key is not kept: once every node has its certificate, nobody can issue
    more, which is what a fixed-membership job wants. Keys are written 0600.

    Returns:
        A mapping of role names (``ca``, ``ps``, ``worker-0`` ...) to certificate paths.

    Raises:
        ConfigError: ``out_dir`` already holds certificates (nothing is overwritten).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / "ca.pem").exists():
        raise ConfigError(f"{out_dir}: already holds ca.pem; refusing to overwrite certificates")
    ca_cert, ca_key = make_ca(job_name, validity)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    _write(out_dir / "ca.pem", ca_pem, private=False)
    paths = {"ca": out_dir / "ca.pem"}
    roles = [("ps", server_names)] + [(f"worker-{i}", ()) for i in range(workers)]
    for role, names in roles:
        bundle = make_node_cert(ca_cert, ca_key, f"enclavefl {role}", server_names=names, validity=validity)
        _write(out_dir / f"{role}.pem", bundle.cert_pem, private=False)
        _write(out_dir / f"{role}.key", bundle.key_pem, private=True)
        paths[role] = out_dir / f"{role}.pem"
    return paths
