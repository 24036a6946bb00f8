"""Intel PCK certificates: chain checks against a pinned root, and the SGX extension.

The PCK leaf certificate names the platform's TCB: its extension
``1.2.840.113741.1.13.1`` holds the FMSPC, the PCE-ID, 16 TCB component SVNs,
the PCESVN and the CPUSVN. Collateral (TCB info) turns those numbers into a TCB
status. The extension is plain DER; :func:`parse_pck_extension` reads it with a
small bounded TLV reader, and :meth:`PckExtension.to_der` writes the same layout
(simulated PCK certificates and tests use it).

Chains are checked bottom-up to a root that is *pinned*: by default only the Intel
SGX Root CA shipped with this package, identified by the SHA-256 of its DER.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding

from enclavefl.attest.der import (
    TAG_ENUMERATED,
    TAG_INTEGER,
    TAG_OCTET_STRING,
    TAG_OID,
    TAG_SEQUENCE,
    DerError,
    decode_oid,
    decode_uint,
    encode_oid,
    encode_tlv,
    encode_uint,
    read_children,
    read_tlv,
)
from enclavefl.errors import AttestationError, VerificationError

__all__ = [
    "INTEL_SGX_ROOT_CA_SHA256",
    "SGX_EXTENSION_OID",
    "PckExtension",
    "as_utc",
    "certificate_fingerprint",
    "intel_sgx_root_ca",
    "parse_pck_extension",
    "pck_ca_kind",
    "verify_certificate_chain",
]

#: SHA-256 of the DER of the real Intel SGX Root CA (CN=Intel SGX Root CA, 2018-05-21..2049-12-31).
INTEL_SGX_ROOT_CA_SHA256 = "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"
SGX_EXTENSION_OID = x509.ObjectIdentifier("1.2.840.113741.1.13.1")
_SGX_OID_PREFIX = SGX_EXTENSION_OID.dotted_string + "."
_ROOT_PEM = "intel_sgx_root_ca.pem"



def certificate_fingerprint(cert: x509.Certificate) -> str:
    """Hex SHA-256 of the certificate's DER: how roots are pinned."""
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


@functools.cache
def intel_sgx_root_ca() -> x509.Certificate:
    """The Intel SGX Root CA shipped with the package, checked against the pinned digest.

    Raises:
        AttestationError: the packaged file is missing or is not the pinned certificate.
    """
    try:
        pem = resources.files("enclavefl.attest").joinpath(_ROOT_PEM).read_bytes()
        cert = x509.load_pem_x509_certificate(pem)
    except (OSError, ValueError) as exc:
        raise AttestationError(f"packaged {_ROOT_PEM} is unreadable: {exc}") from exc
    if certificate_fingerprint(cert) != INTEL_SGX_ROOT_CA_SHA256:
        raise AttestationError(f"packaged {_ROOT_PEM} is not the Intel SGX Root CA (digest mismatch)")
    return cert


def as_utc(at: datetime) -> datetime:
    """``at`` in UTC; a naive time is taken to be UTC already."""
    return at.replace(tzinfo=timezone.utc) if at.tzinfo is None else at.astimezone(timezone.utc)


def _check_validity(cert: x509.Certificate, at: datetime, field: str) -> None:
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if not start <= at <= end:
        raise VerificationError(
            f"{field}.validity",
            f"{start.isoformat()}..{end.isoformat()}",
            at.isoformat(),
            "certificate not valid at that time",
        )


def _check_issuer(issuer: x509.Certificate, cert: x509.Certificate, field: str) -> None:
    """``issuer`` must be a CA allowed to sign certificates, and must have signed ``cert``."""
    try:
        constraints = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = constraints.ca
    except x509.ExtensionNotFound:
        is_ca = False
    except ValueError as exc:
        raise VerificationError(f"{field}.issuer", "a CA certificate", "unparsable extensions", str(exc)) from exc
    if not is_ca:
        raise VerificationError(f"{field}.issuer", "a CA certificate (basicConstraints CA:TRUE)", "not a CA")
    try:
        usage = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
        if not usage.key_cert_sign:
            raise VerificationError(f"{field}.issuer", "keyUsage keyCertSign", "keyCertSign not set")
    except x509.ExtensionNotFound:
        pass
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise VerificationError(
            f"{field}.signature",
            f"signed by {issuer.subject.rfc4514_string()}",
            "invalid signature or issuer name",
            str(exc) or type(exc).__name__,
        ) from exc


