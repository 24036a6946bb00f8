"""RA-TLS certificates: creation, verification, bindings, real certificates."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from enclavefl.attest.measurement import measure_code
from enclavefl.attest.policy import Policy, parse_policy
from enclavefl.attest.providers import NoneProvider, SimulatedProvider
from enclavefl.attest.ratls import (
    RATLS_QUOTE_OID,
    TCG_EVIDENCE_OID,
    RatlsIdentity,
    create_ratls_identity,
    verify_ratls_certificate,
)
from enclavefl.attest.simroot import SimRoot, init_sim_root
from enclavefl.attest.tcg_evidence import encode_tagged_evidence, pubkey_hash_claims
from enclavefl.errors import AttestationError, VerificationError

SHARED = Path(__file__).resolve().parents[3] / ".." / "shared"
CERTS = SHARED / "ra-samples" / "certs"
GRAMINE_LEGACY_OID = x509.ObjectIdentifier("0.6.9.42.840.113741.1337.6")
HOUR = dt.timedelta(hours=1)


@pytest.fixture(scope="module")
def sim_root(tmp_path_factory: pytest.TempPathFactory) -> SimRoot:
    return init_sim_root(tmp_path_factory.mktemp("ratls") / "root", name="ratls-tests")


@pytest.fixture(scope="module")
def provider(sim_root: SimRoot) -> SimulatedProvider:
    return SimulatedProvider(sim_root, measure_code(), isv_prod_id=2, isv_svn=4)


@pytest.fixture(scope="module")
def policy(sim_root: SimRoot, provider: SimulatedProvider) -> Policy:
    entry = {"mr_enclave": provider.mr_enclave.hex(), "mr_signer": provider.mr_signer.hex(), "isv_prod_id": 2, "isv_svn": 4}
    return parse_policy({"sgx_mrs": [entry], "allow_simulated": True, "simulated_root_sha256": sim_root.root_fingerprint})


@pytest.fixture(scope="module")
def identity(provider: SimulatedProvider) -> RatlsIdentity:
    return create_ratls_identity(provider, common_name="worker-1", validity=HOUR)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _spki(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _certificate(key: ec.EllipticCurvePrivateKey, extensions: Sequence[tuple[x509.ObjectIdentifier, bytes]]) -> bytes:
    """A self-signed certificate carrying raw extension values (Gramine-style layout)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "RATLS")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(_now() - HOUR)
        .not_valid_after(_now() + HOUR)
    )
    for oid, value in extensions:
        builder = builder.add_extension(x509.UnrecognizedExtension(oid, value), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def _legacy_quote(provider: SimulatedProvider, key: ec.EllipticCurvePrivateKey) -> bytes:
    return provider.quote(hashlib.sha256(_spki(key)).digest() + bytes(32))


def test_round_trip(identity: RatlsIdentity, policy: Policy, provider: SimulatedProvider) -> None:
    evidence = verify_ratls_certificate(identity.cert_pem, policy=policy, at=_now())
    assert evidence.binding == "tcg-pubkey-hash"
    assert evidence.evidence_oid == TCG_EVIDENCE_OID.dotted_string
    assert evidence.simulated
    assert (evidence.mr_enclave, evidence.mr_signer) == (provider.mr_enclave, provider.mr_signer)
    assert (evidence.isv_prod_id, evidence.isv_svn, evidence.debug, evidence.tee) == (2, 4, False, "sgx")
    assert evidence.spki_sha256 == hashlib.sha256(_spki(identity.key)).hexdigest()


def test_certificate_carries_both_extensions_and_a_san(identity: RatlsIdentity) -> None:
    cert = identity.certificate
    oids = {ext.oid for ext in cert.extensions}
    assert {RATLS_QUOTE_OID, TCG_EVIDENCE_OID} <= oids
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    ) == ["worker-1"]
    legacy = cert.extensions.get_extension_for_oid(RATLS_QUOTE_OID).value
    assert isinstance(legacy, x509.UnrecognizedExtension)
    assert legacy.value[368:400] == hashlib.sha256(_spki(identity.key)).digest()  # report_data[:32]


