"""`enclavefl run` refuses impossible jobs and bad resumes before it starts any process (called through main)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from enclavefl.cli import main
from enclavefl.cli.runs import write_config
from enclavefl.config import parse_job
from enclavefl.server.checkpoint import Checkpoint, save_checkpoint
from enclavefl.tensors import ParamSet

JOB: dict[str, Any] = {
    "job": {"name": "refused", "rounds": 4, "workers": 3},
    "round": {"min_workers": 3},
    "attestation": {"mode": "none"},
}


@pytest.fixture
def job_file(tmp_path: Path) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(JOB))
    return path


def _finished_run(tmp_path: Path, checkpoint_round: int | None) -> Path:
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    write_config(run, parse_job(JOB))
    if checkpoint_round is not None:
        params = ParamSet({"w": np.zeros(2, dtype=np.float32)})
        save_checkpoint(run / "checkpoints", Checkpoint(round=checkpoint_round, model_version=1, params=params))
    return run


def test_fewer_workers_than_min_workers_exits_2_before_making_the_run_dir(
        job_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"

    code = main(["run", str(job_file), "--workers", "2", "--out", str(out)])

    assert code == 2
    err = capsys.readouterr().err
    assert "job.workers = 2 is below round.min_workers = 3" in err
    assert not out.exists()


def test_an_empty_job_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here yet\n")

    code = main(["run", str(empty), "--out", str(tmp_path / "run")])

    assert code == 2
    assert "the job file is empty" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_job_file_is_required_without_resume(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run"]) == 2
    assert "a job file is required" in capsys.readouterr().err


def test_resume_needs_out(job_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(job_file), "--resume"]) == 2
    assert "--resume needs --out RUN_DIR" in capsys.readouterr().err


def test_resume_without_a_checkpoint_exits_2_and_leaves_the_run_alone(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _finished_run(tmp_path, checkpoint_round=None)
    before = sorted(p.name for p in run.rglob("*"))

    code = main(["run", "--resume", "--out", str(run)])

    assert code == 2
    assert "holds no checkpoint, so there is nothing to resume; use --resume-or-start" in capsys.readouterr().err
    assert sorted(p.name for p in run.rglob("*")) == before


def test_resume_refuses_a_set_that_changes_the_job(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _finished_run(tmp_path, checkpoint_round=1)
    before = (run / "config.yaml").read_text()

    code = main(["run", "--resume", "--out", str(run), "--set", "client.lr=0.5"])

    assert code == 2
    assert "--set client.lr=0.5: client.lr cannot change when a run resumes" in capsys.readouterr().err
    assert (run / "config.yaml").read_text() == before


def test_resume_refuses_another_workers_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _finished_run(tmp_path, checkpoint_round=1)

    assert main(["run", "--resume", "--out", str(run), "--workers", "4"]) == 2
    assert "job.workers cannot change when a run resumes" in capsys.readouterr().err


def test_resume_or_start_without_a_run_or_job_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--resume-or-start", "--out", str(tmp_path / "nothing")]) == 2
    assert "holds no earlier run, and no job file was given" in capsys.readouterr().err
