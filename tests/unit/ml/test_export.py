"""export_model: each format round-trips the checkpoint's tensors and the task's metadata; refusals are clear."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from enclavefl.config import JobConfig, parse_job
from enclavefl.errors import ConfigError
from enclavefl.ml.export import EXPORT_FORMAT, export_metadata, export_model, metadata_strings
from enclavefl.ml.safetensors_format import read_safetensors
from enclavefl.ml.task_models import task_model
from enclavefl.ml.trainer import TorchTrainer
from enclavefl.server.checkpoint import Checkpoint, params_digest

ONNX_READY = all(importlib.util.find_spec(p) is not None for p in ("onnx", "onnxscript"))


def _job(name: str = "mnist-lenet", **params: Any) -> JobConfig:
    return parse_job({"job": {"name": "exp", "seed": 2}, "task": {"name": name, "params": params}})


def _checkpoint(config: JobConfig, seed: int = 1) -> Checkpoint:
    torch.manual_seed(seed)
    params = TorchTrainer(task_model(config).make_model(), None).get_parameters()
    return Checkpoint(round=4, model_version=6, params=params)


def test_metadata_names_the_run_and_the_model() -> None:
    config = _job(num_classes=10)
    ckpt = _checkpoint(config)

    meta = export_metadata(config, ckpt)

    assert meta == {
        "format": EXPORT_FORMAT,
        "enclavefl_version": meta["enclavefl_version"],
        "job": "exp",
        "round": 4,
        "model_version": 6,
        "params_digest": params_digest(ckpt.params),
        "task": "mnist-lenet",
        "task_params": {"num_classes": 10},
        "framework": "pytorch",
        "inputs": [{"name": "image", "shape": [1, 28, 28], "dtype": "float32"}],
        "input_shape": [1, 28, 28],
        "layout": "NCHW",
        "classes": list("0123456789"),
        "output": "logits",
        "pixel_scale": "pixel / 255, in [0, 1]",
    }


def test_metadata_of_a_user_task_has_no_model_description() -> None:
    config = parse_job({"task": {"name": "mypkg.tasks:build", "params": {"k": 1}}})
    ckpt = _checkpoint(_job())

    meta = export_metadata(config, ckpt)

    assert meta["task"] == "mypkg.tasks:build" and meta["task_params"] == {"k": 1}
    assert "classes" not in meta and "input_shape" not in meta


def test_metadata_strings_encode_non_strings_as_json() -> None:
    assert metadata_strings({"a": "x", "b": 3, "c": [1, 28], "d": {"k": True}}) == {
        "a": "x", "b": "3", "c": "[1,28]", "d": '{"k":true}'}


def test_safetensors_export_round_trips_tensors_and_metadata(tmp_path: Path) -> None:
    config = _job()
    ckpt = _checkpoint(config)
    out = tmp_path / "model.safetensors"

    meta = export_model(config, ckpt, "safetensors", out)

    back = read_safetensors(out)
    assert sorted(back.tensors) == sorted(ckpt.params)
    for name, value in ckpt.params.items():
        np.testing.assert_array_equal(back.tensors[name], value)
        assert back.tensors[name].dtype == np.float32
    assert {k: v if k in ("format", "enclavefl_version", "job", "params_digest", "task", "layout", "output",
                          "pixel_scale", "framework") else json.loads(v) for k, v in back.metadata.items()} == meta
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temporary file left


def test_torch_export_loads_with_weights_only_into_the_task_model(tmp_path: Path) -> None:
    config = _job("fashion-mnist-resnet20")  # BatchNorm: the checkpoint has no num_batches_tracked
    ckpt = _checkpoint(config, seed=3)
    out = tmp_path / "model.pt"

    meta = export_model(config, ckpt, "torch", out)

    saved = torch.load(out, weights_only=True)
    assert saved["format"] == EXPORT_FORMAT and saved["metadata"] == meta
    assert list(saved["state_dict"]) == list(ckpt.params)
    model = task_model(config).make_model()
    model.load_state_dict(saved["state_dict"], strict=True)
    model.eval()
    x = torch.rand(2, 1, 28, 28)
    expected = task_model(config).load(ckpt.params)(x)
    torch.testing.assert_close(model(x), expected)


def test_onnx_export_refuses_a_keras_task(tmp_path: Path) -> None:
    config = _job("digits-keras-resnet")

    with pytest.raises(ConfigError, match="--format onnx exports PyTorch models; task digits-keras-resnet is a Keras"):
        export_model(config, Checkpoint(round=1, model_version=1, params=_checkpoint(_job()).params), "onnx",
                     tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_onnx_export_refuses_dlrm_and_user_tasks(tmp_path: Path) -> None:
    ckpt = _checkpoint(_job())

    with pytest.raises(ConfigError, match="cannot trace task criteo-dlrm"):
        export_model(_job("criteo-dlrm"), ckpt, "onnx", tmp_path / "m.onnx")
    with pytest.raises(ConfigError, match="'mypkg.tasks:build' is a user task"):
        export_model(parse_job({"task": {"name": "mypkg.tasks:build"}}), ckpt, "onnx", tmp_path / "m.onnx")


@pytest.mark.skipif(ONNX_READY, reason="onnx and onnxscript are installed")
def test_onnx_without_its_packages_names_the_extra(tmp_path: Path) -> None:
    config = _job()

    with pytest.raises(ConfigError, match=r"--format onnx needs the .*onnx.* not installed: pip install 'enclavefl\[export\]'"):
        export_model(config, _checkpoint(config), "onnx", tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not ONNX_READY, reason="onnx/onnxscript not installed: pip install 'enclavefl[export]'")
def test_onnx_export_computes_what_the_model_computes(tmp_path: Path) -> None:
    import onnx
    from onnx.reference import ReferenceEvaluator

    config = _job()
    ckpt = _checkpoint(config)
    out = tmp_path / "m.onnx"

    meta = export_model(config, ckpt, "onnx", out)

    model = onnx.load(str(out))
    assert {p.key: p.value for p in model.metadata_props} == metadata_strings(meta)
    assert [i.name for i in model.graph.input] == ["image"] and [o.name for o in model.graph.output] == ["logits"]
    x = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)  # another batch size than traced
    (logits,) = ReferenceEvaluator(model).run(None, {"image": x})
    expected = task_model(config).load(ckpt.params)(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_unknown_format_and_unwritable_target_are_refused(tmp_path: Path) -> None:
    config = _job()
    ckpt = _checkpoint(config)

    with pytest.raises(ConfigError, match="--format 'h5': expected one of safetensors, torch, onnx"):
        export_model(config, ckpt, "h5", tmp_path / "m.h5")
    with pytest.raises(ConfigError, match="cannot write"):
        export_model(config, ckpt, "safetensors", tmp_path / "absent" / "m.safetensors")
