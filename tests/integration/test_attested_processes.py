"""Attestation with real PS and worker processes on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from enclavefl.config import parse_job
from enclavefl.transport.provisioning import prepare_simulated_attestation
from tests.integration.cluster import Cluster, free_port

REPO = Path(__file__).resolve().parents[2]
TASK = "from enclavefl.ml.tasks import load_digits_task\n\n\ndef make(config):\n    return load_digits_task(config)\n"


def audit(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def test_run_trains_end_to_end_with_simulated_attestation_by_default(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "enclavefl", "run", str(REPO / "examples" / "digits" / "job.yaml"), "--out", str(out),
         "--quiet", "--workers", "2", "--set", "job.rounds=2", "--set", "round.min_workers=2"],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SIMULATED" in proc.stdout and "NOT A REAL TEE" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and rows[-1]["eval_accuracy"] > 0.5
    records = audit(out / "audit.jsonl")
    assert sorted((r["role"], r["decision"]) for r in records) == [("ps", "accepted")] * 2 + [("worker", "accepted")] * 2
    assert all(r["simulated"] and r["note"] == "SIMULATED evidence, NOT A REAL TEE" for r in records)
    policy = json.loads((out / "attestation" / "policy.json").read_text())
    assert {r["mr_enclave"] for r in records} == {policy["sgx_mrs"][0]["mr_enclave"]}


def test_changed_worker_code_and_untrusted_ps_signer_are_refused(tmp_path: Path, make_cluster: type[Cluster],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    good, changed = tmp_path / "good", tmp_path / "changed"
    for folder, text in ((good, TASK), (changed, TASK + "# one changed line\n")):
        folder.mkdir()
        (folder / "a3task.py").write_text(text)
    root = tmp_path / "job"
    root.mkdir()
    sections = {"job": {"workers": 2}, "round": {"min_workers": 2, "start_window_s": 120},
                "task": {"name": "a3task:make"}}
    monkeypatch.syspath_prepend(str(good))
    config = parse_job({**sections, "attestation": {"mode": "simulated"}})
    sim_root, policy, _, mr_signer = prepare_simulated_attestation(root, config)
    worker_policy = json.loads((root / policy).read_text())
    worker_policy["sgx_mrs"][0]["mr_signer"] = "ab" * 32  # this worker trusts another signer only
    (root / "attestation" / "worker_policy.json").write_text(json.dumps(worker_policy))
    c = make_cluster.create(root, **sections, attestation={"mode": "simulated", "policy": policy, "sim_root": sim_root})
    port = free_port()
    monkeypatch.setenv("PYTHONPATH", str(good))
    c.start_ps(port)
    monkeypatch.setenv("PYTHONPATH", str(changed))
    bad_code = c.start_worker(0, port)
    monkeypatch.setenv("PYTHONPATH", str(good))
    distrustful = c._spawn("worker-1", ["worker", "--config", str(root / "job.yaml"), "--connect", f"127.0.0.1:{port}",
                                        "--index", "1", "--set", "attestation.policy=attestation/worker_policy.json"])
    assert bad_code.wait(120) == 3, c.log("worker-0")
    assert distrustful.wait(120) == 3, c.log("worker-1")
    # One changed line: the PS refuses, naming the field, the expected and the actual value.
    assert c.log_has("worker-0", r"mr_enclave: expected one of \[[0-9a-f]{64}\], got [0-9a-f]{64}")
    # An untrusted PS signer: the worker refuses before it sends anything.
    assert c.log_has("worker-1", f"mr_signer: expected one of \\[{'ab' * 32}\\], got {mr_signer.hex()}")
    ps_audit = audit(root / "audit.jsonl")
    assert [(r["decision"], r["field"]) for r in ps_audit] == [("refused", "mr_enclave")]
    assert "worker-0" in str(ps_audit[0]["peer"])
    assert not c.log_has("ps", "joined")
