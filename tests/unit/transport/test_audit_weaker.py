"""An acceptance that relied on a weakening policy allowance is audited as such (issue: weaker verdicts)."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path

import pytest

from enclavefl.attest.policy import parse_policy
from enclavefl.attest.ratls import verify_ratls_certificate
from enclavefl.transport.attested import _proved
from enclavefl.transport.audit import AuditLog, AuditRecord

SAMPLE = Path(__file__).resolve().parents[3] / ".." / "shared" / "ra-samples" / "certs" / "ratls_cosmian_sgx_2023-05.pem"


def test_an_acceptance_without_collateral_is_audited_as_a_weaker_verdict(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if not SAMPLE.is_file():
        pytest.skip(f"shared ra-samples not found at {SAMPLE}")
    policy = parse_policy({
        "sgx_mrs": [{"mr_enclave": "b1ef922543fa54de9d45da6639713efd3386fa27553709b15a94485f9009401b",
                     "mr_signer": "c1c161d0dd996e8a9847de67ea2c00226761f7715a2c422d3012ac10795a1ef5",
                     "isv_prod_id": 1, "isv_svn": 10}],
        "allow_missing_collateral": True,
    })
    evidence = verify_ratls_certificate(SAMPLE.read_bytes(), policy=policy,
                                        at=datetime(2023, 5, 15, 9, 0, tzinfo=timezone.utc))
    audit = AuditLog(tmp_path / "audit.jsonl")

    with caplog.at_level(logging.INFO, logger="enclavefl.transport.audit"):
        audit.record(AuditRecord(node="ps", role="ps", peer="worker 'w1'", decision="accepted", reason="ok",
                                 **_proved(evidence)))  # type: ignore[arg-type]
    audit.close()

    row = json.loads((tmp_path / "audit.jsonl").read_text())
    assert row["weaker"] == ["missing_collateral"]
    assert "WEAKER VERDICT (missing_collateral)" in caplog.text


def test_closing_attested_credentials_logs_the_pending_summary_of_refusals(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from enclavefl.transport.attested import AttestedCredentials
    from tests.unit.transport.attested_server import make_sim

    sim = make_sim(tmp_path)
    audit = AuditLog(tmp_path / "audit.jsonl")
    creds = AttestedCredentials.create(sim.provider, sim.policy, node="ps", role="ps", audit=audit)
    with caplog.at_level(logging.WARNING, logger="enclavefl.transport.audit"):
        for peer in ("a", "b", "c"):
            audit.record(AuditRecord(node="ps", role="ps", peer=peer, decision="refused", reason="no", field="join"))

        creds.close()

    assert "2 more refusals" in caplog.text  # the first in full, the other two summed up at close
