"""DCAP verification: real quotes verify to Intel's root; any tampering or foreign root is refused."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from enclavefl.attest.pck import INTEL_SGX_ROOT_CA_SHA256, certificate_fingerprint, intel_sgx_root_ca
from enclavefl.attest.quote import QuoteFormatError, QuoteHeader, parse_quote
from enclavefl.attest.verifier import verify_quote
from enclavefl.errors import AttestationError, VerificationError

AT = datetime(2025, 6, 20, tzinfo=timezone.utc)  # inside every sample's PCK chain validity (2023..2030)
ALL_CHECKS = ("pck_chain", "qe_report_signature", "qe_report_data", "quote_signature")

EXPECTED: dict[str, dict[str, Any]] = {
    "sgx_v3_phala_dcap-qvl.bin": dict(
        tee="sgx", mr_enclave="33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb",
        mr_signer="815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6",
        isv_prod_id=0, isv_svn=0, report_data=b"Hello, world!".ljust(64, b"\0"), debug=False,
    ),
    "sgx_v3_trustee_occlum_debug.bin": dict(
        tee="sgx", mr_enclave="8f173e4613ff05c52aaf04162d234edae8c9977eae47eb2299ae16a553011c68",
        mr_signer="83d719e77deaca1470f6baf62a4d774303c899db69020f9c70ee1dfc08c7ce9e",
        isv_prod_id=0, isv_svn=0, report_data=b"test".ljust(64, b"\0"), debug=True,
    ),
    "sgx_v3_cosmian_intel-sgx-ra.bin": dict(
        tee="sgx", mr_enclave="e413a4ed616c7a79634d5ca05a2fda746a1f0c71349a80b25a02828846fab90e",
        mr_signer="ac2c9fa87e4c91768b1d0c47169466c50d5a98c790639fbaefe7352a59919980",
        isv_prod_id=1, isv_svn=10, report_data=bytes(64), debug=False,
    ),
    "tdx_v4_trustee_debug_td.bin": dict(
        tee="tdx",
        mr_enclave="705ee9381b8633a9fbe532b52345e8433343d2868959f57889d84ca377c395b6"
        "89cac1599ccea1b7d420483a9ce5f031",
        mr_signer="", isv_prod_id=0, isv_svn=0, debug=True,
        report_data=bytes.fromhex(
            "7c71fe2c86eff65a7cf8dbc22b3275689fd0464a267baced1bf94fc1324656ae"
            "b755da3d44d098c0c87382f3a5f85b45c8a28fee1d3bdb38342bf96671501429"
        ),
    ),
}


def _read(ra_samples: Path, name: str) -> bytes:
    return (ra_samples / "quotes" / name).read_bytes()


def _flip(raw: bytes, offset: int) -> bytes:
    mutated = bytearray(raw)
    mutated[offset] ^= 1 << (offset % 8)
    return bytes(mutated)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_sample_verifies_to_the_intel_root(ra_samples: Path, name: str) -> None:
    expected = EXPECTED[name]
    result = verify_quote(_read(ra_samples, name), at=AT)
    assert result.root_fingerprint == INTEL_SGX_ROOT_CA_SHA256
    assert result.checked == ALL_CHECKS
    assert (result.tee, result.mr_enclave.hex(), result.mr_signer.hex()) == (
        expected["tee"], expected["mr_enclave"], expected["mr_signer"],
    )
    assert (result.isv_prod_id, result.isv_svn, result.report_data, result.debug) == (
        expected["isv_prod_id"], expected["isv_svn"], expected["report_data"], expected["debug"],
    )
    assert (result.tcb_status, result.advisory_ids) == (None, ())
    assert result.pck is not None and len(result.pck.fmspc) == 6


def test_tdx_result_exposes_the_td_attributes(ra_samples: Path) -> None:
    result = verify_quote(parse_quote(_read(ra_samples, "tdx_v4_trustee_debug_td.bin")), at=AT)
    assert result.quote.body.to_bytes()[120:128].hex() == "0100001000000000"


# (region name, first offset, end offset, field expected) in the Phala SGX v3 quote.
SGX_REGIONS = [
    ("header svn/user data", 8, 12, "quote_signature"),
    ("header user data", 28, 48, "quote_signature"),
    ("report body", 48, 432, "quote_signature"),
    ("quote signature", 436, 500, "quote_signature"),
    ("attestation key", 500, 564, None),
    ("qe report", 564, 948, "qe_report_signature"),
    ("qe report signature", 948, 1012, "qe_report_signature"),
    ("qe auth data", 1014, 1046, "qe_report.report_data"),
]


@pytest.mark.parametrize(("region", "start", "end", "field"), SGX_REGIONS, ids=[r[0] for r in SGX_REGIONS])
def test_a_flipped_bit_in_a_signed_region_is_refused(
    ra_samples: Path, region: str, start: int, end: int, field: str | None
) -> None:
    raw = _read(ra_samples, "sgx_v3_phala_dcap-qvl.bin")
    for offset in range(start, end, 5 if end - start > 64 else 1):
        with pytest.raises(VerificationError) as info:
            verify_quote(_flip(raw, offset), at=AT)
        if field is not None:
            assert info.value.field == field, (region, offset)
        else:  # a changed key breaks its binding to the QE report (or is not a curve point)
            assert info.value.field in ("qe_report.report_data", "attestation_key"), (region, offset)


def test_a_changed_qe_vendor_id_is_refused(ra_samples: Path) -> None:
    raw = _read(ra_samples, "sgx_v3_phala_dcap-qvl.bin")
    with pytest.raises(VerificationError) as info:
        verify_quote(_flip(raw, 20), at=AT)
    assert info.value.field == "header.qe_vendor_id"


def test_unparsable_header_changes_are_format_errors(ra_samples: Path) -> None:
    raw = _read(ra_samples, "sgx_v3_phala_dcap-qvl.bin")
    for offset in range(0, 8):
        with pytest.raises(QuoteFormatError):
            verify_quote(_flip(raw, offset), at=AT)


@pytest.mark.parametrize("name", ["sgx_v3_phala_dcap-qvl.bin", "tdx_v4_trustee_debug_td.bin"])
def test_a_flipped_bit_anywhere_in_the_certificate_chain_is_refused(ra_samples: Path, name: str) -> None:
    raw = _read(ra_samples, name)
    quote = parse_quote(raw)
    chain_start = len(raw) - len(quote.signature_data.cert_data)
    for offset in range(chain_start, len(raw), 7):
        with pytest.raises(AttestationError):
            verify_quote(_flip(raw, offset), at=AT)


@pytest.mark.parametrize("name", ["tdx_v4_trustee_debug_td.bin"])
def test_a_flipped_bit_in_the_td_report_or_wrapped_qe_report_is_refused(ra_samples: Path, name: str) -> None:
    raw = _read(ra_samples, name)
    for offset, field in [(60, "quote_signature"), (200, "quote_signature"), (600, "quote_signature"),
                          (636 + 10, "quote_signature"), (636 + 134 + 100, "qe_report_signature"),
                          (636 + 134 + 384 + 5, "qe_report_signature")]:
        with pytest.raises(VerificationError) as info:
            verify_quote(_flip(raw, offset), at=AT)
        assert info.value.field == field, offset


@pytest.mark.parametrize(
    ("at", "field"),
    [
        (datetime(2017, 1, 1, tzinfo=timezone.utc), "pck_chain[2].validity"),
        (datetime(2031, 1, 1, tzinfo=timezone.utc), "pck_chain[0].validity"),
    ],
)
def test_a_time_outside_the_chain_validity_is_refused(ra_samples: Path, at: datetime, field: str) -> None:
    with pytest.raises(VerificationError) as info:
        verify_quote(_read(ra_samples, "sgx_v3_phala_dcap-qvl.bin"), at=at)
    assert info.value.field == field
    assert info.value.actual == at.isoformat()


def test_naive_time_is_taken_as_utc(ra_samples: Path) -> None:
    result = verify_quote(_read(ra_samples, "sgx_v3_phala_dcap-qvl.bin"), at=datetime(2025, 6, 20))
    assert result.checked == ALL_CHECKS


def test_a_self_made_root_is_refused_unless_trusted(sim_dcap: Any) -> None:
    quote = sim_dcap.sgx_quote()
    with pytest.raises(VerificationError) as info:
        verify_quote(quote, at=AT)
    assert info.value.field == "pck_chain.root"
    assert info.value.actual == certificate_fingerprint(sim_dcap.root)

    result = verify_quote(quote.to_bytes(), at=AT, trusted_roots=[sim_dcap.root])
    assert result.root_fingerprint == certificate_fingerprint(sim_dcap.root)
    assert result.checked == ALL_CHECKS
    assert (result.mr_enclave, result.isv_svn, result.debug) == (b"\x11" * 32, 3, False)


def test_trusting_another_root_drops_the_intel_root(ra_samples: Path, sim_dcap: Any) -> None:
    with pytest.raises(VerificationError) as info:
        verify_quote(_read(ra_samples, "sgx_v3_phala_dcap-qvl.bin"), at=AT, trusted_roots=[sim_dcap.root])
    assert info.value.field == "pck_chain.root"
    result = verify_quote(
        _read(ra_samples, "sgx_v3_phala_dcap-qvl.bin"), at=AT, trusted_roots=[sim_dcap.root, intel_sgx_root_ca()]
    )
    assert result.root_fingerprint == INTEL_SGX_ROOT_CA_SHA256


def test_a_chain_signed_by_a_non_ca_is_refused(sim_dcap: Any) -> None:
    # A "root" that is the PCK leaf itself cannot vouch for anything.
    quote = sim_dcap.sgx_quote()
    with pytest.raises(VerificationError) as info:
        verify_quote(quote, at=AT, trusted_roots=[sim_dcap.pck_ca])
    assert info.value.field.startswith("pck_chain")


def test_a_quote_signed_by_another_attestation_key_is_refused(sim_dcap: Any, make_sim_dcap: Any) -> None:
    other = make_sim_dcap()
    good = sim_dcap.sgx_quote()
    forged = other.sgx_quote(good.body)  # same enclave claims, other platform's keys and root
    with pytest.raises(VerificationError):
        verify_quote(forged, at=AT, trusted_roots=[sim_dcap.root])


def test_a_header_change_after_signing_is_refused(sim_dcap: Any) -> None:
    quote = sim_dcap.sgx_quote()
    header = QuoteHeader(qe_svn=99, pce_svn=13)
    altered = type(quote)(header=header, body=quote.body, signature_data=quote.signature_data)
    with pytest.raises(VerificationError) as info:
        verify_quote(altered, at=AT, trusted_roots=[sim_dcap.root])
    assert info.value.field == "quote_signature"
