"""TorchTrainer: the shared minibatch loop's reproducibility and its progress lines on long local training."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from enclavefl.ml import trainer as trainer_module
from enclavefl.ml.datasets import ArrayDataset
from enclavefl.ml.models import mlp
from enclavefl.ml.trainer import OptimizerSettings, TorchTrainer
from enclavefl.training import FitConfig


def _trainer() -> TorchTrainer:
    import torch

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.random((64, 8), dtype=np.float32)
    y = (x[:, 0] > 0.5).astype(np.int64)
    return TorchTrainer(mlp(8, (16,), 2), ArrayDataset(x, y), ArrayDataset(x, y), optimizer=OptimizerSettings("sgd", 0.9))


def test_same_seed_and_round_repeat_exactly() -> None:
    a, b = _trainer(), _trainer()
    ra = a.fit(FitConfig(epochs=2, batch_size=8, lr=0.1, round=3, seed=5))
    rb = b.fit(FitConfig(epochs=2, batch_size=8, lr=0.1, round=3, seed=5))
    assert ra.metrics == rb.metrics and ra.num_samples == 64
    for name, value in a.get_parameters().items():
        assert np.array_equal(value, b.get_parameters()[name])


def test_long_training_logs_progress(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    t = _trainer()
    with caplog.at_level(logging.INFO, logger="enclavefl.ml.trainer"):
        t.fit(FitConfig(epochs=2, batch_size=16, lr=0.1, round=2))
    assert not caplog.records  # fast training stays quiet
    monkeypatch.setattr(trainer_module, "PROGRESS_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="enclavefl.ml.trainer"):
        t.fit(FitConfig(epochs=2, batch_size=16, lr=0.1, round=2))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 7  # every batch but the very first
    assert lines[0].startswith("training round 2: epoch 1/2, batch 2/4, mean loss ")
    assert lines[-1].startswith("training round 2: epoch 2/2, batch 4/4, mean loss ")
