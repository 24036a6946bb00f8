"""The model of each built-in task, from the job alone: what ``export`` and ``predict`` build.

A task's loader (:mod:`enclavefl.ml.workloads`, :mod:`enclavefl.ml.tasks`,
:mod:`enclavefl.ml.keras_tasks`) reads its training data before it can build a
model. Using a trained model needs none of that: the architecture follows from
``task.name`` and ``task.params``, and the weights come from a checkpoint. A
:class:`TaskModel` says how to build that model, what one input sample looks
like, and what its outputs mean, so an exported file can carry it as metadata.

Image tasks read pixels scaled to [0, 1] (pixel / 255), the scale their
loaders give the training data; the PyTorch models take ``(B, C, H, W)``, the
Keras ones ``(B, H, W, C)``.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from enclavefl.config import JobConfig
from enclavefl.errors import ConfigError
from enclavefl.tensors import ParamSet

__all__ = [
    "CIFAR10_CLASSES",
    "DIGIT_CLASSES",
    "FASHION_MNIST_CLASSES",
    "FEMNIST_CLASSES",
    "TASK_MODELS",
    "ModelInput",
    "TaskModel",
    "task_model",
]

DIGIT_CLASSES: tuple[str, ...] = tuple(string.digits)
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
FEMNIST_CLASSES: tuple[str, ...] = tuple(string.digits + string.ascii_uppercase + string.ascii_lowercase)
"""LEAF FEMNIST's 62 labels in order: 10 digits, 26 upper-case, 26 lower-case letters."""


