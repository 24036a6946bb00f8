"""KerasTrainer and the Keras tasks: parameters by variable path, seeded local training, refusals."""

from __future__ import annotations

import logging
import math
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from enclavefl.config import JobConfig, parse_job
from enclavefl.errors import ConfigError
from enclavefl.ml import keras_trainer as keras_trainer_module
from enclavefl.ml.array_task import ArrayTask
from enclavefl.ml.datasets import ArrayDataset
from enclavefl.ml.keras_tasks import KerasTask
from enclavefl.ml.keras_trainer import KerasTrainer
from enclavefl.ml.tasks import TASKS
from enclavefl.ml.trainer import OptimizerSettings
from enclavefl.tensors import ParamSet
from enclavefl.training import FitConfig

# Imported after enclavefl.ml.keras_trainer, which defaults KERAS_BACKEND to torch before keras loads.
keras = pytest.importorskip("keras", reason="Keras 3 is not installed: pip install 'enclavefl[keras]'")


def _model(seed: int = 0, classes: int = 2) -> Any:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,), name="x")
    h = keras.layers.Dense(8, name="hidden")(inputs)
    h = keras.layers.ReLU(name="relu")(keras.layers.BatchNormalization(name="bn")(h))
    return keras.Model(inputs, keras.layers.Dense(classes, name="logits")(h))


def _data() -> ArrayDataset:
    rng = np.random.default_rng(0)
    x = rng.random((64, 4), dtype=np.float32)
    return ArrayDataset(x, (x[:, 0] > 0.5).astype(np.int64))


def _trainer(seed: int = 0) -> KerasTrainer:
    data = _data()
    return KerasTrainer(_model(seed), data, data, optimizer=OptimizerSettings("sgd", 0.9))


def _job(name: str, seed: int = 7, **params: Any) -> JobConfig:
    return parse_job({"job": {"seed": seed}, "task": {"name": name, "params": params}})


@dataclass(frozen=True)
class _AlgorithmConfig(FitConfig):
    """FitConfig with the FedProx and SCAFFOLD settings the PyTorch trainers know."""

    proximal_mu: float = 0.0
    correction: ParamSet | None = None


def test_parameters_are_every_variable_by_path_in_model_order() -> None:
    names = list(_trainer().get_parameters())
    assert names == ["hidden/kernel", "hidden/bias", "bn/gamma", "bn/beta", "bn/moving_mean",
                     "bn/moving_variance", "logits/kernel", "logits/bias"]


def test_parameters_round_trip_through_set() -> None:
    source, target = _trainer(seed=1), _trainer(seed=2)
    sent = source.get_parameters()
    assert not np.array_equal(sent["hidden/kernel"], target.get_parameters()["hidden/kernel"])
    target.set_parameters(sent)
    got = target.get_parameters()
    for name, value in sent.items():
        assert np.array_equal(got[name], value), name


def test_get_parameters_returns_copies() -> None:
    t = _trainer()
    first = t.get_parameters()
    first["logits/bias"][...] = 99.0
    assert not np.any(t.get_parameters()["logits/bias"] == 99.0)


def test_set_parameters_refuses_a_wrong_shape_and_keeps_the_model() -> None:
    t = _trainer()
    before = t.get_parameters()
    # hidden/kernel (valid, zeros) precedes logits/kernel (wrong shape) in the model.
    bad = {"hidden/kernel": np.zeros((4, 8), np.float32), "logits/kernel": np.zeros((3, 3), np.float32)}
    with pytest.raises(ValueError, match=r"logits/kernel: shape \(3, 3\) != model \(8, 2\)"):
        t.set_parameters(ParamSet((n, bad.get(n, v)) for n, v in before.items()))
    assert np.array_equal(t.get_parameters()["hidden/kernel"], before["hidden/kernel"])  # nothing was written


def test_set_parameters_refuses_a_missing_tensor() -> None:
    t = _trainer()
    partial = ParamSet((n, v) for n, v in t.get_parameters().items() if n != "bn/moving_mean")
    with pytest.raises(ValueError, match="bn/moving_mean"):
        t.set_parameters(partial)


