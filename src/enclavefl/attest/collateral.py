"""DCAP collateral: Intel's signed TCB info, QE identity and CRLs, loaded and checked.

How this works: collateral arrives either as the combined JSON some verifiers
store (:meth:`Collateral.from_file`) or as Intel PCS/PCCS responses
(:meth:`Collateral.from_parts`). Intel signs the *exact bytes* of the inner
``tcbInfo`` / ``enclaveIdentity`` JSON object, so those bytes are kept verbatim
(:func:`split_signed_envelope` cuts them out of a PCS response without
re-serialising). :meth:`Collateral.verify` then checks, at a given time: the
issuer chains to a trusted root, that TCB info and QE identity are signed by the
TCB Signing certificate itself (named ``Intel SGX TCB Signing``, not a CA, issued
directly by the root: any other certificate of the root, such as a PCK CA, is
refused, as the QVL's ``TCBSigningChain`` does), the ECDSA signatures on both JSON documents,
their issueDate/nextUpdate window, the CRL signatures and windows, and that no
certificate of those chains is revoked. TCB status is computed elsewhere
(``tcb.py``) from the parsed values here.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from enclavefl.attest.tcb import EnclaveIdentity, TcbInfo, parse_enclave_identity, parse_tcb_info
from enclavefl.attest.pck import INTEL_SGX_ROOT_CA_SHA256, as_utc, certificate_fingerprint, verify_certificate_chain
from enclavefl.attest.quote import QuoteFormatError, parse_pem_chain
from enclavefl.errors import AttestationError, VerificationError

__all__ = [
    "INTEL_TCB_SIGNING_SUBJECT",
    "TCB_SIGNING_COMMON_NAME",
    "Collateral",
    "CollateralFormatError",
    "check_not_revoked",
    "split_signed_envelope",
]

#: Subject CN of the certificate that signs TCB info and QE identity (under any root).
TCB_SIGNING_COMMON_NAME: Final = "Intel SGX TCB Signing"
#: The full subject of Intel's TCB Signing certificate, pinned when the root is Intel's.
INTEL_TCB_SIGNING_SUBJECT: Final = x509.Name(
    [
        x509.NameAttribute(NameOID.COMMON_NAME, TCB_SIGNING_COMMON_NAME),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Intel Corporation"),
        x509.NameAttribute(NameOID.LOCALITY_NAME, "Santa Clara"),
        x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "CA"),
        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
    ]
)

_MAX_FILE_BYTES = 4 << 20
_COMBINED_KEYS = (
    "pck_crl_issuer_chain",
    "root_ca_crl",
    "pck_crl",
    "tcb_info_issuer_chain",
    "tcb_info",
    "tcb_info_signature",
    "qe_identity_issuer_chain",
    "qe_identity",
    "qe_identity_signature",
)


class CollateralFormatError(AttestationError):
    """Collateral could not be read: missing key, bad hex/PEM/DER/JSON (names source and field)."""

    def __init__(self, source: str, field: str, detail: str) -> None:
        self.source = source
        self.field = field
        self.detail = detail
        super().__init__(f"{source}: {field}: {detail}")


def _text(value: bytes | str, source: str, field: str) -> str:
    if isinstance(value, str):
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CollateralFormatError(source, field, "not UTF-8 text") from exc


def _signature(value: bytes | str, source: str, field: str) -> bytes:
    """A collateral signature: raw r||s, given as 64 bytes or 128 hex characters."""
    if isinstance(value, bytes) and len(value) == 64:
        return value
    try:
        raw = bytes.fromhex(_text(value, source, field))
    except ValueError as exc:
        raise CollateralFormatError(source, field, "not hex") from exc
    if len(raw) != 64:
        raise CollateralFormatError(source, field, f"must be a 64-byte r||s signature, got {len(raw)} bytes")
    return raw


def _chain(value: bytes | str, source: str, field: str) -> tuple[x509.Certificate, ...]:
    blob = value.encode("ascii", "replace") if isinstance(value, str) else value
    try:
        return parse_pem_chain(blob, field)
    except QuoteFormatError as exc:
        raise CollateralFormatError(source, field, exc.detail) from exc


def _crl(value: bytes | str, source: str, field: str) -> x509.CertificateRevocationList:
    """Load a CRL given as DER, PEM, or hex of DER (the combined JSON and PCCS use hex)."""
    data = value.encode("ascii", "replace") if isinstance(value, str) else value
    stripped = data.strip()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if stripped.startswith(b"-----BEGIN"):
                crl = x509.load_pem_x509_crl(stripped)
            elif stripped and all(c in b"0123456789abcdefABCDEF" for c in stripped):
                crl = x509.load_der_x509_crl(bytes.fromhex(stripped.decode("ascii")))
            else:
                crl = x509.load_der_x509_crl(data)
            # Fields decode lazily: read every one used later so bad input fails here, clearly.
            _ = (crl.issuer, crl.last_update_utc, crl.next_update_utc, crl.signature_hash_algorithm, crl.extensions)
            _ = [(entry.serial_number, entry.revocation_date_utc) for entry in crl]
    except Exception as exc:  # noqa: BLE001 - cryptography raises several types for malformed CRLs
        raise CollateralFormatError(source, field, f"not a CRL in DER, PEM or hex ({exc!r})") from exc
    if caught:
        raise CollateralFormatError(source, field, f"malformed CRL ({caught[0].message})")
    return crl


def split_signed_envelope(body: bytes | str, key: str, source: str = "collateral") -> tuple[bytes, str]:
    """Cut the exact bytes of ``body[key]`` and the ``signature`` out of a PCS JSON response.

    Intel signs the inner object as served; parsing and re-serialising could change
    a byte, so the top-level object is scanned and the value is sliced verbatim.

    Raises:
        CollateralFormatError: not a JSON object, or ``key``/``signature`` missing.
    """
    text = _text(body, source, key)
    decoder = json.JSONDecoder()
    spans: dict[str, tuple[int, int]] = {}
    values: dict[str, Any] = {}
    try:
        pos = _skip_ws(text, 0)
        if text[pos : pos + 1] != "{":
            raise ValueError("not a JSON object")
        pos = _skip_ws(text, pos + 1)
        while text[pos : pos + 1] != "}":
            name, pos = decoder.raw_decode(text, pos)
            pos = _skip_ws(text, pos)
            if not isinstance(name, str) or text[pos : pos + 1] != ":":
                raise ValueError(f"bad member at {pos}")
            start = _skip_ws(text, pos + 1)
            values[name], pos = decoder.raw_decode(text, start)
            spans[name] = (start, pos)
            pos = _skip_ws(text, pos)
            if text[pos : pos + 1] == ",":
                pos = _skip_ws(text, pos + 1)
            elif text[pos : pos + 1] != "}":
                raise ValueError(f"expected ',' or '}}' at {pos}")
        if _skip_ws(text, pos + 1) != len(text):
            raise ValueError("trailing data after the JSON object")
    except ValueError as exc:
        raise CollateralFormatError(source, key, f"bad JSON envelope: {exc}") from exc
    if key not in spans or not isinstance(values.get("signature"), str):
        raise CollateralFormatError(source, key, f"envelope needs '{key}' and a 'signature' string")
    start, end = spans[key]
    return text[start:end].encode("utf-8"), values["signature"]


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def check_not_revoked(cert: x509.Certificate, crl: x509.CertificateRevocationList, field: str) -> None:
    """Refuse ``cert`` if ``crl`` (which must be from its issuer) lists its serial.

    Raises:
        VerificationError: the CRL is from another issuer, or the certificate is revoked.
    """
    if crl.issuer != cert.issuer:
        raise VerificationError(
            f"{field}.crl_issuer", cert.issuer.rfc4514_string(), crl.issuer.rfc4514_string(), "CRL from another CA"
        )
    revoked = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
    if revoked is not None:
        raise VerificationError(
            f"{field}.revocation",
            "not revoked",
            f"revoked on {revoked.revocation_date_utc.isoformat()}",
            f"serial {cert.serial_number:x} is listed in the CRL of {crl.issuer.rfc4514_string()}",
        )


def _check_crl(crl: x509.CertificateRevocationList, issuer: x509.Certificate, at: datetime, field: str) -> None:
    if crl.issuer != issuer.subject or not crl.is_signature_valid(issuer.public_key()):  # type: ignore[arg-type]
        expected = f"signed by {issuer.subject.rfc4514_string()}"
        raise VerificationError(f"{field}.signature", expected, "invalid signature")
    last, nxt = crl.last_update_utc, crl.next_update_utc
    if nxt is None or not last <= at <= nxt:
        window = f"{last.isoformat()}..{nxt.isoformat() if nxt else 'none'}"
        raise VerificationError(f"{field}.validity", window, at.isoformat(), "CRL not current at that time")


def _check_tcb_signer(chain: Sequence[x509.Certificate], root: x509.Certificate, field: str) -> None:
    """The chain must be exactly the TCB Signing certificate, issued directly by ``root``.

    ``verify_certificate_chain`` only proves the chain leads to the root; any
    certificate the root issued (a PCK CA, say) would pass that. Intel's QVL also
    requires the signer's name and that the root issued it directly.
    """
    root_der = root.public_bytes(Encoding.DER)
    below_root = [cert for cert in chain if cert.public_bytes(Encoding.DER) != root_der]
    if len(below_root) != 1:
        raise VerificationError(
            field, "the TCB Signing certificate, issued directly by the root", f"{len(below_root)} certificates below the root"
        )
    signer = below_root[0]
    names = signer.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name = str(names[0].value) if len(names) == 1 else None
    intel_root = certificate_fingerprint(root) == INTEL_SGX_ROOT_CA_SHA256
    if common_name != TCB_SIGNING_COMMON_NAME or (intel_root and signer.subject != INTEL_TCB_SIGNING_SUBJECT):
        expected = INTEL_TCB_SIGNING_SUBJECT.rfc4514_string() if intel_root else f"CN={TCB_SIGNING_COMMON_NAME}"
        raise VerificationError(f"{field}[0].subject", expected, signer.subject.rfc4514_string(), "not the TCB signer")
    try:
        is_ca = signer.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if is_ca:
        raise VerificationError(f"{field}[0].basic_constraints", "CA:FALSE (a signing certificate)", "CA:TRUE")


def _check_signed_json(
    body: bytes,
    signature: bytes,
    signer: x509.Certificate,
    issue: datetime,
    next_update: datetime,
    at: datetime,
    field: str,
) -> None:
    key = signer.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise VerificationError(f"{field}.signature", "an EC signing certificate", type(key).__name__)
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    try:
        key.verify(der, body, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise VerificationError(
            f"{field}.signature", f"ECDSA-P256 by {signer.subject.rfc4514_string()}", "invalid signature"
        ) from exc
    if not issue <= at <= next_update:
        raise VerificationError(
            f"{field}.validity",
            f"{issue.isoformat()}..{next_update.isoformat()}",
            at.isoformat(),
            "outside issueDate..nextUpdate",
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Collateral:
    """Everything needed to judge a quote's platform and QE against Intel's current view.

    ``tcb_info_body`` / ``qe_identity_body`` are the exact signed JSON bytes.
    """

    tcb_info: TcbInfo
    tcb_info_body: bytes
    tcb_info_signature: bytes
    tcb_info_issuer_chain: tuple[x509.Certificate, ...]
    qe_identity: EnclaveIdentity
    qe_identity_body: bytes
    qe_identity_signature: bytes
    qe_identity_issuer_chain: tuple[x509.Certificate, ...]
    root_ca_crl: x509.CertificateRevocationList
    pck_crl: x509.CertificateRevocationList
    pck_crl_issuer_chain: tuple[x509.Certificate, ...]

    @classmethod
    def from_file(cls, path: Path | str) -> Collateral:
        """Load the combined JSON format (keys as in dcap-qvl's ``QuoteCollateralV3``).

        Raises:
            CollateralFormatError: unreadable, too large, or a key is missing or malformed.
        """
        source = str(path)
        try:
            with open(path, "rb") as handle:
                raw = handle.read(_MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise CollateralFormatError(source, "file", f"cannot read: {exc.strerror}") from exc
        if len(raw) > _MAX_FILE_BYTES:
            raise CollateralFormatError(source, "file", f"larger than {_MAX_FILE_BYTES} bytes")
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise CollateralFormatError(source, "file", f"not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise CollateralFormatError(source, "file", "top level must be a JSON object")
        for key in _COMBINED_KEYS:
            if not isinstance(data.get(key), str):
                raise CollateralFormatError(source, key, "missing or not a string")
        return cls.from_parts(**{key: data[key] for key in _COMBINED_KEYS}, source=source)

    @classmethod
    def from_parts(
        cls,
        *,
        tcb_info: bytes | str,
        tcb_info_issuer_chain: bytes | str,
        qe_identity: bytes | str,
        qe_identity_issuer_chain: bytes | str,
        root_ca_crl: bytes | str,
        pck_crl: bytes | str,
        pck_crl_issuer_chain: bytes | str,
        tcb_info_signature: bytes | str | None = None,
        qe_identity_signature: bytes | str | None = None,
        source: str = "collateral",
    ) -> Collateral:
        """Build collateral from Intel PCS/PCCS pieces.

        ``tcb_info`` / ``qe_identity`` are either the PCS response body
        (``{"tcbInfo": ..., "signature": ...}``) when no signature is passed, or the
        inner JSON text with its signature (raw 64 bytes or hex). CRLs may be DER,
        PEM or hex; issuer chains are PEM.

        Raises:
            CollateralFormatError: a piece is malformed (named).
        """
        if tcb_info_signature is None:
            tcb_body, tcb_info_signature = split_signed_envelope(tcb_info, "tcbInfo", source)
        else:
            tcb_body = _text(tcb_info, source, "tcb_info").encode("utf-8")
        if qe_identity_signature is None:
            qe_body, qe_identity_signature = split_signed_envelope(qe_identity, "enclaveIdentity", source)
        else:
            qe_body = _text(qe_identity, source, "qe_identity").encode("utf-8")
        try:
            parsed_tcb = parse_tcb_info(tcb_body)
            parsed_qe = parse_enclave_identity(qe_body)
        except ValueError as exc:
            raise CollateralFormatError(source, "tcb_info/qe_identity", str(exc)) from exc
        return cls(
            tcb_info=parsed_tcb,
            tcb_info_body=tcb_body,
            tcb_info_signature=_signature(tcb_info_signature, source, "tcb_info_signature"),
            tcb_info_issuer_chain=_chain(tcb_info_issuer_chain, source, "tcb_info_issuer_chain"),
            qe_identity=parsed_qe,
            qe_identity_body=qe_body,
            qe_identity_signature=_signature(qe_identity_signature, source, "qe_identity_signature"),
            qe_identity_issuer_chain=_chain(qe_identity_issuer_chain, source, "qe_identity_issuer_chain"),
            root_ca_crl=_crl(root_ca_crl, source, "root_ca_crl"),
            pck_crl=_crl(pck_crl, source, "pck_crl"),
            pck_crl_issuer_chain=_chain(pck_crl_issuer_chain, source, "pck_crl_issuer_chain"),
        )

    def verify(self, *, at: datetime, trusted_roots: Sequence[x509.Certificate] | None = None) -> x509.Certificate:
        """Check chains, signatures, validity windows and revocation at ``at``; return the root.

        Raises:
            VerificationError: the first failed check (``tcb_info.signature``,
                ``qe_identity.validity``, ``root_ca_crl.signature``, ...).
        """
        at = as_utc(at)
        roots: dict[bytes, x509.Certificate] = {}
        for name, chain in (
            ("tcb_info_issuer_chain", self.tcb_info_issuer_chain),
            ("qe_identity_issuer_chain", self.qe_identity_issuer_chain),
            ("pck_crl_issuer_chain", self.pck_crl_issuer_chain),
        ):
            root = verify_certificate_chain(chain, at=at, trusted_roots=trusted_roots, field=name)
            roots[root.fingerprint(hashes.SHA256())] = root
        if len(roots) != 1:
            found = f"{len(roots)} different roots"
            raise VerificationError("collateral.root", "one root for all issuer chains", found)
        root = next(iter(roots.values()))
        _check_tcb_signer(self.tcb_info_issuer_chain, root, "tcb_info_issuer_chain")
        _check_tcb_signer(self.qe_identity_issuer_chain, root, "qe_identity_issuer_chain")
        _check_crl(self.root_ca_crl, root, at, "root_ca_crl")
        pck_ca = self.pck_crl_issuer_chain[0]
        _check_crl(self.pck_crl, pck_ca, at, "pck_crl")
        for name, chain in (
            ("tcb_info_issuer_chain", self.tcb_info_issuer_chain),
            ("qe_identity_issuer_chain", self.qe_identity_issuer_chain),
            ("pck_crl_issuer_chain", self.pck_crl_issuer_chain),
        ):
            for index, cert in enumerate(chain):
                if cert.subject != root.subject:
                    check_not_revoked(cert, self.root_ca_crl, f"{name}[{index}]")
        tcb, qe = self.tcb_info, self.qe_identity
        _check_signed_json(
            self.tcb_info_body, self.tcb_info_signature, self.tcb_info_issuer_chain[0],
            tcb.issue_date, tcb.next_update, at, "tcb_info",
        )
        _check_signed_json(
            self.qe_identity_body, self.qe_identity_signature, self.qe_identity_issuer_chain[0],
            qe.issue_date, qe.next_update, at, "qe_identity",
        )
        return root
