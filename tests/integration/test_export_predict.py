"""Using a run's result: `enclavefl export` and `enclavefl predict` as processes, on a run `enclavefl simulate` made."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from enclavefl.ml.safetensors_format import read_safetensors
from enclavefl.server.checkpoint import load_checkpoint, params_digest

pytestmark = pytest.mark.slow

JOB = {
    "job": {"name": "digits-export", "rounds": 2, "seed": 4, "workers": 2},
    "round": {"min_workers": 2, "update_window_s": 60},
    "task": {"name": "digits-mlp"},
    "client": {"epochs": 2, "batch_size": 32, "lr": 0.1, "momentum": 0.9},
    "attestation": {"mode": "none"},
}


def _enclavefl(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "enclavefl", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_export_and_predict_use_the_model_a_run_trained(tmp_path: Path) -> None:
    # Prepare: a 2-round run, and held-out digits as a .npy (pixels / 16, in [0, 1]) with their labels.
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(JOB))
    made = _enclavefl("simulate", "job.yaml", "--out", "run", "--quiet", cwd=tmp_path)
    assert made.returncode == 0, made.stdout + made.stderr
    run = tmp_path / "run"
    from sklearn.datasets import load_digits

    digits = load_digits()
    np.save(tmp_path / "digits.npy", (digits.data[-300:] / 16).astype(np.float32))
    labels = digits.target[-300:]

    # Execute
    safetensors = _enclavefl("export", "run", "--format", "safetensors", cwd=tmp_path)
    torch_file = _enclavefl("export", "run", "--round", "1", "--format", "torch", "--out", "r1.pt", cwd=tmp_path)
    onnx = _enclavefl("export", "run", "--format", "onnx", "--out", "model.onnx", cwd=tmp_path)
    missing = _enclavefl("export", "run", "--round", "9", "--format", "torch", cwd=tmp_path)
    predicted = _enclavefl("predict", "run", "--input", "digits.npy", "--out", "pred.csv", cwd=tmp_path)

    # Assert: the newest round's tensors and digest, exactly
    assert safetensors.returncode == 0, safetensors.stderr
    final = load_checkpoint(run / "checkpoints" / "round-000002.ckpt")
    exported = read_safetensors(run / "model-round-000002.safetensors")
    assert exported.metadata["params_digest"] == params_digest(final.params)
    assert exported.metadata["job"] == "digits-export" and exported.metadata["task"] == "digits-mlp"
    assert exported.metadata["input_shape"] == "[1,8,8]"
    for name, value in final.params.items():
        np.testing.assert_array_equal(exported.tensors[name], value)
    # round 1, still on disk, read back without unpickling arbitrary objects
    assert torch_file.returncode == 0, torch_file.stderr
    first = load_checkpoint(run / "checkpoints" / "round-000001.ckpt")
    saved = torch.load(tmp_path / "r1.pt", weights_only=True)
    assert saved["metadata"]["round"] == 1 and saved["metadata"]["params_digest"] == params_digest(first.params)
    # ONNX: written with the export extra, else refused naming it (one line, exit 2)
    if all(importlib.util.find_spec(p) is not None for p in ("onnx", "onnxscript")):
        assert onnx.returncode == 0 and (tmp_path / "model.onnx").stat().st_size > 0, onnx.stderr
    else:
        assert onnx.returncode == 2 and "pip install 'enclavefl[export]'" in onnx.stderr
        assert len(onnx.stderr.strip().splitlines()) == 1 and not (tmp_path / "model.onnx").exists()
    assert missing.returncode == 2 and "it holds rounds 1, 2" in missing.stderr
    # predict: one probability column per class, and a trained model (chance is 1 in 10)
    assert predicted.returncode == 0, predicted.stderr
    with (tmp_path / "pred.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["Id", *"0123456789", "Predicted"] and len(rows) == 301
    accuracy = np.mean([int(r[-1]) == y for r, y in zip(rows[1:], labels)])
    assert accuracy > 0.6, accuracy
