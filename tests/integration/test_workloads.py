"""One short federated run per reference workload: `enclavefl run` on the example job, real processes.

Each run uses a tiny seeded subsample of the real data (task.params.max_train_samples)
and 2 workers, so it checks the wiring (data, model, partition table, wire, metrics),
not the accuracy; bench/workloads.py measures that.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / ".." / "shared" / "data"

CASES = {
    "criteo": ("recommendation/criteo.yaml", "criteo", 2, ["task.params.max_train_samples=1000", "task.params.table_size=5000"]),
    "femnist": ("lenet_femnist/femnist.yaml", "leaf-femnist", 1, ["task.params.max_train_samples=400", "task.params.max_eval_samples=200"]),
    "mnist": ("mnist/dirichlet.yaml", "mnist", 1, ["task.params.max_train_samples=400", "task.params.max_eval_samples=200"]),
    "fashion": ("image_classification/fashion_mnist.yaml", "fashion-mnist", 1,
                ["task.params.max_train_samples=128", "task.params.max_eval_samples=128"]),
}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.shared
@pytest.mark.parametrize("case", sorted(CASES))
def test_workload_runs_federated(case: str, tmp_path: Path) -> None:
    example, folder, rounds, extra = CASES[case]
    data_dir = DATA / folder
    if not data_dir.is_dir():
        pytest.skip(f"real data not found: {data_dir} (the shared data folder beside the repo)")
    out = tmp_path / "run"
    sets = [f"job.rounds={rounds}", "round.min_workers=2", f"task.data_dir={data_dir}", *extra]
    argv = [sys.executable, "-m", "enclavefl", "run", str(REPO / "examples" / example), "--out", str(out),
            "--quiet", "--workers", "2"]
    for item in sets:
        argv += ["--set", item]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "partition:" in proc.stdout  # the partition summary table
    assert ("final auc" if case == "criteo" else "final acc") in proc.stdout  # the run summary's score
    rows = _rows(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))
    for row in rows:
        assert row["participants"] == 2 and row["eval_accuracy"] is not None
    worker_log = (out / "logs" / "worker-0.log").read_text()
    assert "worker 0 of 2 holds" in worker_log
    if case == "criteo":
        for row in rows:
            assert 0.0 <= row["eval_auc"] <= 1.0
            # Embedding tables travel row-sparse: far below the dense cost.
            assert row["bytes_in"] * 3 < row["bytes_in_dense"], row
        # The trained model scores the Kaggle test layout (no labels) from the run directory.
        csv = tmp_path / "predictions.csv"
        proc = subprocess.run([sys.executable, "-m", "enclavefl", "predict", str(out), "--input",
                               str(data_dir / "test_sample.txt"), "--out", str(csv)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        lines = csv.read_text().splitlines()
        assert lines[0] == "Id,Predicted" and len(lines) == 1 + 1200
        assert all(0.0 < float(line.split(",")[1]) < 1.0 for line in lines[1:])
