"""Built-in Keras tasks: a small ResNet on the digits demo and on Fashion-MNIST.

=============================  ==========================================================
task name                      data, held-out set and partition: the same as
=============================  ==========================================================
``digits-keras-resnet``        ``digits-mlp`` (scikit-learn digits as 8x8x1 images)
``fashion-mnist-keras-resnet`` ``fashion-mnist-resnet20`` (IDX files in ``task.data_dir``)
=============================  ==========================================================

How this works: a :class:`KerasTask` wraps the PyTorch task's
:class:`~enclavefl.ml.array_task.ArrayTask` and uses only its data half (the
seeded held-out split, ``task.params`` sample limits and ``task.partition``),
so a worker holds exactly the samples it would hold under the PyTorch task. The
ArrayTask's own PyTorch model is never built; the KerasTask builds a Keras model
instead and moves images from the loaders' (C, H, W) to Keras's (H, W, C).

``task.params`` (all optional): ``width`` (16, channels of the first stage) and
``blocks`` (1, residual blocks per stage; 3 gives ResNet-20's depth); the
Fashion-MNIST task also takes ``max_train_samples``, ``max_eval_samples`` and
``num_classes`` as ``fashion-mnist-resnet20`` does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from enclavefl.config import JobConfig
from enclavefl.errors import ConfigError
from enclavefl.ml.array_task import ArrayTask
from enclavefl.ml.datasets.arrays import ArrayDataset
from enclavefl.ml.keras_trainer import KerasTrainer, import_keras
from enclavefl.ml.partition import PartitionRow, label_histogram
from enclavefl.ml.trainer import OptimizerSettings
from enclavefl.ml.workloads import load_fashion_mnist_resnet20
from enclavefl.task_params import KerasResNetParams, task_params
from enclavefl.tensors import ParamSet
from enclavefl.training import Task, Trainer

if TYPE_CHECKING:
    import keras

__all__ = [
    "KERAS_TASKS",
    "KerasTask",
    "keras_resnet",
    "load_digits_keras_resnet",
    "load_fashion_mnist_keras_resnet",
]

log = logging.getLogger(__name__)

# PyTorch's BatchNorm defaults (Keras's own momentum of 0.99 lets the moving
# statistics lag far behind a few short rounds, and the PS scores with them).
_BN = {"momentum": 0.9, "epsilon": 1e-5, "axis": -1}


def keras_resnet(
    input_shape: tuple[int, int, int], num_classes: int, *, width: int = 16, blocks: int = 1
) -> keras.Model:
    """A small ResNet for (H, W, C) images that outputs logits.

    The CIFAR variant of He et al. 2016 ("Deep Residual Learning for Image
    Recognition", section 4.2): a 3x3 convolution stem, three stages of
    ``blocks`` basic blocks at ``width``, 2 ``width`` and 4 ``width`` channels
    (stride 2 entering stages 2 and 3, a 1x1 projection where the shape
    changes), global average pooling and a dense layer. Every layer is named,
    so every build has the same variable paths.

    Raises:
        ConfigError: Keras is missing.
    """
    keras = import_keras()
    layers = keras.layers

    def conv(x: Any, filters: int, size: int, stride: int, name: str) -> Any:
        return layers.Conv2D(filters, size, strides=stride, padding="same", use_bias=False,
                             kernel_initializer="he_normal", data_format="channels_last", name=name)(x)

    inputs = keras.Input(shape=input_shape, name="image")
    x = conv(inputs, width, 3, 1, "stem_conv")
    x = layers.ReLU(name="stem_relu")(layers.BatchNormalization(**_BN, name="stem_bn")(x))
    for stage in range(3):
        filters = width * 2**stage
        for block in range(blocks):
            name = f"s{stage + 1}b{block + 1}"
            stride = 2 if stage > 0 and block == 0 else 1
            shortcut = x
            y = conv(x, filters, 3, stride, f"{name}_conv1")
            y = layers.ReLU(name=f"{name}_relu1")(layers.BatchNormalization(**_BN, name=f"{name}_bn1")(y))
            y = conv(y, filters, 3, 1, f"{name}_conv2")
            y = layers.BatchNormalization(**_BN, name=f"{name}_bn2")(y)
            if stride != 1 or shortcut.shape[-1] != filters:
                shortcut = conv(shortcut, filters, 1, stride, f"{name}_proj")
                shortcut = layers.BatchNormalization(**_BN, name=f"{name}_proj_bn")(shortcut)
            x = layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([y, shortcut]))
    x = layers.GlobalAveragePooling2D(data_format="channels_last", name="pool")(x)
    logits = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, logits, name=f"resnet_w{width}_b{blocks}")


@dataclass
class KerasTask:
    """A Keras model over an :class:`ArrayTask`'s data, held-out set and partition."""

    name: str
    data: ArrayTask
    """Supplies ``train``, ``test``, ``config`` and ``partition``; its PyTorch model is not used."""
    make_model: Callable[[], keras.Model]
    image_shape: tuple[int, int, int]
    """One sample as (C, H, W); ``data``'s samples are reshaped to it, then moved to (H, W, C)."""

    def _model(self) -> keras.Model:
        # Seeds Python, numpy and the backend: every node builds the same initial weights.
        import_keras().utils.set_random_seed(self.data.config.job.seed)
        return self.make_model()

    def _images(self, data: ArrayDataset) -> ArrayDataset:
        c, h, w = self.image_shape
        # (N, C, H, W) -> (N, H, W, C); no copy when C is 1.
        x = np.ascontiguousarray(np.moveaxis(data.x.reshape(len(data), c, h, w), 1, -1))
        return ArrayDataset(x, data.y)

    def _optimizer(self) -> OptimizerSettings:
        c = self.data.config.client
        return OptimizerSettings(c.optimizer, c.momentum, c.weight_decay)

    def initial_parameters(self) -> ParamSet:
        return KerasTrainer(self._model(), None).get_parameters()

    def partition_summary(self, num_workers: int) -> list[PartitionRow]:
        """Size and label histogram of every worker's share (for ``enclavefl run``'s table)."""
        return self.data.partition_summary(num_workers)

    def worker_trainer(self, index: int, num_workers: int) -> Trainer:
        if not 0 <= index < num_workers:
            raise ConfigError(f"worker index {index} is outside 0..{num_workers - 1}")
        part = self.data.partition(num_workers)[index]
        data = self._images(self.data.train.subset(part))
        hist = label_histogram(data.y, self.data.num_classes)
        log.info("task %s: worker %d of %d holds %d samples, labels %s",
                 self.name, index, num_workers, len(part), hist.tolist())
        return KerasTrainer(self._model(), data, optimizer=self._optimizer())

    def server_evaluator(self) -> Trainer | None:
        if self.data.test is None:
            return None
        return KerasTrainer(self._model(), None, self._images(self.data.test))


def _keras_task(
    config: JobConfig, name: str, load: Callable[[JobConfig], Task], image_shape: tuple[int, int, int]
) -> KerasTask:
    """The Keras ResNet over the data of the PyTorch task ``load`` builds; params and Keras checked first."""
    params = task_params(config, KerasResNetParams)
    width, blocks = params.width, params.blocks
    import_keras()
    data = load(config)
    if not isinstance(data, ArrayTask):  # pragma: no cover - the PyTorch loaders return ArrayTasks
        raise TypeError(f"task {name}: expected the PyTorch loader to return an ArrayTask, got {type(data).__name__}")
    c, h, w = image_shape
    return KerasTask(
        name=name,
        data=data,
        make_model=lambda: keras_resnet((h, w, c), data.num_classes, width=width, blocks=blocks),
        image_shape=image_shape,
    )


def load_digits_keras_resnet(config: JobConfig) -> Task:
    """The Keras ResNet on scikit-learn's digits: the digits-mlp data, split and partition, as 8x8x1 images.

    Raises:
        ConfigError: Keras or scikit-learn is missing, or ``width``/``blocks`` is not an integer >= 1.
    """
    # Imported here: enclavefl.ml.tasks imports this module to register its tasks.
    from enclavefl.ml.tasks import load_digits_task

    return _keras_task(config, "digits-keras-resnet", load_digits_task, (1, 8, 8))


def load_fashion_mnist_keras_resnet(config: JobConfig) -> Task:
    """The Keras ResNet on Fashion-MNIST IDX files in ``task.data_dir`` (the fashion-mnist-resnet20 data).

    Raises:
        ConfigError: Keras is missing, ``task.data_dir`` is not a folder, or a ``task.params`` value is wrong.
        DataError: an IDX file is missing or malformed.
    """
    return _keras_task(config, "fashion-mnist-keras-resnet", load_fashion_mnist_resnet20, (1, 28, 28))


KERAS_TASKS: Mapping[str, Callable[[JobConfig], Task]] = {
    "digits-keras-resnet": load_digits_keras_resnet,
    "fashion-mnist-keras-resnet": load_fashion_mnist_keras_resnet,
}
"""Built-in Keras tasks by ``task.name``."""
