"""Signing and checking secure-aggregation keys with a node's certificate key (ECDSA P-256, SHA-256).

A worker signs its advertised keys with the private key of the certificate the
PS bound at its join (its RA-TLS certificate with attestation, its CA-issued one
without), so neither the PS nor a network attacker can substitute keys without
the signature failing (Bonawitz et al. 2017, the active-adversary variant).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Final, final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = ["KnownKeys", "certificate_fingerprint", "certificate_key", "sign_with_key", "verify_with_certificate",
           "verify_with_key"]


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


MAX_KNOWN_KEYS: Final = 4096
"""Certificates whose verdicts :class:`KnownKeys` keeps (job.workers is at most 1024)."""


@final
class KnownKeys:
    """Each certificate's verdict and key, decided once: the same certificates sign every round.

    An RA-TLS certificate (about 11 KB, with its quote) costs more to check and
    parse than the signature it carries; the signature is still checked every time.
    """

    def __init__(self, trusted: Callable[[bytes], bool] = lambda _: True) -> None:
        """Args: trusted: whether a certificate may sign at all (a worker checks its peers' evidence)."""
        self._trusted = trusted
        self._keys: dict[bytes, ec.EllipticCurvePublicKey | None] = {}  # None: untrusted or not an EC key

    def verify(self, cert_pem: bytes, payload: bytes, signature: bytes) -> bool:
        """Whether ``cert_pem`` is trusted and its key signed ``payload``."""
        if cert_pem in self._keys:
            key = self._keys[cert_pem]
        else:
            key = certificate_key(cert_pem) if self._trusted(cert_pem) else None
            if len(self._keys) < MAX_KNOWN_KEYS:
                self._keys[cert_pem] = key
        return key is not None and verify_with_key(key, payload, signature)
