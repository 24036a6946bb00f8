"""Policy options never drop checks silently; enclave attributes are checked as Gramine does.

Regression tests for issue 10 items 1 and 3 (attributes): ``allow_outdated_tcb`` or
``NotEvaluated`` used to make collateral optional, so real evidence without
collateral was accepted with no QE identity, revocation or TCB check.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from enclavefl.attest.pck import certificate_fingerprint
from enclavefl.attest.policy import parse_policy
from enclavefl.attest.quote import SgxAttributes, SgxReportBody
from enclavefl.attest.ratls import verify_ratls_certificate
from enclavefl.attest.verifier import verify_quote
from enclavefl.errors import ConfigError, VerificationError

AT = datetime(2025, 6, 20, tzinfo=timezone.utc)  # inside the Phala sample's chain and collateral windows
PHALA_MRS = {
    "mr_enclave": "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb",
    "mr_signer": "815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6",
    "isv_prod_id": 0,
    "isv_svn": 0,
}
SIM_MRS = {"mr_enclave": "11" * 32, "mr_signer": "22" * 32, "isv_prod_id": 0, "isv_svn": 3}
INIT, MODE64BIT, PROVISION_KEY, EINITTOKEN_KEY = 0x01, 0x04, 0x10, 0x20  # SGX ATTRIBUTES.FLAGS bits


def _phala(ra_samples: Path) -> bytes:
    return (ra_samples / "quotes" / "sgx_v3_phala_dcap-qvl.bin").read_bytes()


# -- item 1: "no collateral" is its own, explicit, weaker decision -----------------------


def test_allow_outdated_tcb_does_not_accept_real_evidence_without_collateral(ra_samples: Path) -> None:
    verification = verify_quote(_phala(ra_samples), at=AT)  # real Intel evidence, no collateral
    policy = parse_policy({"sgx_mrs": [PHALA_MRS], "allow_outdated_tcb": True})
    with pytest.raises(VerificationError) as info:
        policy.evaluate(verification, simulated=False)
    assert (info.value.field, info.value.actual) == ("tcb_status", "NotEvaluated (no collateral)")
    assert "allow_missing_collateral" in str(info.value)


def test_not_evaluated_in_accepted_tcb_statuses_is_refused_at_load() -> None:
    with pytest.raises(ConfigError, match="allow_missing_collateral"):
        parse_policy({"sgx_mrs": [PHALA_MRS], "accepted_tcb_statuses": ["UpToDate", "NotEvaluated"]})


def test_allow_missing_collateral_accepts_with_a_warning_and_a_weaker_verdict(
    ra_samples: Path, caplog: pytest.LogCaptureFixture
) -> None:
    verification = verify_quote(_phala(ra_samples), at=AT)
    assert not verification.collateral_checked
    policy = parse_policy({"sgx_mrs": [PHALA_MRS], "allow_missing_collateral": True})
    with caplog.at_level(logging.WARNING, logger="enclavefl.attest.policy"):
        weaker = policy.evaluate(verification, simulated=False)
        policy.evaluate(verification, simulated=False)
    assert weaker == ("missing_collateral",)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "WITHOUT collateral" in r.getMessage()]
    assert len(warnings) == 2  # one line on every use, not once per process


def test_evidence_with_collateral_is_not_marked_weaker(ra_samples: Path) -> None:
    from enclavefl.attest.collateral import Collateral

    collateral = Collateral.from_file(ra_samples / "quotes" / "sgx_v3_phala_dcap-qvl.collateral.json")
    verification = verify_quote(_phala(ra_samples), at=AT, collateral=collateral)
    assert verification.collateral_checked
    policy = parse_policy({
        "sgx_mrs": [PHALA_MRS], "allow_missing_collateral": True,
        "accepted_tcb_statuses": ["ConfigurationAndSWHardeningNeeded"],
        "accepted_advisories": ["INTEL-SA-00289", "INTEL-SA-00615"],
    })
    assert policy.evaluate(verification, simulated=False) == ()


def test_a_peer_accepted_without_collateral_carries_the_weaker_verdict() -> None:
    path = Path(__file__).resolve().parents[3] / ".." / "shared" / "ra-samples" / "certs" / "ratls_cosmian_sgx_2023-05.pem"
    if not path.is_file():
        pytest.skip(f"shared ra-samples not found at {path}")
    policy = parse_policy({
        "sgx_mrs": [{"mr_enclave": "b1ef922543fa54de9d45da6639713efd3386fa27553709b15a94485f9009401b",
                     "mr_signer": "c1c161d0dd996e8a9847de67ea2c00226761f7715a2c422d3012ac10795a1ef5",
                     "isv_prod_id": 1, "isv_svn": 10}],
        "allow_missing_collateral": True,
    })
    at = datetime(2023, 5, 15, 9, 0, tzinfo=timezone.utc)
    evidence = verify_ratls_certificate(path.read_bytes(), policy=policy, at=at)
    assert evidence.weaker == ("missing_collateral",)
    assert evidence.collateral_checked is False


def test_outdated_tcb_allowed_still_checks_the_qe_identity(sim_dcap: Any) -> None:
    collateral = sim_dcap.collateral(qe_identity=sim_dcap.qe_identity(mr_signer=b"\x01" * 32))
    with pytest.raises(VerificationError) as info:
        verify_quote(sim_dcap.sgx_quote(), at=AT, trusted_roots=[sim_dcap.root], collateral=collateral)
    assert info.value.field == "qe_report.mr_signer"


# -- item 3: enclave attributes (Gramine verify_quote_body_enclave_attributes) -----------------


def _sim_policy(sim_dcap: Any, **extra: Any) -> Any:
    return parse_policy({"sgx_mrs": [SIM_MRS], "trusted_root_sha256": certificate_fingerprint(sim_dcap.root), **extra})


def _with_flags(sim_dcap: Any, flags: int) -> Any:
    body = SgxReportBody(mr_enclave=b"\x11" * 32, mr_signer=b"\x22" * 32, isv_svn=3,
                         attributes=SgxAttributes(flags=flags, xfrm=0xE7), report_data=bytes(64))
    quote = sim_dcap.sgx_quote(body)
    return verify_quote(quote, at=AT, trusted_roots=[sim_dcap.root], collateral=sim_dcap.collateral())


def test_a_production_enclave_with_init_and_mode64bit_is_accepted(sim_dcap: Any) -> None:
    assert _sim_policy(sim_dcap).evaluate(_with_flags(sim_dcap, INIT | MODE64BIT), simulated=False) == ()


@pytest.mark.parametrize(
    ("flags", "bit"),
    [
        (INIT | MODE64BIT | PROVISION_KEY, "PROVISION_KEY"),
        (INIT | MODE64BIT | EINITTOKEN_KEY, "EINITTOKEN_KEY"),
        (MODE64BIT, "INIT"),
        (INIT, "MODE64BIT"),
    ],
)
def test_enclave_attributes_gramine_refuses_are_refused(sim_dcap: Any, flags: int, bit: str) -> None:
    verification = _with_flags(sim_dcap, flags)
    with pytest.raises(VerificationError) as info:
        _sim_policy(sim_dcap).evaluate(verification, simulated=False)
    assert info.value.field == "attributes.flags"
    assert bit in str(info.value.expected)
    assert info.value.actual == f"{flags:#x}"


def test_allow_provision_key_admits_a_provisioning_enclave(sim_dcap: Any) -> None:
    verification = _with_flags(sim_dcap, INIT | MODE64BIT | PROVISION_KEY)
    policy = _sim_policy(sim_dcap, allow_provision_key=True)
    assert policy.evaluate(verification, simulated=False) == ("provision_key",)
    with pytest.raises(VerificationError, match="MODE64BIT"):
        policy.evaluate(_with_flags(sim_dcap, INIT | PROVISION_KEY), simulated=False)
