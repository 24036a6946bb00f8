"""What a node's credentials say about who it is: the attested identity of a joining worker and of the node itself,
and the audit log's listeners (the PS's management plane hears every trust decision through them)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from enclavefl.config import parse_job
from enclavefl.server.ps import ParameterServer
from enclavefl.tensors import ParamSet
from enclavefl.transport.attested import AttestedCredentials
from enclavefl.transport.audit import AuditLog, AuditRecord
from enclavefl.transport.certs import make_ca, make_node_cert
from enclavefl.transport.credentials import CaCredentials, cert_fingerprint
from tests.unit.transport.attested_server import Sim, make_sim


def _sha256_der(cert_pem: bytes) -> bytes:
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).digest()


def _pair(tmp_path: Path) -> tuple[Sim, AttestedCredentials, AttestedCredentials, AuditLog]:
    sim = make_sim(tmp_path)
    audit = AuditLog()
    ps = AttestedCredentials.create(sim.provider, sim.policy, node="ps", role="ps", audit=audit)
    worker = AttestedCredentials.create(sim.provider, sim.policy, node="worker-0", role="worker", audit=AuditLog())
    return sim, ps, worker, audit


def test_an_admitted_worker_carries_what_its_evidence_proved(tmp_path: Path) -> None:
    sim, ps, worker, _ = _pair(tmp_path)
    proof = worker.prove_join(ps.issue_challenge("c1"), _sha256_der(ps.certificate_pem), "worker-0")

    peer, _ = ps.admit(proof, "worker-0", None, "c1")

    assert peer.fingerprint == cert_fingerprint(worker.certificate_pem)
    assert (peer.evidence, peer.measurement, peer.mr_signer) == (
        "simulated", sim.provider.mr_enclave.hex(), sim.provider.mr_signer.hex())
    assert (peer.isv_prod_id, peer.isv_svn, peer.tcb_status, peer.advisories, peer.weaker) == (0, 0, None, (), ())


def test_attested_credentials_name_their_own_evidence(tmp_path: Path) -> None:
    sim, ps, _, _ = _pair(tmp_path)

    own = ps.own_identity()

    assert own.fingerprint == cert_fingerprint(ps.certificate_pem)
    assert (own.evidence, own.measurement, own.mr_signer, own.isv_prod_id, own.isv_svn) == (
        "simulated", sim.provider.mr_enclave.hex(), sim.provider.mr_signer.hex(), 0, 0)
    assert own.tcb_status is None


def test_ca_credentials_prove_no_code_identity() -> None:
    ca_cert, ca_key = make_ca("identity")
    node = make_node_cert(ca_cert, ca_key, "enclavefl ps", server_names=("enclavefl-ps",))
    creds = CaCredentials(ca_cert.public_bytes(serialization.Encoding.PEM), node.cert_pem, node.key_pem)

    own = creds.own_identity()

    assert (own.evidence, own.measurement, own.label) == ("none", "", "enclavefl ps")
    assert own.fingerprint == cert_fingerprint(node.cert_pem)
    assert creds.audit_log is None


def test_audit_listeners_hear_every_decision_even_after_one_fails(caplog: pytest.LogCaptureFixture) -> None:
    audit = AuditLog()
    heard: list[str] = []

    def broken(entry: AuditRecord) -> None:
        raise RuntimeError("listener bug")

    audit.subscribe(broken)
    audit.subscribe(lambda entry: heard.append(f"{entry.decision} {entry.peer}"))
    with caplog.at_level(logging.ERROR, logger="enclavefl.transport.audit"):
        audit.record(AuditRecord(node="ps", role="ps", peer="w1", decision="accepted", reason="ok"))
        audit.record(AuditRecord(node="ps", role="ps", peer="w2", decision="refused", reason="no", field="join"))

    assert heard == ["accepted w1", "refused w2"]
    assert caplog.text.count("a listener failed") == 2


def test_the_ps_handle_shows_its_identity_and_publishes_attestation_decisions(tmp_path: Path) -> None:
    sim, ps_creds, worker, _ = _pair(tmp_path)
    config = parse_job({"job": {"rounds": 1}, "attestation": {"mode": "simulated"}})
    ps = ParameterServer(config, ParamSet({"w": np.zeros(2, dtype=np.float32)}), out_dir=tmp_path / "run")
    handle = ps.handle()
    proof = worker.prove_join(ps_creds.issue_challenge("c1"), _sha256_der(ps_creds.certificate_pem), "worker-0")

    handle.connect_credentials(ps_creds)
    ps_creds.admit(proof, "worker-0", None, "c1")
    status = handle.status()
    events = [dict(e.data) for e in handle.events.read(0).events if e.kind == "attestation"]

    assert (status.attestation_mode, status.identity.evidence) == ("simulated", "simulated")
    assert status.identity.mr_enclave == sim.provider.mr_enclave.hex()
    assert status.identity.fingerprint == cert_fingerprint(ps_creds.certificate_pem)
    assert [(e["decision"], e["evidence"], e["mr_enclave"]) for e in events] == [
        ("accepted", "simulated", sim.provider.mr_enclave.hex())]
    assert events[0]["peer"].startswith("worker 'worker-0'")
