"""RA-TLS certificates: a TLS key bound to attestation evidence.

How this works. A node makes an EC P-256 key in memory and asks its evidence
provider for quotes whose report data names that key. The quotes travel in a
self-signed X.509 certificate, in the two extensions Gramine (v1.8+) writes:

- legacy ``1.2.840.113741.1337.6``: the raw quote, with
  ``report_data = SHA-256(DER SubjectPublicKeyInfo) || 32 zero bytes``;
- TCG DICE tagged evidence ``2.23.133.5.4.9``: CBOR ``[quote, claims]``, with
  ``report_data = SHA-256(claims)`` and a ``pubkey-hash`` claim naming the key
  (see :mod:`enclavefl.attest.tcg_evidence`).

A peer verifies the certificate's self-signature and validity, the quote (its
signatures and PCK chain, to the Intel root or a root the policy pins), the
binding between quote and certificate key, and finally the policy. Like
Gramine's verifier, the TCG extension is used when present (no fallback if it
fails); otherwise the legacy quote is used, found under any of its spellings:
the correct OID, Gramine's double-encoded ``0.6.9.42.840.113741.1337.6`` and
Cosmian's TDX ``1.2.840.113741.1337.8`` (whose quote sits in a zero-filled
8192-byte buffer: only those zeros are accepted after the quote). The legacy
binding may be DER SPKI (Gramine, Occlum) or the SEC1 uncompressed point (Cosmian).
The certificate itself must be exactly one DER certificate or one PEM block.
:class:`PeerEvidence` carries ``weaker``: the policy allowances the acceptance
relied on (e.g. ``missing_collateral``), for the audit record.

The private key is never written anywhere; :meth:`RatlsIdentity.private_key_pem`
hands it to the TLS stack as bytes in memory.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
from dataclasses import dataclass, field
from typing import Final, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from enclavefl.attest.collateral import Collateral
from enclavefl.attest.collateral_source import CollateralSource
from enclavefl.attest.pck import certificate_fingerprint, intel_sgx_root_ca
from enclavefl.attest.policy import Policy
from enclavefl.attest.providers import EvidenceProvider
from enclavefl.attest.quote import Quote, QuoteFormatError, load_certificate_der, parse_pem_chain, parse_quote
from enclavefl.attest.tcg_evidence import decode_tagged_evidence, encode_tagged_evidence, pubkey_hash_claims
from enclavefl.attest.verifier import QuoteVerification, verify_quote
from enclavefl.errors import AttestationError, VerificationError

__all__ = [
    "COSMIAN_TDX_QUOTE_OID",
    "LEGACY_QUOTE_OIDS",
    "RATLS_QUOTE_OID",
    "TCG_EVIDENCE_OID",
    "Binding",
    "PeerEvidence",
    "RatlsIdentity",
    "create_ratls_identity",
    "verify_ratls_certificate",
]

logger = logging.getLogger(__name__)

#: The legacy RA-TLS quote extension, correctly encoded (what we write).
RATLS_QUOTE_OID: Final = x509.ObjectIdentifier("1.2.840.113741.1337.6")
#: TCG DICE "tagged evidence" extension.
TCG_EVIDENCE_OID: Final = x509.ObjectIdentifier("2.23.133.5.4.9")
#: Cosmian's TDX quote extension: the quote in a zero-filled buffer of 8192 bytes.
COSMIAN_TDX_QUOTE_OID: Final = x509.ObjectIdentifier("1.2.840.113741.1337.8")
#: Every spelling of the legacy quote extension seen in real certificates.
LEGACY_QUOTE_OIDS: Final = (
    RATLS_QUOTE_OID,
    x509.ObjectIdentifier("0.6.9.42.840.113741.1337.6"),  # Gramine: OID TLV passed as the OID value
    COSMIAN_TDX_QUOTE_OID,
)
_COSMIAN_QUOTE_BUFFER_BYTES: Final = 8192
_MAX_EVIDENCE_BYTES: Final = 64 * 1024
_MAX_CERT_BYTES: Final = 128 * 1024
_BACKDATE: Final = dt.timedelta(minutes=5)  # tolerate clock skew between peers

Binding = Literal["spki-sha256", "sec1-point-sha256", "tcg-pubkey-hash"]


@dataclass(frozen=True, slots=True)
class RatlsIdentity:
    """A node's RA-TLS certificate and its in-memory private key."""

    cert_pem: bytes
    key: ec.EllipticCurvePrivateKey = field(repr=False)

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    def private_key_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM, for the TLS stack only; never store it."""
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


@dataclass(frozen=True, slots=True)
class PeerEvidence:
    """What a verified peer certificate proves.

    Attributes:
        verification: the full quote verification result.
        binding: how the quote names the certificate key.
        evidence_oid: the extension the quote came from (dotted string).
        simulated: the evidence chains to a simulated root (NOT A REAL TEE).
        spki_sha256: SHA-256 (hex) of the peer's DER SubjectPublicKeyInfo.
        weaker: the policy allowances this acceptance relied on (empty for a full
            verdict), e.g. ``("missing_collateral",)``: record it in the audit line.
    """

    verification: QuoteVerification
    binding: Binding
    evidence_oid: str
    simulated: bool
    spki_sha256: str
    weaker: tuple[str, ...] = ()

    @property
    def collateral_checked(self) -> bool:
        """Whether Intel collateral was checked (QE identity, revocation, TCB level)."""
        return self.verification.collateral_checked

    @property
    def tee(self) -> str:
        return self.verification.tee

    @property
    def mr_enclave(self) -> bytes:
        return self.verification.mr_enclave

    @property
    def mr_signer(self) -> bytes:
        return self.verification.mr_signer

    @property
    def isv_prod_id(self) -> int:
        return self.verification.isv_prod_id

    @property
    def isv_svn(self) -> int:
        return self.verification.isv_svn

    @property
    def debug(self) -> bool:
        return self.verification.debug


def _spki_der(public_key: object) -> bytes:
    if not isinstance(public_key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)):
        raise VerificationError("certificate.public_key", "an EC or RSA key", type(public_key).__name__)
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def create_ratls_identity(
    provider: EvidenceProvider,
    *,
    common_name: str,
    validity: dt.timedelta,
    dns_names: tuple[str, ...] = (),
) -> RatlsIdentity:
    """Make a fresh key in memory and a self-signed certificate carrying its evidence.

    Args:
        provider: where the quotes come from (two per certificate: legacy and TCG).
        common_name: subject CN; also the first DNS SAN, so TLS name checks can use it.
        validity: how long the certificate is valid from now.
        dns_names: further DNS SANs.

    Raises:
        AttestationError: the provider cannot produce evidence (e.g. NoneProvider),
            or ``validity`` is not positive.
    """
    if validity <= dt.timedelta(0):
        raise AttestationError(f"RA-TLS certificate validity must be positive, got {validity}")
    key = ec.generate_private_key(ec.SECP256R1())
    spki = _spki_der(key.public_key())
    legacy_quote = provider.quote(hashlib.sha256(spki).digest() + bytes(32))
    claims = pubkey_hash_claims(spki)
    tcg_quote = provider.quote(hashlib.sha256(claims).digest() + bytes(32))

    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    sans = [x509.DNSName(n) for n in dict.fromkeys((common_name, *dns_names))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .add_extension(x509.UnrecognizedExtension(RATLS_QUOTE_OID, legacy_quote), critical=False)
        .add_extension(
            x509.UnrecognizedExtension(TCG_EVIDENCE_OID, encode_tagged_evidence(tcg_quote, claims)), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    logger.debug(
        "created RA-TLS certificate cn=%s spki_sha256=%s evidence=%s",
        common_name, hashlib.sha256(spki).hexdigest()[:16], provider.kind,
    )
    return RatlsIdentity(cert_pem=cert.public_bytes(serialization.Encoding.PEM), key=key)


def _load_certificate(data: bytes | str) -> x509.Certificate:
    """Exactly one certificate: DER, or one canonical PEM block with nothing around it but line breaks.

    cryptography's PEM loader skips text before the block and ignores anything
    after it (even a second certificate); evidence must have one encoding, so
    that slack is refused here.
    """
    raw = data.encode("ascii", "replace") if isinstance(data, str) else bytes(data)
    if len(raw) > _MAX_CERT_BYTES:
        raise VerificationError("certificate", f"at most {_MAX_CERT_BYTES} bytes", f"{len(raw)} bytes")
    try:
        if b"-----BEGIN" in raw[:64]:
            certs = parse_pem_chain(raw, "certificate")
            if len(certs) != 1:
                raise VerificationError("certificate", "one PEM certificate", f"{len(certs)} certificates")
            return certs[0]
        return load_certificate_der(raw, "certificate", 0)
    except QuoteFormatError as exc:
        raise VerificationError(
            "certificate", "one X.509 certificate (PEM or DER) and nothing else", "unparsable", exc.detail
        ) from exc


def _public_key(cert: x509.Certificate) -> object:
    """The certificate's key; one of an algorithm or curve cryptography does not know is refused."""
    try:
        return cert.public_key()
    except (UnsupportedAlgorithm, ValueError) as exc:
        raise VerificationError(
            "certificate.public_key", "an EC or RSA key of a supported curve and size", "unsupported", str(exc)
        ) from exc


