"""ArrayTask: a classification task over in-memory arrays, split across workers by a named partitioner.

The built-in image workloads (:mod:`enclavefl.ml.workloads`) and the digits demo
(:mod:`enclavefl.ml.tasks`) are ArrayTasks; only their loaders differ.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from enclavefl.config import JobConfig
from enclavefl.errors import ConfigError
from enclavefl.ml.datasets.arrays import ArrayDataset, FederatedDataset
from enclavefl.ml.partition import PARTITIONERS, PartitionRow, label_histogram, partition_summary
from enclavefl.ml.trainer import OptimizerSettings, TorchTrainer
from enclavefl.tensors import ParamSet
from enclavefl.training import Trainer

__all__ = ["ArrayTask"]

log = logging.getLogger(__name__)


@dataclass
class ArrayTask:
    """A classification task over in-memory arrays, split by a named partitioner."""

    name: str
    make_model: Callable[[], nn.Module]
    train: ArrayDataset
    test: ArrayDataset | None
    config: JobConfig
    num_classes: int
    writers: FederatedDataset | None = None
    """Per-writer view of ``train`` (its flattening, in order), for ``task.partition: writer``."""

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
        data = self.writers if t.partition == "writer" and self.writers is not None else self.train
        return list(PARTITIONERS[t.partition](data, num_workers, seed=self.config.job.seed, **options))

    def partition_summary(self, num_workers: int) -> list[PartitionRow]:
        """Size and label histogram of every worker's share (for ``enclavefl run``'s table)."""
        return partition_summary(self.partition(num_workers), self.train.y, self.num_classes)

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
