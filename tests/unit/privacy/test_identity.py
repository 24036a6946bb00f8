"""Signing and checking secure-aggregation keys with a certificate's key."""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from enclavefl.privacy.secagg.identity import KnownKeys, certificate_key, verify_with_certificate, verify_with_key
from enclavefl.simulation.identity import SimulatedIdentity


def test_a_signature_checks_with_the_certificate_and_with_its_kept_key() -> None:
    who, other = SimulatedIdentity(0), SimulatedIdentity(1)
    certificate, signature = who.sign(b"keys of round 3")
    key = certificate_key(certificate)
    assert key is not None
    assert verify_with_certificate(certificate, b"keys of round 3", signature)
    assert verify_with_key(key, b"keys of round 3", signature)
    assert not verify_with_key(key, b"keys of round 4", signature)
    assert not verify_with_key(key, b"keys of round 3", b"\x30\x00")  # malformed DER
    assert not verify_with_certificate(other.certificate, b"keys of round 3", signature)


def test_a_malformed_certificate_or_a_key_that_is_not_ec_has_no_key() -> None:
    assert certificate_key(b"not a certificate") is None
    key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ed")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1)).sign(key, None))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    assert certificate_key(pem) is None
    assert not verify_with_certificate(pem, b"x", key.sign(b"x"))


def test_known_keys_decide_a_certificate_once_and_check_every_signature() -> None:
    who, other = SimulatedIdentity(0), SimulatedIdentity(1)
    asked: list[bytes] = []

    def trusted(cert_pem: bytes) -> bool:
        asked.append(cert_pem)
        return cert_pem == who.certificate

    keys = KnownKeys(trusted)
    certificate, signature = who.sign(b"round 1")
    assert keys.verify(certificate, b"round 1", signature)
    assert not keys.verify(certificate, b"round 2", signature)  # known key, wrong payload
    _, foreign = other.sign(b"round 1")
    assert not keys.verify(other.certificate, b"round 1", foreign)  # untrusted, however well signed
    assert not keys.verify(other.certificate, b"round 1", foreign)
    assert asked == [who.certificate, other.certificate]
