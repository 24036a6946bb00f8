"""Scoring new data with a trained global model (what a run's checkpoint is for).

A task that scores rows of a data file (criteo-dlrm) registers a predictor here
by ``task.name``; every built-in image task classifies images with
:func:`classify_images`. Either way the model is built from the job's
``task.params`` alone (no training data is read) and the checkpoint's
parameters are loaded into it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from enclavefl.config import JobConfig
from enclavefl.errors import ConfigError, DataError
from enclavefl.ml.datasets.criteo import NUM_CATEGORICAL, NUM_DENSE, iter_criteo
from enclavefl.ml.datasets.images import load_images
from enclavefl.ml.dlrm_trainer import DlrmTrainer
from enclavefl.ml.task_models import TaskModel, task_model
from enclavefl.ml.workloads import DlrmShape
from enclavefl.tensors import ParamSet

__all__ = [
    "CLASSIFY_BATCH",
    "PREDICTORS",
    "PREDICT_BLOCK_ROWS",
    "ClassProbabilities",
    "Predictions",
    "classify_images",
    "criteo_file_has_labels",
    "predict_criteo_dlrm",
    "softmax",
]

PREDICT_BLOCK_ROWS = 500_000
"""Rows scored at a time: a prediction holds one block of features (130 MB, twice that while read)."""

CLASSIFY_BATCH = 1024
"""Images per forward pass when classifying."""


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


@dataclass(frozen=True, slots=True, eq=False)
class ClassProbabilities:
    """Class probabilities of each input image, in input order.

    Attributes:
        probabilities: float32 ``(N, K)``, each row summing to 1.
        classes: the K class names, in column order.
        names: each image's file name (folder input), or None (rows of an array file).
    """

    probabilities: npt.NDArray[np.float32]
    classes: tuple[str, ...]
    names: tuple[str, ...] | None
    source: Path

    @property
    def predicted(self) -> npt.NDArray[np.int64]:
        """The most probable class of each image (its column index)."""
        predicted: npt.NDArray[np.int64] = np.argmax(self.probabilities, axis=1).astype(np.int64)
        return predicted


def softmax(logits: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float32]:
    """Row-wise softmax of ``(N, K)`` logits, in float64 with the row maximum subtracted (no overflow)."""
    if logits.size == 0:
        return np.zeros(logits.shape, dtype=np.float32)
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    probabilities: npt.NDArray[np.float32] = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    return probabilities


def _logits(spec: TaskModel, model: Any, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """``(N, K)`` logits of ``(N, C, H, W)`` images, in batches of :data:`CLASSIFY_BATCH`."""
    out: list[npt.NDArray[np.float32]] = []
    if spec.framework == "keras":
        from enclavefl.ml.keras_trainer import import_keras

        keras = import_keras()
        nhwc = np.ascontiguousarray(np.moveaxis(x, 1, -1))  # (N, C, H, W) -> (N, H, W, C)
        for start in range(0, len(nhwc), CLASSIFY_BATCH):
            logits = model(nhwc[start : start + CLASSIFY_BATCH], training=False)
            # A torch tensor is copied with .numpy(): Keras's own conversion goes through
            # np.array(tensor), which numpy 2 flags as deprecated for torch's __array__.
            array = logits.detach().cpu().numpy() if keras.backend.backend() == "torch" else keras.ops.convert_to_numpy(logits)
            out.append(np.asarray(array, dtype=np.float32))
    else:
        import torch

        with torch.no_grad():
            for start in range(0, len(x), CLASSIFY_BATCH):
                out.append(model(torch.from_numpy(x[start : start + CLASSIFY_BATCH])).numpy().astype(np.float32))
    return np.concatenate(out) if out else np.zeros((0, len(spec.classes)), dtype=np.float32)


def classify_images(config: JobConfig, params: ParamSet, path: Path) -> ClassProbabilities:
    """Class probabilities for the images at ``path`` (a folder, an IDX image file or a ``.npy`` file).

    Raises:
        ConfigError: the task does not classify images, its model does not fit
            ``params``, or Pillow (for a folder) or Keras (for a Keras task) is missing.
        DataError: the input is missing or its images do not fit the model (see
            :func:`~enclavefl.ml.datasets.images.load_images`).
    """
    spec = task_model(config)
    if spec.image_shape is None:
        raise ConfigError(f"task {spec.task!r} does not classify images")
    inputs = load_images(path, spec.image_shape)
    model = spec.load(params)
    logits = _logits(spec, model, inputs.x)
    if logits.shape != (len(inputs.x), len(spec.classes)):
        raise ConfigError(f"task {spec.task}: the model gave logits of shape {logits.shape}, "
                          f"expected ({len(inputs.x)}, {len(spec.classes)})")
    return ClassProbabilities(softmax(logits), spec.classes, inputs.names, path)
