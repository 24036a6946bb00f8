"""A simulated worker's certificate key, so that secure aggregation runs in a simulation.

A deployed worker signs its secure-aggregation keys with the key of the
certificate the PS bound at its join (its RA-TLS certificate), and the PS
refuses keys signed by any other certificate: the fingerprint of the signing
certificate must be the connection's. A simulated worker has no TLS connection,
so :class:`SimulatedIdentity` makes the pair a connection would have: a fresh
P-256 key, a self-signed certificate for it, and the
:class:`~enclavefl.messages.PeerIdentity` whose fingerprint is that
certificate's. Nothing here is attested: it stands in for the certificate, not
for the evidence.
"""

from __future__ import annotations

import datetime as dt
from typing import Final, final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from enclavefl.messages import PeerIdentity
from enclavefl.privacy.secagg.identity import certificate_fingerprint, sign_with_key

__all__ = ["SimulatedIdentity"]

VALID_FOR: Final = dt.timedelta(days=365)
"""How long the certificate is valid: longer than any simulated job (only the signature is checked in process)."""


@final
class SimulatedIdentity:
    """Worker ``index``'s certificate key pair and the identity the PS sees for it.

    :meth:`sign` is the ``secagg_signer`` of an
    :class:`~enclavefl.worker.inmemory.InMemoryClient` whose peer is :attr:`peer`.
    """

    def __init__(self, index: int) -> None:
        """Makes a new key and its self-signed certificate (about a millisecond)."""
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"worker-{index} (simulated)")])
        now = dt.datetime.now(dt.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + VALID_FOR)
                .sign(self._key, hashes.SHA256()))
        self.certificate = cert.public_bytes(serialization.Encoding.PEM)
        self.peer = PeerIdentity(fingerprint=certificate_fingerprint(self.certificate),
                                 label=f"worker-{index} (simulated)")

    def sign(self, payload: bytes) -> tuple[bytes, bytes]:
        """(certificate PEM, ECDSA-SHA256 signature of ``payload``): what a worker's credentials return."""
        return self.certificate, sign_with_key(self._key, payload)
