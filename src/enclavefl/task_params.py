"""The ``task.params`` each built-in task accepts, as typed models.

A built-in task reads a few optional settings from ``task.params``. Each task
has a model here listing them (types, ranges, defaults), with unknown keys
forbidden, so that a typo such as ``max_train_sample`` is refused when the job
file is read instead of being silently ignored. :func:`enclavefl.config.parse_job`
checks ``task.params`` against the model of the task the job names; a user task
(``package.module:function``) keeps free-form ``task.params``.

Some models are assembled from parts because several tasks share settings (the
Fashion-MNIST Keras task takes the image workloads' sample limits and the Keras
ResNet's shape). A loader reads only the part it needs with
:func:`task_params`, so a task that wraps another's data loader does not see
the wrapper's own keys as unknown.

This module imports neither torch nor the rest of the package: the parent of
``enclavefl run`` checks a job without loading any model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from enclavefl.config_errors import describe_errors
from enclavefl.errors import ConfigError

if TYPE_CHECKING:
    from enclavefl.config import JobConfig

__all__ = [
    "BUILTIN_TASK_PARAMS",
    "CriteoDlrmParams",
    "DigitsMlpParams",
    "FashionMnistKerasParams",
    "ImageWorkloadParams",
    "KerasResNetParams",
    "TaskParams",
    "task_params",
]

LayerSizes = list[Annotated[int, Field(ge=1)]]


class TaskParams(BaseModel):
    """Base of every built-in task's params: strict (``true`` is not a number), unknown keys refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class DigitsMlpParams(TaskParams):
    """``digits-mlp``: the MLP's hidden layer sizes."""

    hidden: LayerSizes = Field(default_factory=lambda: [64], description="hidden layer sizes, input to output")


class ImageWorkloadParams(TaskParams):
    """The image workloads (``mnist-lenet``, ``fashion-mnist-resnet20``, ``cifar10-resnet20``, ``femnist-lenet``)."""

    max_train_samples: int | None = Field(default=None, ge=1, description="a seeded subsample, for short runs")
    max_eval_samples: int | None = Field(default=None, ge=1, description="a seeded subsample of the held-out set")
    num_classes: int | None = Field(default=None, ge=1, description="classifier outputs (default from the data set)")


class KerasResNetParams(TaskParams):
    """``digits-keras-resnet``: the shape of the Keras ResNet."""

    width: int = Field(default=16, ge=1, description="channels of the first stage (then 2x and 4x)")
    blocks: int = Field(default=1, ge=1, description="residual blocks per stage (3 gives ResNet-20's depth)")


class FashionMnistKerasParams(ImageWorkloadParams, KerasResNetParams):
    """``fashion-mnist-keras-resnet``: the Keras ResNet's shape plus the image workloads' sample limits."""


class CriteoDlrmParams(TaskParams):
    """``criteo-dlrm``: the DLRM's shape and the held-out split (see :mod:`enclavefl.ml.workloads`)."""

    train_file: str | None = Field(default=None, min_length=1, description="default train.txt, else train_sample.txt")
    table_size: int = Field(default=10_000, ge=2, description="rows per embedding table")
    embedding_dim: int = Field(default=16, ge=1)
    bottom_mlp: LayerSizes | None = Field(default=None, description="default [64, 32, embedding_dim]")
    top_mlp: LayerSizes = Field(default_factory=lambda: [64, 32, 1])
    sparse_gradients: bool = Field(default=True, description="row-sparse embedding gradients and a lazy optimizer")
    eval_fraction: float = Field(default=0.1, gt=0, lt=1, description="share of the distinct rows held out")
    eval_fold: int = Field(default=0, ge=0, description="which eval_fraction slice is held out (cross-validation)")
    max_rows: int | None = Field(default=None, ge=1, description="rows read from the file")
    max_train_samples: int | None = Field(default=None, ge=1, description="a seeded subsample of the training rows")

    @model_validator(mode="after")
    def _fold_in_range(self) -> CriteoDlrmParams:
        folds = int(1 / self.eval_fraction + 1e-9)
        if self.eval_fold >= folds:
            raise ValueError(f"task.params.eval_fold = {self.eval_fold}: eval_fraction={self.eval_fraction} "
                             f"gives folds 0..{folds - 1}")
        return self

    @property
    def bottom_layers(self) -> tuple[int, ...]:
        """``bottom_mlp``, or its default, which ends in ``embedding_dim``."""
        return tuple(self.bottom_mlp) if self.bottom_mlp is not None else (64, 32, self.embedding_dim)


BUILTIN_TASK_PARAMS: Mapping[str, type[TaskParams]] = {
    "cifar10-resnet20": ImageWorkloadParams,
    "criteo-dlrm": CriteoDlrmParams,
    "digits-keras-resnet": KerasResNetParams,
    "digits-mlp": DigitsMlpParams,
    "fashion-mnist-keras-resnet": FashionMnistKerasParams,
    "fashion-mnist-resnet20": ImageWorkloadParams,
    "femnist-lenet": ImageWorkloadParams,
    "mnist-lenet": ImageWorkloadParams,
}
"""The params model of every built-in task, by ``task.name`` (the keys of :data:`enclavefl.ml.tasks.TASKS`)."""

P = TypeVar("P", bound=TaskParams)


def task_params(config: JobConfig, model: type[P]) -> P:
    """The job's ``task.params`` read as ``model``: its keys only, typed and with its defaults.

    Keys that ``model`` does not declare are left alone (the job's own task
    model refused unknown ones when the job was parsed), so a loader can read
    the part of the settings it owns.

    Raises:
        ConfigError: a value has the wrong type or is out of range.
    """
    params = {k: v for k, v in config.task.params.items() if k in model.model_fields}
    try:
        return model.model_validate(params)
    except ValidationError as exc:
        lines = describe_errors(exc, root=model, prefix=("task", "params"))
        raise ConfigError(f"task {config.task.name}: " + "; ".join(lines)) from None
