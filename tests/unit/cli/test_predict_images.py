"""`enclavefl predict` on image tasks: IDX, .npy and folders in, one probability column per class out."""

from __future__ import annotations

import csv
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from enclavefl.cli import main
from enclavefl.config import JobConfig, parse_job
from enclavefl.ml.prediction import classify_images, softmax
from enclavefl.ml.task_models import task_model
from enclavefl.ml.trainer import TorchTrainer
from enclavefl.server.checkpoint import Checkpoint, latest_checkpoint, save_checkpoint
from enclavefl.tensors import ParamSet

JOB = {"job": {"name": "mnist-predict", "seed": 3}, "task": {"name": "mnist-lenet"}}


def _run_dir(root: Path, job: dict[str, object], params: ParamSet) -> Path:
    """A run directory as `enclavefl run` leaves it: config.yaml and checkpoints/."""
    run = root / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(parse_job(job).to_dict()))
    save_checkpoint(run / "checkpoints", Checkpoint(round=2, model_version=2, params=params))
    return run


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    torch.manual_seed(11)
    params = TorchTrainer(task_model(parse_job(JOB)).make_model(), None).get_parameters()
    return _run_dir(tmp_path, JOB, params)


def _pixels(n: int = 5) -> np.ndarray:
    return np.random.default_rng(4).integers(0, 256, (n, 28, 28)).astype(np.uint8)


def _expected(run_dir: Path, config: JobConfig, x: np.ndarray) -> np.ndarray:
    """The probabilities computed by hand: the checkpoint's LeNet, softmax of its logits."""
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    assert ckpt is not None
    model = task_model(config).load(ckpt.params)
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _read(path: Path) -> list[list[str]]:
    with path.open(newline="") as f:
        return list(csv.reader(f))


def test_idx_input_gives_a_probability_per_class(run_dir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    pixels = _pixels()
    idx = tmp_path / "t10k-images-idx3-ubyte"
    idx.write_bytes(struct.pack(">IIII", 2051, 5, 28, 28) + pixels.tobytes())
    out = tmp_path / "p.csv"

    assert main(["predict", str(run_dir), "--input", str(idx), "--out", str(out)]) == 0

    rows = _read(out)
    assert rows[0] == ["Id", *"0123456789", "Predicted"]
    assert [r[0] for r in rows[1:]] == ["0", "1", "2", "3", "4"]
    probabilities = np.array([[float(v) for v in r[1:11]] for r in rows[1:]])
    expected = _expected(run_dir, parse_job(JOB), (pixels / 255).astype(np.float32)[:, None])
    np.testing.assert_allclose(probabilities, expected, atol=1e-6)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert [r[11] for r in rows[1:]] == [str(k) for k in expected.argmax(axis=1)]
    assert "classified 5 images" in capsys.readouterr().out


def test_npy_input_numbers_rows_from_first_id(run_dir: Path, tmp_path: Path) -> None:
    x = (_pixels(3) / 255).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "p.csv"

    assert main(["predict", str(run_dir), "--input", str(tmp_path / "x.npy"), "--out", str(out),
                 "--first-id", "100"]) == 0

    rows = _read(out)
    assert [r[0] for r in rows[1:]] == ["100", "101", "102"]
    probabilities = np.array([[float(v) for v in r[1:11]] for r in rows[1:]])
    np.testing.assert_allclose(probabilities, _expected(run_dir, parse_job(JOB), x[:, None]), atol=1e-6)


def test_a_folder_of_images_is_named_by_file(run_dir: Path, tmp_path: Path) -> None:
    image = pytest.importorskip("PIL.Image", reason="Pillow is not installed (ml extra)")
    folder = tmp_path / "digits"
    folder.mkdir()
    pixels = _pixels(2)
    for i, name in enumerate(["seven.png", "one, two.png"]):
        image.fromarray(pixels[i]).save(folder / name)
    out = tmp_path / "p.csv"

    assert main(["predict", str(run_dir), "--input", str(folder), "--out", str(out)]) == 0

    rows = _read(out)
    assert [r[0] for r in rows[1:]] == ["one, two.png", "seven.png"]  # sorted; the comma is quoted
    probabilities = np.array([[float(v) for v in r[1:11]] for r in rows[1:]])
    expected = _expected(run_dir, parse_job(JOB), (pixels[::-1] / 255).astype(np.float32)[:, None])
    np.testing.assert_allclose(probabilities, expected, atol=1e-6)


def test_input_of_the_wrong_shape_exits_2_in_one_line(run_dir: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 32, 32), dtype=np.float32))
    out = tmp_path / "p.csv"

    assert main(["predict", str(run_dir), "--input", str(tmp_path / "x.npy"), "--out", str(out)]) == 2

    err = capsys.readouterr().err.strip()
    assert "shape (2, 3, 32, 32); the model takes (N, 1, 28, 28)" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_an_unknown_input_kind_exits_2(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "rows.csv").write_text("1,2\n")

    assert main(["predict", str(run_dir), "--input", str(tmp_path / "rows.csv"), "--out", str(tmp_path / "p.csv")]) == 2
    assert "not a folder of images, a .npy file nor an IDX image file" in capsys.readouterr().err


def test_a_checkpoint_of_another_model_exits_2(run_dir: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    np.save(tmp_path / "x.npy", np.zeros((1, 28, 28), dtype=np.uint8))

    code = main(["predict", str(run_dir), "--input", str(tmp_path / "x.npy"), "--out", str(tmp_path / "p.csv"),
                 "--set", "task.params.num_classes=12"])

    assert code == 2
    assert "does not fit task mnist-lenet's model: out.weight: shape (10, 84) != model (12, 84)" in capsys.readouterr().err


def test_softmax_by_hand() -> None:
    # logits [0, ln 3] -> [1/4, 3/4]; a huge logit does not overflow: [1000, 1000] -> [1/2, 1/2]
    got = softmax(np.array([[0.0, np.log(3.0)], [1000.0, 1000.0]]))
    np.testing.assert_allclose(got, [[0.25, 0.75], [0.5, 0.5]], rtol=1e-6)


def test_a_keras_task_classifies_in_its_own_layout(tmp_path: Path) -> None:
    keras_trainer = pytest.importorskip("enclavefl.ml.keras_trainer")
    keras_trainer.import_keras()
    job = {"job": {"seed": 2}, "task": {"name": "digits-keras-resnet", "params": {"width": 4}}}
    config = parse_job(job)
    spec = task_model(config)
    model = spec.make_model()
    params = keras_trainer.KerasTrainer(model, None).get_parameters()
    x = np.random.default_rng(5).random((3, 1, 8, 8), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)

    result = classify_images(config, params, tmp_path / "x.npy")

    # the Keras model takes (N, H, W, C): the same images, channels last
    logits = model(np.moveaxis(x, 1, -1), training=False).detach().numpy()  # the torch backend's tensor
    np.testing.assert_allclose(result.probabilities, softmax(logits), atol=1e-6)
    assert result.classes == tuple("0123456789") and result.names is None
