"""Collateral sources: a static file, and a PCCS source refreshed before nextUpdate (against an HTTPS stand-in)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, ClassVar

import pytest

from enclavefl.attest.collateral import Collateral
from enclavefl.attest.collateral_source import (
    PIECES,
    CollateralSource,
    PccsCollateralSource,
    StaticCollateralSource,
    describe_collateral,
    earliest_next_update,
)
from enclavefl.attest.pccs import Platform, platform_of
from enclavefl.attest.pck import certificate_fingerprint
from enclavefl.attest.policy import parse_policy
from enclavefl.attest.providers import EvidenceProvider
from enclavefl.attest.quote import Quote, SgxAttributes, SgxReportBody, parse_quote
from enclavefl.attest.ratls import create_ratls_identity, verify_ratls_certificate
from enclavefl.attest.verifier import verify_quote
from enclavefl.errors import VerificationError
from tests.unit.attest.pccs_standin import PccsStandIn, pccs_routes, sample_parts

AT = datetime(2025, 6, 20, tzinfo=timezone.utc)  # inside the sample collateral's window
QE_NEXT_UPDATE = datetime(2025, 7, 19, 10, 1, 18, tzinfo=timezone.utc)  # the earliest nextUpdate of the sample
DAY = timedelta(days=1)
LOGGER = "enclavefl.attest.collateral_source"


@pytest.fixture
def pccs(ra_samples: Path, tmp_path: Path) -> Iterator[PccsStandIn]:
    server = PccsStandIn(pccs_routes(sample_parts(ra_samples)), tmp_path / "pccs-tls")
    yield server
    server.stop()


@pytest.fixture
def quote(ra_samples: Path) -> Quote:
    return parse_quote((ra_samples / "quotes" / "sgx_v3_phala_dcap-qvl.bin").read_bytes())


def source_for(pccs: PccsStandIn, cache: Path, **kwargs: Any) -> PccsCollateralSource:
    return PccsCollateralSource(pccs.url, cache, refresh_before_s=86_400, retry_s=60, node="ps",
                                http_get=pccs.http_get(), **kwargs)


def test_pccs_source_serves_collateral_that_verifies_the_real_quote(pccs: PccsStandIn, quote: Quote,
                                                                    tmp_path: Path) -> None:
    source = source_for(pccs, tmp_path / "cache")

    result = verify_quote(quote, at=AT, collateral=source.for_quote(quote, AT))

    assert result.tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert result.advisory_ids == ("INTEL-SA-00289", "INTEL-SA-00615")
    assert len(pccs.requests) == 4  # PCK CRL, TCB info, QE identity, root CA CRL


def test_earliest_next_update_is_the_qe_identity_of_the_sample(ra_samples: Path) -> None:
    collateral = Collateral.from_file(ra_samples / "quotes" / "sgx_v3_phala_dcap-qvl.collateral.json")
    # tcb_info 2025-07-19T10:56:11Z, qe_identity 10:01:18Z, pck_crl 10:23:18Z, root_ca_crl 2026-04-03
    assert earliest_next_update(collateral) == ("qe_identity", QE_NEXT_UPDATE)


def test_collateral_is_reused_until_the_refresh_point(pccs: PccsStandIn, quote: Quote, tmp_path: Path) -> None:
    source = source_for(pccs, tmp_path / "cache")
    source.for_quote(quote, AT)
    refresh_at = QE_NEXT_UPDATE - DAY  # refresh_before_s = 1 day

    source.for_quote(quote, AT + timedelta(hours=1))
    source.for_quote(quote, refresh_at - timedelta(seconds=1))

    assert len(pccs.requests) == 4


def test_collateral_is_refreshed_before_next_update(pccs: PccsStandIn, quote: Quote, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    source = source_for(pccs, tmp_path / "cache")
    source.for_quote(quote, AT)
    caplog.set_level(logging.INFO, logger=LOGGER)

    source.for_quote(quote, QE_NEXT_UPDATE - DAY)

    assert len(pccs.requests) == 8
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(lines) == 1 and lines[0].startswith("ps: collateral for sgx fmspc=00A067110000 ca=processor refreshed")


def test_last_good_collateral_is_served_while_the_pccs_is_down(pccs: PccsStandIn, quote: Quote, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    source = source_for(pccs, tmp_path / "cache")
    first = source.for_quote(quote, AT)
    pccs.stop()
    caplog.set_level(logging.INFO, logger=LOGGER)
    late = QE_NEXT_UPDATE - timedelta(hours=1)  # refresh due, collateral still valid

    served = source.for_quote(quote, late)

    assert served is first
    assert verify_quote(quote, at=late, collateral=served).tcb_status == "ConfigurationAndSWHardeningNeeded"
    (line,) = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert line.startswith("ps: collateral refresh for sgx fmspc=00A067110000 ca=processor from https://127.0.0.1:")
    assert "serving the last good one until qe_identity expires at 2025-07-19T10:01:18+00:00" in line


def test_expired_collateral_is_refused_naming_what_expired_and_why(pccs: PccsStandIn, quote: Quote,
                                                                   tmp_path: Path) -> None:
    source = source_for(pccs, tmp_path / "cache")
    source.for_quote(quote, AT)
    pccs.stop()

    with pytest.raises(VerificationError) as info:
        source.for_quote(quote, QE_NEXT_UPDATE + timedelta(seconds=1))

    assert info.value.field == "collateral.qe_identity.next_update"
    message = str(info.value)
    assert "qe_identity expired at 2025-07-19T10:01:18+00:00" in message
    assert f"refresh from {pccs.url} failed: GET {pccs.url}/sgx/certification/v4/pckcrl" in message


def test_a_pccs_serving_only_stale_collateral_does_not_extend_it(pccs: PccsStandIn, quote: Quote,
                                                                 tmp_path: Path) -> None:
    source = source_for(pccs, tmp_path / "cache")
    source.for_quote(quote, AT)

    with pytest.raises(VerificationError, match=r"qe_identity expired at .*failed: qe_identity.validity"):
        source.for_quote(quote, QE_NEXT_UPDATE + timedelta(seconds=1))
    assert len(pccs.requests) == 8  # it did ask again


def test_a_restart_uses_the_cache_while_the_pccs_is_down(pccs: PccsStandIn, quote: Quote, tmp_path: Path) -> None:
    source_for(pccs, tmp_path / "cache").for_quote(quote, AT)
    pccs.stop()
    restarted = source_for(pccs, tmp_path / "cache")

    collateral = restarted.for_quote(quote, AT + DAY)

    assert verify_quote(quote, at=AT + DAY, collateral=collateral).tcb_status == "ConfigurationAndSWHardeningNeeded"


def test_no_collateral_and_no_pccs_refuses_naming_the_fetch(pccs: PccsStandIn, quote: Quote, tmp_path: Path) -> None:
    pccs.stop()

    with pytest.raises(VerificationError, match=r"collateral sgx fmspc=00A067110000 ca=processor: .*fetch failed: GET"):
        source_for(pccs, tmp_path / "cache").for_quote(quote, AT)


def test_failed_refreshes_are_spaced_by_retry_s(pccs: PccsStandIn, quote: Quote, tmp_path: Path) -> None:
    source = source_for(pccs, tmp_path / "cache")
    source.for_quote(quote, AT)
    pccs.routes.clear()  # the PCCS answers 404 from now on
    due = QE_NEXT_UPDATE - DAY

    source.for_quote(quote, due)  # one failed attempt: 1 request (the PCK CRL)
    source.for_quote(quote, due + timedelta(seconds=59))  # within retry_s = 60: no request
    source.for_quote(quote, due + timedelta(seconds=60))  # a second attempt

    assert len(pccs.requests) == 4 + 1 + 1


def test_concurrent_verifications_make_one_refresh(pccs: PccsStandIn, quote: Quote, tmp_path: Path) -> None:
    source = source_for(pccs, tmp_path / "cache")
    results: list[Collateral] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def verify() -> None:
        start.wait(timeout=10)
        try:
            results.append(source.for_quote(quote, AT))
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=verify) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert errors == [] and len(results) == 8
    assert len({id(c) for c in results}) == 1
    assert len(pccs.requests) == 4


def test_a_forged_pck_chain_makes_no_request(pccs: PccsStandIn, sim_dcap: Any, tmp_path: Path) -> None:
    source = source_for(pccs, tmp_path / "cache")

    with pytest.raises(VerificationError) as info:
        source.for_quote(sim_dcap.sgx_quote(), AT)

    assert info.value.field.startswith("pck_chain")
    assert pccs.requests == []


def test_platforms_beyond_the_cap_are_refused(pccs: PccsStandIn, quote: Quote, tmp_path: Path) -> None:
    source = source_for(pccs, tmp_path / "cache", max_platforms=1)
    source.for_quote(quote, AT)

    with pytest.raises(VerificationError, match="at most 1 platforms"):
        source.for_platform(Platform("sgx", "00906ED50000", "processor"), AT)


def test_platform_of_the_sample_quote(quote: Quote) -> None:
    assert platform_of(quote) == Platform("sgx", "00A067110000", "processor")


def test_static_source_refuses_after_expiry_saying_it_is_never_refreshed(ra_samples: Path, quote: Quote) -> None:
    collateral = Collateral.from_file(ra_samples / "quotes" / "sgx_v3_phala_dcap-qvl.collateral.json")
    source = StaticCollateralSource(collateral)
    assert source.for_quote(quote, AT) is collateral

    with pytest.raises(VerificationError, match="qe_identity expired at 2025-07-19T10:01:18.*never refreshed"):
        source.for_quote(quote, QE_NEXT_UPDATE + timedelta(seconds=1))


def test_describe_collateral_reports_each_piece(ra_samples: Path) -> None:
    collateral = Collateral.from_file(ra_samples / "quotes" / "sgx_v3_phala_dcap-qvl.collateral.json")

    pieces = describe_collateral(collateral, at=AT)
    late = {p.name: p for p in describe_collateral(collateral, at=QE_NEXT_UPDATE + timedelta(seconds=1))}

    assert tuple(p.name for p in pieces) == PIECES
    assert all(p.problem is None for p in pieces)
    assert "CN=Intel SGX TCB Signing" in pieces[0].issuer and "CN=Intel SGX PCK Processor CA" in pieces[2].issuer
    assert pieces[1].time_left(AT) == QE_NEXT_UPDATE - AT
    assert late["qe_identity"].problem is not None and "qe_identity.validity" in late["qe_identity"].problem
    assert late["tcb_info"].problem is None and late["root_ca_crl"].problem is None


def test_describe_collateral_names_a_bad_signature(ra_samples: Path, sim_dcap: Any) -> None:
    parts = sample_parts(ra_samples)
    parts["tcb_info_signature"] = parts["tcb_info_signature"][:-2] + ("00" if parts["tcb_info_signature"][-2:] != "00" else "01")

    pieces = {p.name: p for p in describe_collateral(Collateral.from_parts(**parts), at=AT)}

    assert pieces["tcb_info"].problem is not None and "tcb_info.signature" in pieces["tcb_info"].problem
    assert pieces["qe_identity"].problem is None


# -- refresh outcomes, with a self-made DCAP PKI (its collateral can be issued at any time) ---------------


def test_a_refresh_takes_newer_collateral_and_refuses_a_rollback(sim_dcap: Any, tmp_path: Path) -> None:
    platform = Platform("sgx", "00906ED50000", "processor")  # SimDcap's FMSPC

    def routes(issued: datetime) -> dict[str, tuple[bytes, dict[str, str]]]:
        return pccs_routes(sim_dcap.combined(at=issued), fmspc=platform.fmspc)

    server = PccsStandIn(routes(AT), tmp_path / "tls")
    try:
        source = PccsCollateralSource(server.url, tmp_path / "cache", refresh_before_s=86_400, retry_s=60,
                                      http_get=server.http_get(), trusted_roots=[sim_dcap.root])
        first = source.for_platform(platform, AT)  # sim collateral: issued AT - 1 day, nextUpdate AT + 29 days
        due = AT + timedelta(days=28)
        server.routes = routes(AT + timedelta(days=27))
        newer = source.for_platform(platform, due)
        server.routes = routes(AT + timedelta(days=26, hours=12))  # valid at day 55, but expires before day 56
        kept = source.for_platform(platform, AT + timedelta(days=55))
    finally:
        server.stop()

    assert earliest_next_update(first)[1] == AT + timedelta(days=29)
    assert earliest_next_update(newer)[1] == AT + timedelta(days=56)
    assert kept is newer
    assert len(server.requests) == 12  # three fetches of four pieces


class _RecordingSource(CollateralSource):
    """An in-memory source: serves one collateral and remembers which quotes asked."""

    def __init__(self, collateral: Collateral) -> None:
        self.collateral = collateral
        self.asked: list[bytes] = []

    def for_quote(self, quote: Quote, at: datetime) -> Collateral:
        self.asked.append(quote.body.report_data)
        return self.collateral


class _SimDcapProvider(EvidenceProvider):
    kind: ClassVar[str] = "sim-dcap"

    def __init__(self, dcap: Any) -> None:
        self.dcap = dcap

    def quote(self, report_data: bytes) -> bytes:
        body = SgxReportBody(mr_enclave=b"\x11" * 32, mr_signer=b"\x22" * 32, isv_svn=3,
                             attributes=SgxAttributes(flags=0x05, xfrm=0xE7), report_data=report_data)
        return bytes(self.dcap.sgx_quote(body).to_bytes())


def test_ratls_verification_asks_the_source_for_the_peer_quote(sim_dcap: Any) -> None:
    identity = create_ratls_identity(_SimDcapProvider(sim_dcap), common_name="peer", validity=timedelta(days=1))
    policy = parse_policy({"sgx_mrs": [{"mr_enclave": "11" * 32, "mr_signer": "22" * 32, "isv_prod_id": 0,
                                        "isv_svn": 3}], "trusted_root_sha256": certificate_fingerprint(sim_dcap.root)})
    now = datetime.now(timezone.utc)
    source = _RecordingSource(sim_dcap.collateral(at=now))

    evidence = verify_ratls_certificate(identity.cert_pem, policy=policy, at=now, collateral=source)

    assert evidence.verification.tcb_status == "UpToDate"
    assert len(source.asked) == 1 and source.asked[0][:32] == evidence.verification.report_data[:32]


def test_a_malformed_refresh_does_not_overwrite_the_good_cache(pccs: PccsStandIn, quote: Quote, tmp_path: Path) -> None:
    source_for(pccs, tmp_path / "cache").for_quote(quote, AT)
    for path in list(pccs.routes):
        if "/tcb?" in path:
            pccs.routes[path] = (b'{"tcbInfo": {}, "signature": "00"}', pccs.routes[path][1])
    refreshing = source_for(pccs, tmp_path / "cache")
    refreshing.for_quote(quote, QE_NEXT_UPDATE - DAY / 2)  # past the refresh point: the refresh fails, the old serves
    pccs.stop()
    restarted = source_for(pccs, tmp_path / "cache")

    collateral = restarted.for_quote(quote, QE_NEXT_UPDATE - DAY / 2)

    assert verify_quote(quote, at=QE_NEXT_UPDATE - DAY / 2, collateral=collateral).tcb_status is not None
