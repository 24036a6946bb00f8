"""The simulated attestation root: operator key material for development only.

A real SGX quote chains to Intel: the Quoting Enclave's report is signed by a
PCK leaf certificate, which chains through a PCK CA to the Intel SGX Root CA.
The simulated provider reproduces that shape with keys the operator creates
once (``enclavefl attest init-sim-root``), like a test CA:

    root CA (self-signed, P-256) -> "PCK CA" -> PCK leaf  (signs the QE report)
    attestation key (P-256)                               (signs header + body)
    signer key (EC P-256 here; an RSA-3072 SGX signer key is accepted too)

Peers accept such evidence only when their policy names this root's SHA-256
fingerprint and sets ``allow_simulated``. Every name in the chain says it is
NOT A REAL TEE. The two CA private keys are discarded after signing, so
nothing can issue more certificates under a root once it is created.

This is not the per-node TLS key: RA-TLS keys are made in memory per process.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from enclavefl.attest.pck import PckExtension
from enclavefl.errors import ConfigError

__all__ = [
    "ROOT_COMMON_NAME",
    "SIM_ROOT_FILES",
    "SimRoot",
    "init_sim_root",
]

logger = logging.getLogger(__name__)

ROOT_COMMON_NAME: Final = "enclavefl simulated SGX root -- NOT A REAL TEE"
_PCK_CA_COMMON_NAME: Final = "enclavefl simulated PCK CA -- NOT A REAL TEE"
_PCK_LEAF_COMMON_NAME: Final = "enclavefl simulated PCK leaf -- NOT A REAL TEE"
_VALIDITY: Final = dt.timedelta(days=3650)
_BACKDATE: Final = dt.timedelta(hours=1)  # tolerate small clock differences between nodes

_ROOT_CERT = "root_ca.pem"
_PCK_CA_CERT = "pck_ca.pem"
_PCK_LEAF_CERT = "pck_leaf.pem"
_PCK_LEAF_KEY = "pck_leaf.key"
_ATTESTATION_KEY = "attestation.key"
_SIGNER_KEY = "signer.key"
#: Files a sim root directory holds (private keys are the ``.key`` files, mode 0600).
SIM_ROOT_FILES: Final = (_ROOT_CERT, _PCK_CA_CERT, _PCK_LEAF_CERT, _PCK_LEAF_KEY, _ATTESTATION_KEY, _SIGNER_KEY)
_MAX_FILE_BYTES = 64 * 1024
# The PCK leaf carries Intel's SGX extension so that code reading FMSPC/TCB from a
# PCK certificate works unchanged; all-zero values mark a platform that does not exist.
_SIM_PCK_EXTENSION: Final = PckExtension(
    tcb_components=(0,) * 16, pce_svn=0, cpu_svn=bytes(16), fmspc=bytes(6), pce_id=bytes(2)
)

SignerKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True, slots=True)
class SimRoot:
    """Loaded simulated-root material; build with :func:`init_sim_root` or :meth:`load`.

    Attributes:
        directory: where the files live.
        root_cert: the self-signed simulated root CA.
        pck_ca_cert: the intermediate ("PCK CA") certificate.
        pck_leaf_cert: the PCK leaf certificate; its key signs QE reports.
        pck_leaf_key: P-256 private key of the PCK leaf.
        attestation_key: P-256 private key that signs quote header + body.
        signer_key: the enclave signer key; MRSIGNER is derived from its public half.
    """

    directory: Path
    root_cert: x509.Certificate
    pck_ca_cert: x509.Certificate
    pck_leaf_cert: x509.Certificate
    pck_leaf_key: ec.EllipticCurvePrivateKey
    attestation_key: ec.EllipticCurvePrivateKey
    signer_key: SignerKey

    def __repr__(self) -> str:  # never show key objects
        return f"SimRoot(directory={str(self.directory)!r}, root_fingerprint={self.root_fingerprint[:16]}...)"

    @property
    def root_fingerprint(self) -> str:
        """SHA-256 (hex) of the root certificate's DER: what a policy pins."""
        return hashlib.sha256(self.root_cert.public_bytes(serialization.Encoding.DER)).hexdigest()

    @property
    def pck_chain(self) -> tuple[x509.Certificate, x509.Certificate, x509.Certificate]:
        """Leaf, intermediate, root: the order a quote's certification data uses."""
        return (self.pck_leaf_cert, self.pck_ca_cert, self.root_cert)

    @classmethod
    def load(cls, directory: Path) -> SimRoot:
        """Load and cross-check a sim root directory.

        Raises:
            ConfigError: a file is missing, unreadable or malformed, a key does
                not belong to its certificate, or the chain does not link.
        """
        directory = Path(directory)
        root_cert = _load_cert(directory / _ROOT_CERT)
        pck_ca_cert = _load_cert(directory / _PCK_CA_CERT)
        pck_leaf_cert = _load_cert(directory / _PCK_LEAF_CERT)
        pck_leaf_key = _load_p256_key(directory / _PCK_LEAF_KEY)
        attestation_key = _load_p256_key(directory / _ATTESTATION_KEY)
        signer_key = _load_signer_key(directory / _SIGNER_KEY)
        for child, issuer, name in (
            (root_cert, root_cert, _ROOT_CERT),
            (pck_ca_cert, root_cert, _PCK_CA_CERT),
            (pck_leaf_cert, pck_ca_cert, _PCK_LEAF_CERT),
        ):
            try:
                child.verify_directly_issued_by(issuer)
            except (ValueError, TypeError, InvalidSignature) as exc:
                raise ConfigError(f"{directory / name}: not issued by the expected CA ({exc or 'bad signature'})") from exc
        if _public_der(pck_leaf_key.public_key()) != _public_der(pck_leaf_cert.public_key()):
            raise ConfigError(f"{directory / _PCK_LEAF_KEY}: key does not match {_PCK_LEAF_CERT}")
        sim_root = cls(directory, root_cert, pck_ca_cert, pck_leaf_cert, pck_leaf_key, attestation_key, signer_key)
        logger.info("loaded simulated root %s (NOT A REAL TEE) from %s", sim_root.root_fingerprint[:16], directory)
        return sim_root


