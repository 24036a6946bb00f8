"""Checks Intel's QVL makes that the verifier once skipped (issue 10 item 3).

Each test builds the violation with a self-made DCAP PKI (``SimDcap``) or a real
sample and shows the verifier refuses it: collateral signed by a certificate
other than the TCB Signing certificate, a PCK CRL from a CA other than the
quote's, trailing bytes after a quote or certificate, and quote version 5.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from enclavefl.attest.collateral import Collateral
from enclavefl.attest.measurement import measure_code
from enclavefl.attest.policy import Policy, parse_policy
from enclavefl.attest.providers import SimulatedProvider
from enclavefl.attest.quote import QuoteFormatError, load_certificate_der, parse_pem_chain, parse_quote
from enclavefl.attest.ratls import RatlsIdentity, create_ratls_identity, verify_ratls_certificate
from enclavefl.attest.simroot import SimRoot, init_sim_root
from enclavefl.attest.verifier import verify_quote
from enclavefl.errors import VerificationError

AT = datetime(2025, 6, 20, tzinfo=timezone.utc)
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def raw_sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA-P256-SHA256 as DCAP encodes it: raw r||s."""
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _pem(*certs: x509.Certificate) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)


def _issue(subject: x509.Name, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate,
           issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime(2020, 1, 1, tzinfo=timezone.utc))
        .not_valid_after(datetime(2040, 1, 1, tzinfo=timezone.utc))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(issuer_key, hashes.SHA256())
    )


def _verify(sim: Any, parts: dict[str, str], **quote: Any) -> Any:
    return verify_quote(sim.sgx_quote(**quote), at=AT, trusted_roots=[sim.root], collateral=Collateral.from_parts(**parts))


# -- the TCB info / QE identity signer is the TCB Signing certificate, issued by the root --------


@pytest.mark.parametrize("document", ["tcb_info", "qe_identity"])
def test_collateral_signed_by_the_pck_ca_is_refused(sim_dcap: Any, document: str) -> None:
    # The PCK CA chains to the root too, but it is not the TCB Signing certificate.
    parts = sim_dcap.combined()
    parts[f"{document}_issuer_chain"] = _pem(sim_dcap.pck_ca, sim_dcap.root)
    parts[f"{document}_signature"] = raw_sign(sim_dcap.ca_key, parts[document].encode()).hex()
    with pytest.raises(VerificationError) as info:
        _verify(sim_dcap, parts)
    assert info.value.field == f"{document}_issuer_chain[0].subject"


def test_a_tcb_signer_issued_below_the_root_is_refused(sim_dcap: Any) -> None:
    # Named like Intel's signer, but issued by the PCK CA instead of directly by the root.
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Intel SGX TCB Signing")])
    signer = _issue(name, key, sim_dcap.pck_ca, sim_dcap.ca_key, ca=False)
    parts = sim_dcap.combined()
    parts["tcb_info_issuer_chain"] = _pem(signer, sim_dcap.pck_ca, sim_dcap.root)
    parts["tcb_info_signature"] = raw_sign(key, parts["tcb_info"].encode()).hex()
    with pytest.raises(VerificationError) as info:
        _verify(sim_dcap, parts)
    assert info.value.field == "tcb_info_issuer_chain"


def test_the_sample_collateral_is_signed_by_intels_tcb_signing_certificate(ra_samples: Path) -> None:
    collateral = Collateral.from_file(ra_samples / "quotes" / "sgx_v3_phala_dcap-qvl.collateral.json")
    intel = x509.load_pem_x509_certificate((ra_samples / "intel" / "Intel_SGX_TCB_Signing.pem").read_bytes())
    assert collateral.tcb_info_issuer_chain[0] == intel == collateral.qe_identity_issuer_chain[0]
    quote = (ra_samples / "quotes" / "sgx_v3_phala_dcap-qvl.bin").read_bytes()
    assert verify_quote(quote, at=AT, collateral=collateral).collateral_checked


# -- the PCK CRL comes from the CA that issued the quote's PCK certificate -----------------------


def test_a_pck_crl_from_another_ca_with_the_same_name_is_refused(sim_dcap: Any) -> None:
    # A second CA named like the quote's PCK CA, issued by the same root, vouches
    # (with an empty CRL) for a leaf that the real PCK CA has revoked.
    shadow_key = ec.generate_private_key(ec.SECP256R1())
    shadow = _issue(sim_dcap.pck_ca.subject, shadow_key, sim_dcap.root, sim_dcap.root_key, ca=True)
    parts = sim_dcap.combined(revoked_leaf=True)
    parts["pck_crl_issuer_chain"] = _pem(shadow, sim_dcap.root)
    parts["pck_crl"] = sim_dcap.crl(shadow, shadow_key).public_bytes(serialization.Encoding.DER).hex()
    with pytest.raises(VerificationError) as info:
        _verify(sim_dcap, parts)
    assert info.value.field == "pck_crl.signature"


# -- ECDSA s: real Intel signatures are high-s, so high-s is accepted as the QVL does -------------


def test_real_quote_signatures_may_be_high_s(ra_samples: Path) -> None:
    # Intel's QE does not normalise s (3 of the 4 real quotes carry s > n/2) and the QVL
    # verifies with OpenSSL, which accepts both: refusing high-s would refuse real hardware.
    raw = (ra_samples / "quotes" / "sgx_v3_cosmian_intel-sgx-ra.bin").read_bytes()
    s = int.from_bytes(parse_quote(raw).signature_data.signature[32:], "big")
    assert s > P256_ORDER // 2
    assert "quote_signature" in verify_quote(raw, at=AT).checked


