"""One short federated run per reference workload: `enclavefl run` on the example job, real processes.

Each run uses a tiny seeded subsample of the real data (task.params.max_train_samples;
CIFAR-10, absent here, is written by the test in its official layout) and 2 workers, so it checks the wiring (data, model, partition table, wire, metrics),
not the accuracy; bench/workloads.py measures that.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from enclavefl.config import load_job
from enclavefl.server.checkpoint import latest_checkpoint
from enclavefl.tasks import load_task

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


def assert_model_trained(out: Path) -> None:
    """The final global model moved away from the task's initial one: training did something."""
    config = load_job(out / "config.yaml")
    initial = load_task(config).initial_parameters()
    final = latest_checkpoint(out / config.server.checkpoint_dir)
    assert final is not None
    moved = 0.0
    for name, value in initial.items():
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            after = final.params[name]
            assert isinstance(after, np.ndarray)
            moved = max(moved, float(np.linalg.norm(after - value)) / (float(np.linalg.norm(value)) + 1e-12))
    assert moved > 1e-3, f"the global model barely moved (largest relative change {moved:.2e})"


def _run(example: str, data_dir: Path, rounds: int, extra: list[str], out: Path) -> subprocess.CompletedProcess[str]:
    sets = [f"job.rounds={rounds}", "round.min_workers=2", f"task.data_dir={data_dir}", *extra]
    argv = [sys.executable, "-m", "enclavefl", "run", str(REPO / "examples" / example), "--out", str(out),
            "--quiet", "--workers", "2"]
    for item in sets:
        argv += ["--set", item]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_cifar10_example_on_files_in_the_official_binary_layout(tmp_path: Path) -> None:
    """No CIFAR-10 here: the example job runs on random images written in the official 3073-byte records."""
    rng = np.random.default_rng(5)
    data = tmp_path / "cifar10"
    data.mkdir()
    for stem in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        records = np.concatenate([rng.integers(0, 10, (12, 1)), rng.integers(0, 256, (12, 3072))], axis=1)
        (data / f"{stem}.bin").write_bytes(records.astype(np.uint8).tobytes())
    out = tmp_path / "run"
    proc = _run("image_classification/cifar10.yaml", data, 1, [], out)
    assert "partition:" in proc.stdout and "final acc" in proc.stdout
    rows = _rows(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1] and rows[0]["participants"] == 2
    assert "worker 1 of 2 holds 30 samples" in (out / "logs" / "worker-1.log").read_text()
    assert_model_trained(out)


@pytest.mark.shared
@pytest.mark.parametrize("case", sorted(CASES))
def test_workload_runs_federated(case: str, tmp_path: Path) -> None:
    example, folder, rounds, extra = CASES[case]
    data_dir = DATA / folder
    if not data_dir.is_dir():
        pytest.skip(f"real data not found: {data_dir} (the shared data folder beside the repo)")
    out = tmp_path / "run"
    proc = _run(example, data_dir, rounds, extra, out)
    assert "partition:" in proc.stdout  # the partition summary table
    assert ("final auc" if case == "criteo" else "final acc") in proc.stdout  # the run summary's score
    rows = _rows(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))
    for row in rows:
        assert row["participants"] == 2 and row["eval_accuracy"] is not None
    worker_log = (out / "logs" / "worker-0.log").read_text()
    assert "worker 0 of 2 holds" in worker_log
    assert_model_trained(out)
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
