"""Quote codec: real samples parse to the values their sources state, and bad bytes fail cleanly."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from enclavefl.attest import reports
from enclavefl.attest.quote import (
    Quote,
    QuoteFormatError,
    QuoteHeader,
    QuoteSignatureData,
    SgxAttributes,
    SgxReportBody,
    TdReportBody,
    parse_pem_chain,
    parse_quote,
    serialize_quote,
)

SAMPLES = [
    "sgx_v3_phala_dcap-qvl.bin",
    "sgx_v3_trustee_occlum_debug.bin",
    "sgx_v3_cosmian_intel-sgx-ra.bin",
    "tdx_v4_trustee_debug_td.bin",
]

# Values stated by each sample's source (see ra-samples/README.md).
SGX_EXPECTED: dict[str, dict[str, Any]] = {
    "sgx_v3_phala_dcap-qvl.bin": dict(
        mr_enclave="33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb",
        mr_signer="815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6",
        isv_prod_id=0, isv_svn=0, report_data=b"Hello, world!".ljust(64, b"\0"), qe_svn=10, pce_svn=15,
        flags=0x5, debug=False, nul=True,
    ),
    "sgx_v3_trustee_occlum_debug.bin": dict(
        mr_enclave="8f173e4613ff05c52aaf04162d234edae8c9977eae47eb2299ae16a553011c68",
        mr_signer="83d719e77deaca1470f6baf62a4d774303c899db69020f9c70ee1dfc08c7ce9e",
        isv_prod_id=0, isv_svn=0, report_data=b"test".ljust(64, b"\0"), qe_svn=8, pce_svn=13,
        flags=0x7, debug=True, nul=False,
    ),
    "sgx_v3_cosmian_intel-sgx-ra.bin": dict(
        mr_enclave="e413a4ed616c7a79634d5ca05a2fda746a1f0c71349a80b25a02828846fab90e",
        mr_signer="ac2c9fa87e4c91768b1d0c47169466c50d5a98c790639fbaefe7352a59919980",
        isv_prod_id=1, isv_svn=10, report_data=bytes(64), qe_svn=9, pce_svn=14,
        flags=0x5, debug=False, nul=True,
    ),
}
TDX_REPORT_DATA = bytes.fromhex(
    "7c71fe2c86eff65a7cf8dbc22b3275689fd0464a267baced1bf94fc1324656ae"
    "b755da3d44d098c0c87382f3a5f85b45c8a28fee1d3bdb38342bf96671501429"
)
TDX_MR_TD = "705ee9381b8633a9fbe532b52345e8433343d2868959f57889d84ca377c395b689cac1599ccea1b7d420483a9ce5f031"


def _read(ra_samples: Path, name: str) -> bytes:
    return (ra_samples / "quotes" / name).read_bytes()


@pytest.mark.parametrize("name", sorted(SGX_EXPECTED))
def test_sgx_sample_parses_to_the_values_its_source_states(ra_samples: Path, name: str) -> None:
    expected = SGX_EXPECTED[name]
    quote = parse_quote(_read(ra_samples, name))
    body = quote.body
    assert isinstance(body, SgxReportBody)
    assert (quote.tee, quote.header.version, quote.header.qe_svn, quote.header.pce_svn) == (
        "sgx", 3, expected["qe_svn"], expected["pce_svn"],
    )
    assert body.mr_enclave.hex() == expected["mr_enclave"]
    assert body.mr_signer.hex() == expected["mr_signer"]
    assert (body.isv_prod_id, body.isv_svn, body.report_data) == (
        expected["isv_prod_id"], expected["isv_svn"], expected["report_data"],
    )
    assert (body.attributes.flags, quote.is_debug) == (expected["flags"], expected["debug"])
    signature_data = quote.signature_data
    assert (signature_data.cert_type, len(signature_data.pck_chain), signature_data.wrapped) == (5, 3, False)
    assert signature_data.cert_data.endswith(b"\x00") is expected["nul"]
    assert signature_data.qe_auth_data == bytes(range(32))


def test_trustee_sgx_sample_has_the_stated_cpu_svn_and_misc_select(ra_samples: Path) -> None:
    body = parse_quote(_read(ra_samples, "sgx_v3_trustee_occlum_debug.bin")).body
    assert isinstance(body, SgxReportBody)
    assert body.cpu_svn.hex() == "06060c0cffff00000000000000000000"
    assert (body.misc_select, body.attributes.xfrm) == (1, 0xE7)


def test_tdx_sample_parses_to_the_values_its_source_states(ra_samples: Path) -> None:
    quote = parse_quote(_read(ra_samples, "tdx_v4_trustee_debug_td.bin"))
    body = quote.body
    assert isinstance(body, TdReportBody)
    assert (quote.tee, quote.header.version, quote.header.tee_type) == ("tdx", 4, 0x81)
    assert body.mr_td.hex() == TDX_MR_TD
    assert body.report_data == TDX_REPORT_DATA
    assert body.tee_tcb_svn.hex() == "03000500000000000000000000000000"
    assert body.td_attributes.hex() == "0100001000000000"
    assert body.xfam.hex() == "e742060000000000"
    assert body.rtmr0.hex().startswith("e940da7c") and body.rtmr1.hex().startswith("559cfcf4")
    assert quote.is_debug
    assert quote.signature_data.wrapped and quote.signature_data.cert_type == 5
    assert len(quote.signed_bytes) == 632


@pytest.mark.parametrize("name", SAMPLES)
def test_serialize_reproduces_every_sample_byte_for_byte(ra_samples: Path, name: str) -> None:
    raw = _read(ra_samples, name)
    quote = parse_quote(raw)
    assert serialize_quote(quote) == raw
    assert quote.to_bytes() == raw


@pytest.mark.parametrize("name", SAMPLES)
def test_truncation_at_every_offset_raises_quote_format_error_only(ra_samples: Path, name: str) -> None:
    raw = _read(ra_samples, name)
    for size in range(len(raw)):
        with pytest.raises(QuoteFormatError):
            parse_quote(raw[:size])


def test_corrupting_any_byte_gives_a_quote_or_a_quote_format_error(ra_samples: Path) -> None:
    raw = _read(ra_samples, "tdx_v4_trustee_debug_td.bin")
    for offset in range(0, len(raw), 3):
        mutated = bytearray(raw)
        mutated[offset] ^= 0xFF
        try:
            parse_quote(bytes(mutated))
        except QuoteFormatError:
            pass


@pytest.mark.parametrize("padding", [bytes(70), b"trailing ascii padding\n", bytes(3253)])
def test_bytes_after_the_signature_data_are_counted_not_parsed(ra_samples: Path, padding: bytes) -> None:
    # Parsing tolerates them (to show a padded quote); verify_quote refuses them (test_qvl_parity).
    raw = _read(ra_samples, "sgx_v3_phala_dcap-qvl.bin")
    quote = parse_quote(raw + padding)
    assert quote.to_bytes() == raw and quote.trailing_bytes == len(padding)


@pytest.mark.parametrize("name", SAMPLES)
def test_building_from_parts_reproduces_the_sample(ra_samples: Path, name: str) -> None:
    raw = _read(ra_samples, name)
    parsed = parse_quote(raw)
    sig = parsed.signature_data
    rebuilt_sig = QuoteSignatureData.with_pck_chain(
        signature=sig.signature, attestation_key=sig.attestation_key, qe_report=sig.qe_report,
        qe_report_signature=sig.qe_report_signature, qe_auth_data=sig.qe_auth_data, pck_chain=sig.pck_chain,
        wrapped=sig.wrapped, nul_terminated=sig.cert_data.endswith(b"\x00"),
    )
    if isinstance(parsed.body, SgxReportBody):
        rebuilt = Quote.build_sgx_v3(header=parsed.header, body=parsed.body, signature_data=rebuilt_sig)
    else:
        rebuilt = Quote(header=parsed.header, body=parsed.body, signature_data=rebuilt_sig)
    assert rebuilt.to_bytes() == raw


def _with_u32(raw: bytes, offset: int, value: int) -> bytes:
    return raw[:offset] + value.to_bytes(4, "little") + raw[offset + 4 :]


@pytest.mark.parametrize(
    ("offset", "size", "value", "field"),
    [
        (0, 2, 5, "header.version"),
        (2, 2, 3, "header.att_key_type"),
        (4, 4, 0x81, "header.tee_type"),
        (432, 4, 0xFFFFFFFF, "signature_data"),
        (1012, 2, 0xFFFF, "signature_data.qe_auth_data"),
        (1046, 2, 6, "signature_data.cert_type"),
        (1048, 4, 0x7FFFFFFF, "signature_data.cert_data"),
    ],
)
def test_bad_header_and_sizes_name_the_field(
    ra_samples: Path, offset: int, size: int, value: int, field: str
) -> None:
    raw = _read(ra_samples, "sgx_v3_phala_dcap-qvl.bin")
    mutated = raw[:offset] + value.to_bytes(size, "little") + raw[offset + size :]
    with pytest.raises(QuoteFormatError) as info:
        parse_quote(mutated)
    assert info.value.field == field
    assert "offset" in str(info.value)


def test_v4_without_the_type_6_wrapper_is_refused(ra_samples: Path) -> None:
    raw = _read(ra_samples, "tdx_v4_trustee_debug_td.bin")
    outer_type = 636 + 128
    mutated = raw[:outer_type] + (5).to_bytes(2, "little") + raw[outer_type + 2 :]
    with pytest.raises(QuoteFormatError, match="type 6"):
        parse_quote(mutated)


def test_declared_signature_length_shorter_than_its_content_is_refused(ra_samples: Path) -> None:
    raw = _read(ra_samples, "sgx_v3_phala_dcap-qvl.bin")
    with pytest.raises(QuoteFormatError) as info:
        parse_quote(_with_u32(raw, 432, len(raw) - 436 - 10))
    assert info.value.field.startswith("signature_data")


def test_bytes_between_pem_blocks_are_refused() -> None:
    with pytest.raises(QuoteFormatError, match="no PEM certificate"):
        parse_pem_chain(b"\x00")
    with pytest.raises(QuoteFormatError, match="unexpected bytes"):
        parse_pem_chain(b"junk -----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(QuoteFormatError, match="DER"):
        parse_pem_chain(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(QuoteFormatError, match="base64"):
        parse_pem_chain(b"-----BEGIN CERTIFICATE-----\nA*AA\n-----END CERTIFICATE-----\n")


def test_value_objects_refuse_wrong_sizes_and_ranges() -> None:
    with pytest.raises(QuoteFormatError, match="mr_enclave"):
        SgxReportBody(mr_enclave=b"short")
    with pytest.raises(QuoteFormatError, match="isv_svn"):
        SgxReportBody(isv_svn=1 << 16)
    with pytest.raises(QuoteFormatError, match="flags"):
        SgxAttributes(flags=-1)
    with pytest.raises(QuoteFormatError, match="mr_td"):
        TdReportBody(mr_td=bytes(32))
    with pytest.raises(QuoteFormatError, match="user_data"):
        QuoteHeader(user_data=bytes(16))


def test_quote_refuses_a_body_that_does_not_fit_its_header() -> None:
    signature_data = QuoteSignatureData(
        signature=bytes(64), attestation_key=bytes(64), qe_report=SgxReportBody(), qe_report_signature=bytes(64),
        qe_auth_data=b"", cert_type=5, cert_data=b"",
    )
    with pytest.raises(QuoteFormatError, match="TdReportBody"):
        Quote(header=QuoteHeader(version=4, tee_type=0x81), body=SgxReportBody(), signature_data=signature_data)
    with pytest.raises(QuoteFormatError, match="wrapped"):
        Quote(header=QuoteHeader(version=4), body=SgxReportBody(), signature_data=signature_data)


def test_debug_flags_are_read_from_the_attributes() -> None:
    assert SgxReportBody(attributes=SgxAttributes(flags=0x7)).is_debug
    assert not SgxReportBody(attributes=SgxAttributes(flags=0x5)).is_debug
    assert TdReportBody(td_attributes=bytes([1]) + bytes(7)).is_debug
    assert not TdReportBody(td_attributes=bytes.fromhex("0000001000000000")).is_debug


@pytest.mark.parametrize(
    ("cls", "layout", "size"),
    [
        (QuoteHeader, reports._HEADER_LAYOUT, 48),
        (SgxReportBody, reports._SGX_REPORT_LAYOUT, 384),
        (TdReportBody, reports._TD_REPORT_LAYOUT, 584),
    ],
)
def test_layout_tables_match_the_dataclasses(cls: type, layout: Any, size: int) -> None:
    assert [f.name for f in dataclasses.fields(cls)] == [name for name, _, _ in layout]
    assert sum(width for _, width, _ in layout) == size
    assert len(cls().to_bytes()) == size