def verify_certificate_chain(
    chain: Sequence[x509.Certificate],
    *,
    at: datetime,
    trusted_roots: Sequence[x509.Certificate] | None = None,
    field: str = "pck_chain",
) -> x509.Certificate:
    """Check ``chain`` (leaf first) up to a trusted root; return that root.

    The chain may end with the root itself or stop just below it. Every
    certificate must be valid at ``at`` and signed by the next one, which must be
    a CA. ``trusted_roots`` replaces the default (the pinned Intel root).

    Raises:
        VerificationError: empty chain, unknown root, bad signature, not a CA, or
            outside its validity (``field`` names the certificate: ``pck_chain[1]``).
    """
    at = as_utc(at)
    roots = list(trusted_roots) if trusted_roots is not None else [intel_sgx_root_ca()]
    if not chain:
        raise VerificationError(field, "a certificate chain", "no certificates")
    certs = list(chain)
    last = certs[-1]
    last_der = last.public_bytes(Encoding.DER)
    root = next((r for r in roots if r.public_bytes(Encoding.DER) == last_der), None)
    if root is not None:
        certs.pop()
    else:
        root = next((r for r in roots if r.subject == last.issuer and r.subject != last.subject), None)
    if root is None:
        raise VerificationError(
            f"{field}.root",
            "one of " + ", ".join(certificate_fingerprint(r)[:16] + "..." for r in roots),
            certificate_fingerprint(last),
            "the chain does not end at a trusted root",
        )
    root_field = f"{field}[{len(certs)}]"
    _check_issuer(root, root, root_field)
    _check_validity(root, at, root_field)
    issuer = root
    for index in range(len(certs) - 1, -1, -1):
        cert_field = f"{field}[{index}]"
        _check_issuer(issuer, certs[index], cert_field)
        _check_validity(certs[index], at, cert_field)
        issuer = certs[index]
    return root


def pck_ca_kind(intermediate: x509.Certificate) -> Literal["processor", "platform"] | None:
    """Which Intel PCK CA issued a PCK leaf (the PCS ``ca`` parameter), from the CA's CN."""
    names = intermediate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    common_name = str(names[0].value) if names else ""
    if common_name == "Intel SGX PCK Processor CA":
        return "processor"
    if common_name == "Intel SGX PCK Platform CA":
        return "platform"
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class PckExtension:
    """The Intel SGX extension of a PCK leaf certificate.

    Attributes:
        tcb_components: the 16 SGX TCB component SVNs (compared with tcbInfo levels).
        pce_svn: PCE security version.
        cpu_svn: raw 16-byte CPUSVN.
        fmspc: 6-byte platform family id (selects the TCB info).
        pce_id: 2-byte PCE id.
        ppid: encrypted platform provisioning id (16 bytes).
        sgx_type: 0 standard, 1 scalable, 2 scalable with integrity.
        platform_instance_id: set in certificates from the Platform CA.
    """

    tcb_components: tuple[int, ...]
    pce_svn: int
    cpu_svn: bytes
    fmspc: bytes
    pce_id: bytes
    ppid: bytes = bytes(16)
    sgx_type: int = 0
    platform_instance_id: bytes | None = None

    def to_der(self) -> bytes:
        """DER of the extension value (the layout Intel's PCK certificates use)."""

        def entry(suffix: str, value: bytes) -> bytes:
            return encode_tlv(TAG_SEQUENCE, encode_oid(_SGX_OID_PREFIX + suffix) + value)

        tcb = b"".join(entry(f"2.{i + 1}", encode_uint(TAG_INTEGER, svn)) for i, svn in enumerate(self.tcb_components))
        tcb += entry("2.17", encode_uint(TAG_INTEGER, self.pce_svn))
        tcb += entry("2.18", encode_tlv(TAG_OCTET_STRING, self.cpu_svn))
        parts = [
            entry("1", encode_tlv(TAG_OCTET_STRING, self.ppid)),
            entry("2", encode_tlv(TAG_SEQUENCE, tcb)),
            entry("3", encode_tlv(TAG_OCTET_STRING, self.pce_id)),
            entry("4", encode_tlv(TAG_OCTET_STRING, self.fmspc)),
            entry("5", encode_uint(TAG_ENUMERATED, self.sgx_type)),
        ]
        if self.platform_instance_id is not None:
            parts.append(entry("6", encode_tlv(TAG_OCTET_STRING, self.platform_instance_id)))
        return encode_tlv(TAG_SEQUENCE, b"".join(parts))

    def to_extension(self) -> x509.UnrecognizedExtension:
        """The extension object to add to a certificate builder."""
        return x509.UnrecognizedExtension(SGX_EXTENSION_OID, self.to_der())