def test_fit_reduces_the_loss_on_tiny_data() -> None:
    t = _trainer()
    before = t.evaluate()["loss"]
    result = t.fit(FitConfig(epochs=5, batch_size=8, lr=0.1, round=1, seed=3))
    assert result.num_samples == 64 and set(result.metrics) == {"loss", "accuracy"}
    assert t.evaluate()["loss"] < before


def test_same_seed_and_round_repeat_exactly() -> None:
    a, b = _trainer(), _trainer()
    ra = a.fit(FitConfig(epochs=2, batch_size=8, lr=0.1, round=3, seed=5))
    rb = b.fit(FitConfig(epochs=2, batch_size=8, lr=0.1, round=3, seed=5))
    assert ra == rb
    for name, value in a.get_parameters().items():
        assert np.array_equal(value, b.get_parameters()[name]), name


def test_another_round_shuffles_differently() -> None:
    a, b = _trainer(), _trainer()
    a.fit(FitConfig(epochs=1, batch_size=8, lr=0.1, round=3, seed=5))
    b.fit(FitConfig(epochs=1, batch_size=8, lr=0.1, round=4, seed=5))
    assert not np.array_equal(a.get_parameters()["hidden/kernel"], b.get_parameters()["hidden/kernel"])


def test_fit_moves_batchnorm_statistics() -> None:
    t = _trainer()
    t.fit(FitConfig(epochs=1, batch_size=16, lr=0.1))
    assert not np.array_equal(t.get_parameters()["bn/moving_mean"], np.zeros(8, np.float32))


