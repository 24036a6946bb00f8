"""`enclavefl predict`: a run's checkpoint scores a Criteo file in either layout (hand-made files, no processes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from enclavefl.cli import main
from enclavefl.cli.predict_cmd import resolve_model
from enclavefl.config import parse_job
from enclavefl.errors import ConfigError, DataError
from enclavefl.ml.datasets import load_criteo
from enclavefl.ml.dlrm_trainer import DlrmTrainer, binary_auc
from enclavefl.ml import prediction
from enclavefl.ml.prediction import criteo_file_has_labels, predict_criteo_dlrm
from enclavefl.ml.workloads import DlrmShape
from enclavefl.server.checkpoint import Checkpoint, latest_checkpoint, save_checkpoint
from enclavefl.tensors import ParamSet

JOB = {
    "job": {"name": "criteo-predict", "seed": 4},
    "task": {"name": "criteo-dlrm", "data_dir": ".", "params": {"table_size": 64, "embedding_dim": 4}},
}


def _rows(n: int, labelled: bool, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        ints = [str(int(v)) if v >= 0 else "" for v in rng.integers(-1, 50, size=13)]
        cats = [f"{int(v):08x}" if v else "" for v in rng.integers(0, 2**32, size=26)]
        lines.append("\t".join(([str(i % 2)] if labelled else []) + ints + cats))
    return "\n".join(lines) + "\n"


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    """A run directory as `enclavefl run` leaves it: config.yaml and checkpoints/."""
    run = tmp_path / "run"
    run.mkdir()
    config = parse_job(JOB)
    (run / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    params = DlrmTrainer(DlrmShape.from_config(config).build(7), None).get_parameters()
    save_checkpoint(run / "checkpoints", Checkpoint(round=3, model_version=3, params=params))
    return run


def _checkpoint_params(run_dir: Path) -> ParamSet:
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    assert ckpt is not None
    return ckpt.params


def test_layout_detection(tmp_path: Path) -> None:
    train, test, odd = tmp_path / "train.txt", tmp_path / "test.txt", tmp_path / "odd.txt"
    train.write_text(_rows(2, True))
    test.write_text(_rows(2, False))
    odd.write_text("1\t2\t3\n")
    assert criteo_file_has_labels(train) and not criteo_file_has_labels(test)
    with pytest.raises(DataError, match=r"odd.txt:1: 3 tab-separated fields; a Criteo file has 40 .* or 39"):
        criteo_file_has_labels(odd)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty file"):
        criteo_file_has_labels(tmp_path / "empty.txt")


def test_predict_writes_kaggle_csv_matching_the_model(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    test = tmp_path / "test.txt"
    test.write_text(_rows(30, False))
    out = tmp_path / "pred.csv"
    assert main(["predict", str(run_dir), "--input", str(test), "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "Id,Predicted" and len(lines) == 31
    ids = [int(line.split(",")[0]) for line in lines[1:]]
    scores = np.array([float(line.split(",")[1]) for line in lines[1:]])
    assert ids == list(range(60_000_000, 60_000_030))
    # the same numbers as the model from the checkpoint, scored directly
    config = parse_job(JOB)
    trainer = DlrmTrainer(DlrmShape.from_config(config).build(0), None)
    trainer.set_parameters(_checkpoint_params(run_dir))
    expected = trainer.predict(load_criteo(test, table_size=64, has_label=False))
    np.testing.assert_allclose(scores, expected, atol=1e-6)
    assert "scored 30 rows" in capsys.readouterr().out


def test_labelled_input_reports_auc(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train = tmp_path / "train.txt"
    train.write_text(_rows(40, True))
    out = tmp_path / "pred.csv"
    assert main(["predict", str(run_dir), "--input", str(train), "--out", str(out), "--first-id", "0"]) == 0
    result = predict_criteo_dlrm(parse_job(JOB), _checkpoint_params(run_dir), train)
    assert result.labels is not None
    printed = capsys.readouterr().out
    assert f"AUC {binary_auc(result.labels, result.scores):.4f}" in printed
    assert out.read_text().splitlines()[1].startswith("0,")


def test_model_that_does_not_fit_the_config(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    test = tmp_path / "test.txt"
    test.write_text(_rows(3, False))
    out = tmp_path / "pred.csv"
    code = main(["predict", str(run_dir), "--input", str(test), "--out", str(out), "--set", "task.params.table_size=65"])
    assert code == 2 and not out.exists()
    err = capsys.readouterr().err
    assert "does not fit task.params (table_size=65" in err and "embeddings.0.weight" in err


def test_errors_name_what_is_missing(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    test = tmp_path / "test.txt"
    test.write_text(_rows(3, False))
    empty = tmp_path / "empty-run"
    empty.mkdir()
    (empty / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    assert main(["predict", str(empty), "--input", str(test)]) == 2
    assert "no checkpoint (round-NNNNNN.ckpt)" in capsys.readouterr().err
    ckpt = next((run_dir / "checkpoints").glob("*.ckpt"))
    assert main(["predict", str(ckpt), "--input", str(test)]) == 2
    assert "needs --config" in capsys.readouterr().err
    assert main(["predict", str(run_dir), "--input", str(tmp_path / "absent.txt"), "--out", str(tmp_path / "p.csv")]) == 2
    assert "absent.txt: cannot read" in capsys.readouterr().err
    user = dict(JOB, task={"name": "mypkg.tasks:build"})
    (tmp_path / "user.yaml").write_text(yaml.safe_dump(user))
    assert main(["predict", str(ckpt), "--config", str(tmp_path / "user.yaml"), "--input", str(test)]) == 2
    assert "task 'mypkg.tasks:build' is a user task; predict supports the built-in tasks" in capsys.readouterr().err


def test_unknown_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="neither a run directory nor a checkpoint file"):
        resolve_model(tmp_path / "nothing", None, [])


def test_scoring_in_blocks_changes_nothing(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train = tmp_path / "train.txt"
    train.write_text(_rows(25, True))
    params = _checkpoint_params(run_dir)
    whole = predict_criteo_dlrm(parse_job(JOB), params, train)
    monkeypatch.setattr(prediction, "PREDICT_BLOCK_ROWS", 7)
    blocks = predict_criteo_dlrm(parse_job(JOB), params, train)
    np.testing.assert_array_equal(blocks.scores, whole.scores)
    assert blocks.labels is not None and whole.labels is not None
    np.testing.assert_array_equal(blocks.labels, whole.labels)
    assert len(blocks.scores) == 25


def test_a_corrupt_checkpoint_exits_2_in_one_line(run_dir: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    test = tmp_path / "test.txt"
    test.write_text(_rows(3, False))
    ckpt = next((run_dir / "checkpoints").glob("*.ckpt"))
    ckpt.write_bytes(ckpt.read_bytes()[:-50])

    assert main(["predict", str(run_dir), "--input", str(test), "--out", str(tmp_path / "p.csv")]) == 2

    err = capsys.readouterr().err.strip()
    assert ckpt.name in err and len(err.splitlines()) == 1