def _check_certificate(cert: x509.Certificate, at: dt.datetime) -> None:
    _public_key(cert)
    try:
        cert.verify_directly_issued_by(cert)
    except (InvalidSignature, UnsupportedAlgorithm, ValueError, TypeError) as exc:
        raise VerificationError(
            "certificate.signature", "a valid self-signature", "invalid", str(exc) or type(exc).__name__
        ) from exc
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if not start <= at <= end:
        raise VerificationError("certificate.validity", f"{start.isoformat()}..{end.isoformat()}", at.isoformat())


def _find_evidence(cert: x509.Certificate) -> tuple[x509.ObjectIdentifier, bytes]:
    """The TCG extension if present, else the first legacy spelling found."""
    try:
        extensions = {ext.oid: ext.value for ext in cert.extensions}
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise VerificationError("certificate.extensions", "well-formed extensions", "malformed", str(exc)) from exc
    for oid in (TCG_EVIDENCE_OID, *LEGACY_QUOTE_OIDS):
        value = extensions.get(oid)
        if isinstance(value, x509.UnrecognizedExtension):
            if len(value.value) > _MAX_EVIDENCE_BYTES:
                raise VerificationError(
                    f"certificate.{oid.dotted_string}", f"at most {_MAX_EVIDENCE_BYTES} bytes", len(value.value)
                )
            return oid, value.value
    known = ", ".join(o.dotted_string for o in (TCG_EVIDENCE_OID, *LEGACY_QUOTE_OIDS))
    raise VerificationError("certificate.evidence", f"an extension with a quote ({known})", "none")