def _read_entries(content: bytes) -> dict[str, tuple[int, bytes]]:
    """Read ``SEQUENCE OF SEQUENCE { OID, value }`` into {sub-oid suffix: (tag, content)}."""
    entries: dict[str, tuple[int, bytes]] = {}
    for tag, entry in read_children(content, 0, len(content)):
        if tag != TAG_SEQUENCE:
            raise DerError("entry is not a SEQUENCE")
        fields = read_children(entry, 0, len(entry))
        if len(fields) != 2 or fields[0][0] != TAG_OID:
            raise DerError("entry is not { OID, value }")
        oid = decode_oid(fields[0][1])
        if not oid.startswith(_SGX_OID_PREFIX):
            raise DerError(f"unexpected OID {oid}")
        entries[oid[len(_SGX_OID_PREFIX) :]] = fields[1]
    return entries


def _octets(entries: dict[str, tuple[int, bytes]], key: str, size: int) -> bytes:
    if key not in entries:
        raise DerError(f"missing {_SGX_OID_PREFIX}{key}")
    tag, content = entries[key]
    if tag != TAG_OCTET_STRING or len(content) != size:
        raise DerError(f"{_SGX_OID_PREFIX}{key} must be an OCTET STRING of {size} bytes")
    return content


def parse_pck_extension(cert: x509.Certificate, field: str = "pck_chain[0]") -> PckExtension:
    """Read the SGX extension of a PCK leaf certificate.

    Raises:
        VerificationError: the extension is absent or malformed (field ``<field>.sgx_extension``).
    """
    name = f"{field}.sgx_extension"
    try:
        value = cert.extensions.get_extension_for_oid(SGX_EXTENSION_OID).value
    except x509.ExtensionNotFound as exc:
        raise VerificationError(name, f"extension {SGX_EXTENSION_OID.dotted_string}", "absent") from exc
    except ValueError as exc:
        raise VerificationError(name, "parsable extensions", "malformed", str(exc)) from exc
    raw = value.value if isinstance(value, x509.UnrecognizedExtension) else b""
    try:
        tag, start, end = read_tlv(raw, 0, len(raw))
        if tag != TAG_SEQUENCE or end != len(raw):
            raise DerError("not a single SEQUENCE")
        entries = _read_entries(raw[start:end])
        if "2" not in entries or entries["2"][0] != TAG_SEQUENCE:
            raise DerError(f"missing TCB sequence {_SGX_OID_PREFIX}2")
        tcb = _read_entries(entries["2"][1])
        components = []
        for index in range(1, 17):
            if f"2.{index}" not in tcb:
                raise DerError(f"missing TCB component {index}")
            components.append(decode_uint(*tcb[f"2.{index}"], TAG_INTEGER))
        if "2.17" not in tcb:
            raise DerError("missing PCESVN")
        pce_svn = decode_uint(*tcb["2.17"], TAG_INTEGER)
        sgx_type = decode_uint(*entries["5"], TAG_ENUMERATED) if "5" in entries else 0
        return PckExtension(
            tcb_components=tuple(components),
            pce_svn=pce_svn,
            cpu_svn=_octets(tcb, "2.18", 16),
            fmspc=_octets(entries, "4", 6),
            pce_id=_octets(entries, "3", 2),
            ppid=_octets(entries, "1", 16),
            sgx_type=sgx_type,
            platform_instance_id=_octets(entries, "6", 16) if "6" in entries else None,
        )
    except DerError as exc:
        raise VerificationError(name, "Intel SGX extension layout", "malformed", str(exc)) from exc
