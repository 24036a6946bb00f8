"""PyTorch models of the reference workloads, found by name from a job file.

``MODELS[name](**options)`` builds a fresh, randomly initialised model;
:func:`create_model` does the same with a clear error for unknown names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from enclavefl.errors import ConfigError
from enclavefl.ml.models.dlrm import DLRM
from enclavefl.ml.models.lenet import LeNet5, lenet5
from enclavefl.ml.models.mlp import mlp
from enclavefl.ml.models.resnet import ResNet, resnet18, resnet20, resnet32, resnet56, resnet_cifar

__all__ = [
    "DLRM",
    "MODELS",
    "LeNet5",
    "ResNet",
    "create_model",
    "lenet5",
    "mlp",
    "resnet18",
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet_cifar",
]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "dlrm": DLRM,
    "lenet5": lenet5,
    "mlp": mlp,
    "resnet18": resnet18,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "resnet_cifar": resnet_cifar,
}
"""Model constructors by job-file name; keyword options go to the constructor."""


def create_model(name: str, **options: Any) -> nn.Module:
    """Build the model registered as ``name`` with ``options``.

    Raises:
        ConfigError: unknown name, or options the constructor does not take.
    """
    factory = MODELS.get(name)
    if factory is None:
        raise ConfigError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    try:
        return factory(**options)
    except TypeError as exc:
        raise ConfigError(f"model {name!r}: bad options {sorted(options)} ({exc})") from exc
