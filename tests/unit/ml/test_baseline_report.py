"""`enclavefl baseline` and `enclavefl report` on the bundled digits task (seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from enclavefl.cli import main
from enclavefl.cli.report_cmd import read_series
from enclavefl.errors import ConfigError

JOB = {
    "job": {"name": "digits-baseline", "rounds": 3, "seed": 2, "workers": 3},
    "task": {"name": "digits-mlp", "partition": "iid"},
    "client": {"epochs": 1, "batch_size": 32, "lr": 0.1, "momentum": 0.9},
    "attestation": {"mode": "none"},
}


def _fake_federated(run: Path) -> None:
    rows = [
        {"round": r, "eval_accuracy": 0.5 + 0.1 * r, "eval_loss": 1.0 / r, "bytes_in": 100, "bytes_in_dense": 400,
         "bytes_out": 200, "seconds_wait": 0.1, "seconds_train": 1.0, "seconds_aggregate": 0.1, "seconds_eval": 0.3}
        for r in (1, 2, 3)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_baseline_then_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(JOB))
    run = tmp_path / "run"
    assert main(["baseline", str(job), "--out", str(run), "--set", "job.rounds=4"]) == 0
    rows = [json.loads(line) for line in (run / "baseline.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert all(r["num_samples"] == 1438 for r in rows)  # the pooled 80 % of 1797 digits
    assert rows[-1]["eval_accuracy"] > 0.9  # an MLP learns digits in 4 epochs
    assert rows[-1]["seconds_total"] >= rows[0]["seconds"]
    assert "baseline round 4/4: eval_loss=" in capsys.readouterr().err  # progress, one line a round
    _fake_federated(run)
    assert main(["report", str(run)]) == 0
    report = (run / "report.md").read_text()
    assert "| run | federated | accuracy | 0.8000 | 0.8000 | 3 | 4.5 | 0.0 | 0.0 |" in report
    assert "| run | centralized | accuracy |" in report
    assert (run / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out


def test_report_prefers_auc_and_counts_dense_bytes(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"round": 1, "eval_accuracy": 0.7, "eval_auc": 0.75, "bytes_in": 10,
                                "bytes_in_dense": 1000, "bytes_out": 5}) + "\n")
    s = read_series(path, "federated")
    assert (s.metric, s.final, s.bytes_moved, s.bytes_dense) == ("auc", 0.75, 15, 1005)


def test_report_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"round": 1}\nnot json\n')
    with pytest.raises(ConfigError, match=r"metrics.jsonl:2"):
        read_series(tmp_path / "metrics.jsonl", "federated")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 2