@dataclass(frozen=True, slots=True)
class ModelInput:
    """One input of a model: its name, the shape of one sample and its numpy dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True, slots=True)
class TaskModel:
    """A built-in task's model as its job describes it, without its data.

    Attributes:
        task: ``task.name``.
        framework: ``pytorch`` (an ``nn.Module``) or ``keras`` (a ``keras.Model``).
        inputs: the model's inputs, in call order.
        layout: ``NCHW`` or ``NHWC`` for image models, ``tabular`` otherwise.
        classes: the name of each output class, in output order.
        output: ``logits`` (one score per class, softmax gives probabilities) or
            ``probability`` (of the last class, already through a sigmoid).
        image_shape: ``(C, H, W)`` of the images an image task classifies, else None.
        make_model: builds the model with fresh weights.
    """

    task: str
    framework: Literal["pytorch", "keras"]
    inputs: tuple[ModelInput, ...]
    layout: Literal["NCHW", "NHWC", "tabular"]
    classes: tuple[str, ...]
    output: Literal["logits", "probability"]
    image_shape: tuple[int, int, int] | None
    make_model: Callable[[], Any]

    def load(self, params: ParamSet) -> Any:
        """The model with ``params`` as its weights, in inference mode.

        Raises:
            ConfigError: the parameters do not fit the model ``task.params`` describes
                (names the first tensor that differs).
        """
        model = self.make_model()
        if self.framework == "keras":
            from enclavefl.ml.keras_trainer import KerasTrainer

            trainer: Any = KerasTrainer(model, None)
        else:
            from enclavefl.ml.trainer import TorchTrainer

            trainer = TorchTrainer(model, None)
            model.eval()
        try:
            trainer.set_parameters(params)
        except ValueError as exc:
            raise ConfigError(
                f"the checkpoint does not fit task {self.task}'s model: {exc}; use the job configuration "
                "the model was trained with (the run directory's config.yaml)"
            ) from exc
        return model


def _int(config: JobConfig, key: str, default: int) -> int:
    value = config.task.params.get(key, default)
    if type(value) is not int or value < 1:  # exact: True is not an int here
        raise ConfigError(f"task.params.{key} = {value!r}: expected an integer >= 1")
    return value


def _int_list(config: JobConfig, key: str, default: Sequence[int]) -> tuple[int, ...]:
    value = config.task.params.get(key, list(default))
    if not isinstance(value, list | tuple) or not all(type(v) is int and v >= 1 for v in value):
        raise ConfigError(f"task.params.{key} = {value!r}: expected a list of integers >= 1")
    return tuple(value)


def _names(named: Sequence[str], count: int) -> tuple[str, ...]:
    """The first ``count`` class names; classes past the named ones are called by their index."""
    return tuple(named[i] if i < len(named) else str(i) for i in range(count))


def _classes(config: JobConfig, default: int | None) -> int:
    """``task.params.num_classes`` (default ``default``), or a fixed 10 when ``default`` is None.

    The digits tasks ignore ``num_classes`` (scikit-learn's digits have 10);
    the other image tasks take it, as their loaders do.
    """
    return 10 if default is None else _int(config, "num_classes", default)


def _torch_image(
    config: JobConfig, shape: tuple[int, int, int], named: Sequence[str], default_classes: int | None,
    build: Callable[[int], Any],
) -> TaskModel:
    classes = _classes(config, default_classes)
    return TaskModel(
        task=config.task.name,
        framework="pytorch",
        inputs=(ModelInput("image", shape, "float32"),),
        layout="NCHW",
        classes=_names(named, classes),
        output="logits",
        image_shape=shape,
        make_model=lambda: build(classes),
    )


def _digits_mlp(config: JobConfig) -> TaskModel:
    hidden = _int_list(config, "hidden", (64,))

    def build(classes: int) -> Any:
        from enclavefl.ml.models import mlp

        return mlp(in_features=64, hidden=hidden, num_classes=classes)

    # 8x8 images, flattened by the MLP's first layer.
    return _torch_image(config, (1, 8, 8), DIGIT_CLASSES, None, build)


def _lenet(named: Sequence[str], default_classes: int) -> Callable[[JobConfig], TaskModel]:
    def spec(config: JobConfig) -> TaskModel:
        def build(classes: int) -> Any:
            from enclavefl.ml.models import lenet5

            return lenet5(num_classes=classes)

        return _torch_image(config, (1, 28, 28), named, default_classes, build)

    return spec


def _resnet20(shape: tuple[int, int, int], named: Sequence[str]) -> Callable[[JobConfig], TaskModel]:
    def spec(config: JobConfig) -> TaskModel:
        def build(classes: int) -> Any:
            from enclavefl.ml.models import resnet20

            return resnet20(num_classes=classes, in_channels=shape[0])

        return _torch_image(config, shape, named, 10, build)

    return spec


def _keras_resnet(
    shape: tuple[int, int, int], named: Sequence[str], default_classes: int | None
) -> Callable[[JobConfig], TaskModel]:
    def spec(config: JobConfig) -> TaskModel:
        width, blocks = _int(config, "width", 16), _int(config, "blocks", 1)
        classes = _classes(config, default_classes)
        c, h, w = shape

        def build() -> Any:
            from enclavefl.ml.keras_tasks import keras_resnet

            return keras_resnet((h, w, c), classes, width=width, blocks=blocks)

        return TaskModel(
            task=config.task.name,
            framework="keras",
            inputs=(ModelInput("image", (h, w, c), "float32"),),
            layout="NHWC",
            classes=_names(named, classes),
            output="logits",
            image_shape=shape,
            make_model=build,
        )

    return spec


def _criteo_dlrm(config: JobConfig) -> TaskModel:
    from enclavefl.ml.datasets.criteo import NUM_CATEGORICAL, NUM_DENSE
    from enclavefl.ml.workloads import DlrmShape

    shape = DlrmShape.from_config(config)
    return TaskModel(
        task=config.task.name,
        framework="pytorch",
        inputs=(ModelInput("dense", (NUM_DENSE,), "float32"), ModelInput("categorical", (NUM_CATEGORICAL,), "int64")),
        layout="tabular",
        classes=("no click", "click"),
        output="probability",
        image_shape=None,
        make_model=lambda: shape.build(config.job.seed),
    )


TASK_MODELS: Mapping[str, Callable[[JobConfig], TaskModel]] = {
    "cifar10-resnet20": _resnet20((3, 32, 32), CIFAR10_CLASSES),
    "criteo-dlrm": _criteo_dlrm,
    "digits-keras-resnet": _keras_resnet((1, 8, 8), DIGIT_CLASSES, None),
    "digits-mlp": _digits_mlp,
    "fashion-mnist-keras-resnet": _keras_resnet((1, 28, 28), FASHION_MNIST_CLASSES, 10),
    "fashion-mnist-resnet20": _resnet20((1, 28, 28), FASHION_MNIST_CLASSES),
    "femnist-lenet": _lenet(FEMNIST_CLASSES, 62),
    "mnist-lenet": _lenet(DIGIT_CLASSES, 10),
}
"""How to build each built-in task's model from its job, by ``task.name``."""


def task_model(config: JobConfig) -> TaskModel:
    """The model the job's task trains, described without reading any data.

    Raises:
        ConfigError: the task is a user task (``module:function``), whose model only
            its own code knows, or a ``task.params`` value is malformed.
    """
    name = config.task.name
    spec = TASK_MODELS.get(name)
    if spec is None:
        raise ConfigError(
            f"task {name!r} is not a built-in task, so its model is unknown here; "
            f"built-in tasks: {', '.join(sorted(TASK_MODELS))}"
        )
    return spec(config)
