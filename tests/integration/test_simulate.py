"""simulate() runs the real server in one process, and agrees with a multi-process run on every backend.

Both run the same seeded local training and sample by worker name, so every
worker computes the same update in both, and the final models are
bit-identical, on one condition: torch must use as many threads in the
simulation as in the worker processes (`enclavefl run` starts them with
OMP_NUM_THREADS=1). With two threads, torch's matrix products reduce in
another order and the models differ by about one float32 ulp (measured:
at most 1.2e-7 after 3 rounds). The PS's float64 sum does not depend on the
arrival order at float32 precision here (it could, in the last bit, only when
a float64 sum lands exactly half-way between two float32 values).

The same holds for the pool backends, whose clients train in processes of
their own (a local process pool, Ray actors) with one thread each: the stated
tolerance is bit-identity, measured so on every backend.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from enclavefl.app import simulate
from enclavefl.config import parse_job
from enclavefl.server.checkpoint import Checkpoint, latest_checkpoint
from enclavefl.simulation import ClientPool, ProcessPool, RayPool, TaskTrainers
from enclavefl.tasks import load_task
from enclavefl.tensors import ParamSet

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


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    """The job's final checkpoint from ``enclavefl run``: a PS and three worker processes."""
    tmp_path = tmp_path_factory.mktemp("real")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(JOB))
    proc = subprocess.run([sys.executable, "-m", "enclavefl", "run", str(job), "--out", str(tmp_path / "run"), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    real = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert real is not None and real.round == 3
    return real


@pytest.fixture
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker processes run
    yield
    torch.set_num_threads(threads)


def simulated(out_dir: Path, pool: ClientPool | None = None) -> ParamSet:
    config = parse_job(JOB)
    return simulate(load_task(config), config, workers=3, out_dir=out_dir, pool=pool).params


def test_simulate_matches_a_multi_process_run_of_the_same_job(real_run: Checkpoint, one_thread: None,
                                                               tmp_path: Path) -> None:
    assert simulated(tmp_path).equal(real_run.params)


def test_the_process_pool_matches_a_multi_process_run_of_the_same_job(real_run: Checkpoint, tmp_path: Path) -> None:
    config = parse_job(JOB)
    pool = ProcessPool(config, TaskTrainers(config), processes=2)
    try:
        params = simulated(tmp_path, pool)
    finally:
        pool.close()

    assert params.equal(real_run.params)


@pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                    reason="Ray is not installed (pip install 'enclavefl[simulation]')")
def test_ray_actors_match_a_multi_process_run_of_the_same_job(real_run: Checkpoint, tmp_path: Path) -> None:
    config = parse_job(JOB)
    pool = RayPool(config, TaskTrainers(config), actors=2)
    try:
        params = simulated(tmp_path, pool)
    finally:
        pool.close()

    assert params.equal(real_run.params)
