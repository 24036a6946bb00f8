"""``enclavefl attest collateral fetch|show`` against the HTTPS PCCS stand-in, through ``enclavefl.cli.main``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from enclavefl.cli import main
from tests.unit.attest.pccs_standin import PccsStandIn, pccs_routes, sample_parts

AT = "2025-06-20T00:00:00Z"
LATE = "2025-07-19T10:30:00Z"  # after the QE identity's and PCK CRL's nextUpdate, before the TCB info's


@pytest.fixture
def pccs(ra_samples: Path, tmp_path: Path) -> Iterator[PccsStandIn]:
    server = PccsStandIn(pccs_routes(sample_parts(ra_samples)), tmp_path / "pccs-tls")
    yield server
    server.stop()


@pytest.fixture
def job(pccs: PccsStandIn, tmp_path: Path) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"attestation": {"collateral": {
        "source": "pccs", "url": pccs.url, "cache_dir": "cache", "ca_cert": str(pccs.ca_pem)}}}))
    return path


def test_fetch_prints_one_line_per_piece_with_its_next_update(pccs: PccsStandIn, ra_samples: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    quote = ra_samples / "quotes" / "sgx_v3_phala_dcap-qvl.bin"

    code = main(["attest", "collateral", "fetch", "--url", pccs.url, "--ca-cert", str(pccs.ca_pem),
                 "--cache-dir", str(tmp_path / "cache"), "--quote", str(quote), "--at", AT])

    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0] == f"collateral sgx fmspc=00A067110000 ca=processor from {pccs.url} into {tmp_path / 'cache'}"
    assert [line.split()[0] for line in out[1:]] == ["tcb_info", "qe_identity", "pck_crl", "root_ca_crl"]
    assert "nextUpdate 2025-07-19T10:01:18+00:00" in out[2] and "verifies" in out[2]
    assert len(pccs.requests) == 4 and list((tmp_path / "cache").iterdir())


def test_show_prints_the_cached_pieces_from_a_job_file_while_the_pccs_is_down(
        pccs: PccsStandIn, job: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["attest", "collateral", "fetch", "--config", str(job), "--fmspc", "00a067110000",
                 "--ca", "processor", "--at", AT]) == 0
    pccs.stop()
    capsys.readouterr()

    code = main(["attest", "collateral", "show", "--config", str(job), "--at", AT])

    out = capsys.readouterr().out
    assert code == 0
    assert "collateral sgx fmspc=00A067110000 ca=processor" in out
    assert "issuer C=US,ST=CA,L=Santa Clara,O=Intel Corporation,CN=Intel SGX TCB Signing" in out
    assert "issueDate 2025-06-19T10:01:18+00:00  nextUpdate 2025-07-19T10:01:18+00:00  left 29d 10h 1m" in out
    assert out.count("  verifies") == 4


def test_show_flags_expired_pieces_and_exits_3(pccs: PccsStandIn, job: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    main(["attest", "collateral", "fetch", "--config", str(job), "--fmspc", "00A067110000", "--ca", "processor",
          "--at", AT])
    capsys.readouterr()

    code = main(["attest", "collateral", "show", "--config", str(job), "--at", LATE])

    out = capsys.readouterr().out
    assert code == 3
    assert "EXPIRED 0d 0h 28m ago" in out and "DOES NOT VERIFY: qe_identity.validity" in out
    assert "DOES NOT VERIFY: pck_crl.validity" in out


def test_show_reads_a_collateral_file(ra_samples: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = ra_samples / "quotes" / "sgx_v3_phala_dcap-qvl.collateral.json"

    code = main(["attest", "collateral", "show", "--collateral", str(path), "--at", AT])

    out = capsys.readouterr().out
    assert code == 0 and out.count("  verifies") == 4 and "CN=Intel SGX Root CA" in out


def test_fetch_from_a_stopped_pccs_fails_with_one_line(pccs: PccsStandIn, job: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    pccs.stop()

    code = main(["attest", "collateral", "fetch", "--config", str(job), "--fmspc", "00A067110000",
                 "--ca", "processor"])

    err = capsys.readouterr().err
    assert code == 4
    assert err.startswith("enclavefl attest: error: GET https://127.0.0.1:") and err.count("\n") == 1


def test_show_with_nothing_cached_says_so(pccs: PccsStandIn, job: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["attest", "collateral", "show", "--config", str(job)])

    assert code == 3
    assert "no collateral from https://127.0.0.1:" in capsys.readouterr().err
    assert pccs.requests == []  # show never touches the network


@pytest.mark.parametrize(("argv", "match"), [
    (["fetch", "--url", "https://pccs.example", "--config", "job.yaml", "--fmspc", "00A067110000", "--ca", "processor"],
     "exactly one of --config or --url"),
    (["fetch", "--url", "https://pccs.example"], "give --quote FILE, or --fmspc HEX"),
    (["fetch", "--url", "https://pccs.example", "--fmspc", "00A0", "--ca", "processor"], "--fmspc '00A0'"),
    (["show"], "exactly one of --config, --url or --collateral"),
])
def test_bad_arguments_exit_2_naming_the_option(argv: list[str], match: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["attest", "collateral", *argv]) == 2
    assert match in capsys.readouterr().err
