"""Keras 3 adapter: a :class:`~enclavefl.training.Trainer` around a ``keras.Model``.

How this works: parameters cross the seam as numpy arrays, one per variable in
``model.weights`` order (trainable and not, so BatchNorm's moving statistics
travel with the weights), each named by its ``variable.path`` (``"layer/kernel"``).
A path is the layer's name, so two builds of a model agree on the names only if
its layers are named explicitly (Keras numbers unnamed layers per process:
``conv2d``, ``conv2d_1``, ...). Local training is a minibatch loop over
``train_on_batch`` with the same seeded shuffle, progress lines, metrics and
divergence check as :class:`~enclavefl.ml.trainer.TorchTrainer`.

Backend: importing this module sets ``KERAS_BACKEND=torch`` unless the
environment already names one, so Keras runs on PyTorch by default and
TensorFlow is never required. Set ``KERAS_BACKEND=tensorflow`` (with TensorFlow
installed) to train on TensorFlow instead; either way the parameters are numpy
on the wire, so nodes on different backends can share one federation.
Keras itself is imported lazily, when a trainer or model is first needed.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter
from collections.abc import Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

from enclavefl.errors import ConfigError
from enclavefl.ml.datasets.arrays import ArrayDataset
from enclavefl.tensors import ParamSet, SparseRows
from enclavefl.training import FitConfig, FitResult

if TYPE_CHECKING:
    import keras

__all__ = ["PROGRESS_EVERY_S", "KerasTrainer", "OptimizerSpec", "import_keras"]

log = logging.getLogger(__name__)

# Before anything imports keras: it picks its backend once, at import.
os.environ.setdefault("KERAS_BACKEND", "torch")

PROGRESS_EVERY_S = 30.0
"""Local training longer than this logs a progress line this often (as TorchTrainer does)."""


class OptimizerSpec(Protocol):
    """The client optimizer settings a trainer needs (``OptimizerSettings`` of the PyTorch trainer fits)."""

    @property
    def name(self) -> str: ...

    @property
    def momentum(self) -> float: ...

    @property
    def weight_decay(self) -> float: ...


class _SGD:
    """Plain SGD: the default when no optimizer settings are given."""

    name = "sgd"
    momentum = 0.0
    weight_decay = 0.0


def import_keras() -> ModuleType:
    """Keras 3 on the backend ``KERAS_BACKEND`` names (PyTorch unless set).

    Raises:
        ConfigError: Keras is missing or older than 3, or its backend cannot train.
    """
    try:
        import keras
    except ImportError as exc:
        backend = os.environ.get("KERAS_BACKEND")
        raise ConfigError(
            f"Keras tasks need Keras 3 on a working backend (KERAS_BACKEND={backend}): "
            f"pip install 'enclavefl[keras]' ({exc})"
        ) from exc
    version = str(getattr(keras, "__version__", "0"))
    if int(version.split(".")[0]) < 3:
        raise ConfigError(f"Keras tasks need Keras 3, found Keras {version}: pip install 'enclavefl[keras]'")
    backend = keras.backend.backend()
    if backend == "numpy":
        raise ConfigError("KERAS_BACKEND=numpy cannot train; use torch (the default) or tensorflow")
    module: ModuleType = keras
    return module


def _refuse_torch_only(config: FitConfig) -> None:
    """FedProx and SCAFFOLD change the local objective; only the PyTorch trainers implement that."""
    mu = float(getattr(config, "proximal_mu", 0.0) or 0.0)
    correction = getattr(config, "correction", None)
    if mu > 0:
        raise ConfigError(f"proximal_mu = {mu}: FedProx is supported by the PyTorch trainers only, not Keras")
    if correction is not None:
        raise ConfigError("a SCAFFOLD correction was given: SCAFFOLD is supported by the PyTorch trainers only, not Keras")


class KerasTrainer:
    """Trains a Keras classifier that outputs logits, on an :class:`ArrayDataset`, with cross-entropy.

    Each :meth:`fit` compiles the model afresh with a new optimizer at the round's
    learning rate, so optimizer state (momentum, Adam moments) starts from zero
    every round, as in :class:`~enclavefl.ml.trainer.TorchTrainer`. Weight decay is
    Keras's decoupled form (Loshchilov & Hutter 2019, "Decoupled Weight Decay
    Regularization"): the same as PyTorch's L2 term for plain SGD, not with
    momentum or Adam.

    Args:
        model: a built ``keras.Model`` mapping a batch of ``train.x`` to logits
            ``(B, classes)``; name its layers (see the module docstring).
        train: the local training data, or None for an evaluation-only trainer.
        evaluation: the data :meth:`evaluate` scores, or None.
        optimizer: ``sgd`` or ``adam`` with momentum and weight decay; plain SGD if None.
        eval_batch_size: samples per forward pass in :meth:`evaluate`.

    Raises:
        ConfigError: Keras is missing, or a variable path repeats (nested models
            that share layer names).
    """

    def __init__(
        self,
        model: keras.Model,
        train: ArrayDataset | None,
        evaluation: ArrayDataset | None = None,
        *,
        optimizer: OptimizerSpec | None = None,
        eval_batch_size: int = 1024,
    ) -> None:
        self._keras = import_keras()
        self.model = model
        self._train = train
        self._eval = evaluation
        self._optimizer: OptimizerSpec = optimizer if optimizer is not None else _SGD()
        self._eval_batch = eval_batch_size
        repeated = sorted(p for p, count in Counter(v.path for v in model.weights).items() if count > 1)
        if repeated:
            raise ConfigError(f"Keras model variables share the paths {repeated[:5]}: give its layers unique names")
        self._compiled = False

    @property
    def num_samples(self) -> int:
        return 0 if self._train is None else len(self._train.y)

    def _to_numpy(self, value: Any) -> npt.NDArray[Any]:
        """A numpy copy of a backend tensor or variable value.

        PyTorch tensors are copied with ``.numpy()``: Keras's generic conversion
        goes through ``np.array(tensor)``, which numpy 2 flags as deprecated for
        torch's ``__array__``.
        """
        if self._keras.backend.backend() == "torch":
            return np.array(value.detach().cpu().numpy(), copy=True)
        return np.array(self._keras.ops.convert_to_numpy(value), copy=True)

    def get_parameters(self) -> ParamSet:
        return ParamSet((v.path, self._to_numpy(v.value)) for v in self.model.weights)

    def set_parameters(self, params: ParamSet) -> None:
        variables = self.model.weights
        missing = [v.path for v in variables if v.path not in params]
        if missing:
            raise ValueError(f"parameters lack {missing[:5]} (the Keras model has {len(variables)} variables)")
        arrays = []
        for v in variables:
            value = params[v.path]
            array = value.to_dense() if isinstance(value, SparseRows) else value
            if tuple(array.shape) != tuple(v.shape):
                raise ValueError(f"{v.path}: shape {tuple(array.shape)} != model {tuple(v.shape)}")
            arrays.append(array)
        # Checked all first, so a refused ParamSet leaves the model as it was.
        for v, array in zip(variables, arrays, strict=True):
            v.assign(np.ascontiguousarray(array, dtype=v.dtype))

    def _make_optimizer(self, lr: float) -> Any:
        s, optimizers = self._optimizer, self._keras.optimizers
        decay = s.weight_decay or None
        if s.name == "adam":
            return optimizers.Adam(learning_rate=lr, weight_decay=decay)
        if s.name == "sgd":
            return optimizers.SGD(learning_rate=lr, momentum=s.momentum, weight_decay=decay)
        raise ConfigError(f"client.optimizer = {s.name!r}: the Keras trainer knows sgd and adam")

    def _compile(self, optimizer: Any) -> None:
        k = self._keras
        self.model.compile(
            optimizer=optimizer,
            loss=k.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=[k.metrics.SparseCategoricalAccuracy(name="accuracy")],
        )

    def fit(self, config: FitConfig) -> FitResult:
        """``config.epochs`` seeded shuffles in minibatches; the mean loss and accuracy over them.

        The shuffle depends on the job seed and the round only, so a run repeats exactly.

        Raises:
            ConfigError: ``config`` asks for FedProx or SCAFFOLD, or an unknown optimizer.
            ValueError: this trainer has no training data.
            FloatingPointError: the mean loss is not finite (training diverged).
        """
        _refuse_torch_only(config)
        if self._train is None or self.num_samples == 0:
            raise ValueError("this trainer has no training data")
        self._compile(self._make_optimizer(config.lr))
        self._compiled = True
        x, y = self._train.x, self._train.y
        n = len(y)
        rng = np.random.default_rng([config.seed, config.round])
        total_loss, correct, seen = 0.0, 0, 0
        batches = -(-n // config.batch_size)
        reported = time.monotonic()
        for epoch in range(config.epochs):
            order = rng.permutation(n)
            for batch, start in enumerate(range(0, n, config.batch_size), start=1):
                if time.monotonic() - reported >= PROGRESS_EVERY_S and seen:
                    reported = time.monotonic()
                    log.info("training round %d: epoch %d/%d, batch %d/%d, mean loss %.4f", config.round,
                             epoch + 1, config.epochs, batch, batches, total_loss / seen)
                idx = order[start : start + config.batch_size]
                # train_on_batch resets the metrics first: its loss and accuracy are this batch's.
                logs = self.model.train_on_batch(x[idx], y[idx], return_dict=True)
                total_loss += float(logs["loss"]) * len(idx)
                correct += round(float(logs["accuracy"]) * len(idx))
                seen += len(idx)
        loss_mean = total_loss / max(seen, 1)
        if not math.isfinite(loss_mean):
            raise FloatingPointError(f"local training diverged (loss {loss_mean}); lower client.lr")
        return FitResult(self.num_samples, {"loss": loss_mean, "accuracy": correct / max(seen, 1)})

    def evaluate(self) -> Mapping[str, float]:
        """Mean cross-entropy and accuracy on the evaluation set (inference mode); {} without one."""
        if self._eval is None:
            return {}
        if not self._compiled:
            # test_on_batch needs the loss and metric; the optimizer is never used here.
            self._compile(self._make_optimizer(1e-3))
            self._compiled = True
        x, y = self._eval.x, self._eval.y
        total, correct = 0.0, 0
        for start in range(0, len(y), self._eval_batch):
            xb, yb = x[start : start + self._eval_batch], y[start : start + self._eval_batch]
            logs = self.model.test_on_batch(xb, yb, return_dict=True)
            total += float(logs["loss"]) * len(yb)
            correct += round(float(logs["accuracy"]) * len(yb))
        n = max(len(y), 1)
        return {"loss": total / n, "accuracy": correct / n}
