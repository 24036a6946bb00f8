"""simulate() runs the real server and worker runtime in one process, and agrees with a multi-process run.

Both run the same seeded local training and sample by worker name, so every
worker computes the same update in both, and the final models are
bit-identical, on one condition: torch must use as many threads in the
simulation as in the worker processes (`enclavefl run` starts them with
OMP_NUM_THREADS=1). With two threads, torch's matrix products reduce in
another order and the models differ by about one float32 ulp (measured:
at most 1.2e-7 after 3 rounds). The PS's float64 sum does not depend on the
arrival order at float32 precision here (it could, in the last bit, only when
a float64 sum lands exactly half-way between two float32 values).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from enclavefl.app import simulate
from enclavefl.config import parse_job
from enclavefl.server.checkpoint import latest_checkpoint
from enclavefl.tasks import load_task

pytestmark = pytest.mark.slow

JOB: dict[str, Any] = {
    "job": {"name": "sim", "rounds": 3, "seed": 5, "workers": 3},
    "round": {"min_workers": 3, "start_window_s": 60, "update_window_s": 60},
    "task": {"name": "digits-mlp"},
    "client": {"epochs": 1, "batch_size": 32, "lr": 0.1, "momentum": 0.9},
    "server": {"optimizer": "fedavgm", "lr": 1.0},
    "attestation": {"mode": "none"},
}


def test_simulate_runs_100_workers_in_one_process(tmp_path: Path) -> None:
    doc = {**JOB, "job": {**JOB["job"], "workers": 100, "rounds": 4},
           "round": {"min_workers": 100, "update_window_s": 120}, "client": {**JOB["client"], "epochs": 5}}
    config = parse_job(doc)
    started = time.monotonic()
    result = simulate(load_task(config), config, workers=100, out_dir=tmp_path)

    assert [row["participants"] for row in result.history] == [100, 100, 100, 100]
    assert result.history[-1]["eval_accuracy"] > 0.5
    assert latest_checkpoint(tmp_path / "checkpoints") is not None
    assert time.monotonic() - started < 300


def test_simulate_matches_a_multi_process_run_of_the_same_job(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(JOB))
    proc = subprocess.run([sys.executable, "-m", "enclavefl", "run", str(job), "--out", str(tmp_path / "run"), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    real = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert real is not None and real.round == 3

    config = parse_job(JOB)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker processes run
    try:
        simulated = simulate(load_task(config), config, workers=3, out_dir=tmp_path / "sim").params
    finally:
        torch.set_num_threads(threads)

    assert simulated.equal(real.params)
