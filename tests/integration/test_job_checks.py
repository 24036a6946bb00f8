"""Real processes: impossible settings are refused at start-up, and --resume continues the run's own configuration."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from enclavefl.config import load_job, parse_job
from tests.integration.cluster import BASE_JOB, Cluster, free_port, merge

pytestmark = pytest.mark.slow

REFUSAL_S = 30.0
"""A refusal comes before any process starts: far sooner than a round's start window (60 s here)."""


def _enclavefl(*args: str, timeout_s: float = 240) -> subprocess.CompletedProcess[str]:
    """Runs ``enclavefl ARGS``; past the timeout it is interrupted like Ctrl-C, which stops its children too."""
    env = dict(os.environ, COLUMNS="400")  # the console wraps at its width: keep each line whole
    proc = subprocess.Popen([sys.executable, "-m", "enclavefl", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"enclavefl {' '.join(args)} still ran after {timeout_s}s:\n{out}\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _rounds(run: Path) -> list[int]:
    return [json.loads(line)["round"] for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _job_file(path: Path, **sections: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(merge(BASE_JOB, sections)))
    return path


def test_run_with_fewer_workers_than_min_workers_exits_2_at_once(tmp_path: Path) -> None:
    out = tmp_path / "run"
    started = time.monotonic()

    proc = _enclavefl("run", "examples/digits/job.yaml", "--workers", "2", "--out", str(out), "--quiet",
                      timeout_s=REFUSAL_S)

    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert time.monotonic() - started < REFUSAL_S
    assert "job.workers = 2 is below round.min_workers = 3" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()  # no run directory: no process was started


def test_worker_of_fewer_than_min_workers_exits_2_at_once(make_cluster: type[Cluster]) -> None:
    # A PS address where nothing listens: a worker that is not refused at once retries it.
    c = make_cluster.create(round={"min_workers": 3})
    worker = c._spawn("worker-0", ["worker", "--config", str(c.root / "job.yaml"), "--tls-dir", str(c.root / "certs"),
                                   "--connect", f"127.0.0.1:{free_port()}", "--index", "0", "--of", "2"])

    try:
        code = worker.wait(REFUSAL_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker still ran after {REFUSAL_S}s:\n{c.log('worker-0')}")
    assert code == 2, c.log("worker-0")
    assert "--of 2 is below round.min_workers = 3" in c.log("worker-0")


def test_resume_without_a_checkpoint_is_refused(tmp_path: Path) -> None:
    job = _job_file(tmp_path / "job.yaml", job={"rounds": 1})
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(load_job(job).to_dict()))
    before = (run / "config.yaml").read_text()

    proc = _enclavefl("run", str(job), "--resume", "--out", str(run), "--quiet", timeout_s=REFUSAL_S)

    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "holds no checkpoint, so there is nothing to resume; use --resume-or-start" in proc.stderr
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]  # nothing started, nothing written
    assert (run / "config.yaml").read_text() == before


@pytest.fixture(scope="module")
def two_round_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A finished run of 2 rounds, made with `--set job.rounds=2` from a job file that says 4 rounds."""
    root = tmp_path_factory.mktemp("resume")
    job = _job_file(root / "job.yaml", job={"rounds": 4, "workers": 2}, round={"min_workers": 2})
    run = root / "run"
    proc = _enclavefl("run", str(job), "--out", str(run), "--quiet", "--set", "job.rounds=2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _rounds(run) == [1, 2]
    return job, run


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def test_resume_that_extends_the_job_continues_from_its_checkpoint(two_round_run: tuple[Path, Path],
                                                                  tmp_path: Path) -> None:
    _job, finished = two_round_run
    run = _copy(finished, tmp_path / "run")
    first_rows = (run / "metrics.jsonl").read_text().splitlines()

    proc = _enclavefl("run", "--resume", "--out", str(run), "--quiet", "--set", "job.rounds=3")

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resume: job.rounds 2 -> 3" in proc.stdout
    assert "resumed from round 2" in proc.stdout
    assert _rounds(run) == [1, 2, 3]
    assert (run / "metrics.jsonl").read_text().splitlines()[:2] == first_rows  # rounds 1-2 were not run again
    assert load_job(run / "config.yaml").job.rounds == 3


def test_a_forgotten_set_on_resume_does_not_change_the_job(two_round_run: tuple[Path, Path], tmp_path: Path) -> None:
    # The run stopped after round 1 (its round-2 checkpoint never written); the user resumes with the job
    # file (4 rounds) and without the --set that made the run 2 rounds long.
    job, finished = two_round_run
    run = _copy(finished, tmp_path / "run")
    (run / "checkpoints" / "round-000002.ckpt").unlink()
    before = (run / "config.yaml").read_text()

    proc = _enclavefl("run", str(job), "--resume", "--out", str(run), "--quiet")

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resumed from round 1" in proc.stdout
    assert f"{job} is not read" in proc.stdout
    assert _rounds(run) == [1, 2]  # still the run's 2 rounds, not the job file's 4
    assert (run / "config.yaml").read_text() == before
    assert parse_job(yaml.safe_load(before)).job.rounds == 2