def test_der_input_and_private_key_stay_in_memory(identity: RatlsIdentity, policy: Policy) -> None:
    der = identity.certificate.public_bytes(serialization.Encoding.DER)
    assert verify_ratls_certificate(der, policy=policy, at=_now()).binding == "tcg-pubkey-hash"
    key = serialization.load_pem_private_key(identity.private_key_pem(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert _spki(key) == _spki(identity.key)
    assert "PRIVATE" not in repr(identity) and "key=" not in repr(identity)


def test_legacy_extension_alone_binds_the_spki(provider: SimulatedProvider, policy: Policy) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _certificate(key, [(RATLS_QUOTE_OID, _legacy_quote(provider, key))])
    evidence = verify_ratls_certificate(cert, policy=policy, at=_now())
    assert (evidence.binding, evidence.evidence_oid) == ("spki-sha256", RATLS_QUOTE_OID.dotted_string)


def test_gramine_double_encoded_oid_and_p384_key(provider: SimulatedProvider, policy: Policy) -> None:
    key = ec.generate_private_key(ec.SECP384R1())  # Gramine's RA-TLS key type
    cert = _certificate(key, [(GRAMINE_LEGACY_OID, _legacy_quote(provider, key))])
    # cryptography writes exactly the bytes Gramine does: OID TLV inside the OID.
    assert bytes.fromhex("060b06092a864886f84d8a3906") in cert
    evidence = verify_ratls_certificate(cert, policy=policy, at=_now())
    assert (evidence.binding, evidence.evidence_oid) == ("spki-sha256", GRAMINE_LEGACY_OID.dotted_string)


def test_quote_copied_into_another_certificate_is_refused(identity: RatlsIdentity, policy: Policy) -> None:
    stolen = identity.certificate.extensions
    legacy = stolen.get_extension_for_oid(RATLS_QUOTE_OID).value
    tcg = stolen.get_extension_for_oid(TCG_EVIDENCE_OID).value
    assert isinstance(legacy, x509.UnrecognizedExtension) and isinstance(tcg, x509.UnrecognizedExtension)
    thief = ec.generate_private_key(ec.SECP256R1())
    for extensions in ([(RATLS_QUOTE_OID, legacy.value)], [(TCG_EVIDENCE_OID, tcg.value)]):
        with pytest.raises(VerificationError) as info:
            verify_ratls_certificate(_certificate(thief, extensions), policy=policy, at=_now())
        assert info.value.field == "binding"


def test_tcg_claims_for_another_key_are_refused(provider: SimulatedProvider, policy: Policy) -> None:
    key, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    claims = pubkey_hash_claims(_spki(other))  # the quote binds these claims, which name `other`
    quote = provider.quote(hashlib.sha256(claims).digest() + bytes(32))
    cert = _certificate(key, [(TCG_EVIDENCE_OID, encode_tagged_evidence(quote, claims))])
    with pytest.raises(VerificationError, match="pubkey-hash claim naming the certificate key"):
        verify_ratls_certificate(cert, policy=policy, at=_now())


def test_broken_tcg_evidence_does_not_fall_back_to_legacy(provider: SimulatedProvider, policy: Policy) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    good_legacy = (RATLS_QUOTE_OID, _legacy_quote(provider, key))
    cert = _certificate(key, [good_legacy, (TCG_EVIDENCE_OID, b"\xd9\xea\x60\x80")])  # tag 60000, empty array
    with pytest.raises(VerificationError) as info:
        verify_ratls_certificate(cert, policy=policy, at=_now())
    assert info.value.field == "tcg_evidence"


def test_tampered_certificate_is_refused(identity: RatlsIdentity, policy: Policy) -> None:
    der = bytearray(identity.certificate.public_bytes(serialization.Encoding.DER))
    at = der.find(bytes.fromhex("06092a864886f84d8a3906"))  # legacy OID; its quote follows
    der[at + 200] ^= 0x01  # a byte inside the quote (header+body), covered by the cert signature
    with pytest.raises(VerificationError) as info:
        verify_ratls_certificate(bytes(der), policy=policy, at=_now())
    assert info.value.field == "certificate.signature"


def test_certificate_outside_its_validity_is_refused(identity: RatlsIdentity, policy: Policy) -> None:
    with pytest.raises(VerificationError) as info:
        verify_ratls_certificate(identity.cert_pem, policy=policy, at=_now() + 2 * HOUR)
    assert info.value.field == "certificate.validity"


def test_simulated_evidence_refused_by_a_strict_policy(identity: RatlsIdentity, policy: Policy) -> None:
    strict = parse_policy({**policy.model_dump(), "allow_simulated": False, "simulated_root_sha256": None})
    with pytest.raises(VerificationError) as info:
        verify_ratls_certificate(identity.cert_pem, policy=strict, at=_now())
    assert info.value.field == "simulated"


def test_wrong_measurement_is_refused(identity: RatlsIdentity, policy: Policy) -> None:
    other = parse_policy({**policy.model_dump(), "sgx_mrs": [{**policy.sgx_mrs[0].model_dump(), "isv_svn": 5}]})
    with pytest.raises(VerificationError) as info:
        verify_ratls_certificate(identity.cert_pem, policy=other, at=_now())
    assert (info.value.field, info.value.actual) == ("isv_svn", 4)


@pytest.mark.parametrize(
    ("data", "field"),
    [(b"not a certificate", "certificate"), (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "certificate")],
)
def test_garbage_is_refused(data: bytes, field: str, policy: Policy) -> None:
    with pytest.raises(VerificationError) as info:
        verify_ratls_certificate(data, policy=policy, at=_now())
    assert info.value.field == field


def test_certificate_without_evidence_is_refused(policy: Policy) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(VerificationError) as info:
        verify_ratls_certificate(_certificate(key, []), policy=policy, at=_now())
    assert info.value.field == "certificate.evidence"


def test_none_provider_cannot_make_an_identity() -> None:
    with pytest.raises(AttestationError, match="attestation mode is 'none'"):
        create_ratls_identity(NoneProvider(), common_name="ps", validity=HOUR)


# -- real certificates (Cosmian, real SGX/TDX hardware) ------------------------------

REAL: dict[str, dict[str, Any]] = {
    "ratls_cosmian_sgx_2023-05.pem": {
        "at": dt.datetime(2023, 5, 15, 9, 0, tzinfo=dt.timezone.utc),
        "oid": "1.2.840.113741.1337.6",
        "tee": "sgx",
        "policy": {
            "sgx_mrs": [{
                "mr_enclave": "b1ef922543fa54de9d45da6639713efd3386fa27553709b15a94485f9009401b",
                "mr_signer": "c1c161d0dd996e8a9847de67ea2c00226761f7715a2c422d3012ac10795a1ef5",
                "isv_prod_id": "1",
                "isv_svn": "10",
            }],
        },
        "wrong": ("mr_enclave", {"sgx_mrs": [{"mr_enclave": "00" * 32, "mr_signer": "00" * 32, "isv_prod_id": 1, "isv_svn": 10}]}),
    },
    "ratls_cosmian_tdx_2023-12.pem": {
        "at": dt.datetime(2024, 1, 15, tzinfo=dt.timezone.utc),
        "oid": "1.2.840.113741.1337.8",
        "tee": "tdx",
        "policy": {
            "mr_td": ["5f53c3881242a5b418854923bb4adec34c72aa4b570d526179d63f9ee6e4cefb6abd4f0f35e5e6e29655a60d90bcf27f"],
        },
        "wrong": ("mr_td", {"mr_td": ["00" * 48]}),
    },
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_certificates_verify(name: str) -> None:
    path = CERTS / name
    if not path.is_file():
        pytest.skip(f"shared ra-samples not found at {path}")
    case = REAL[name]
    # No collateral is shipped for these quotes: accept the weaker verdict explicitly.
    base = {"allow_missing_collateral": True}
    evidence = verify_ratls_certificate(path.read_bytes(), policy=parse_policy({**base, **case["policy"]}), at=case["at"])
    assert (evidence.binding, evidence.evidence_oid, evidence.tee) == ("sec1-point-sha256", case["oid"], case["tee"])
    assert not evidence.simulated and evidence.verification.tcb_status is None
    field, wrong = case["wrong"]
    with pytest.raises(VerificationError) as info:
        verify_ratls_certificate(path.read_bytes(), policy=parse_policy({**base, **wrong}), at=case["at"])
    assert info.value.field == field
    with pytest.raises(VerificationError) as outside:
        verify_ratls_certificate(path.read_bytes(), policy=parse_policy({**base, **case["policy"]}), at=_now())
    assert outside.value.field == "certificate.validity"
