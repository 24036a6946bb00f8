"""The management API of a real job: `enclavefl run` (a PS and three workers, simulated attestation) on 127.0.0.1.

One job serves every test of this module, in order: the reads, the refusals, a
settings change, a pause, and last the stop that ends it. Its rounds take tens of
milliseconds and it has far more rounds than the tests wait for: only the stop
ends it, and checkpoint_every is above its rounds, so the only checkpoint is the
one the stop writes.
"""

from __future__ import annotations

import http.client
import json
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from enclavefl.cli import main
from enclavefl.management.auth import generate_token, read_token
from enclavefl.errors import Unavailable
from enclavefl.management.client import ManagementClient
from enclavefl.management.runfiles import MANAGEMENT_FILE
from enclavefl.server.checkpoint import latest_checkpoint
from tests.integration.cluster import wait_for
from tests.integration.processes import children_of, kill_all

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
JOB = ["--workers", "3", "--set", "round.min_workers=2", "--set", "job.rounds=100000",
       "--set", "server.checkpoint_every=100000"]


@dataclass
class Run:
    proc: subprocess.Popen[bytes]
    out: Path
    console: Path
    client: ManagementClient

    def rows(self) -> list[dict[str, Any]]:
        path = self.out / "metrics.jsonl"
        text = path.read_text() if path.exists() else ""
        return [json.loads(line) for line in text.splitlines() if line.endswith("}")]

    def rounds_done(self) -> int:
        return int(self.client.get("/api/v1/status")["rounds_done"])

    def raw(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> int:
        url = self.client.url.removeprefix("https://")
        host, _, port = url.rpartition(":")
        info = json.loads((self.out / MANAGEMENT_FILE).read_text())
        context = ssl.create_default_context(cafile=str(self.out / info["ca"]))
        conn = http.client.HTTPSConnection(host, int(port), context=context, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    root = tmp_path_factory.mktemp("management")
    out, console = root / "run", root / "console.txt"
    with console.open("wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "enclavefl", "run", str(REPO / "examples" / "digits" / "job.yaml"),
                                 "--out", str(out), "--quiet", *JOB], stdout=f, stderr=subprocess.STDOUT)
    children = []
    try:
        wait_for(lambda: (out / MANAGEMENT_FILE).exists() or proc.poll() is not None, 120, "the management API")
        children = children_of(proc.pid)
        assert proc.poll() is None, console.read_text()
        client = ManagementClient.for_run(out)
        wait_for(lambda: client.get("/api/v1/status")["workers_joined"] == 3 and len(Run(proc, out, console, client)
                                                                                     .rows()) >= 2,
                 120, "three workers and two rounds")
        yield Run(proc, out, console, client)
    finally:
        proc.kill()
        proc.wait(10)
        kill_all(children)  # a PS stuck after a failed test must not outlive it


def test_run_prints_the_management_url(run: Run) -> None:
    url = run.client.url

    assert f"management API {url} (token in {run.out / 'management.token'})" in run.console.read_text()


def test_status_and_workers_report_the_live_round_and_attested_identities(run: Run) -> None:
    before = run.rows()[-1]["round"]

    status = run.client.get("/api/v1/status")
    workers = run.client.get("/api/v1/workers")

    assert status["job"] == "digits" and status["state"] == "running"
    assert status["round"] > before and status["rounds_done"] >= before
    assert status["attestation_mode"] == "simulated"
    assert sorted(w["name"] for w in workers) == ["worker-0", "worker-1", "worker-2"]
    for w in workers:
        assert w["state"] in ("joined", "training", "uploaded")
        assert w["identity"]["evidence"] == "simulated"
        assert len(w["identity"]["mr_enclave"]) == 64 and w["identity"]["mr_signer"]


def test_cloud_state_lists_the_ps_as_server_and_the_workers(run: Run) -> None:
    state = run.client.get("/state")

    assert state["code"] == "0" and state["cluster_state"] == "CLUSTER_READY"
    roles = sorted(node["role"] for node in state["nodes"])
    assert roles == ["SERVER", "WORKER", "WORKER", "WORKER"]
    server = next(node for node in state["nodes"] if node["role"] == "SERVER")
    assert server["tcp_address"] == f"127.0.0.1:{(run.out / 'ps.port').read_text()}"


CONTROL = [("POST", "/api/v1/stop", b'{"mode": "abort"}'), ("POST", "/api/v1/pause", None),
           ("POST", "/api/v1/resume", None), ("PATCH", "/api/v1/config", b'{"job.rounds": 1}'),
           ("POST", "/newInstance", b'{"fl_iteration_num": 1}'), ("POST", "/disableFLS", None),
           ("POST", "/enableFLS", None)]


def test_control_routes_refuse_missing_and_foreign_tokens_and_the_job_goes_on(run: Run) -> None:
    settings = run.client.get("/api/v1/config")
    done = run.rounds_done()
    foreign = {"Authorization": f"Bearer {generate_token()}", "Content-Type": "application/json"}

    missing = [run.raw(m, p, b, {"Content-Type": "application/json"}) for m, p, b in CONTROL]
    wrong = [run.raw(m, p, b, foreign) for m, p, b in CONTROL]

    assert missing == [401] * len(CONTROL) and wrong == [401] * len(CONTROL)
    assert run.client.get("/api/v1/config") == settings
    wait_for(lambda: run.rounds_done() > done + 2, 30, "rounds to go on")
    audit = [json.loads(line) for line in (run.out / "audit.jsonl").read_text().splitlines()]
    assert any(r["role"] == "management" and r["decision"] == "refused" for r in audit)


def test_oversized_and_malformed_bodies_are_refused_and_the_job_goes_on(run: Run) -> None:
    settings = run.client.get("/api/v1/config")
    done = run.rounds_done()
    headers = {"Authorization": f"Bearer {read_token(run.out / 'management.token')}",
               "Content-Type": "application/json"}

    statuses = [
        run.raw("PATCH", "/api/v1/config", json.dumps({"round.fraction": 0.5, "x": "y" * 100_000}).encode(), headers),
        run.raw("PATCH", "/api/v1/config", b'{"round.fraction": ', headers),
        run.raw("PATCH", "/api/v1/config", b'{"round.fraction": "half"}', headers),
        run.raw("POST", "/api/v1/stop", b'{"mode": "now"}', headers),
        run.raw("POST", "/newInstance", b"\xff\xfe", headers),
    ]

    assert statuses == [413, 422, 422, 422, 400]
    assert run.client.get("/api/v1/config") == settings
    assert run.client.get("/api/v1/status")["state"] == "running"
    wait_for(lambda: run.rounds_done() > done + 2, 30, "rounds to go on")


def test_a_patched_fraction_applies_from_the_next_round(run: Run) -> None:
    # 3 workers: fraction 1.0 samples 3; fraction 0.34 samples ceil(0.34 * 3) = 2 (round.min_workers is 2).
    assert all(row["sampled"] == 3 for row in run.rows()[-3:])

    after = run.client.patch("/api/v1/config", {"round": {"fraction": 0.34}})
    patched_at = run.rounds_done()

    assert after["round.fraction"] == 0.34
    # The round open during the PATCH keeps its sample; every round opened after it samples 2.
    wait_for(lambda: run.rows()[-1]["round"] >= patched_at + 4, 30, "rounds after the change")
    later = [row for row in run.rows() if row["round"] > patched_at + 1]
    assert later and all(row["sampled"] == 2 for row in later), [(r["round"], r["sampled"]) for r in later]


def test_pause_holds_rounds_and_resume_continues(run: Run) -> None:
    assert run.client.post("/api/v1/pause") == {"paused": True, "changed": True}
    time.sleep(0.5)  # the round open at the pause may still complete
    held = run.rounds_done()

    time.sleep(1.5)  # dozens of rounds' time

    status = run.client.get("/api/v1/status")
    assert status["state"] == "paused" and status["rounds_done"] == held
    assert run.client.get("/state")["cluster_state"] == "CLUSTER_DISABLE"
    assert run.client.post("/api/v1/resume") == {"paused": False, "changed": True}
    wait_for(lambda: run.rounds_done() > held + 2, 30, "rounds after the resume")


def test_the_cli_shows_the_status_of_the_run(run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["status", str(run.out), "--json"])

    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["status"]["state"] == "running" and len(doc["workers"]) == 3


def test_stop_finishes_the_job_cleanly_with_a_checkpoint(run: Run) -> None:
    answer = run.client.post("/api/v1/stop", {"mode": "finish"})

    assert answer == {"stopping": True, "mode": "finish"}
    assert run.proc.wait(60) == 0, run.console.read_text()
    checkpoint = latest_checkpoint(run.out / "checkpoints")
    assert checkpoint is not None and checkpoint.round == run.rows()[-1]["round"]
    assert not (run.out / MANAGEMENT_FILE).exists()
    with pytest.raises(Unavailable):
        run.client.get("/api/v1/status")
