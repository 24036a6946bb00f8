"""Signing and checking secure-aggregation keys with a node's certificate key (ECDSA P-256, SHA-256).

A worker signs its advertised keys with the private key of the certificate the
PS bound at its join (its RA-TLS certificate with attestation, its CA-issued one
without), so neither the PS nor a network attacker can substitute keys without
the signature failing (Bonawitz et al. 2017, the active-adversary variant).
"""

from __future__ import annotations

import hashlib

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = ["certificate_fingerprint", "certificate_key", "sign_with_key", "verify_with_certificate", "verify_with_key"]


def certificate_fingerprint(cert_pem: bytes) -> str:
    """SHA-256 of the certificate's DER, hex (the fingerprint a PeerIdentity carries); "" if unparsable."""
    try:
        der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    except ValueError:
        return ""
    return hashlib.sha256(der).hexdigest()


def sign_with_key(key: ec.EllipticCurvePrivateKey, payload: bytes) -> bytes:
    """A DER ECDSA-SHA256 signature of ``payload``."""
    return key.sign(payload, ec.ECDSA(hashes.SHA256()))


def certificate_key(cert_pem: bytes) -> ec.EllipticCurvePublicKey | None:
    """The EC public key of ``cert_pem``; None for a malformed certificate or another kind of key.

    Parsing an RA-TLS certificate (it carries its quote) costs about twice the
    signature check, so callers that check many signatures by one certificate keep this.
    """
    try:
        key = x509.load_pem_x509_certificate(cert_pem).public_key()
    except ValueError:
        return None
    return key if isinstance(key, ec.EllipticCurvePublicKey) else None


def verify_with_key(key: ec.EllipticCurvePublicKey, payload: bytes, signature: bytes) -> bool:
    """Whether ``key`` signed ``payload`` (False for a malformed signature)."""
    try:
        key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def verify_with_certificate(cert_pem: bytes, payload: bytes, signature: bytes) -> bool:
    """Whether the EC key of ``cert_pem`` signed ``payload`` (False for any malformed input)."""
    key = certificate_key(cert_pem)
    return key is not None and verify_with_key(key, payload, signature)
