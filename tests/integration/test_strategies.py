"""Strategies end to end: real PS and worker processes over mutual TLS on 127.0.0.1.

One short digits job per strategy part (FedAdam, SCAFFOLD, trimmed mean, async):
each must train (accuracy well above chance and rising), record what it did in
metrics.jsonl, and checkpoint its state.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from enclavefl.server.checkpoint import latest_checkpoint

pytestmark = pytest.mark.slow

BASE: dict[str, Any] = {
    "job": {"name": "strategies", "rounds": 3, "seed": 4, "workers": 3},
    "round": {"min_workers": 3, "start_window_s": 60, "update_window_s": 60},
    "task": {"name": "digits-mlp"},
    "client": {"epochs": 1, "batch_size": 32, "lr": 0.1, "momentum": 0.9},
    "attestation": {"mode": "none"},
}

CASES: dict[str, dict[str, Any]] = {
    "fedadam": {"server": {"optimizer": "fedadam", "lr": 0.05}},
    "scaffold": {"server": {"strategy": "scaffold"}, "client": {"epochs": 2, "batch_size": 32, "lr": 0.2, "momentum": 0.0}},
    "trimmed_mean": {"server": {"aggregator": {"name": "trimmed_mean", "trim_ratio": 0.34}}},
    "async": {"job": {"rounds": 6}, "round": {"mode": "async", "min_workers": 3, "buffer_size": 2, "max_staleness": 4}},
}


def run_job(tmp_path: Path, extra: dict[str, Any]) -> list[dict[str, Any]]:
    doc = {k: dict(v) for k, v in BASE.items()}
    for section, values in extra.items():
        doc.setdefault(section, {}).update(values)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "enclavefl", "run", str(job), "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("case", sorted(CASES))
def test_strategy_trains_with_real_processes(tmp_path: Path, case: str) -> None:
    rows = run_job(tmp_path, CASES[case])
    rounds = CASES[case].get("job", {}).get("rounds", BASE["job"]["rounds"])

    assert [r["round"] for r in rows] == list(range(1, rounds + 1))
    assert rows[-1]["eval_accuracy"] > 0.8, rows
    assert rows[-1]["eval_accuracy"] > rows[0]["eval_accuracy"] or rows[0]["eval_accuracy"] > 0.9
    ckpt = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert ckpt is not None and ckpt.round == rounds
    if case == "fedadam":
        assert ckpt.parts["optimizer"].meta["step"] == rounds
        assert any(name.startswith("v/") for name in ckpt.parts["optimizer"].tensors)
    if case == "scaffold":
        control = ckpt.parts["algorithm"].tensors
        assert len(control) and any(float(abs(v).max()) > 0 for v in control.values())  # type: ignore[union-attr]
    if case == "async":
        # One server step per 2 updates; a fast worker may send both.
        assert all(r["mode"] == "async" and r["updates"] == 2 and 1 <= r["participants"] <= 2 for r in rows)
        assert all(0 <= r["staleness_mean"] <= r["staleness_max"] <= 4 for r in rows)
        assert [r["model_version"] for r in rows] == list(range(1, rounds + 1))
