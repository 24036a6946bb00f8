"""End to end: `enclavefl run --servers 3` (redis-server, 3 servers, 12 workers) against the single PS."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from enclavefl.server.checkpoint import latest_checkpoint
from tests.integration.cluster import BASE_JOB, merge

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("redis-server") is None,
                       reason="redis-server is not on PATH (Debian: apt-get install redis-server; .ci/run installs it)"),
]

JOB = merge(BASE_JOB, {"job": {"name": "cluster-itest", "rounds": 3, "workers": 12, "seed": 3},
                       "round": {"min_workers": 12, "start_window_s": 180, "update_window_s": 120},
                       "cluster": {"poll_s": 0.05}})


def _run(job: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "enclavefl", "run", str(job), "--out", str(out), "--quiet", *extra],
                          capture_output=True, text=True, timeout=900)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_three_servers_and_twelve_workers_end_with_the_single_ps_model(tmp_path: Path) -> None:
    # Prepare
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(JOB))

    # Execute: the same job, seed and workers, on a cluster and on one PS.
    cluster = _run(job, tmp_path / "cluster", "--servers", "3")
    single = _run(job, tmp_path / "single")

    # Assert
    assert cluster.returncode == 0, cluster.stdout + cluster.stderr
    assert single.returncode == 0, single.stdout + single.stderr
    rows = _rows(tmp_path / "cluster" / "server-0" / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert all(r["participants"] == 12 for r in rows)
    ours = latest_checkpoint(tmp_path / "cluster" / "server-0" / "checkpoints")
    theirs = latest_checkpoint(tmp_path / "single" / "checkpoints")
    assert ours is not None and theirs is not None and ours.round == theirs.round == 3
    # FedAvg sums each update in float64 (the single PS in arrival order, the servers per server, merged in
    # server-id order): the sums differ by a few float64 roundings, far below the model's float32 rounding, so
    # the models agree bit for bit unless a value lies that close to a float32 boundary: within 1e-6 relative.
    for name, value in theirs.params.items():
        np.testing.assert_allclose(ours.params[name], value, rtol=1e-6, atol=1e-7, err_msg=name)
    # The single PS never starts Redis.
    assert not (tmp_path / "single" / "redis").exists()
    assert (tmp_path / "cluster" / "redis").is_dir()
