"""Scoring new data with a trained global model (what a run's checkpoint is for).

A task that can score files registers a predictor here by ``task.name``. The
predictor builds the model from the job's ``task.params`` alone (no training
data is read), loads the checkpoint's parameters into it and scores the file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from enclavefl.config import JobConfig
from enclavefl.errors import ConfigError, DataError
from enclavefl.ml.datasets.criteo import NUM_CATEGORICAL, NUM_DENSE, iter_criteo
from enclavefl.ml.dlrm_trainer import DlrmTrainer
from enclavefl.ml.workloads import DlrmShape
from enclavefl.tensors import ParamSet

__all__ = ["PREDICTORS", "PREDICT_BLOCK_ROWS", "Predictions", "criteo_file_has_labels", "predict_criteo_dlrm"]

PREDICT_BLOCK_ROWS = 500_000
"""Rows scored at a time: a prediction holds one block of features (130 MB, twice that while read)."""


@dataclass(frozen=True, slots=True)
class Predictions:
    """One score per input row, in file order; ``labels`` when the file carried them."""

    scores: npt.NDArray[np.float32]
    labels: npt.NDArray[np.float32] | None
    source: Path


def criteo_file_has_labels(path: Path) -> bool:
    """True for the train layout (label + 39 fields), False for the Kaggle test layout (39 fields).

    Raises:
        DataError: the file is missing, empty, or its first line has another field count.
    """
    try:
        with path.open("rb") as f:
            first = f.readline()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if not first:
        raise DataError(f"{path}: empty file; expected Criteo TSV rows")
    fields = first.rstrip(b"\r\n").count(b"\t") + 1
    features = NUM_DENSE + NUM_CATEGORICAL
    if fields == features + 1:
        return True
    if fields == features:
        return False
    raise DataError(
        f"{path}:1: {fields} tab-separated fields; a Criteo file has {features + 1} (train layout: label, "
        f"{NUM_DENSE} integer, {NUM_CATEGORICAL} categorical) or {features} (test layout, no label)"
    )


def predict_criteo_dlrm(config: JobConfig, params: ParamSet, path: Path) -> Predictions:
    """Click probabilities for every row of a Criteo TSV in either layout.

    Raises:
        ConfigError: the parameters do not fit the DLRM that ``task.params`` describes.
        DataError: the file is missing or malformed (names the line and field).
    """
    shape = DlrmShape.from_config(config)
    trainer = DlrmTrainer(shape.build(config.job.seed), None)
    try:
        trainer.set_parameters(params)
    except ValueError as exc:
        raise ConfigError(
            f"the model does not fit task.params (table_size={shape.table_size}, embedding_dim={shape.embedding_dim}, "
            f"bottom_mlp={list(shape.bottom_mlp)}, top_mlp={list(shape.top_mlp)}): {exc}; use the job "
            "configuration the model was trained with (the run directory's config.yaml)"
        ) from exc
    has_label = criteo_file_has_labels(path)
    scores: list[npt.NDArray[np.float32]] = []
    labels: list[npt.NDArray[np.float32]] = []
    for block in iter_criteo(path, table_size=shape.table_size, has_label=has_label, block_rows=PREDICT_BLOCK_ROWS):
        scores.append(trainer.predict(block))
        if block.labels is not None:
            labels.append(block.labels)
    return Predictions(
        scores=np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32),
        labels=(np.concatenate(labels) if labels else np.zeros(0, dtype=np.float32)) if has_label else None,
        source=path,
    )


PREDICTORS: Mapping[str, Callable[[JobConfig, ParamSet, Path], Predictions]] = {
    "criteo-dlrm": predict_criteo_dlrm,
}
"""Built-in tasks that can score a file, by ``task.name``."""
