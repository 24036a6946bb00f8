"""Built-in tasks and the resolution of user tasks (``package.module:function``).

A task is what the job's ``task`` section names: a model, its training data
split deterministically across workers, and the held-out data the PS scores
each round. A user task is a function ``(JobConfig) -> Task`` in an importable
module; like the rest of the node's code, that module is part of what the node
attests, which is why a job file may name it.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from enclavefl.config import JobConfig
from enclavefl.errors import ConfigError
from enclavefl.ml.datasets.arrays import ArrayDataset
from enclavefl.ml.models import MODELS
from enclavefl.ml.partition import PARTITIONERS, label_histogram
from enclavefl.ml.trainer import OptimizerSettings, TorchTrainer
from enclavefl.tensors import ParamSet
from enclavefl.training import Task, Trainer

__all__ = ["TASKS", "ArrayTask", "load_digits_task", "load_task"]

log = logging.getLogger(__name__)

TaskFactory = Callable[[JobConfig], Task]


@dataclass
class ArrayTask:
    """A classification task over in-memory arrays, split by a named partitioner."""

    name: str
    make_model: Callable[[], nn.Module]
    train: ArrayDataset
    test: ArrayDataset | None
    config: JobConfig
    num_classes: int

    def _model(self) -> nn.Module:
        torch.manual_seed(self.config.job.seed)
        return self.make_model()

    def _optimizer(self) -> OptimizerSettings:
        c = self.config.client
        return OptimizerSettings(c.optimizer, c.momentum, c.weight_decay)

    def initial_parameters(self) -> ParamSet:
        return TorchTrainer(self._model(), None).get_parameters()

    def partition(self, num_workers: int) -> list[np.ndarray]:
        """Index arrays into ``train``, one per worker, from the job's ``task.partition``."""
        t = self.config.task
        options = {"alpha": t.alpha} if t.partition in ("dirichlet", "quantity") else {}
        return list(PARTITIONERS[t.partition](self.train, num_workers, seed=self.config.job.seed, **options))

    def worker_trainer(self, index: int, num_workers: int) -> Trainer:
        if not 0 <= index < num_workers:
            raise ConfigError(f"worker index {index} is outside 0..{num_workers - 1}")
        part = self.partition(num_workers)[index]
        data = self.train.subset(part)
        hist = label_histogram(data.y, self.num_classes)
        log.info("task %s: worker %d of %d holds %d samples, labels %s", self.name, index, num_workers, len(part), hist.tolist())
        return TorchTrainer(self._model(), data, optimizer=self._optimizer())

    def server_evaluator(self) -> Trainer | None:
        if self.test is None:
            return None
        return TorchTrainer(self._model(), None, self.test)


def load_digits_task(config: JobConfig) -> Task:
    """scikit-learn's bundled handwritten digits (1797 real 8x8 images, no download).

    A seeded 20 % is held out for the PS's evaluation; the rest is split across workers.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ConfigError("task digits-mlp needs scikit-learn: pip install 'enclavefl[ml]'") from exc
    bunch = load_digits()
    x = (np.asarray(bunch.data, dtype=np.float32) / 16.0).astype(np.float32)
    y = np.asarray(bunch.target, dtype=np.int64)
    order = np.random.default_rng(config.job.seed).permutation(len(y))
    cut = int(round(len(y) * 0.2))
    test_idx, train_idx = np.sort(order[:cut]), np.sort(order[cut:])
    hidden = tuple(int(h) for h in config.task.params.get("hidden", (64,)))
    return ArrayTask(
        name="digits-mlp",
        make_model=lambda: MODELS["mlp"](in_features=64, hidden=hidden, num_classes=10),
        train=ArrayDataset(x[train_idx], y[train_idx]),
        test=ArrayDataset(x[test_idx], y[test_idx]),
        config=config,
        num_classes=10,
    )


TASKS: dict[str, TaskFactory] = {"digits-mlp": load_digits_task}


def load_task(config: JobConfig) -> Task:
    """Builds the task the job names.

    Raises:
        ConfigError: the name is neither built in nor an importable ``module:function``.
    """
    name = config.task.name
    if name in TASKS:
        return TASKS[name](config)
    if ":" not in name:
        raise ConfigError(f"task.name = {name!r}: not a built-in task ({', '.join(sorted(TASKS))}) nor module:function")
    module_name, _, func_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"task.name = {name!r}: cannot import {module_name}: {exc}") from exc
    factory = getattr(module, func_name, None)
    if not callable(factory):
        raise ConfigError(f"task.name = {name!r}: {module_name} has no function {func_name}")
    task = factory(config)
    for attr in ("initial_parameters", "worker_trainer", "server_evaluator"):
        if not callable(getattr(task, attr, None)):
            raise ConfigError(f"task.name = {name!r}: the returned object lacks {attr}()")
    return task  # type: ignore[no-any-return]


def task_names() -> Mapping[str, TaskFactory]:
    """The built-in tasks, for the CLI's help."""
    return dict(TASKS)
