"""Tests for enclavefl.cluster.keyservice: the cluster key goes only to servers whose attestation passes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from enclavefl.attest.measurement import CodeMeasurement
from enclavefl.attest.providers import SimulatedProvider
from enclavefl.cluster.keyservice import KeyService, fetch_cluster_key
from enclavefl.errors import VerificationError
from enclavefl.transport.attested import AttestedCredentials
from enclavefl.transport.audit import AuditLog
from enclavefl.transport.certs import create_job_certs
from enclavefl.transport.credentials import CaCredentials
from tests.unit.transport.attested_server import Sim, make_sim

KEY = bytes(range(32))


def credentials(sim: Sim, node: str, provider: SimulatedProvider | None = None) -> AttestedCredentials:
    return AttestedCredentials.create(provider or sim.provider, sim.policy, node=node, role="ps",
                                      audit=AuditLog(None))


@pytest.fixture
def sim(tmp_path: Path) -> Sim:
    return make_sim(tmp_path)


@pytest.fixture
def service(sim: Sim) -> Iterator[KeyService]:
    made = KeyService(credentials(sim, "scheduler"), KEY, listen="127.0.0.1:0")
    yield made
    made.close()


def test_an_attested_server_gets_the_key_and_is_recorded(sim: Sim, service: KeyService) -> None:
    # Execute
    key = fetch_cluster_key(f"127.0.0.1:{service.port}", credentials(sim, "server-0"), "server-0")

    # Assert
    assert key == KEY
    grants = service.grants()
    assert [g.server_id for g in grants] == ["server-0"]
    assert grants[0].identity.evidence != "none"


def test_a_server_running_other_code_is_refused_the_key(sim: Sim, service: KeyService) -> None:
    # Prepare: the same simulated root, another code measurement than the policy allows.
    other = SimulatedProvider(sim.root, CodeMeasurement(b"\x07" * 32, 1))

    # Execute / Assert
    with pytest.raises(VerificationError, match="cluster key"):
        fetch_cluster_key(f"127.0.0.1:{service.port}", credentials(sim, "rogue", other), "rogue")
    assert service.grants() == []


def test_a_server_refuses_a_scheduler_running_other_code(sim: Sim) -> None:
    # Prepare: a scheduler whose code the server's policy does not allow.
    other = SimulatedProvider(sim.root, CodeMeasurement(b"\x07" * 32, 1))
    rogue = KeyService(credentials(sim, "rogue-scheduler", other), KEY, listen="127.0.0.1:0")

    # Execute / Assert: refused before anything is sent.
    try:
        with pytest.raises(VerificationError):
            fetch_cluster_key(f"127.0.0.1:{rogue.port}", credentials(sim, "server-0"), "server-0")
        assert rogue.grants() == []
    finally:
        rogue.close()


def test_with_attestation_off_the_job_ca_is_the_check(tmp_path: Path) -> None:
    # Prepare
    create_job_certs(tmp_path, "job", workers=1)
    ca = lambda role: CaCredentials.from_files(tmp_path / "ca.pem", tmp_path / f"{role}.pem",  # noqa: E731
                                               tmp_path / f"{role}.key")
    service = KeyService(ca("ps"), KEY, listen="127.0.0.1:0")

    # Execute
    try:
        key = fetch_cluster_key(f"127.0.0.1:{service.port}", ca("ps"), "server-0")
    finally:
        service.close()

    # Assert
    assert key == KEY
