"""`enclavefl simulate`: a whole job in this process, called through ``enclavefl.cli.main``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from enclavefl.cli import main
from enclavefl.config import load_job
from enclavefl.server.checkpoint import latest_checkpoint

JOB = {
    "job": {"name": "digits-sim", "rounds": 5, "seed": 2, "workers": 7},
    "round": {"min_workers": 3, "update_window_s": 60},
    "task": {"name": "digits-mlp", "partition": "iid"},
    "client": {"epochs": 1, "batch_size": 32, "lr": 0.1, "momentum": 0.9},
}


@pytest.fixture
def job_file(tmp_path: Path) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(JOB))
    return path


def test_simulate_trains_and_writes_the_run_directory(job_file: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"

    code = main(["simulate", str(job_file), "--out", str(out), "--workers", "3", "--set", "job.rounds=2"])

    assert code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["participants"]) for r in rows] == [(1, 3), (2, 3)]
    assert rows[-1]["eval_accuracy"] > 0.3  # ten classes: chance is 0.1
    checkpoint = latest_checkpoint(out / "checkpoints")
    assert checkpoint is not None and checkpoint.round == 2
    assert load_job(out / "config.yaml").job.workers == 3
    assert "worker-2 round 2: trained" in (out / "logs" / "simulate.log").read_text()
    stdout = capsys.readouterr().out
    assert "in-memory simulation: no network, no TLS, no attestation" in stdout
    assert "clients on processes" in stdout
    assert "management API https://127.0.0.1:" in stdout  # as in `enclavefl run`: the job's API and dashboard
    assert "round   1/2  workers  3" in stdout and "round   2/2  workers  3" in stdout
    assert "enclavefl simulate summary" in stdout


def test_simulate_quiet_prints_no_round_lines(job_file: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["simulate", str(job_file), "--out", str(tmp_path / "run"), "--workers", "3",
                 "--set", "job.rounds=1", "--quiet", "--backend", "threads"])

    assert code == 0
    stdout = capsys.readouterr().out
    assert "round   1/1" not in stdout and "enclavefl simulate summary" in stdout


def test_a_failed_job_exits_1_with_its_reason(job_file: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    # No update arrives within a 1 ms window, and a round needs all three (too few workers is refused at start).
    code = main(["simulate", str(job_file), "--out", str(tmp_path / "run"), "--workers", "3",
                 "--set", "round.update_window_s=0.001", "--set", "round.min_updates=3",
                 "--set", "round.max_retries=0", "--backend", "threads"])

    assert code == 1
    assert "the job failed:" in capsys.readouterr().out


def test_a_used_run_directory_is_refused(job_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("")

    assert main(["simulate", str(job_file), "--out", str(out)]) == 1
    assert "already exists and is not empty" in capsys.readouterr().err


def test_clients_sets_the_number_of_clients_and_only_sampled_ones_train(job_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"

    code = main(["simulate", str(job_file), "--out", str(out), "--clients", "40", "--concurrency", "1",
                 "--set", "job.rounds=2", "--set", "round.fraction=0.1", "--set", "task.partition=iid", "--quiet"])

    assert code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["participants"] for r in rows] == [4, 4]  # ceil(0.1 x 40) sampled per round
    assert load_job(out / "config.yaml").job.workers == 40
    trained = (out / "logs" / "simulate.log").read_text().count(": trained ")
    assert trained == 8


def test_resume_continues_a_simulated_run_from_its_checkpoint(job_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["simulate", str(job_file), "--out", str(out), "--workers", "3", "--set", "job.rounds=1",
                 "--concurrency", "1", "--quiet"]) == 0

    code = main(["simulate", "--resume", "--out", str(out), "--set", "job.rounds=2", "--concurrency", "1", "--quiet"])

    assert code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    checkpoint = latest_checkpoint(out / "checkpoints")
    assert checkpoint is not None and checkpoint.round == 2


def test_resume_without_out_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--resume"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err