# -- one encoding: no bytes after a quote or a certificate ----------------------------------------


@pytest.mark.parametrize("trailing", [b"\x00", bytes(3253), b"x"])
def test_bytes_after_a_quote_are_refused(ra_samples: Path, trailing: bytes) -> None:
    raw = (ra_samples / "quotes" / "sgx_v3_phala_dcap-qvl.bin").read_bytes()
    with pytest.raises(VerificationError) as info:
        verify_quote(raw + trailing, at=AT)
    assert (info.value.field, info.value.actual) == ("quote.trailing_bytes", len(trailing))
    with pytest.raises(VerificationError):
        verify_quote(parse_quote(raw + trailing), at=AT)


@pytest.fixture(scope="module")
def sim_root(tmp_path_factory: pytest.TempPathFactory) -> SimRoot:
    return init_sim_root(tmp_path_factory.mktemp("parity") / "root", name="parity-tests")


@pytest.fixture(scope="module")
def sim_policy(sim_root: SimRoot) -> Policy:
    provider = SimulatedProvider(sim_root, measure_code())
    entry = {"mr_enclave": provider.mr_enclave.hex(), "mr_signer": provider.mr_signer.hex(), "isv_prod_id": 0, "isv_svn": 0}
    return parse_policy({"sgx_mrs": [entry], "allow_simulated": True, "simulated_root_sha256": sim_root.root_fingerprint})


@pytest.fixture(scope="module")
def identity(sim_root: SimRoot) -> RatlsIdentity:
    provider = SimulatedProvider(sim_root, measure_code())
    return create_ratls_identity(provider, common_name="worker", validity=dt.timedelta(hours=1))


@pytest.mark.parametrize(
    "suffix",
    [b"trailing text", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", b"self"],
)
def test_bytes_after_a_ratls_certificate_are_refused(identity: RatlsIdentity, sim_policy: Policy, suffix: bytes) -> None:
    now = datetime.now(timezone.utc)
    verify_ratls_certificate(identity.cert_pem, policy=sim_policy, at=now)
    extra = identity.cert_pem if suffix == b"self" else suffix
    with pytest.raises(VerificationError) as info:
        verify_ratls_certificate(identity.cert_pem + extra, policy=sim_policy, at=now)
    assert info.value.field == "certificate"


def test_bytes_before_a_ratls_certificate_are_refused(identity: RatlsIdentity, sim_policy: Policy) -> None:
    with pytest.raises(VerificationError) as info:
        verify_ratls_certificate(b"junk\n" + identity.cert_pem, policy=sim_policy, at=datetime.now(timezone.utc))
    assert info.value.field == "certificate"


def test_a_certificate_signature_with_unused_bits_is_refused(ra_samples: Path) -> None:
    # The BIT STRING's "unused bits" byte is outside the signed TBS: a second encoding.
    leaf = parse_quote((ra_samples / "quotes" / "sgx_v3_phala_dcap-qvl.bin").read_bytes()).signature_data.pck_chain[0]
    der = bytearray(leaf.public_bytes(serialization.Encoding.DER))
    signature_at = der.rindex(bytes([0x03, len(leaf.signature) + 1, 0x00]))
    der[signature_at + 2] = 0x01
    with pytest.raises(QuoteFormatError, match="0 unused bits"):
        load_certificate_der(bytes(der), "pck_chain[0]")


def test_non_canonical_base64_in_a_pem_chain_is_refused(ra_samples: Path) -> None:
    # A DER whose length is not a multiple of 3 ends in base64 padding; the last
    # character before it has unused low bits, and flipping one decodes to the same bytes.
    chain = parse_quote((ra_samples / "quotes" / "sgx_v3_phala_dcap-qvl.bin").read_bytes()).signature_data.pck_chain
    der = next(d for d in (c.public_bytes(serialization.Encoding.DER) for c in chain) if len(d) % 3)
    encoded = base64.b64encode(der)
    body, padding = encoded.rstrip(b"="), encoded[len(encoded.rstrip(b"=")) :]
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    flipped = alphabet.index(body[-1:]) ^ 1
    changed = body[:-1] + alphabet[flipped : flipped + 1] + padding
    assert base64.b64decode(changed) == base64.b64decode(encoded)  # same bytes, other text
    pem = b"-----BEGIN CERTIFICATE-----\n" + changed + b"\n-----END CERTIFICATE-----\n"
    with pytest.raises(QuoteFormatError, match="non-canonical base64"):
        parse_pem_chain(pem)


def test_a_quote_without_a_pck_chain_is_refused(sim_dcap: Any) -> None:
    quote = sim_dcap.sgx_quote()
    sig = dataclasses.replace(quote.signature_data, cert_type=3, cert_data=b"encrypted ppid", pck_chain=())
    with pytest.raises(VerificationError) as info:
        verify_quote(dataclasses.replace(quote, signature_data=sig), at=AT, trusted_roots=[sim_dcap.root])
    assert info.value.field == "signature_data.cert_type"


# -- quote version 5 is refused, by name -------------------------------------------------------


def test_quote_version_5_is_refused_by_name(ra_samples: Path) -> None:
    raw = bytearray((ra_samples / "quotes" / "tdx_v4_trustee_debug_td.bin").read_bytes())
    raw[0:2] = (5).to_bytes(2, "little")
    with pytest.raises(QuoteFormatError, match="quote version 5") as info:
        parse_quote(bytes(raw))
    assert info.value.field == "header.version"