def _parse_quote(raw: bytes, oid: x509.ObjectIdentifier) -> Quote:
    try:
        quote = parse_quote(raw)
    except QuoteFormatError as exc:
        raise VerificationError("quote", "a DCAP quote", "malformed", str(exc)) from exc
    if quote.trailing_bytes and oid == COSMIAN_TDX_QUOTE_OID and len(raw) == _COSMIAN_QUOTE_BUFFER_BYTES:
        # That extension holds the quote in a zero-filled fixed buffer. The zeros are
        # the container's format, covered by the certificate's own signature; any
        # other byte there, or any other length, stays refused by the verifier.
        if not any(raw[len(raw) - quote.trailing_bytes :]):
            quote = dataclasses.replace(quote, trailing_bytes=0)
    return quote


def _trusted_roots(quote: Quote, policy: Policy) -> list[x509.Certificate]:
    """Intel's root, plus the quote chain's own root when the policy pins its fingerprint.

    A chain ending in neither Intel's root nor the policy's extra root is
    simulated evidence: the policy is asked first, so a refusal says so plainly.
    """
    chain = quote.signature_data.pck_chain
    if not chain:
        return [intel_sgx_root_ca()]  # verify_quote names the missing chain
    last = chain[-1]
    fingerprint = certificate_fingerprint(last)
    if last.issuer == last.subject and policy.is_simulated_root(fingerprint):
        policy.check_root(fingerprint, simulated=True)
    if fingerprint in policy.trusted_root_fingerprints():
        return [intel_sgx_root_ca(), last]
    return [intel_sgx_root_ca()]


