"""Evidence providers: simulated quotes, Gramine's /dev/attestation, and none."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import pytest

from enclavefl.attest.measurement import CodeMeasurement, measure_code, signer_id
from enclavefl.attest.providers import GramineProvider, NoneProvider, SimulatedProvider
from enclavefl.attest.quote import CERT_TYPE_PCK_CHAIN, parse_quote
from enclavefl.attest.simroot import SimRoot, init_sim_root
from enclavefl.attest.verifier import verify_quote
from enclavefl.errors import AttestationError, VerificationError

REPORT_DATA = bytes(range(64))


@pytest.fixture(scope="module")
def sim_root(tmp_path_factory: pytest.TempPathFactory) -> SimRoot:
    return init_sim_root(tmp_path_factory.mktemp("providers") / "root", name="provider-tests")


@pytest.fixture(scope="module")
def measurement() -> CodeMeasurement:
    return measure_code()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def test_simulated_quote_verifies_under_the_sim_root(sim_root: SimRoot, measurement: CodeMeasurement) -> None:
    provider = SimulatedProvider(sim_root, measurement, isv_prod_id=5, isv_svn=9)
    v = verify_quote(provider.quote(REPORT_DATA), at=_now(), trusted_roots=[sim_root.root_cert])
    assert v.checked == ("pck_chain", "qe_report_signature", "qe_report_data", "quote_signature")
    assert (v.tee, v.debug, v.isv_prod_id, v.isv_svn) == ("sgx", False, 5, 9)
    assert v.mr_enclave == measurement.mr_enclave
    assert v.mr_signer == signer_id(sim_root.signer_key.public_key())
    assert v.report_data == REPORT_DATA
    assert v.root_fingerprint == sim_root.root_fingerprint


def test_simulated_quote_is_refused_under_the_intel_root(sim_root: SimRoot, measurement: CodeMeasurement) -> None:
    quote = SimulatedProvider(sim_root, measurement).quote(REPORT_DATA)
    with pytest.raises(VerificationError) as info:
        verify_quote(quote, at=_now())
    assert info.value.field == "pck_chain.root"
    assert info.value.actual == sim_root.root_fingerprint


def test_simulated_quote_has_the_sgx_v3_layout(sim_root: SimRoot, measurement: CodeMeasurement) -> None:
    raw = SimulatedProvider(sim_root, measurement).quote(REPORT_DATA)
    quote = parse_quote(raw)
    assert (quote.header.version, quote.header.tee_type, quote.header.att_key_type) == (3, 0, 2)
    assert raw[112:144] == measurement.mr_enclave  # MRENCLAVE at its v3 offset
    assert raw[368:432] == REPORT_DATA
    assert int.from_bytes(raw[432:436], "little") == len(raw) - 436
    sig = quote.signature_data
    assert sig.cert_type == CERT_TYPE_PCK_CHAIN
    assert sig.cert_data.endswith(b"-----END CERTIFICATE-----\n\x00")
    assert [c.subject for c in sig.pck_chain] == [c.subject for c in sim_root.pck_chain]
    assert quote.to_bytes() == raw


def test_each_quote_binds_its_own_report_data(sim_root: SimRoot, measurement: CodeMeasurement) -> None:
    provider = SimulatedProvider(sim_root, measurement)
    first, second = provider.quote(bytes(64)), provider.quote(b"\x01" * 64)
    assert parse_quote(first).body.report_data == bytes(64)
    assert parse_quote(second).body.report_data == b"\x01" * 64


def test_tampered_simulated_quote_is_refused(sim_root: SimRoot, measurement: CodeMeasurement) -> None:
    raw = bytearray(SimulatedProvider(sim_root, measurement).quote(REPORT_DATA))
    raw[112] ^= 1  # one bit of MRENCLAVE
    with pytest.raises(VerificationError) as info:
        verify_quote(bytes(raw), at=_now(), trusted_roots=[sim_root.root_cert])
    assert info.value.field == "quote_signature"


def test_debug_simulated_quote_says_so(sim_root: SimRoot, measurement: CodeMeasurement) -> None:
    raw = SimulatedProvider(sim_root, measurement, debug=True).quote(REPORT_DATA)
    assert verify_quote(raw, at=_now(), trusted_roots=[sim_root.root_cert]).debug


@pytest.mark.parametrize("report_data", [b"", bytes(32), bytes(65)])
def test_report_data_must_be_64_bytes(sim_root: SimRoot, measurement: CodeMeasurement, report_data: bytes) -> None:
    with pytest.raises(AttestationError, match=f"must be 64 bytes, got {len(report_data)}"):
        SimulatedProvider(sim_root, measurement).quote(report_data)


def test_isv_values_out_of_range_are_refused(sim_root: SimRoot, measurement: CodeMeasurement) -> None:
    with pytest.raises(AttestationError, match="isv_svn must be 0..65535"):
        SimulatedProvider(sim_root, measurement, isv_svn=65536)


def test_simulated_log_lines_say_not_a_real_tee(
    sim_root: SimRoot, measurement: CodeMeasurement, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="enclavefl.attest.providers"):
        SimulatedProvider(sim_root, measurement).quote(REPORT_DATA)
    records = [r for r in caplog.records if r.name == "enclavefl.attest.providers"]
    assert len(records) == 2
    assert all("NOT A REAL TEE" in r.getMessage() for r in records)


def test_gramine_provider_passes_bytes_through_the_device_files(
    tmp_path: Path, sim_root: SimRoot, measurement: CodeMeasurement
) -> None:
    # Prepare: a directory standing in for /dev/attestation, holding a real simulated quote.
    device = tmp_path / "attestation"
    device.mkdir()
    (device / "attestation_type").write_text("dcap")
    prepared = SimulatedProvider(sim_root, measurement).quote(REPORT_DATA)
    (device / "quote").write_bytes(prepared)
    # Execute
    raw = GramineProvider(device).quote(REPORT_DATA)
    # Assert: report data went to the device, the quote came back unchanged and verifies.
    assert (device / "user_report_data").read_bytes() == REPORT_DATA
    assert raw == prepared
    assert verify_quote(raw, at=_now(), trusted_roots=[sim_root.root_cert]).report_data == REPORT_DATA


def test_gramine_provider_without_device_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(AttestationError, match="user_report_data: not found; is this process running under Gramine"):
        GramineProvider(tmp_path / "absent").quote(REPORT_DATA)


def test_gramine_provider_refuses_attestation_type_none(tmp_path: Path) -> None:
    (tmp_path / "attestation_type").write_text("none")
    with pytest.raises(AttestationError, match="attestation type is 'none', need 'dcap'"):
        GramineProvider(tmp_path).quote(REPORT_DATA)


def test_gramine_provider_refuses_empty_and_oversized_quotes(tmp_path: Path) -> None:
    (tmp_path / "quote").write_bytes(b"")
    with pytest.raises(AttestationError, match="returned no quote"):
        GramineProvider(tmp_path).quote(REPORT_DATA)
    (tmp_path / "quote").write_bytes(bytes(8193))
    with pytest.raises(AttestationError, match="larger than 8192 bytes"):
        GramineProvider(tmp_path).quote(REPORT_DATA)


def test_none_provider_has_no_evidence() -> None:
    provider = NoneProvider()
    assert provider.kind == "none"
    with pytest.raises(AttestationError, match="attestation mode is 'none'"):
        provider.quote(REPORT_DATA)