def init_sim_root(directory: Path, *, name: str) -> SimRoot:
    """Create a new simulated root, PCK chain, attestation key and signer key.

    Args:
        directory: created if missing (mode 0700); must not hold any sim root file.
        name: who the root belongs to (written as the certificates' organisation).

    Raises:
        ConfigError: a file would be overwritten, ``name`` is empty, or the
            directory cannot be written.
    """
    directory = Path(directory)
    if not name.strip():
        raise ConfigError("init_sim_root: name must not be empty")
    existing = [f for f in SIM_ROOT_FILES if (directory / f).exists()]
    if existing:
        raise ConfigError(f"{directory}: refusing to overwrite existing sim root files {existing}")

    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    root_key = ec.generate_private_key(ec.SECP256R1())
    pck_ca_key = ec.generate_private_key(ec.SECP256R1())
    pck_leaf_key = ec.generate_private_key(ec.SECP256R1())
    attestation_key = ec.generate_private_key(ec.SECP256R1())
    signer_key = ec.generate_private_key(ec.SECP256R1())

    root_name = _name(ROOT_COMMON_NAME, name)
    root_cert = _issue(root_name, root_key.public_key(), root_name, root_key, now, ca=True, path_length=1)
    pck_ca_name = _name(_PCK_CA_COMMON_NAME, name)
    pck_ca_cert = _issue(pck_ca_name, pck_ca_key.public_key(), root_name, root_key, now, ca=True, path_length=0)
    pck_leaf_cert = _issue(
        _name(_PCK_LEAF_COMMON_NAME, name), pck_leaf_key.public_key(), pck_ca_name, pck_ca_key, now, ca=False,
        extra=_SIM_PCK_EXTENSION.to_extension(),
    )

    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write_new(directory / _ROOT_CERT, root_cert.public_bytes(serialization.Encoding.PEM), 0o644)
        _write_new(directory / _PCK_CA_CERT, pck_ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
        _write_new(directory / _PCK_LEAF_CERT, pck_leaf_cert.public_bytes(serialization.Encoding.PEM), 0o644)
        for file_name, key in ((_PCK_LEAF_KEY, pck_leaf_key), (_ATTESTATION_KEY, attestation_key), (_SIGNER_KEY, signer_key)):
            _write_new(directory / file_name, _private_pem(key), 0o600)
    except FileExistsError as exc:
        raise ConfigError(f"{exc.filename}: refusing to overwrite an existing sim root file") from exc
    except OSError as exc:
        raise ConfigError(f"{directory}: cannot write sim root: {exc}") from exc

    sim_root = SimRoot(directory, root_cert, pck_ca_cert, pck_leaf_cert, pck_leaf_key, attestation_key, signer_key)
    logger.warning(
        "created simulated SGX root %s in %s: development only, NOT A REAL TEE", sim_root.root_fingerprint[:16], directory
    )
    return sim_root


# -- certificates -------------------------------------------------------------


def _name(common_name: str, organisation: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation.strip()[:64]),
        ]
    )


def _issue(
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    now: dt.datetime,
    *,
    ca: bool,
    path_length: int | None = None,
    extra: x509.UnrecognizedExtension | None = None,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    )
    if ca:
        usage = x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
        )
    else:
        usage = x509.KeyUsage(
            digital_signature=True, content_commitment=True, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
        )
    builder = builder.add_extension(usage, critical=True)
    if extra is not None:
        builder = builder.add_extension(extra, critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _public_der(key: object) -> bytes:
    if not isinstance(key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)):
        return b""
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


# -- files ----------------------------------------------------------------------

def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` exclusively with ``mode`` (never replaces a file)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # umask must not widen or narrow what we asked for
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_small(path: Path) -> bytes:
    try:
        size = path.stat().st_size
        if size > _MAX_FILE_BYTES:
            raise ConfigError(f"{path}: {size} bytes is too large for a key or certificate (max {_MAX_FILE_BYTES})")
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: missing; create a sim root with `enclavefl attest init-sim-root`") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read_small(path))
    except ValueError as exc:
        raise ConfigError(f"{path}: not a PEM certificate ({exc})") from exc


def _load_private_key(path: Path) -> object:
    try:
        return serialization.load_pem_private_key(_read_small(path), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: not an unencrypted PEM private key ({exc})") from exc


def _load_p256_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = _load_private_key(path)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ConfigError(f"{path}: expected an EC P-256 private key, got {_describe(key)}")
    return key


def _load_signer_key(path: Path) -> SignerKey:
    key = _load_private_key(path)
    if isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        return key
    raise ConfigError(f"{path}: expected an EC or RSA private key, got {_describe(key)}")


def _describe(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"EC {key.curve.name}"
    return type(key).__name__
