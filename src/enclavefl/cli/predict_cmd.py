"""``enclavefl predict RUN_DIR --input PATH``: score data with a run's trained model.

The model is the newest checkpoint of the run directory (or a ``.ckpt`` file
given with ``--config``). The output CSV is written atomically:

* criteo-dlrm scores a Criteo TSV into the Kaggle submission layout
  (``Id,Predicted``); when the input carries labels (the train layout) the
  command also prints AUC and log loss on it.
* An image task classifies a folder of PNG/JPEG images, an IDX image file or a
  ``.npy`` array into ``Id``, one probability column per class, and
  ``Predicted`` (the most probable class). Ids are file names for a folder,
  else row numbers from ``--first-id`` (default 0).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from enclavefl.cli import add_overrides_option
from enclavefl.config import JobConfig, load_job
from enclavefl.errors import CheckpointError, ConfigError, DataError
from enclavefl.server.checkpoint import Checkpoint, latest_checkpoint, load_checkpoint

__all__ = [
    "KAGGLE_FIRST_TEST_ID",
    "add_parser",
    "resolve_model",
    "run_predict",
    "write_class_probabilities",
    "write_predictions",
]

KAGGLE_FIRST_TEST_ID = 60_000_000
"""The Id of the first row of the Display Advertising Challenge's test set in its submission files."""


def add_parser(sub: Any) -> None:
    p = sub.add_parser("predict", help="score data with a run's trained model (CSV out)")
    p.add_argument("model", type=Path, metavar="RUN_DIR|CHECKPOINT",
                   help="a run directory (its newest checkpoint and config.yaml) or a .ckpt file")
    p.add_argument("--input", required=True, type=Path,
                   help="what to score: a Criteo TSV (criteo-dlrm), or for an image task a folder of PNG/JPEG "
                        "images, an IDX image file or a .npy array")
    p.add_argument("--config", type=Path, help="job YAML (default: the run directory's config.yaml)")
    add_overrides_option(p)
    p.add_argument("--out", type=Path, default=Path("predictions.csv"), help="output CSV (default predictions.csv)")
    p.add_argument("--first-id", type=int,
                   help=f"Id of the first row (criteo-dlrm default {KAGGLE_FIRST_TEST_ID}, as in the Kaggle test "
                        "submissions; image arrays default 0; a folder's Ids are its file names)")
    p.set_defaults(func=run_predict)


def resolve_model(model: Path, config_path: Path | None, overrides: list[str]) -> tuple[JobConfig, Checkpoint]:
    """The job configuration and checkpoint that ``model`` (a run directory or a checkpoint file) names.

    Raises:
        ConfigError: no configuration to build the model from, or no checkpoint.
        DataError: the checkpoint is corrupt.
    """
    try:
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
    except CheckpointError as exc:  # a corrupt file the user named: bad input, not a failed job
        raise DataError(str(exc)) from exc


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


def write_class_probabilities(path: Path, ids: list[str], probabilities: np.ndarray, classes: tuple[str, ...]) -> None:
    """``Id``, one column per class, ``Predicted`` (the most probable class's name); atomic, as above."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w", encoding="utf-8", newline="") as f:
            rows = csv.writer(f, lineterminator="\n")
            rows.writerow(["Id", *classes, "Predicted"])
            for row_id, row in zip(ids, probabilities.tolist(), strict=True):
                rows.writerow([row_id, *(f"{p:.6f}" for p in row), classes[int(np.argmax(row))]])
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"--out {path}: cannot write ({exc.strerror or exc})") from exc


def _classify(args: argparse.Namespace, config: JobConfig, ckpt: Checkpoint) -> int:
    from enclavefl.ml.prediction import classify_images

    result = classify_images(config, ckpt.params, args.input)
    if not np.isfinite(result.probabilities).all():
        raise CheckpointError(f"{ckpt.path}: the model produced non-finite probabilities")
    first = args.first_id or 0
    ids = list(result.names) if result.names is not None else [str(first + i) for i in range(len(result.probabilities))]
    write_class_probabilities(args.out, ids, result.probabilities, result.classes)
    counts = np.bincount(result.predicted, minlength=len(result.classes))
    top = sorted(range(len(counts)), key=lambda k: -counts[k])[:3]
    common = ", ".join(f"{result.classes[k]} x{counts[k]}" for k in top if counts[k])
    print(f"classified {len(ids)} images (most predicted: {common or '-'}); wrote {args.out}")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from enclavefl.ml.dlrm_trainer import binary_auc, binary_log_loss
    from enclavefl.ml.prediction import PREDICTORS
    from enclavefl.ml.task_models import TASK_MODELS

    if args.first_id is not None and args.first_id < 0:
        raise ConfigError(f"--first-id {args.first_id}: must be >= 0")
    config, ckpt = resolve_model(args.model, args.config, list(args.overrides))
    predictor = PREDICTORS.get(config.task.name)
    if predictor is None and config.task.name not in TASK_MODELS:
        raise ConfigError(f"task {config.task.name!r} is a user task; predict supports the built-in tasks "
                          f"({', '.join(sorted(TASK_MODELS))})")
    print(f"enclavefl predict: task {config.task.name}, model {ckpt.path} (round {ckpt.round}), input {args.input}")
    if predictor is None:
        return _classify(args, config, ckpt)
    result = predictor(config, ckpt.params, args.input)
    scores = result.scores.astype(np.float64)
    if not np.isfinite(scores).all():
        raise CheckpointError(f"{ckpt.path}: the model produced non-finite scores")
    write_predictions(args.out, result.scores, KAGGLE_FIRST_TEST_ID if args.first_id is None else args.first_id)
    line = f"scored {len(scores)} rows, mean prediction {scores.mean() if len(scores) else math.nan:.4f}"
    if result.labels is not None and len(scores):
        line += (f", on its labels: AUC {binary_auc(result.labels, scores):.4f} "
                 f"log loss {binary_log_loss(result.labels, scores):.4f}")
    print(f"{line}; wrote {args.out}")
    return 0