def verify_ratls_certificate(
    cert_pem_or_der: bytes | str,
    *,
    policy: Policy,
    at: dt.datetime,
    collateral: Collateral | CollateralSource | None = None,
) -> PeerEvidence:
    """Verify a peer's RA-TLS certificate end to end and apply the policy.

    Args:
        cert_pem_or_der: the peer certificate as presented in the TLS handshake.
        policy: what this node accepts.
        at: the time to check validity at (normally now).
        collateral: Intel collateral for TCB status, passed to the quote verifier; a
            :class:`CollateralSource` picks it for the quote's platform.

    Returns:
        The verified evidence, the binding that matched and whether it is simulated.

    Raises:
        VerificationError: naming the field that failed (``certificate.signature``,
            ``binding``, ``mr_enclave``, ...), what was expected and what was found.
    """
    at = at if at.tzinfo is not None else at.replace(tzinfo=dt.timezone.utc)
    cert = _load_certificate(cert_pem_or_der)
    _check_certificate(cert, at)
    spki = _spki_der(_public_key(cert))
    oid, value = _find_evidence(cert)

    if oid == TCG_EVIDENCE_OID:
        evidence = decode_tagged_evidence(value)
        raw_quote, expected_prefix = evidence.quote, evidence.expected_report_data_prefix
    else:
        raw_quote, expected_prefix = value, b""
    quote = _parse_quote(raw_quote, oid)
    roots = _trusted_roots(quote, policy)
    if isinstance(collateral, CollateralSource):
        collateral = collateral.for_quote(quote, at)
    verification = verify_quote(quote, at=at, trusted_roots=roots, collateral=collateral)

    binding: Binding
    prefix = verification.report_data[:32]
    if oid == TCG_EVIDENCE_OID:
        if prefix != expected_prefix:
            raise VerificationError("binding", f"report_data[:32] = SHA-256(claims) = {expected_prefix.hex()}", prefix.hex())
        if not evidence.pubkey_hash.matches(spki):
            raise VerificationError(
                "binding", "pubkey-hash claim naming the certificate key", evidence.pubkey_hash.digest.hex()
            )
        binding = "tcg-pubkey-hash"
    else:
        binding = _legacy_binding(prefix, spki, cert.public_key())

    simulated = policy.is_simulated_root(verification.root_fingerprint)
    weaker = policy.evaluate(verification, simulated=simulated)
    spki_sha256 = hashlib.sha256(spki).hexdigest()
    if simulated:
        logger.warning("peer %s verified with SIMULATED evidence: NOT A REAL TEE", spki_sha256[:16])
    else:  # a weaker verdict was already logged as a WARNING by the policy
        logger.info(
            "peer %s verified: tee=%s mr_enclave=%s weaker=%s",
            spki_sha256[:16], verification.tee, verification.mr_enclave.hex()[:16], ",".join(weaker) or "none",
        )
    return PeerEvidence(verification, binding, oid.dotted_string, simulated, spki_sha256, weaker)


def _legacy_binding(prefix: bytes, spki: bytes, public_key: object) -> Binding:
    spki_hash = hashlib.sha256(spki).digest()
    if prefix == spki_hash:
        return "spki-sha256"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        point = public_key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        if prefix == hashlib.sha256(point).digest():
            return "sec1-point-sha256"
    raise VerificationError(
        "binding", f"report_data[:32] = SHA-256 of the certificate key ({spki_hash.hex()})", prefix.hex()
    )
