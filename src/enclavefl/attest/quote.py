"""Intel DCAP quote codec: SGX quote v3 and TDX quote v4, parsed into frozen values.

How this works: a quote is ``header (48) || body (SGX 384 / TD 584) || u32 len ||
signature data``. The fixed-layout header and bodies live in ``reports.py``; this
module adds the signature data (QE report, PCK chain) and the whole quote. Every read
goes through a bounded :class:`~enclavefl.attest.reports.QuoteReader`, so a malformed
or truncated quote raises :class:`QuoteFormatError` naming the field and offset,
never an ``IndexError``. Serialisation is the exact inverse: ``parse_quote(b).to_bytes()``
equals ``b`` up to the end of the signature data (bytes after it are only counted, in
``Quote.trailing_bytes``; the verifier refuses a quote that had any). All integers
are little-endian. Layouts follow Intel's ``sgx_quote_3.h`` / ``sgx_quote_4.h`` and
the QVL ``QuoteStructures.h``. Quote version 5 is refused by name.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from enclavefl.attest.der import TAG_BIT_STRING, TAG_SEQUENCE, DerError, read_children, read_tlv
from enclavefl.attest.reports import (
    ATT_KEY_TYPE_ECDSA_P256,
    HEADER_SIZE,
    INTEL_QE_VENDOR_ID,
    TEE_TYPE_SGX,
    TEE_TYPE_TDX,
    QuoteFormatError,
    QuoteHeader,
    QuoteReader,
    SgxAttributes,
    SgxReportBody,
    TdReportBody,
)

__all__ = [
    "ATT_KEY_TYPE_ECDSA_P256",
    "CERT_TYPE_PCK_CHAIN",
    "CERT_TYPE_QE_REPORT",
    "INTEL_QE_VENDOR_ID",
    "Quote",
    "QuoteFormatError",
    "QuoteHeader",
    "QuoteSignatureData",
    "SgxAttributes",
    "SgxReportBody",
    "TEE_TYPE_SGX",
    "TEE_TYPE_TDX",
    "TdReportBody",
    "load_certificate_der",
    "parse_pem_chain",
    "parse_quote",
    "qe_report_data_for",
    "serialize_quote",
]

logger = logging.getLogger(__name__)

CERT_TYPE_PCK_LEAF = 4
CERT_TYPE_PCK_CHAIN = 5
CERT_TYPE_QE_REPORT = 6
_MAX_CHAIN_CERTS = 8
_PEM_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", re.DOTALL)


def qe_report_data_for(attestation_key: bytes, qe_auth_data: bytes) -> bytes:
    """The report_data a QE report must carry: SHA-256(key || auth data) || 32 zero bytes.

    This is what binds the attestation key to the hardware-signed QE report.
    """
    return hashlib.sha256(attestation_key + qe_auth_data).digest() + bytes(32)


def _check_certificate_envelope(der: bytes) -> None:
    """Refuse what cryptography tolerates: a signature BIT STRING with unused bits.

    Its "unused bits" byte is outside the signed TBS and ignored when the signature is
    read, so accepting a non-zero value would let a changed byte pass.
    """
    tag, start, end = read_tlv(der, 0, len(der))
    if tag != TAG_SEQUENCE or end != len(der):
        raise DerError("not a single DER SEQUENCE")
    parts = read_children(der, start, end)
    if len(parts) != 3 or parts[2][0] != TAG_BIT_STRING or parts[2][1][:1] != b"\x00":
        raise DerError("signature must be a BIT STRING with 0 unused bits")


def load_certificate_der(der: bytes, field: str, offset: int | None = None) -> x509.Certificate:
    """Load one DER certificate, turning any parse problem into QuoteFormatError.

    cryptography only *warns* about some RFC 5280 violations (negative serials) and will
    refuse them later; we refuse them now so behaviour does not depend on its version.
    """
    try:
        _check_certificate_envelope(der)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cert = x509.load_der_x509_certificate(der)
            # cryptography decodes some fields lazily; touch every one the verifier reads
            # so a malformed certificate fails here, once, with a clear error.
            _ = (cert.subject, cert.issuer, cert.serial_number, cert.not_valid_before_utc, cert.not_valid_after_utc)
            _ = (cert.extensions, cert.signature_hash_algorithm, cert.public_key())
    except Exception as exc:  # noqa: BLE001 - cryptography raises ValueError, InvalidVersion,
        # DuplicateExtension, UnsupportedAlgorithm, ... for malformed input: all mean "bad certificate".
        raise QuoteFormatError(field, offset, f"not a usable DER X.509 certificate ({exc!r})") from exc
    if caught:
        raise QuoteFormatError(field, offset, f"malformed certificate ({caught[0].message})")
    return cert


def _is_line_breaks(gap: bytes) -> bool:
    return not gap.replace(b"\r\n", b"").replace(b"\n", b"")


def parse_pem_chain(blob: bytes, field: str = "pem_chain", offset: int = 0) -> tuple[x509.Certificate, ...]:
    """Split a concatenated PEM chain (optionally ending in one NUL) into certificates.

    The text must be canonical: only line breaks between and inside blocks, and
    base64 that re-encodes to itself. The chain is not covered by the quote's
    signatures, so any slack here (stray bytes, ignored bits) would let two different
    byte strings pass as the same evidence; refusing it keeps a flipped bit fatal.

    Raises:
        QuoteFormatError: no certificate, stray bytes, bad base64 or DER.
    """
    text = blob[:-1] if blob.endswith(b"\x00") else blob
    certs: list[x509.Certificate] = []
    pos = 0
    for match in _PEM_BLOCK.finditer(text):
        if not _is_line_breaks(text[pos : match.start()]):
            raise QuoteFormatError(field, offset + pos, "unexpected bytes between PEM blocks")
        if len(certs) == _MAX_CHAIN_CERTS:
            raise QuoteFormatError(field, offset + match.start(), f"more than {_MAX_CHAIN_CERTS} certificates")
        encoded = match.group(1).replace(b"\r\n", b"\n").replace(b"\n", b"")
        try:
            der = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise QuoteFormatError(field, offset + match.start(), f"bad base64 in PEM block ({exc})") from exc
        if base64.b64encode(der) != encoded:
            raise QuoteFormatError(field, offset + match.start(), "non-canonical base64 in PEM block")
        certs.append(load_certificate_der(der, f"{field}[{len(certs)}]", offset + match.start()))
        pos = match.end()
    if not _is_line_breaks(text[pos:]):
        raise QuoteFormatError(field, offset + pos, "unexpected bytes after the last PEM block")
    if not certs:
        raise QuoteFormatError(field, offset, "no PEM certificate found")
    return tuple(certs)


@dataclass(frozen=True, slots=True, kw_only=True)
class QuoteSignatureData:
    """ECDSA-P256 signature data of a quote, flattened over the v3 and v4 layouts.

    In v3 the QE report and the certification data sit directly in the signature data.
    In v4 (``wrapped=True``) they sit inside a type-6 "QE report certification data"
    block; the fields here are then the contents of that block, and ``cert_type`` /
    ``cert_data`` are its inner certification data.

    Attributes:
        signature: raw r||s (64 bytes) by the attestation key over header+body.
        attestation_key: raw X||Y P-256 point (64 bytes).
        qe_report: the Quoting Enclave's report body, signed by the PCK leaf key.
        qe_report_signature: raw r||s (64 bytes).
        qe_auth_data: bytes hashed into the QE report's report_data.
        cert_type: certification data type (5 = PCK chain in PEM).
        cert_data: the raw certification data, kept byte-exact (trailing NUL included).
        pck_chain: certificates parsed from cert_data (leaf first) for types 4 and 5.
        wrapped: True for the v4 layout with the type-6 wrapper.
    """

    signature: bytes
    attestation_key: bytes
    qe_report: SgxReportBody
    qe_report_signature: bytes
    qe_auth_data: bytes
    cert_type: int
    cert_data: bytes
    pck_chain: tuple[x509.Certificate, ...] = ()
    wrapped: bool = False

    def __post_init__(self) -> None:
        for name in ("signature", "attestation_key", "qe_report_signature"):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != 64:
                raise QuoteFormatError(f"signature_data.{name}", None, "must be 64 bytes")
        if not isinstance(self.qe_report, SgxReportBody):
            raise QuoteFormatError("signature_data.qe_report", None, "must be an SgxReportBody")
        if not isinstance(self.qe_auth_data, bytes) or len(self.qe_auth_data) > 0xFFFF:
            raise QuoteFormatError("signature_data.qe_auth_data", None, "must be bytes of at most 65535")
        if not 1 <= self.cert_type <= CERT_TYPE_PCK_CHAIN:
            raise QuoteFormatError("signature_data.cert_type", None, f"must be 1..5, got {self.cert_type}")

    @classmethod
    def with_pck_chain(
        cls,
        *,
        signature: bytes,
        attestation_key: bytes,
        qe_report: SgxReportBody,
        qe_report_signature: bytes,
        qe_auth_data: bytes,
        pck_chain: Sequence[x509.Certificate],
        wrapped: bool = False,
        nul_terminated: bool = True,
    ) -> QuoteSignatureData:
        """Build type-5 signature data from a certificate chain (leaf, intermediate, root).

        The chain is written as concatenated PEM ending in a NUL, as Intel's QE does.
        """
        if not pck_chain:
            raise QuoteFormatError("signature_data.pck_chain", None, "needs at least one certificate")
        pem = b"".join(cert.public_bytes(Encoding.PEM) for cert in pck_chain)
        return cls(
            signature=signature,
            attestation_key=attestation_key,
            qe_report=qe_report,
            qe_report_signature=qe_report_signature,
            qe_auth_data=qe_auth_data,
            cert_type=CERT_TYPE_PCK_CHAIN,
            cert_data=pem + (b"\x00" if nul_terminated else b""),
            pck_chain=tuple(pck_chain),
            wrapped=wrapped,
        )

    def to_bytes(self) -> bytes:
        qe_part = b"".join(
            (
                self.qe_report.to_bytes(),
                self.qe_report_signature,
                len(self.qe_auth_data).to_bytes(2, "little"),
                self.qe_auth_data,
                self.cert_type.to_bytes(2, "little"),
                len(self.cert_data).to_bytes(4, "little"),
                self.cert_data,
            )
        )
        if self.wrapped:
            qe_part = CERT_TYPE_QE_REPORT.to_bytes(2, "little") + len(qe_part).to_bytes(4, "little") + qe_part
        return self.signature + self.attestation_key + qe_part

    @classmethod
    def read_from(cls, reader: QuoteReader, wrapped: bool) -> QuoteSignatureData:
        signature = reader.take(64, "signature_data.signature")
        attestation_key = reader.take(64, "signature_data.attestation_key")
        inner = reader
        if wrapped:
            outer_type = reader.uint(2, "signature_data.cert_type")
            if outer_type != CERT_TYPE_QE_REPORT:
                raise QuoteFormatError(
                    "signature_data.cert_type", reader.pos - 2, f"v4 needs type 6 (QE report), got {outer_type}"
                )
            size = reader.uint(4, "signature_data.cert_size")
            inner = reader.sub(size, "signature_data.qe_report_cert_data")
        qe_report = SgxReportBody.read_from(inner, "signature_data.qe_report")
        qe_report_signature = inner.take(64, "signature_data.qe_report_signature")
        auth_size = inner.uint(2, "signature_data.qe_auth_data_size")
        qe_auth_data = inner.take(auth_size, "signature_data.qe_auth_data")
        cert_type_offset = inner.pos
        cert_type = inner.uint(2, "signature_data.inner_cert_type" if wrapped else "signature_data.cert_type")
        if not 1 <= cert_type <= CERT_TYPE_PCK_CHAIN:
            raise QuoteFormatError("signature_data.cert_type", cert_type_offset, f"must be 1..5, got {cert_type}")
        cert_size = inner.uint(4, "signature_data.cert_size")
        cert_offset = inner.pos
        cert_data = inner.take(cert_size, "signature_data.cert_data")
        if wrapped:
            inner.expect_end("signature_data.qe_report_cert_data")
        chain: tuple[x509.Certificate, ...] = ()
        if cert_type in (CERT_TYPE_PCK_LEAF, CERT_TYPE_PCK_CHAIN):
            chain = parse_pem_chain(cert_data, "signature_data.cert_data", cert_offset)
        return cls(
            signature=signature,
            attestation_key=attestation_key,
            qe_report=qe_report,
            qe_report_signature=qe_report_signature,
            qe_auth_data=qe_auth_data,
            cert_type=cert_type,
            cert_data=cert_data,
            pck_chain=chain,
            wrapped=wrapped,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Quote:
    """A parsed DCAP quote: SGX v3, or v4 for SGX or TDX (ECDSA-P256 only).

    Attributes:
        trailing_bytes: how many bytes followed the signature data in the parsed
            input (0 when built from parts). Parsing tolerates them so a padded quote
            can still be shown; :func:`~enclavefl.attest.verifier.verify_quote`
            refuses them, as Intel's QVL does, so accepted evidence has one encoding.
    """

    header: QuoteHeader
    body: SgxReportBody | TdReportBody
    signature_data: QuoteSignatureData
    trailing_bytes: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.trailing_bytes, int) or self.trailing_bytes < 0:
            raise QuoteFormatError("trailing_bytes", None, f"must be a count >= 0, got {self.trailing_bytes!r}")
        header = self.header
        if header.att_key_type != ATT_KEY_TYPE_ECDSA_P256:
            raise QuoteFormatError(
                "header.att_key_type", 2, f"only 2 (ECDSA-P256) is supported, got {header.att_key_type}"
            )
        if header.version == 3:
            expected_tee, wrapped = TEE_TYPE_SGX, False
        elif header.version == 4:
            expected_tee, wrapped = (TEE_TYPE_TDX if header.tee_type == TEE_TYPE_TDX else TEE_TYPE_SGX), True
        else:
            raise QuoteFormatError("header.version", 0, _unsupported_version(header.version))
        if header.tee_type != expected_tee:
            raise QuoteFormatError(
                "header.tee_type", 4, f"must be {expected_tee:#x} for v{header.version}, got {header.tee_type:#x}"
            )
        body_type = TdReportBody if expected_tee == TEE_TYPE_TDX else SgxReportBody
        if not isinstance(self.body, body_type):
            raise QuoteFormatError("body", HEADER_SIZE, f"tee_type {header.tee_type:#x} needs a {body_type.__name__}")
        if self.signature_data.wrapped != wrapped:
            raise QuoteFormatError("signature_data.wrapped", None, f"must be {wrapped} for a v{header.version} quote")

    @property
    def tee(self) -> Literal["sgx", "tdx"]:
        return "tdx" if self.header.tee_type == TEE_TYPE_TDX else "sgx"

    @property
    def is_debug(self) -> bool:
        """True for a debug enclave or debug TD, whose secrets the host can read."""
        return self.body.is_debug

    @property
    def signed_bytes(self) -> bytes:
        """The header+body region the attestation key signs."""
        return self.header.to_bytes() + self.body.to_bytes()

    def to_bytes(self) -> bytes:
        signature_data = self.signature_data.to_bytes()
        return self.signed_bytes + len(signature_data).to_bytes(4, "little") + signature_data

    @classmethod
    def build_sgx_v3(
        cls, *, body: SgxReportBody, signature_data: QuoteSignatureData, header: QuoteHeader | None = None
    ) -> Quote:
        """Assemble an SGX v3 quote from parts (the simulated provider's path).

        Sign ``header.to_bytes() + body.to_bytes()`` for ``signature_data.signature``.
        """
        return cls(header=header or QuoteHeader(), body=body, signature_data=signature_data)


def _unsupported_version(version: int) -> str:
    if version == 5:
        # v5 (TDX 1.5, and SGX in the v5 layout) adds a typed, sized body; it is not
        # implemented here, and refusing it by name says so instead of misparsing it.
        return "quote version 5 (TDX 1.5 / SGX v5 layout) is not supported; only versions 3 and 4 are"
    return f"only quote versions 3 and 4 are supported, got quote version {version}"


def parse_quote(data: bytes | bytearray | memoryview) -> Quote:
    """Parse a DCAP quote; bytes after the declared signature data are counted, not read.

    The count is kept in :attr:`Quote.trailing_bytes`. Parsing tolerates such bytes
    (some producers zero-pad quotes into a fixed buffer, and a tool may want to show
    them), but :func:`~enclavefl.attest.verifier.verify_quote` refuses a quote that
    had any, as Intel's QVL refuses "additional, not expected data in quote".

    Raises:
        QuoteFormatError: truncated, inconsistent or unsupported quote (field and offset named).
    """
    raw = bytes(data)
    reader = QuoteReader(raw)
    header = QuoteHeader.read_from(reader, "header")
    if header.version not in (3, 4):
        raise QuoteFormatError("header.version", 0, _unsupported_version(header.version))
    if header.att_key_type != ATT_KEY_TYPE_ECDSA_P256:
        raise QuoteFormatError("header.att_key_type", 2, f"only 2 (ECDSA-P256) is supported, got {header.att_key_type}")
    body: SgxReportBody | TdReportBody
    if header.tee_type == TEE_TYPE_TDX and header.version == 4:
        body = TdReportBody.read_from(reader, "body")
    elif header.tee_type == TEE_TYPE_SGX:
        body = SgxReportBody.read_from(reader, "body")
    else:
        raise QuoteFormatError("header.tee_type", 4, f"unsupported for v{header.version}: {header.tee_type:#x}")
    size = reader.uint(4, "signature_data_len")
    sig_reader = reader.sub(size, "signature_data")
    signature_data = QuoteSignatureData.read_from(sig_reader, wrapped=header.version == 4)
    sig_reader.expect_end("signature_data")
    if reader.remaining:
        logger.debug("quote carries %d bytes after its signature data", reader.remaining)
    return Quote(header=header, body=body, signature_data=signature_data, trailing_bytes=reader.remaining)


def serialize_quote(quote: Quote) -> bytes:
    """Serialise a quote; the exact inverse of :func:`parse_quote` (trailing bytes dropped)."""
    return quote.to_bytes()

