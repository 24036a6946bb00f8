"""``enclavefl attest``: measure, verify and init-sim-root, called through ``enclavefl.cli.main``."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest

from enclavefl.attest.measurement import measure_code
from enclavefl.attest.providers import SimulatedProvider
from enclavefl.attest.ratls import create_ratls_identity
from enclavefl.attest.simroot import SimRoot
from enclavefl.cli import main

AT = "2025-06-20T00:00:00Z"
NOT_EVALUATED = {"allow_missing_collateral": True}


def write_policy(path: Path, policy: dict[str, Any]) -> Path:
    path.write_text(json.dumps(policy))
    return path


@pytest.fixture
def sim(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[SimRoot, SimulatedProvider, Path]:
    assert main(["attest", "init-sim-root", str(tmp_path / "root"), "--name", "cli-test"]) == 0
    out = capsys.readouterr().out
    root = SimRoot.load(tmp_path / "root")
    assert root.root_fingerprint in out and "NOT A REAL TEE" in out
    provider = SimulatedProvider(root, measure_code())
    policy = write_policy(tmp_path / "policy.json", {
        "sgx_mrs": [{"mr_enclave": provider.mr_enclave.hex(), "mr_signer": provider.mr_signer.hex(),
                     "isv_prod_id": 0, "isv_svn": 0}],
        "allow_simulated": True, "simulated_root_sha256": root.root_fingerprint,
    })
    return root, provider, policy


def test_measure_prints_the_values_a_policy_needs(tmp_path: Path, sim: tuple[SimRoot, SimulatedProvider, Path],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    root, provider, _ = sim
    assert main(["attest", "measure", "--sim-root", str(tmp_path / "root")]) == 0
    out = capsys.readouterr().out
    assert provider.mr_enclave.hex() in out and provider.mr_signer.hex() in out
    assert "isv_prod_id 0" in out and "isv_svn     0" in out
    task = tmp_path / "task.py"
    task.write_text("x = 1\n")
    assert main(["attest", "measure", "--task-file", str(task)]) == 0
    assert provider.mr_enclave.hex() not in capsys.readouterr().out  # the task code is measured too


def test_init_sim_root_refuses_to_overwrite(tmp_path: Path, sim: tuple[SimRoot, SimulatedProvider, Path],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["attest", "init-sim-root", str(tmp_path / "root"), "--name", "again"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err


def test_verify_accepts_a_simulated_certificate_and_prints_its_fields(
    tmp_path: Path, sim: tuple[SimRoot, SimulatedProvider, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, provider, policy = sim
    cert = tmp_path / "node.pem"
    cert.write_bytes(create_ratls_identity(provider, common_name="node", validity=dt.timedelta(hours=1)).cert_pem)
    assert main(["attest", "verify", str(cert), "--policy", str(policy)]) == 0
    out = capsys.readouterr().out
    for text in (f"body.mr_enclave     {provider.mr_enclave.hex()}", provider.mr_signer.hex(), "body.isv_prod_id",
                 "body.isv_svn", "body.report_data", "binding             tcg-pubkey-hash", "NOT A REAL TEE",
                 "verdict             ACCEPTED"):
        assert text in out


def test_verify_refuses_other_code_naming_field_expected_and_actual(
    tmp_path: Path, sim: tuple[SimRoot, SimulatedProvider, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    root, provider, policy = sim
    task = tmp_path / "task.py"
    task.write_text("x = 2\n")
    other = SimulatedProvider(root, measure_code([task]))
    quote = tmp_path / "other.bin"
    quote.write_bytes(other.quote(bytes(64)))
    assert main(["attest", "verify", str(quote), "--policy", str(policy)]) == 3
    out = capsys.readouterr().out
    assert f"verdict             REFUSED: mr_enclave: expected one of [{provider.mr_enclave.hex()}], got {other.mr_enclave.hex()}" in out


def test_verify_rejects_a_bad_time(tmp_path: Path, sim: tuple[SimRoot, SimulatedProvider, Path],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    _, provider, policy = sim
    quote = tmp_path / "q.bin"
    quote.write_bytes(provider.quote(bytes(64)))
    assert main(["attest", "verify", str(quote), "--policy", str(policy), "--at", "yesterday"]) == 2
    assert "--at 'yesterday'" in capsys.readouterr().err


SAMPLES: dict[str, dict[str, Any]] = {
    "quotes/sgx_v3_phala_dcap-qvl.bin": {
        "policy": {"sgx_mrs": [{"mr_enclave": "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb",
                                "mr_signer": "815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6",
                                "isv_prod_id": 0, "isv_svn": 0}],
                   "accepted_tcb_statuses": ["ConfigurationAndSWHardeningNeeded"],
                   "accepted_advisories": ["INTEL-SA-00289", "INTEL-SA-00615"]},
        "collateral": "quotes/sgx_v3_phala_dcap-qvl.collateral.json", "expect": "ConfigurationAndSWHardeningNeeded",
    },
    "quotes/sgx_v3_trustee_occlum_debug.bin": {
        "policy": {"sgx_mrs": [{"mr_enclave": "8f173e4613ff05c52aaf04162d234edae8c9977eae47eb2299ae16a553011c68",
                                "mr_signer": "83d719e77deaca1470f6baf62a4d774303c899db69020f9c70ee1dfc08c7ce9e",
                                "isv_prod_id": 0, "isv_svn": 0}], "allow_debug": True, **NOT_EVALUATED},
        "expect": "debug               True",
    },
    "quotes/sgx_v3_cosmian_intel-sgx-ra.bin": {
        "policy": {"sgx_mrs": [{"mr_enclave": "e413a4ed616c7a79634d5ca05a2fda746a1f0c71349a80b25a02828846fab90e",
                                "mr_signer": "ac2c9fa87e4c91768b1d0c47169466c50d5a98c790639fbaefe7352a59919980",
                                "isv_prod_id": 1, "isv_svn": 10}], **NOT_EVALUATED},
        "expect": "body.isv_svn        10",
    },
    "quotes/tdx_v4_trustee_debug_td.bin": {
        "policy": {"mr_td": ["705ee9381b8633a9fbe532b52345e8433343d2868959f57889d84ca377c395b689cac1599ccea1b7d420483a9ce5f031"],
                   "allow_debug": True, **NOT_EVALUATED},
        "expect": "tee                 tdx",
    },
    "certs/ratls_cosmian_sgx_2023-05.pem": {
        "at": "2023-05-15T09:00:00Z",
        "policy": {"sgx_mrs": [{"mr_enclave": "b1ef922543fa54de9d45da6639713efd3386fa27553709b15a94485f9009401b",
                                "mr_signer": "c1c161d0dd996e8a9847de67ea2c00226761f7715a2c422d3012ac10795a1ef5",
                                "isv_prod_id": 1, "isv_svn": 10}], **NOT_EVALUATED},
        "expect": "binding             sec1-point-sha256",
    },
    "certs/ratls_cosmian_tdx_2023-12.pem": {
        "at": "2024-01-15T00:00:00Z",
        "policy": {"mr_td": ["5f53c3881242a5b418854923bb4adec34c72aa4b570d526179d63f9ee6e4cefb6abd4f0f35e5e6e29655a60d90bcf27f"],
                   "allow_debug": True, **NOT_EVALUATED},
        "expect": "evidence_oid        1.2.840.113741.1337.8",
    },
}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_verify_every_shared_sample(name: str, ra_samples: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    case = SAMPLES[name]
    policy = write_policy(tmp_path / "policy.json", case["policy"])
    argv = ["attest", "verify", str(ra_samples / name), "--policy", str(policy), "--at", case.get("at", AT)]
    if "collateral" in case:
        argv += ["--collateral", str(ra_samples / case["collateral"])]
    code = main(argv)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "verdict             ACCEPTED" in out and case["expect"] in out
    assert "root_sha256         44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3" in out
    strict = write_policy(tmp_path / "strict.json", {**case["policy"], "allow_debug": False, "sgx_mrs": [],
                                                     "mr_td": [], "verify_mr_enclave": False, "verify_mr_signer": False,
                                                     "verify_isv_prod_id": False, "verify_isv_svn": False,
                                                     "min_isv_svn": 11})
    strict_argv = [a if a != str(policy) else str(strict) for a in argv]
    assert main(strict_argv) == 3
    assert "verdict             REFUSED" in capsys.readouterr().out
