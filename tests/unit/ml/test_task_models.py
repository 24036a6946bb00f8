"""TaskModel: each built-in task's model, built from the job alone, is the model its loader trains."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from enclavefl.config import JobConfig, parse_job
from enclavefl.errors import ConfigError
from enclavefl.ml.tasks import TASKS
from enclavefl.ml.task_models import TASK_MODELS, task_model
from enclavefl.tasks import load_task
from enclavefl.tensors import ParamSet


def _idx(path: Path, magic: int, array: np.ndarray) -> None:
    path.write_bytes(struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes())


def _mnist_files(folder: Path, n: int = 6) -> None:
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        _idx(folder / f"{prefix}-images-idx3-ubyte", 2051, rng.integers(0, 256, (n, 28, 28)))
        _idx(folder / f"{prefix}-labels-idx1-ubyte", 2049, np.arange(n) % 10)


def _cifar_files(folder: Path, n: int = 4) -> None:
    rng = np.random.default_rng(1)
    for stem in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        pixels = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        (folder / f"{stem}.bin").write_bytes(np.concatenate([labels[:, None], pixels], axis=1).tobytes())


def _femnist_files(folder: Path) -> None:
    for split in ("train", "test"):
        (folder / split).mkdir()
        doc = {"users": ["w1"], "num_samples": [2], "user_data": {"w1": {"x": [[1.0] * 784] * 2, "y": [0, 61]}}}
        (folder / split / f"all_data_0_{split}.json").write_text(json.dumps(doc))


def _criteo_file(folder: Path, n: int = 40) -> None:
    rng = np.random.default_rng(2)
    lines = []
    for i in range(n):
        ints = [str(int(v)) for v in rng.integers(0, 50, size=13)]
        cats = [f"{int(v):08x}" for v in rng.integers(1, 2**32, size=26)]
        lines.append("\t".join([str(i % 2), *ints, *cats]))
    (folder / "train.txt").write_text("\n".join(lines) + "\n")


_DATA = {
    "mnist-lenet": _mnist_files,
    "fashion-mnist-resnet20": _mnist_files,
    "fashion-mnist-keras-resnet": _mnist_files,
    "cifar10-resnet20": _cifar_files,
    "femnist-lenet": _femnist_files,
    "criteo-dlrm": _criteo_file,
}
_PARAMS: dict[str, dict[str, Any]] = {"criteo-dlrm": {"table_size": 16, "embedding_dim": 4}}


def _job(name: str, data_dir: Path, **params: Any) -> JobConfig:
    task: dict[str, Any] = {"name": name, "params": {**_PARAMS.get(name, {}), **params}}
    if name in _DATA:
        _DATA[name](data_dir)
        task["data_dir"] = str(data_dir)
    return parse_job({"job": {"seed": 5}, "task": task})


def _specs(params: ParamSet) -> list[tuple[str, tuple[int, ...], str]]:
    return [(s.name, tuple(s.shape), str(s.dtype)) for s in params.specs()]


def test_every_built_in_task_has_a_model() -> None:
    assert set(TASK_MODELS) == set(TASKS)


@pytest.mark.parametrize("name", sorted(TASK_MODELS))
def test_the_model_is_the_one_the_task_trains(name: str, tmp_path: Path) -> None:
    if "keras" in name:
        pytest.importorskip("enclavefl.ml.keras_trainer").import_keras()
    config = _job(name, tmp_path)
    trained = load_task(config).initial_parameters()

    spec = task_model(config)
    model = spec.load(trained)  # the task's own parameters fit the model built without its data

    assert model is not None
    from enclavefl.ml.keras_trainer import KerasTrainer
    from enclavefl.ml.trainer import TorchTrainer

    built = (KerasTrainer(model, None) if spec.framework == "keras" else TorchTrainer(model, None)).get_parameters()
    assert _specs(built) == _specs(trained)
    assert built.equal(trained)


def test_image_tasks_name_their_classes_and_shapes(tmp_path: Path) -> None:
    mnist = task_model(parse_job({"task": {"name": "mnist-lenet"}}))
    fashion = task_model(parse_job({"task": {"name": "fashion-mnist-keras-resnet"}}))
    cifar = task_model(parse_job({"task": {"name": "cifar10-resnet20", "params": {"num_classes": 12}}}))
    femnist = task_model(parse_job({"task": {"name": "femnist-lenet"}}))

    assert mnist.image_shape == (1, 28, 28) and mnist.inputs[0].shape == (1, 28, 28) and mnist.layout == "NCHW"
    assert mnist.classes == tuple("0123456789")
    assert fashion.image_shape == (1, 28, 28) and fashion.inputs[0].shape == (28, 28, 1) and fashion.layout == "NHWC"
    assert fashion.classes[0] == "T-shirt/top" and fashion.classes[9] == "Ankle boot"
    assert cifar.classes[:2] == ("airplane", "automobile") and cifar.classes[10:] == ("10", "11")
    assert len(femnist.classes) == 62 and femnist.classes[10] == "A" and femnist.classes[36] == "a"


def test_criteo_takes_dense_and_categorical_rows() -> None:
    spec = task_model(parse_job({"task": {"name": "criteo-dlrm"}}))

    assert [(i.name, i.shape, i.dtype) for i in spec.inputs] == [("dense", (13,), "float32"),
                                                                   ("categorical", (26,), "int64")]
    assert spec.output == "probability" and spec.image_shape is None


def test_parameters_of_another_shape_are_refused_naming_the_tensor() -> None:
    trained = load_task(parse_job({"task": {"name": "digits-mlp", "params": {"hidden": [32]}}})).initial_parameters()
    spec = task_model(parse_job({"task": {"name": "digits-mlp", "params": {"hidden": [64]}}}))

    with pytest.raises(ConfigError, match=r"does not fit task digits-mlp's model: 1.weight: shape \(32, 64\)"):
        spec.load(trained)


def test_a_user_task_has_no_model_here() -> None:
    with pytest.raises(ConfigError, match="'mypkg.tasks:build' is not a built-in task"):
        task_model(parse_job({"task": {"name": "mypkg.tasks:build"}}))


def test_a_malformed_param_is_named() -> None:
    with pytest.raises(ConfigError, match=r"task.params.num_classes = 'ten'"):
        task_model(parse_job({"task": {"name": "mnist-lenet", "params": {"num_classes": "ten"}}}))
