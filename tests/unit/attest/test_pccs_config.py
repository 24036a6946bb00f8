"""``attestation.collateral`` in a job file: file or PCCS source, and what provisioning makes of it."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from enclavefl.attest.quote import parse_quote
from enclavefl.attest.verifier import verify_quote
from enclavefl.config import load_job, parse_job
from enclavefl.errors import ConfigError
from enclavefl.transport import provisioning
from tests.unit.attest.pccs_standin import PccsStandIn, pccs_routes, sample_parts

AT = datetime(2025, 6, 20, tzinfo=timezone.utc)  # inside the sample collateral's window (2025-06-19..07-19)
QUOTE = "sgx_v3_phala_dcap-qvl.bin"
COLLATERAL = "sgx_v3_phala_dcap-qvl.collateral.json"


@pytest.fixture
def pccs(ra_samples: Path, tmp_path: Path) -> Iterator[PccsStandIn]:
    server = PccsStandIn(pccs_routes(sample_parts(ra_samples)), tmp_path / "pccs-tls")
    yield server
    server.stop()


def write_job(path: Path, attestation: dict[str, object]) -> Path:
    path.write_text(yaml.safe_dump({"attestation": attestation}))
    return path


def test_job_file_selecting_a_pccs_source_feeds_verification(pccs: PccsStandIn, ra_samples: Path,
                                                             tmp_path: Path) -> None:
    # Regression (issue 10, item 2): before, `collateral` took only a file path, so this job file was refused.
    job = write_job(tmp_path / "job.yaml", {"mode": "simulated", "collateral": {
        "source": "pccs", "url": pccs.url, "cache_dir": "cache", "ca_cert": str(pccs.ca_pem)}})
    config = load_job(job)
    source = provisioning.make_collateral_source(config, job_dir=tmp_path, node="ps")
    assert source is not None
    quote = parse_quote((ra_samples / "quotes" / QUOTE).read_bytes())

    result = verify_quote(quote, at=AT, collateral=source.for_quote(quote, AT))

    assert result.tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert result.checked[-4:] == ("collateral", "revocation", "qe_identity", "tcb_level")
    assert any(path.startswith("/sgx/certification/v4/tcb?fmspc=") for path in pccs.requests)
    assert list((tmp_path / "cache").iterdir())  # cache_dir is relative to the job file


def test_plain_string_collateral_still_means_a_file(ra_samples: Path, tmp_path: Path) -> None:
    config = parse_job({"attestation": {"collateral": "collateral.json"}})

    assert config.attestation.collateral is not None
    assert (config.attestation.collateral.source, config.attestation.collateral.path) == ("file", "collateral.json")


def test_file_source_serves_the_file_for_any_quote(ra_samples: Path) -> None:
    path = ra_samples / "quotes" / COLLATERAL
    config = parse_job({"attestation": {"collateral": {"source": "file", "path": str(path)}}})
    source = provisioning.make_collateral_source(config, job_dir=Path("."), node="ps")
    assert source is not None
    quote = parse_quote((ra_samples / "quotes" / QUOTE).read_bytes())

    result = verify_quote(quote, at=AT, collateral=source.for_quote(quote, AT))

    assert result.tcb_status == "ConfigurationAndSWHardeningNeeded"


def test_no_collateral_section_gives_no_source() -> None:
    assert provisioning.make_collateral_source(parse_job({}), job_dir=Path("."), node="ps") is None


@pytest.mark.parametrize(
    ("collateral", "match"),
    [
        ({"source": "pccs"}, "attestation.collateral.url"),
        ({"source": "pccs", "url": "http://pccs.example"}, "attestation.collateral.url"),
        ({"source": "file"}, "attestation.collateral.path"),
        ({"source": "ftp", "path": "c.json"}, "attestation.collateral = .*source is .file. or .pccs."),
        ({"source": "pccs", "url": "https://pccs.example", "refresh_before_s": -1}, "attestation.collateral.refresh_before_s"),
        ({"source": "file", "path": "c.json", "url": "https://pccs.example"}, "attestation.collateral.url"),
        ({"source": "pccs", "url": "https://pccs.example", "max_age": 3}, "attestation.collateral.max_age"),
    ],
)
def test_bad_collateral_settings_name_the_key(collateral: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_job({"attestation": {"collateral": collateral}})


# -- allow_missing_collateral in gramine mode -------------------------------------------------------


@pytest.mark.parametrize(("mode", "policy_allows", "job_allows", "refused"), [
    ("gramine", True, False, True),
    ("gramine", True, True, False),
    ("gramine", False, False, False),
    ("simulated", True, False, False),
])
def test_gramine_refuses_a_policy_without_collateral_unless_the_job_allows_it(
        mode: str, policy_allows: bool, job_allows: bool, refused: bool) -> None:
    check = provisioning.check_missing_collateral_allowed
    if refused:
        with pytest.raises(ConfigError, match=r"allow_missing_collateral.*attestation\.allow_missing_collateral"):
            check(mode, policy_allows=policy_allows, job_allows=job_allows, policy_source="policy.json")
    else:
        check(mode, policy_allows=policy_allows, job_allows=job_allows, policy_source="policy.json")


def test_gramine_credentials_refuse_a_policy_allowing_missing_collateral(tmp_path: Path) -> None:
    (tmp_path / "policy.json").write_text('{"allow_missing_collateral": true}')
    config = parse_job({"attestation": {"mode": "gramine", "policy": "policy.json", "device_dir": str(tmp_path)}})

    with pytest.raises(ConfigError, match="attestation.allow_missing_collateral"):
        provisioning.make_attested_credentials(config, job_dir=tmp_path, role="ps", node="ps", audit_path=None)
