"""``enclavefl predict RUN_DIR --input FILE``: score a file with a run's trained model.

The model is the newest checkpoint of the run directory (or a ``.ckpt`` file
given with ``--config``); the output is a CSV in the Kaggle submission layout
(``Id,Predicted``), written atomically. When the input carries labels (the
train layout) the command also prints AUC and log loss on it.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from enclavefl.cli import add_overrides_option
from enclavefl.config import JobConfig, load_job
from enclavefl.errors import CheckpointError, ConfigError
from enclavefl.server.checkpoint import Checkpoint, latest_checkpoint, load_checkpoint

__all__ = ["KAGGLE_FIRST_TEST_ID", "add_parser", "resolve_model", "run_predict", "write_predictions"]

KAGGLE_FIRST_TEST_ID = 60_000_000
"""The Id of the first row of the Display Advertising Challenge's test set in its submission files."""


def add_parser(sub: Any) -> None:
    p = sub.add_parser("predict", help="score a data file with a run's trained model (CSV out)")
    p.add_argument("model", type=Path, metavar="RUN_DIR|CHECKPOINT",
                   help="a run directory (its newest checkpoint and config.yaml) or a .ckpt file")
    p.add_argument("--input", required=True, type=Path, help="the file to score (Criteo TSV, train or test layout)")
    p.add_argument("--config", type=Path, help="job YAML (default: the run directory's config.yaml)")
    add_overrides_option(p)
    p.add_argument("--out", type=Path, default=Path("predictions.csv"), help="output CSV (default predictions.csv)")
    p.add_argument("--first-id", type=int, default=KAGGLE_FIRST_TEST_ID,
                   help=f"Id of the first row (default {KAGGLE_FIRST_TEST_ID}, as in the Kaggle test submissions)")
    p.set_defaults(func=run_predict)


def resolve_model(model: Path, config_path: Path | None, overrides: list[str]) -> tuple[JobConfig, Checkpoint]:
    """The job configuration and checkpoint that ``model`` (a run directory or a checkpoint file) names.

    Raises:
        ConfigError: no configuration to build the model from, or no checkpoint.
        CheckpointError: the checkpoint is corrupt.
    """
    if model.is_dir():
        config = load_job(config_path or model / "config.yaml", overrides)
        directory = model / config.server.checkpoint_dir
        ckpt = latest_checkpoint(directory)
        if ckpt is None:
            raise ConfigError(f"{directory}: no checkpoint (round-NNNNNN.ckpt) to predict with")
        return config, ckpt
    if not model.is_file():
        raise ConfigError(f"{model}: neither a run directory nor a checkpoint file")
    if config_path is None:
        raise ConfigError(f"{model}: a checkpoint file needs --config, the job it was trained with")
    return load_job(config_path, overrides), load_checkpoint(model)


def write_predictions(path: Path, scores: np.ndarray, first_id: int) -> None:
    """``Id,Predicted`` rows, written to a temporary file and renamed (no half-written CSV)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w", encoding="ascii") as f:
            f.write("Id,Predicted\n")
            for i, score in enumerate(scores.tolist()):
                f.write(f"{first_id + i},{score:.6f}\n")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"--out {path}: cannot write ({exc.strerror or exc})") from exc


def run_predict(args: argparse.Namespace) -> int:
    from enclavefl.ml.dlrm_trainer import binary_auc, binary_log_loss
    from enclavefl.ml.prediction import PREDICTORS

    if args.first_id < 0:
        raise ConfigError(f"--first-id {args.first_id}: must be >= 0")
    config, ckpt = resolve_model(args.model, args.config, list(args.overrides))
    predictor = PREDICTORS.get(config.task.name)
    if predictor is None:
        raise ConfigError(f"task {config.task.name!r} cannot score files; predict supports {', '.join(sorted(PREDICTORS))}")
    print(f"enclavefl predict: task {config.task.name}, model {ckpt.path} (round {ckpt.round}), input {args.input}")
    result = predictor(config, ckpt.params, args.input)
    scores = result.scores.astype(np.float64)
    if not np.isfinite(scores).all():
        raise CheckpointError(f"{ckpt.path}: the model produced non-finite scores")
    write_predictions(args.out, result.scores, args.first_id)
    line = f"scored {len(scores)} rows, mean prediction {scores.mean() if len(scores) else math.nan:.4f}"
    if result.labels is not None and len(scores):
        line += (f", on its labels: AUC {binary_auc(result.labels, scores):.4f} "
                 f"log loss {binary_log_loss(result.labels, scores):.4f}")
    print(f"{line}; wrote {args.out}")
    return 0
