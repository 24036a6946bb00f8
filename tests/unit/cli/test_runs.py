"""The run directory on resume (config.yaml is read back, only some keys may change, a checkpoint is required)
and how a completed round reads on the console."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from enclavefl.cli.runs import RESUMABLE_KEYS, plan_resume, record_config, round_line, write_config
from enclavefl.config import load_job, parse_job
from enclavefl.errors import ConfigError
from enclavefl.server.checkpoint import Checkpoint, save_checkpoint
from enclavefl.tensors import ParamSet

JOB: dict[str, Any] = {
    "job": {"name": "resume-me", "rounds": 4, "workers": 3},
    "round": {"min_workers": 3},
    "client": {"lr": 0.1},
    "attestation": {"mode": "none"},
}


def _run_dir(tmp_path: Path, *, checkpoint_round: int | None = 2) -> Path:
    """A run directory as `enclavefl run` leaves it: config.yaml and, unless None, one checkpoint."""
    run = tmp_path / "run"
    run.mkdir()
    write_config(run, parse_job(JOB))
    if checkpoint_round is not None:
        params = ParamSet({"w": np.zeros(3, dtype=np.float32)})
        save_checkpoint(run / "checkpoints", Checkpoint(round=checkpoint_round, model_version=checkpoint_round,
                                                        params=params))
    return run


def _refusal(run: Path, overrides: list[str], **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        plan_resume(run, overrides, **kwargs)
    return str(info.value)


def test_resume_reads_the_runs_config_and_its_newest_checkpoint(tmp_path: Path) -> None:
    run = _run_dir(tmp_path)

    plan = plan_resume(run, [])

    assert plan.config == parse_job(JOB)
    assert plan.changes == ()
    assert plan.checkpoint_round == 2
    assert plan.checkpoint_path == run / "checkpoints" / "round-000002.ckpt"


def test_resume_may_extend_the_job_and_reports_the_change(tmp_path: Path) -> None:
    run = _run_dir(tmp_path)

    plan = plan_resume(run, ["job.rounds=6"])

    assert plan.config.job.rounds == 6
    assert plan.changes == (("job.rounds", 4, 6),)


def test_resume_accepts_a_cloud_alias_for_an_allowed_key(tmp_path: Path) -> None:
    plan = plan_resume(_run_dir(tmp_path), ["fl_iteration_num=5"])

    assert plan.changes == (("job.rounds", 4, 5),)


@pytest.mark.parametrize("item", ["round.start_window_s=5", "round.update_window_s=7", "round.max_retries=1",
                                  "round.heartbeat_s=1", "round.worker_timeout_s=20",
                                  "transport.listen=0.0.0.0:7443"])
def test_resume_may_change_the_waiting_windows_and_the_address(tmp_path: Path, item: str) -> None:
    plan = plan_resume(_run_dir(tmp_path), [item])

    assert [key for key, _, _ in plan.changes] == [item.partition("=")[0]]
    assert plan.changes[0][0] in RESUMABLE_KEYS


def test_resume_refuses_a_change_to_what_the_job_computes_naming_the_set_and_key(tmp_path: Path) -> None:
    message = _refusal(_run_dir(tmp_path), ["job.rounds=6", "client.lr=0.5"])

    assert message.startswith("--set client.lr=0.5: client.lr cannot change when a run resumes")
    assert "has 0.1" in message and "only job.rounds, " in message


def test_resume_refuses_a_section_change_naming_the_set(tmp_path: Path) -> None:
    message = _refusal(_run_dir(tmp_path), ["server.optimizer=fedadam"])

    assert message.startswith("--set server.optimizer=fedadam: server.optimizer.")


def test_resume_refuses_another_number_of_workers(tmp_path: Path) -> None:
    # Worker i of n holds partition i of n: another n is another job.
    message = _refusal(_run_dir(tmp_path), ["job.workers=4"])

    assert message.startswith("--set job.workers=4: job.workers cannot change")


def test_resume_accepts_a_set_that_repeats_the_value_it_has(tmp_path: Path) -> None:
    plan = plan_resume(_run_dir(tmp_path), ["client.lr=0.1", "job.workers=3"])

    assert plan.changes == ()


def test_resume_blames_an_invalid_set_value_on_the_set(tmp_path: Path) -> None:
    message = _refusal(_run_dir(tmp_path), ["job.rounds=0"])

    assert message == "--set job.rounds=0: job.rounds = 0: must be >= 1"


def test_resume_without_a_checkpoint_is_refused(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, checkpoint_round=None)

    message = _refusal(run, [])

    assert "holds no checkpoint, so there is nothing to resume; use --resume-or-start" in message


def test_resume_or_start_without_a_checkpoint_starts_at_round_one(tmp_path: Path) -> None:
    plan = plan_resume(_run_dir(tmp_path, checkpoint_round=None), [], allow_start=True)

    assert plan.checkpoint_round is None and plan.checkpoint_path is None


def test_resume_without_an_earlier_run_is_refused(tmp_path: Path) -> None:
    message = _refusal(tmp_path, [])

    assert message.startswith(f"--resume: {tmp_path} holds no earlier run (config.yaml missing")


def test_resume_of_a_finished_run_says_how_to_extend_it(tmp_path: Path) -> None:
    message = _refusal(_run_dir(tmp_path, checkpoint_round=4), [])

    assert "completed all its rounds (checkpoint of round 4, job.rounds = 4); extend it with --set job.rounds=N" in message


def test_resume_does_not_write_config_yaml(tmp_path: Path) -> None:
    run = _run_dir(tmp_path)
    before = (run / "config.yaml").read_text()

    plan_resume(run, ["job.rounds=9"])

    assert (run / "config.yaml").read_text() == before  # the caller writes it, after showing the change


def test_record_config_writes_the_resolved_config_with_absolute_attestation_paths(tmp_path: Path) -> None:
    job_file = tmp_path / "deploy" / "job.yaml"
    job_file.parent.mkdir()
    job_file.write_text(yaml.safe_dump({**JOB, "attestation": {"mode": "simulated", "policy": "policy.json"}}))
    config = load_job(job_file, ["job.rounds=2"])

    path = record_config(tmp_path / "run", config, job_file)

    recorded = load_job(path)
    assert recorded.job.rounds == 2
    assert recorded.attestation.policy == str(tmp_path / "deploy" / "policy.json")


def test_record_config_leaves_the_file_it_was_read_from(tmp_path: Path) -> None:
    run = _run_dir(tmp_path)
    before = (run / "config.yaml").read_bytes()

    path = record_config(run, load_job(run / "config.yaml"), run / "config.yaml")

    assert path == run / "config.yaml" and path.read_bytes() == before


def test_record_config_refuses_to_replace_another_runs_config(tmp_path: Path) -> None:
    run = _run_dir(tmp_path)
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(JOB))

    with pytest.raises(ConfigError, match="holds the configuration of another run; continue that run with --resume"):
        record_config(run, load_job(job_file, ["job.rounds=7"]), job_file)
    assert load_job(run / "config.yaml").job.rounds == 4


def test_record_config_accepts_the_same_job_again(tmp_path: Path) -> None:
    run = _run_dir(tmp_path)
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(JOB))

    assert record_config(run, load_job(job_file), job_file) == run / "config.yaml"


def row(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"round": 1, "participants": 3, "train_loss": 0.5, "eval_loss": 0.4,
                            "eval_accuracy": 0.9, "seconds_wait": 0.0, "seconds_train": 2.0,
                            "seconds_aggregate": 0.25}
    base.update(extra)
    return base


def test_round_time_leaves_out_the_wait_for_workers_and_shows_it_apart() -> None:
    line = round_line(row(seconds_wait=12.0), 10)

    # 2.0 s training + 0.25 s aggregation = 2.2 s (rounded); the 12 s of start-up apart.
    assert line.endswith("2.2s (+12.0s waiting for workers)")


def test_short_waits_are_not_shown() -> None:
    assert round_line(row(seconds_wait=0.1), 10).endswith("eval_acc 0.900  2.2s")


def test_dropped_workers_and_rejected_updates_are_shown() -> None:
    assert round_line(row(dropped=1, rejected=2), 10).endswith("2.2s  dropped 1  rejected 2")
