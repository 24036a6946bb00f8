"""`enclavefl export`: picks the newest or a chosen round's checkpoint of a run directory; bad input exits 2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from enclavefl.cli import main
from enclavefl.config import parse_job
from enclavefl.ml.safetensors_format import read_safetensors
from enclavefl.ml.task_models import task_model
from enclavefl.ml.trainer import TorchTrainer
from enclavefl.server.checkpoint import Checkpoint, load_checkpoint, params_digest, save_checkpoint

JOB = {"job": {"name": "mnist-exp", "seed": 1}, "task": {"name": "mnist-lenet"}}


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    """A run directory after 5 rounds: checkpoints of rounds 3, 4 and 5 kept, 1 and 2 pruned."""
    run = tmp_path / "run"
    run.mkdir()
    config = parse_job(JOB)
    (run / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    for r in range(1, 6):
        torch.manual_seed(r)
        params = TorchTrainer(task_model(config).make_model(), None).get_parameters()
        save_checkpoint(run / "checkpoints", Checkpoint(round=r, model_version=r, params=params))
    return run


def test_exports_the_newest_round_by_default(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(run_dir), "--format", "safetensors"]) == 0

    out = run_dir / "model-round-000005.safetensors"
    newest = load_checkpoint(run_dir / "checkpoints" / "round-000005.ckpt")
    back = read_safetensors(out)
    assert back.metadata["round"] == "5" and back.metadata["params_digest"] == params_digest(newest.params)
    for name, value in newest.params.items():
        np.testing.assert_array_equal(back.tensors[name], value)
    printed = capsys.readouterr().out
    assert f"round 5 (model version 5, digest {params_digest(newest.params)[:16]})" in printed and str(out) in printed


def test_exports_a_chosen_round_still_on_disk(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "four.pt"

    assert main(["export", str(run_dir), "--round", "4", "--format", "torch", "--out", str(out)]) == 0

    saved = torch.load(out, weights_only=True)
    assert saved["metadata"]["round"] == 4 and saved["metadata"]["job"] == "mnist-exp"
    four = load_checkpoint(run_dir / "checkpoints" / "round-000004.ckpt")
    assert saved["metadata"]["params_digest"] == params_digest(four.params)


def test_a_pruned_round_is_refused_naming_the_rounds_kept(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(run_dir), "--round", "2", "--format", "safetensors"]) == 2

    err = capsys.readouterr().err.strip()
    assert "--round 2: no checkpoint of that round" in err and "it holds rounds 3, 4, 5" in err
    assert "keeps its newest 3 checkpoints" in err and len(err.splitlines()) == 1
    assert not list(run_dir.glob("model-*"))


def test_round_zero_is_refused(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(run_dir), "--round", "0", "--format", "torch"]) == 2
    assert "rounds are numbered from 1" in capsys.readouterr().err


def test_a_run_without_checkpoints_is_refused(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for ckpt in (run_dir / "checkpoints").iterdir():
        ckpt.unlink()

    assert main(["export", str(run_dir), "--format", "safetensors"]) == 2
    assert "no checkpoint (round-NNNNNN.ckpt) to export" in capsys.readouterr().err


def test_a_corrupt_checkpoint_is_refused_in_one_line(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    newest = run_dir / "checkpoints" / "round-000005.ckpt"
    newest.write_bytes(newest.read_bytes()[:-100])

    assert main(["export", str(run_dir), "--format", "safetensors"]) == 2

    err = capsys.readouterr().err.strip()
    assert err.startswith("enclavefl export: error: ") and "round-000005.ckpt" in err and len(err.splitlines()) == 1


def test_not_a_run_directory_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(tmp_path / "absent"), "--format", "safetensors"]) == 2
    assert "not a run directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "empty"), "--format", "safetensors"]) == 2
    assert "config.yaml: cannot read job file" in capsys.readouterr().err


def test_an_out_path_in_a_missing_folder_is_refused(run_dir: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(run_dir), "--format", "torch", "--out", str(tmp_path / "no" / "m.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_an_unknown_format_is_a_usage_error(run_dir: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["export", str(run_dir), "--format", "h5"])
    assert exc.value.code == 2