def test_evaluate_of_a_zero_model_is_log_of_the_class_count() -> None:
    # Zero weights give zero logits: softmax is 1/2 per class, so the loss is ln 2 = 0.6931 for
    # every sample, and argmax ties pick class 0, so accuracy is the share of label 0: 2 of 3.
    keras.utils.set_random_seed(0)
    inputs = keras.Input((2,), name="x")
    model = keras.Model(inputs, keras.layers.Dense(2, kernel_initializer="zeros", name="logits")(inputs))
    data = ArrayDataset(np.ones((3, 2), np.float32), np.array([0, 1, 0], np.int64))
    metrics = KerasTrainer(model, None, data, eval_batch_size=2).evaluate()
    assert set(metrics) == {"loss", "accuracy"}
    assert metrics["loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert metrics["accuracy"] == pytest.approx(2 / 3)


def test_evaluate_without_data_is_empty() -> None:
    assert KerasTrainer(_model(), None).evaluate() == {}


def test_fit_without_data_is_refused() -> None:
    with pytest.raises(ValueError, match="no training data"):
        KerasTrainer(_model(), None).fit(FitConfig(epochs=1, batch_size=8, lr=0.1))


def test_diverged_training_raises() -> None:
    with pytest.raises(FloatingPointError, match="lower client.lr"):
        _trainer().fit(FitConfig(epochs=3, batch_size=8, lr=1e30))


def test_fit_refuses_a_proximal_term() -> None:
    with pytest.raises(ConfigError, match="FedProx is supported by the PyTorch trainers only"):
        _trainer().fit(_AlgorithmConfig(epochs=1, batch_size=8, lr=0.1, proximal_mu=0.01))


def test_fit_refuses_a_scaffold_correction() -> None:
    t = _trainer()
    with pytest.raises(ConfigError, match="SCAFFOLD is supported by the PyTorch trainers only"):
        t.fit(_AlgorithmConfig(epochs=1, batch_size=8, lr=0.1, correction=t.get_parameters()))


def test_fit_accepts_zero_proximal_term_and_no_correction() -> None:
    result = _trainer().fit(_AlgorithmConfig(epochs=1, batch_size=8, lr=0.1))
    assert result.num_samples == 64


def test_adam_with_weight_decay_trains() -> None:
    data = _data()
    t = KerasTrainer(_model(), data, data, optimizer=OptimizerSettings("adam", 0.0, 1e-4))
    before = t.evaluate()["loss"]
    t.fit(FitConfig(epochs=5, batch_size=8, lr=0.01))
    assert t.evaluate()["loss"] < before


def test_long_training_logs_progress(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    t = _trainer()
    with caplog.at_level(logging.INFO, logger="enclavefl.ml.keras_trainer"):
        t.fit(FitConfig(epochs=2, batch_size=16, lr=0.1, round=2))
    assert not caplog.records  # fast training stays quiet
    monkeypatch.setattr(keras_trainer_module, "PROGRESS_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="enclavefl.ml.keras_trainer"):
        t.fit(FitConfig(epochs=2, batch_size=16, lr=0.1, round=2))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 7  # every batch but the very first
    assert lines[0].startswith("training round 2: epoch 1/2, batch 2/4, mean loss ")
    assert lines[-1].startswith("training round 2: epoch 2/2, batch 4/4, mean loss ")


def test_keras_task_initial_parameters_repeat_for_a_seed() -> None:
    first = TASKS["digits-keras-resnet"](_job("digits-keras-resnet", seed=7)).initial_parameters()
    again = TASKS["digits-keras-resnet"](_job("digits-keras-resnet", seed=7)).initial_parameters()
    other = TASKS["digits-keras-resnet"](_job("digits-keras-resnet", seed=8)).initial_parameters()
    assert list(first) == list(again) and "stem_bn/moving_variance" in first
    for name, value in first.items():
        assert np.array_equal(value, again[name]), name
    assert not np.array_equal(first["stem_conv/kernel"], other["stem_conv/kernel"])


def test_digits_keras_task_shares_the_digits_mlp_split() -> None:
    keras_task = TASKS["digits-keras-resnet"](_job("digits-keras-resnet", width=4))
    mlp_task = TASKS["digits-mlp"](_job("digits-mlp"))
    assert isinstance(keras_task, KerasTask) and isinstance(mlp_task, ArrayTask)
    assert keras_task.data.test is not None and mlp_task.test is not None
    assert np.array_equal(keras_task.data.test.x, mlp_task.test.x)
    for ours, theirs in zip(keras_task.data.partition(3), mlp_task.partition(3), strict=True):
        assert np.array_equal(ours, theirs)
    assert keras_task.worker_trainer(1, 3).num_samples == len(mlp_task.partition(3)[1])


def test_digits_keras_task_trains_and_scores_images() -> None:
    task = TASKS["digits-keras-resnet"](_job("digits-keras-resnet", width=4))
    trainer, evaluator = task.worker_trainer(0, 3), task.server_evaluator()
    assert evaluator is not None
    trainer.set_parameters(task.initial_parameters())
    result = trainer.fit(FitConfig(epochs=1, batch_size=32, lr=0.05, round=1, seed=7))
    evaluator.set_parameters(trainer.get_parameters())
    assert math.isfinite(result.metrics["loss"]) and set(evaluator.evaluate()) == {"loss", "accuracy"}


def test_keras_task_width_must_be_a_positive_int() -> None:
    with pytest.raises(ConfigError, match=r"task.params.width = 0: must be >= 1"):
        TASKS["digits-keras-resnet"](_job("digits-keras-resnet", width=0))


def _write_idx(folder: Path, prefix: str, labels: list[int]) -> None:
    n = len(labels)
    pixels = np.arange(n * 784, dtype=np.uint64).astype(np.uint8).tobytes()
    (folder / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + pixels)
    (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + bytes(labels))


def test_fashion_mnist_keras_task_feeds_channels_last_images(tmp_path: Path) -> None:
    _write_idx(tmp_path, "train", [i % 10 for i in range(12)])
    _write_idx(tmp_path, "t10k", [i % 10 for i in range(4)])
    job = parse_job({"task": {"name": "fashion-mnist-keras-resnet", "data_dir": str(tmp_path), "params": {"width": 4}}})
    task = TASKS["fashion-mnist-keras-resnet"](job)
    trainer = task.worker_trainer(0, 2)
    assert trainer.num_samples == 6
    result = trainer.fit(FitConfig(epochs=1, batch_size=4, lr=0.05))
    assert math.isfinite(result.metrics["loss"])
    assert set(task.initial_parameters()) == set(trainer.get_parameters())


def test_missing_keras_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "keras", None)  # what `import keras` meets when it is not installed
    with pytest.raises(ConfigError, match=r"pip install 'enclavefl\[keras\]'"):
        keras_trainer_module.import_keras()
