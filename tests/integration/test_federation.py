"""End to end: real PS and worker processes, real gRPC over mutual TLS on 127.0.0.1."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from enclavefl.server.checkpoint import latest_checkpoint, load_checkpoint, params_digest
from enclavefl.server.metrics import REQUIRED_KEYS
from tests.integration.cluster import Cluster, free_port, wait_for

pytestmark = pytest.mark.slow


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_run_trains_three_rounds_with_three_workers(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(Path("examples/digits/job.yaml").read_text())
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "enclavefl", "run", str(job), "--out", str(out), "--quiet", "--set", "job.rounds=3"],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert str(out) in proc.stdout
    rows = _rows(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert set(REQUIRED_KEYS) <= set(row)
        assert row["participants"] == 3
        assert row["bytes_in"] > 0 and row["bytes_out"] > 0
    assert rows[-1]["eval_accuracy"] > 0.8
    assert latest_checkpoint(out / "checkpoints") is not None
    assert (out / "config.yaml").is_file()
    assert {p.name for p in (out / "logs").iterdir()} >= {"ps.log", "worker-0.log", "worker-1.log", "worker-2.log"}


def test_round_closes_by_window_after_a_worker_is_killed(make_cluster: type[Cluster]) -> None:
    # Long local training so that the kill lands while the round is open; two
    # workers are enough to go on once the third is gone.
    c = make_cluster.create(client={"epochs": 60}, round={"update_window_s": 6, "min_workers": 2}, job={"rounds": 3})
    port = free_port()
    c.start_ps(port)
    for i in range(3):
        c.start_worker(i, port)
    wait_for(lambda: c.log_has("worker-2", r"worker-2 round [2-9]: training"), 120, "worker-2 to train in round 2+")
    victim = c.procs.pop("worker-2")
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    killed_round = max(int(r) for r in re.findall(r"worker-2 round (\d+): training", c.log("worker-2")))
    codes = c.wait_all(180)
    assert codes == {"ps": 0, "worker-0": 0, "worker-1": 0}, c.log("ps")
    rows = _rows(c.root / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2, 3]
    row = rows[killed_round - 1]
    assert row["participants"] == row["sampled"] - 1
    assert c.log_has("ps", rf"round {killed_round}: closed by its window with {row['participants']} of {row['sampled']} updates")


def test_ps_killed_after_round_two_resumes_at_round_three(make_cluster: type[Cluster]) -> None:
    c = make_cluster.create(client={"epochs": 40}, job={"rounds": 5}, server={"checkpoint_every": 2})
    port = free_port()
    ps = c.start_ps(port)
    for i in range(3):
        c.start_worker(i, port)
    ckpt2 = c.root / "checkpoints" / "round-000002.ckpt"
    wait_for(ckpt2.exists, 120, "the round-2 checkpoint")
    ps.send_signal(signal.SIGKILL)
    ps.wait(10)
    saved = load_checkpoint(ckpt2)
    digest = params_digest(saved.params)
    assert latest_checkpoint(c.root / "checkpoints").round == 2  # type: ignore[union-attr]

    c.start_ps(port, resume=True)
    codes = c.wait_all(240)
    assert set(codes.values()) == {0}, c.log("ps")
    log = c.log("ps")
    assert re.search(rf"resumed from .*round-000002\.ckpt: next round 3, model version 2, digest {digest[:16]}", log)
    assert re.search(rf"round 3: opened \(attempt 0\), model version 2 digest {digest[:16]}", log)
    rows = _rows(c.root / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[:2] == saved.history
