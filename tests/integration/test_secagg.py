"""Secure aggregation with 10 real worker processes, simulated attestation and TLS on 127.0.0.1.

``enclavefl run`` starts the PS and 10 workers (all 10 needed: min_workers 10) and
restarts a worker that dies. A test-only environment hook
(``ENCLAVEFL_TEST_SECAGG_CRASH_AFTER_SHARE``, once per worker and round) makes named
workers SIGKILL themselves right after their shares were accepted:

- round 1: workers 7, 8 and 9 die after sharing. The 7 survivors are enough
  (10 holders per secret, t = ceil(0.67 * 10) = 7): the round completes, and the
  model equals plain FedAvg of the 7 survivors (computed here in process with the
  same partitions) within the quantization error.
- round 2: workers 3, 4, 5 and 6 die after sharing: 6 survivors are fewer than
  t = 7, so the attempt fails before any share is asked for ("no mask is
  removed") and the round is retried, with all 10 once the 4 are restarted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from enclavefl.app import simulate
from enclavefl.config import parse_job
from enclavefl.server.checkpoint import load_checkpoint
from enclavefl.tasks import load_task
from enclavefl.worker.secagg import CRASH_AFTER_SHARE_ENV, CRASH_ONCE_DIR_ENV
from tests.integration.cluster import BASE_JOB, merge

pytestmark = pytest.mark.slow

JOB = merge(BASE_JOB, {
    "job": {"rounds": 2, "workers": 10},
    "round": {"min_workers": 10, "start_window_s": 120, "update_window_s": 120, "heartbeat_s": 1,
              "worker_timeout_s": 10},
    "attestation": {"mode": "simulated"},
    "privacy": {"secure_aggregation": {"enabled": True, "stage_timeout_s": 60}},
})
STEP = 8.0 / 32767  # clip_range / (2**15 - 1): stochastic rounding errs by less than one step


def test_ten_workers_three_lost_after_sharing_then_four_lost_and_retried(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(JOB))
    out = tmp_path / "run"
    crash = "worker-7:1,worker-8:1,worker-9:1,worker-3:2,worker-4:2,worker-5:2,worker-6:2"
    markers = tmp_path / "crashed"
    markers.mkdir()
    env = dict(os.environ, **{CRASH_AFTER_SHARE_ENV: crash, CRASH_ONCE_DIR_ENV: str(markers)})
    proc = subprocess.run([sys.executable, "-m", "enclavefl", "run", str(job), "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["attempt"], r["participants"]) for r in rows] == [(1, 0, 7), (2, 1, 10)]
    assert sorted(p.name for p in markers.iterdir()) == sorted(
        ["worker-7-1", "worker-8-1", "worker-9-1", "worker-3-2", "worker-4-2", "worker-5-2", "worker-6-2"])
    ps_log = (out / "logs" / "ps.log").read_text()
    assert "round 2: 6 workers uploaded, threshold is 7: no mask is removed" in ps_log

    # The model after round 1 is FedAvg of workers 0..6 alone, within the quantization error.
    real = load_checkpoint(out / "checkpoints" / "round-000001.ckpt").params
    config = parse_job(merge(JOB, {"job": {"rounds": 1, "workers": 7}, "round": {"min_workers": 7},
                                   "privacy": {"secure_aggregation": {"enabled": False}},
                                   "attestation": {"mode": "none"}}))
    task = load_task(config)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker processes run
    try:
        plain = simulate(task, config, workers=7, out_dir=tmp_path / "plain",
                         make_trainer=lambda i, n: task.worker_trainer(i, 10)).params
    finally:
        torch.set_num_threads(threads)
    worst = max(float(np.max(np.abs(np.asarray(real[name], np.float64) - np.asarray(plain[name], np.float64))))
                for name in plain)
    initial = task.initial_parameters()
    moved = max(float(np.max(np.abs(np.asarray(real[name], np.float64) - np.asarray(initial[name], np.float64))))
                for name in plain)
    assert worst <= STEP + 1e-6, f"secure aggregate differs from FedAvg of the survivors by {worst}"
    assert moved > 10 * STEP  # the round did change the model: the comparison is not vacuous
