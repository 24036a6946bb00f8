"""Pure-Python DCAP quote verification: is this quote really from a TEE on a genuine platform?

How this works (Intel QVL ``QuoteVerifier.cpp``, steps 4.1.2.4.x): the PCK chain in
the quote must lead to a pinned root; the PCK leaf key must have signed the QE
report; the QE report must commit to the attestation key
(``report_data = SHA-256(key || qe_auth_data) || 0*32``); and the attestation key
must have signed the header and body. With collateral, Intel's signed TCB info, QE
identity and CRLs add revocation, QE identity and TCB status checks; the PCK CRL
must come from the CA that issued the quote's PCK certificate, and a quote with
bytes after its signature data is refused (the QVL's "additional data"). The outcome is
facts, not a verdict: which enclave it is, whether it is a debug build, the TCB
status and advisories. Deciding what to accept is ``policy.py``'s job.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from enclavefl.attest.collateral import Collateral, check_not_revoked
from enclavefl.attest.pck import (
    SGX_EXTENSION_OID,
    PckExtension,
    as_utc,
    certificate_fingerprint,
    parse_pck_extension,
    verify_certificate_chain,
)
from enclavefl.attest.quote import (
    CERT_TYPE_PCK_CHAIN,
    INTEL_QE_VENDOR_ID,
    Quote,
    SgxReportBody,
    parse_quote,
    qe_report_data_for,
)
from enclavefl.attest.tcb import TcbEvaluation, evaluate_tcb, match_qe_identity
from enclavefl.errors import VerificationError

__all__ = ["QuoteVerification", "verify_quote"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class QuoteVerification:
    """What a verified quote proves, for a policy to judge.

    For a TDX quote, ``mr_enclave`` holds MRTD (48 bytes), ``mr_signer`` is empty and
    ``isv_prod_id``/``isv_svn`` are 0: a TD has no signer identity; read the rest
    from ``quote.body``.

    Attributes:
        root_fingerprint: SHA-256 (hex) of the root the PCK chain ended at.
        tcb_status: Intel TCB status ("UpToDate", "SWHardeningNeeded", ...) or None
            without collateral.
        advisory_ids: Intel security advisories that apply (empty without collateral).
        checked: names of the checks that passed, in order.
        pck: the PCK certificate's SGX extension, when the certificate has one.
        tcb: details of the TCB evaluation, with collateral.
        collateral_checked: True when collateral was given and every collateral check
            passed (QE identity, revocation, TCB level). False means those were NOT
            checked: a policy accepts that only with ``allow_missing_collateral``.
    """

    quote: Quote
    tee: Literal["sgx", "tdx"]
    mr_enclave: bytes
    mr_signer: bytes
    isv_prod_id: int
    isv_svn: int
    report_data: bytes
    debug: bool
    root_fingerprint: str
    tcb_status: str | None
    advisory_ids: tuple[str, ...]
    checked: tuple[str, ...]
    pck: PckExtension | None = None
    tcb: TcbEvaluation | None = None
    collateral_checked: bool = False


def _verify_raw_ecdsa(key: object, signature: bytes, data: bytes, field: str) -> None:
    """Verify a raw r||s ECDSA-P256-SHA256 signature (the DCAP encoding).

    Both s and n - s verify, as in Intel's QVL (OpenSSL): Intel's QE does not
    normalise s (most real quote signatures are high-s), so requiring low-s would
    refuse real hardware. The signature is the one malleable part of a quote; what
    it signs is not, so identify evidence by the signed bytes, not the whole quote.
    """
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise VerificationError(field, "a P-256 signing key", type(key).__name__)
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    try:
        key.verify(der, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise VerificationError(field, "a valid ECDSA-P256 signature", "invalid signature") from exc


def _attestation_key(raw: bytes) -> ec.EllipticCurvePublicKey:
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + raw)
    except ValueError as exc:
        raise VerificationError("attestation_key", "a point on P-256", raw.hex()[:16] + "...", str(exc)) from exc


def _check_pck_crl_issuer(crl: x509.CertificateRevocationList, pck_ca: x509.Certificate) -> None:
    """The PCK CRL must be signed by the CA that issued the quote's PCK certificate.

    Collateral names its own CRL issuer chain; a CA with the same name but another
    key (any CA the root issued) would otherwise vouch for a leaf the quote's real CA
    revoked. The QVL checks the intermediate CRL against the quote chain's CA.
    """
    key = pck_ca.public_key()
    if crl.issuer != pck_ca.subject or not isinstance(key, ec.EllipticCurvePublicKey) or not crl.is_signature_valid(key):
        raise VerificationError(
            "pck_crl.signature",
            f"signed by the quote's PCK CA {pck_ca.subject.rfc4514_string()} ({certificate_fingerprint(pck_ca)[:16]}...)",
            f"issued by {crl.issuer.rfc4514_string()} under another key",
            "PCK CRL from a CA other than the one that issued the PCK certificate",
        )


def _check_collateral(
    quote: Quote,
    root: x509.Certificate,
    collateral: Collateral,
    at: datetime,
    trusted_roots: Sequence[x509.Certificate] | None,
) -> tuple[PckExtension, TcbEvaluation]:
    sig = quote.signature_data
    collateral_root = collateral.verify(at=at, trusted_roots=trusted_roots)
    if collateral_root.fingerprint(hashes.SHA256()) != root.fingerprint(hashes.SHA256()):
        raise VerificationError(
            "collateral.root",
            certificate_fingerprint(root),
            certificate_fingerprint(collateral_root),
            "collateral from another root",
        )
    leaf = sig.pck_chain[0]
    _check_pck_crl_issuer(collateral.pck_crl, sig.pck_chain[1] if len(sig.pck_chain) > 1 else root)
    check_not_revoked(leaf, collateral.pck_crl, "pck_chain[0]")
    for index, cert in enumerate(sig.pck_chain[1:], start=1):
        if cert.subject != root.subject:
            check_not_revoked(cert, collateral.root_ca_crl, f"pck_chain[{index}]")
    expected_qe = "TD_QE" if quote.tee == "tdx" else "QE"
    if collateral.qe_identity.id != expected_qe:
        raise VerificationError("qe_identity.id", expected_qe, collateral.qe_identity.id, "identity of another enclave")
    qe_level = match_qe_identity(sig.qe_report, collateral.qe_identity)
    pck = parse_pck_extension(leaf)
    return pck, evaluate_tcb(pck, collateral.tcb_info, qe_level, quote.body)


def verify_quote(
    quote: Quote | bytes,
    *,
    at: datetime,
    trusted_roots: Sequence[x509.Certificate] | None = None,
    collateral: Collateral | None = None,
) -> QuoteVerification:
    """Verify a DCAP quote's signatures and certificate chain (and collateral, if given).

    Args:
        quote: parsed quote or raw bytes.
        at: the time to check validity at (naive datetimes are taken as UTC).
        trusted_roots: roots to accept instead of the pinned Intel SGX Root CA; this is
            how a policy admits a simulated root. None means Intel's root only.
        collateral: Intel TCB info, QE identity and CRLs; adds revocation, QE identity
            and TCB status. Without it ``tcb_status`` is None.

    Raises:
        QuoteFormatError: ``quote`` bytes are malformed.
        VerificationError: a check failed; ``field`` names it (``quote.trailing_bytes``,
            ``pck_chain[1].signature``, ``qe_report_signature``, ``qe_report.report_data``,
            ``quote_signature``, ``tcb_info.validity``, ``pck_crl.signature``,
            ``pck_chain[0].revocation``, ...).
    """
    if not isinstance(quote, Quote):
        quote = parse_quote(quote)
    if quote.trailing_bytes:
        # The QVL refuses "additional, not expected data in quote": evidence has one encoding.
        raise VerificationError(
            "quote.trailing_bytes", 0, quote.trailing_bytes, "bytes after the quote's signature data"
        )
    at = as_utc(at)
    sig = quote.signature_data
    checked: list[str] = []
    if quote.header.qe_vendor_id != INTEL_QE_VENDOR_ID:
        raise VerificationError("header.qe_vendor_id", INTEL_QE_VENDOR_ID.hex(), quote.header.qe_vendor_id.hex())
    if sig.cert_type != CERT_TYPE_PCK_CHAIN:
        raise VerificationError(
            "signature_data.cert_type", CERT_TYPE_PCK_CHAIN, sig.cert_type, "only a PCK chain can be verified"
        )
    root = verify_certificate_chain(sig.pck_chain, at=at, trusted_roots=trusted_roots, field="pck_chain")
    checked.append("pck_chain")
    leaf_key = sig.pck_chain[0].public_key()
    _verify_raw_ecdsa(leaf_key, sig.qe_report_signature, sig.qe_report.to_bytes(), "qe_report_signature")
    checked.append("qe_report_signature")
    expected = qe_report_data_for(sig.attestation_key, sig.qe_auth_data)
    if sig.qe_report.report_data != expected:
        raise VerificationError(
            "qe_report.report_data",
            expected.hex(),
            sig.qe_report.report_data.hex(),
            "attestation key not bound to the QE report",
        )
    checked.append("qe_report_data")
    _verify_raw_ecdsa(_attestation_key(sig.attestation_key), sig.signature, quote.signed_bytes, "quote_signature")
    checked.append("quote_signature")

    pck: PckExtension | None = None
    tcb: TcbEvaluation | None = None
    if collateral is not None:
        pck, tcb = _check_collateral(quote, root, collateral, at, trusted_roots)
        checked += ["collateral", "revocation", "qe_identity", "tcb_level"]
    elif any(ext.oid == SGX_EXTENSION_OID for ext in sig.pck_chain[0].extensions):
        pck = parse_pck_extension(sig.pck_chain[0])

    body = quote.body
    if isinstance(body, SgxReportBody):
        mr_enclave, mr_signer, prod_id, svn = body.mr_enclave, body.mr_signer, body.isv_prod_id, body.isv_svn
    else:
        mr_enclave, mr_signer, prod_id, svn = body.mr_td, b"", 0, 0
    result = QuoteVerification(
        quote=quote,
        tee=quote.tee,
        mr_enclave=mr_enclave,
        mr_signer=mr_signer,
        isv_prod_id=prod_id,
        isv_svn=svn,
        report_data=body.report_data,
        debug=quote.is_debug,
        root_fingerprint=certificate_fingerprint(root),
        tcb_status=tcb.status if tcb else None,
        advisory_ids=tcb.advisory_ids if tcb else (),
        checked=tuple(checked),
        pck=pck,
        tcb=tcb,
        collateral_checked=tcb is not None,
    )
    logger.debug(
        "verified %s quote mr_enclave=%s debug=%s root=%s tcb=%s",
        result.tee, mr_enclave.hex()[:16], result.debug, result.root_fingerprint[:16], result.tcb_status,
    )
    return result
