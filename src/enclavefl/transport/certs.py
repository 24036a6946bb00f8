"""A per-job certificate authority for plain mutual TLS (``attestation.mode: none``).

`enclavefl run` makes one automatically inside the run directory and keeps no
CA key: nobody can issue more certificates for that run. `enclavefl certs`
makes the same files for a multi-host deployment, where the operator copies the
CA certificate to every host and each host's own certificate and key to it; it
keeps the CA key in a directory of its own (never copied to a host), from which
:func:`add_worker_cert` issues a certificate for a site that joins later.
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

__all__ = ["CA_KEY_FILE", "CertBundle", "add_worker_cert", "create_job_certs", "make_ca", "make_node_cert"]

DEFAULT_VALIDITY = dt.timedelta(days=30)
CA_KEY_FILE = "ca.key"
"""The CA's private key, in the CA directory (next to a copy of ``ca.pem``)."""


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


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve() == folder.resolve() or folder.resolve() in path.resolve().parents


def create_job_certs(
    out_dir: Path,
    job_name: str,
    *,
    workers: int,
    server_names: tuple[str, ...] = ("enclavefl-ps", "localhost", "127.0.0.1"),
    validity: dt.timedelta = DEFAULT_VALIDITY,
    ca_dir: Path | None = None,
) -> dict[str, Path]:
    """Writes ``ca.pem``, ``ps.pem``/``ps.key`` and ``worker-<i>.pem``/``.key`` into ``out_dir``.

    Without ``ca_dir`` the CA key is not kept: once every node has its
    certificate, nobody can issue more, which is what a fixed-membership job
    wants. With it, the key is kept there (``ca.key``, 0600, in a 0700
    directory, with a copy of ``ca.pem``) for :func:`add_worker_cert`. Keys are written 0600.

    Returns:
        A mapping of role names (``ca``, ``ps``, ``worker-0`` ...) to certificate paths.

    Raises:
        ConfigError: ``out_dir`` or ``ca_dir`` already holds certificates (nothing is
            overwritten), or ``ca_dir`` lies inside ``out_dir`` (whose files are copied to hosts).
    """
    if ca_dir is not None:
        if _inside(ca_dir, out_dir):
            raise ConfigError(f"the CA directory {ca_dir} is inside {out_dir}, whose files go to every host: "
                              "keep the CA key apart")
        if (ca_dir / CA_KEY_FILE).exists():
            raise ConfigError(f"{ca_dir}: already holds {CA_KEY_FILE}; refusing to overwrite a CA")
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / "ca.pem").exists():
        raise ConfigError(f"{out_dir}: already holds ca.pem; refusing to overwrite certificates")
    ca_cert, ca_key = make_ca(job_name, validity)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    if ca_dir is not None:
        ca_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(ca_dir, 0o700)
        _write(ca_dir / CA_KEY_FILE, _key_pem(ca_key), private=True)
        _write(ca_dir / "ca.pem", ca_pem, private=False)
    _write(out_dir / "ca.pem", ca_pem, private=False)
    paths = {"ca": out_dir / "ca.pem"}
    roles = [("ps", server_names)] + [(f"worker-{i}", ()) for i in range(workers)]
    for role, names in roles:
        bundle = make_node_cert(ca_cert, ca_key, f"enclavefl {role}", server_names=names, validity=validity)
        _write(out_dir / f"{role}.pem", bundle.cert_pem, private=False)
        _write(out_dir / f"{role}.key", bundle.key_pem, private=True)
        paths[role] = out_dir / f"{role}.pem"
    return paths


def add_worker_cert(ca_dir: Path, out_dir: Path, index: int, *, validity: dt.timedelta = DEFAULT_VALIDITY) -> Path:
    """Issues ``worker-<index>.pem``/``.key`` into ``out_dir`` with the CA kept in ``ca_dir``.

    For a site that joins after :func:`create_job_certs`: the PS trusts the
    job CA, so the new certificate works without touching the PS.

    Returns:
        The new certificate's path.

    Raises:
        ConfigError: ``ca_dir`` holds no CA key or certificate (or they do not
            pair), or ``out_dir`` already holds that worker's certificate.
    """
    if index < 0:
        raise ConfigError(f"worker index {index}: must be >= 0")
    try:
        ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
        ca_key = serialization.load_pem_private_key((ca_dir / CA_KEY_FILE).read_bytes(), password=None)
    except OSError as exc:
        raise ConfigError(f"{ca_dir}: no CA here ({exc.strerror or exc}: {exc.filename}); it is the directory "
                          "`enclavefl certs --ca-dir` wrote") from exc
    except ValueError as exc:
        raise ConfigError(f"{ca_dir}: ca.pem or {CA_KEY_FILE} is not PEM: {exc}") from exc
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey) or ca_key.public_key() != ca_cert.public_key():
        raise ConfigError(f"{ca_dir}: {CA_KEY_FILE} is not the key of ca.pem")
    role = f"worker-{index}"
    if (out_dir / f"{role}.pem").exists() or (out_dir / f"{role}.key").exists():
        raise ConfigError(f"{out_dir}: already holds {role}.pem or {role}.key; refusing to overwrite it")
    out_dir.mkdir(parents=True, exist_ok=True)
    bundle = make_node_cert(ca_cert, ca_key, f"enclavefl {role}", validity=validity)
    _write(out_dir / f"{role}.pem", bundle.cert_pem, private=False)
    _write(out_dir / f"{role}.key", bundle.key_pem, private=True)
    if not (out_dir / "ca.pem").exists():
        _write(out_dir / "ca.pem", bundle.ca_cert_pem, private=False)
    return out_dir / f"{role}.pem"
