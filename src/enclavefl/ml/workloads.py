"""The reference workloads as built-in tasks: LeNet, ResNet-20 and DLRM on real data.

=========================  =====================  ==========================================
task name                  data (``task.data_dir``)  held-out set the PS scores each round
=========================  =====================  ==========================================
``mnist-lenet``            MNIST IDX files           the official 10k test split
``fashion-mnist-resnet20`` Fashion-MNIST IDX files   the official 10k test split
``cifar10-resnet20``       CIFAR-10 (bin or py)      the official ``test_batch``
``femnist-lenet``          LEAF FEMNIST JSON         the LEAF ``test/`` shards
``criteo-dlrm``            Criteo TSV (train format) a seeded 10 % of the distinct rows
=========================  =====================  ==========================================

``task.data_dir`` is required; a relative path is taken relative to the
current working directory of the process (``enclavefl run`` starts the PS and
the workers in its own working directory), never relative to the job file,
because the nodes read a copy of the job written into the run directory.

``task.params`` (all optional; the models in :mod:`enclavefl.task_params` list
them, and a key a task does not read is refused when the job is parsed):

* the image tasks: ``max_train_samples`` / ``max_eval_samples`` (a seeded
  subsample, for short runs) and ``num_classes`` (classifier outputs, default
  from the data set: 10, FEMNIST 62).
* criteo-dlrm: ``table_size`` (rows per embedding table, default 10000),
  ``embedding_dim`` (16), ``bottom_mlp`` ([64, 32, embedding_dim]),
  ``top_mlp`` ([64, 32, 1]), ``eval_fraction`` (0.1), ``eval_fold`` (0: which
  ``eval_fraction`` slice of the seeded permutation is held out, for
  cross-validation on small samples), ``sparse_gradients`` (true: embedding
  tables get row-sparse gradients and a lazy optimizer, see
  :mod:`enclavefl.ml.dlrm_trainer`), ``train_file`` (default ``train.txt``,
  else ``train_sample.txt``), ``max_rows`` (rows read) and ``max_train_samples``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from enclavefl.config import JobConfig
from enclavefl.errors import ConfigError
from enclavefl.ml.datasets import (
    ArrayDataset,
    NUM_CATEGORICAL,
    CriteoData,
    FederatedDataset,
    flatten_federated,
    load_cifar10,
    load_criteo,
    load_fashion_mnist,
    load_femnist,
    load_mnist,
)
from enclavefl.ml.dlrm_trainer import DlrmTrainer
from enclavefl.ml.models import DLRM, lenet5, resnet20
from enclavefl.ml.partition import (
    PartitionRow,
    dirichlet,
    iid,
    label_histogram,
    partition_summary,
    quantity_skew,
)
from enclavefl.ml.array_task import ArrayTask
from enclavefl.ml.trainer import OptimizerSettings
from enclavefl.task_params import CriteoDlrmParams, ImageWorkloadParams, task_params
from enclavefl.tensors import ParamSet
from enclavefl.training import Task, Trainer

__all__ = [
    "WORKLOADS",
    "CriteoTask",
    "DlrmShape",
    "load_cifar10_resnet20",
    "load_criteo_dlrm",
    "load_fashion_mnist_resnet20",
    "load_femnist_lenet",
    "load_mnist_lenet",
    "resolve_data_dir",
]

log = logging.getLogger(__name__)

CRITEO_TRAIN_FILES = ("train.txt", "train_sample.txt")


def resolve_data_dir(config: JobConfig) -> Path:
    """``task.data_dir`` as a path (relative to the working directory).

    Raises:
        ConfigError: the job does not set ``task.data_dir``, or it is not a folder.
    """
    raw = config.task.data_dir
    if not raw:
        raise ConfigError(
            f"task {config.task.name!r} needs task.data_dir (the folder holding its data files); "
            "set it in the job file or with --set task.data_dir=PATH"
        )
    path = Path(raw).expanduser()
    if not path.is_dir():
        raise ConfigError(f"task.data_dir = {raw!r}: not a folder (resolved to {path.resolve()})")
    return path


def _sample(n: int, limit: int | None, seed: int) -> npt.NDArray[np.int64]:
    """Sorted indices of a seeded subsample of ``limit`` out of ``n`` (all when ``limit`` is None)."""
    if limit is None or limit >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).permutation(n)[:limit]).astype(np.int64)


def _limits(config: JobConfig) -> tuple[int | None, int | None]:
    """``max_train_samples`` and ``max_eval_samples``, checked before any data is read."""
    params = task_params(config, ImageWorkloadParams)
    return params.max_train_samples, params.max_eval_samples


def _limited(data: ArrayDataset, limit: int | None, seed: int) -> ArrayDataset:
    if limit is None or limit >= len(data):
        return data
    return data.subset(_sample(len(data), limit, seed))


def _optimizer(config: JobConfig) -> OptimizerSettings:
    c = config.client
    return OptimizerSettings(c.optimizer, c.momentum, c.weight_decay)


def _image_task(
    config: JobConfig,
    name: str,
    make_model: Callable[[int], torch.nn.Module],
    train: ArrayDataset,
    test: ArrayDataset,
    default_classes: int,
    writers: FederatedDataset | None = None,
) -> ArrayTask:
    num_classes = task_params(config, ImageWorkloadParams).num_classes or default_classes
    top = max(int(np.max(d.y)) if len(d) else 0 for d in (train, test))
    if top >= num_classes:
        raise ConfigError(f"task.params.num_classes = {num_classes}: the data holds label {top}")
    return ArrayTask(
        name=name,
        make_model=lambda: make_model(num_classes),
        train=train,
        test=test,
        config=config,
        num_classes=num_classes,
        writers=writers,
    )


def _split_task(
    config: JobConfig,
    name: str,
    load: Callable[[Path, str], ArrayDataset],
    make_model: Callable[[int], torch.nn.Module],
) -> Task:
    """A 10-class image task over a data set's official train and test splits, each optionally subsampled."""
    root = resolve_data_dir(config)
    train_limit, eval_limit = _limits(config)
    train = _limited(load(root, "train"), train_limit, config.job.seed)
    test = _limited(load(root, "test"), eval_limit, config.job.seed + 1)
    return _image_task(config, name, make_model, train, test, 10)


def load_mnist_lenet(config: JobConfig) -> Task:
    """LeNet-5 on MNIST (``task.data_dir`` holds the four IDX files, gzipped or not)."""
    return _split_task(config, "mnist-lenet", load_mnist, lambda k: lenet5(num_classes=k))


def load_fashion_mnist_resnet20(config: JobConfig) -> Task:
    """ResNet-20 (one input channel) on Fashion-MNIST IDX files."""
    return _split_task(config, "fashion-mnist-resnet20", load_fashion_mnist,
                       lambda k: resnet20(num_classes=k, in_channels=1))


def load_cifar10_resnet20(config: JobConfig) -> Task:
    """ResNet-20 on CIFAR-10 (binary or python version, as downloaded from the official page)."""
    return _split_task(config, "cifar10-resnet20", load_cifar10, lambda k: resnet20(num_classes=k))


def _limited_writers(writers: FederatedDataset, limit: int | None) -> FederatedDataset:
    """Keeps every writer, each cut to the same fraction of its samples (at least one)."""
    total = sum(len(d) for d in writers.values())
    if limit is None or limit >= total:
        return writers
    fraction = limit / total
    return {w: d.subset(np.arange(max(1, int(len(d) * fraction)))) for w, d in writers.items()}


def load_femnist_lenet(config: JobConfig) -> Task:
    """LeNet-5 on LEAF FEMNIST (62 classes); ``task.partition: writer`` gives whole writers to workers."""
    root = resolve_data_dir(config)
    train_limit, eval_limit = _limits(config)
    writers = _limited_writers(load_femnist(root, "train"), train_limit)
    test = _limited(flatten_federated(load_femnist(root, "test")), eval_limit, config.job.seed + 1)
    return _image_task(
        config, "femnist-lenet", lambda k: lenet5(num_classes=k), flatten_federated(writers), test, 62, writers
    )


@dataclass(frozen=True, slots=True)
class DlrmShape:
    """The DLRM a criteo-dlrm job trains, from its ``task.params`` (the checkpoint's shapes follow it)."""

    table_size: int
    embedding_dim: int
    bottom_mlp: tuple[int, ...]
    top_mlp: tuple[int, ...]
    sparse_gradients: bool

    @classmethod
    def from_config(cls, config: JobConfig) -> DlrmShape:
        """Raises: ConfigError: a ``task.params`` key has the wrong type or range."""
        params = task_params(config, CriteoDlrmParams)
        return cls(
            table_size=params.table_size,
            embedding_dim=params.embedding_dim,
            bottom_mlp=params.bottom_layers,
            top_mlp=tuple(params.top_mlp),
            sparse_gradients=params.sparse_gradients,
        )

    def build(self, seed: int) -> DLRM:
        torch.manual_seed(seed)
        return DLRM(
            embedding_sizes=[self.table_size] * NUM_CATEGORICAL,
            embedding_dim=self.embedding_dim,
            bottom_mlp=self.bottom_mlp,
            top_mlp=self.top_mlp,
            sparse_gradients=self.sparse_gradients,
        )


@dataclass
class CriteoTask:
    """DLRM on Criteo click logs: one embedding table per categorical column, binary objective."""

    name: str
    train: CriteoData
    test: CriteoData
    config: JobConfig
    shape: DlrmShape

    def _model(self) -> DLRM:
        return self.shape.build(self.config.job.seed)

    def _labels(self) -> npt.NDArray[np.int64]:
        assert self.train.labels is not None  # load_criteo(has_label=True)
        return self.train.labels.astype(np.int64)

    def partition(self, num_workers: int) -> list[npt.NDArray[np.int64]]:
        """Index arrays into ``train``, one per worker, from ``task.partition``."""
        t, seed = self.config.task, self.config.job.seed
        if t.partition == "iid":
            return iid(len(self.train), num_workers, seed)
        if t.partition == "dirichlet":
            return dirichlet(self._labels(), num_workers, t.alpha, seed)
        if t.partition == "quantity":
            return quantity_skew(len(self.train), num_workers, seed, alpha=t.alpha)
        raise ConfigError(f"task.partition = {t.partition!r}: Criteo has no writers; use iid, dirichlet or quantity")

    def partition_summary(self, num_workers: int) -> list[PartitionRow]:
        """Size and click/no-click histogram of each worker's share."""
        return partition_summary(self.partition(num_workers), self._labels(), 2)

    def initial_parameters(self) -> ParamSet:
        return DlrmTrainer(self._model(), None).get_parameters()

    def worker_trainer(self, index: int, num_workers: int) -> Trainer:
        if not 0 <= index < num_workers:
            raise ConfigError(f"worker index {index} is outside 0..{num_workers - 1}")
        part = self.partition(num_workers)[index]
        data = self.train.subset(part)
        hist = label_histogram(self._labels()[part], 2)
        log.info("task %s: worker %d of %d holds %d samples, labels [no click, click] %s",
                 self.name, index, num_workers, len(part), hist.tolist())
        return DlrmTrainer(self._model(), data, optimizer=_optimizer(self.config))

    def server_evaluator(self) -> Trainer | None:
        return DlrmTrainer(self._model(), None, self.test)


def _held_out_split(
    data: CriteoData, fraction: float, seed: int, fold: int = 0
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], int]:
    """Seeded (eval, train) row indices, holding out ``fraction`` of the *distinct* rows with all their copies.

    Criteo samples in circulation repeat rows (the shared 10,800-line sample is
    900 rows 12 times); a plain row split would score the model on rows it trained on.
    ``fold`` picks which slice of the seeded permutation is held out, so that
    ``1 / fraction`` runs with folds 0, 1, ... cross-validate on a small sample
    (no distinct row is held out twice; all are when the fraction's slices tile them).
    """
    assert data.labels is not None
    keys = np.concatenate(
        [data.dense.view(np.uint32), data.categorical.view(np.uint32), data.labels.view(np.uint32)[:, None]], axis=1
    )
    _, group = np.unique(keys, axis=0, return_inverse=True)
    group = group.ravel()
    distinct = int(group.max()) + 1 if len(group) else 0
    size = int(round(distinct * fraction))
    chosen = np.random.default_rng(seed).permutation(distinct)[fold * size : (fold + 1) * size]
    held = np.isin(group, chosen)
    return np.flatnonzero(held).astype(np.int64), np.flatnonzero(~held).astype(np.int64), distinct


def load_criteo_dlrm(config: JobConfig) -> Task:
    """DLRM on a Criteo TSV in the train format; a seeded ``eval_fraction`` of the distinct rows is held out."""
    root = resolve_data_dir(config)
    params = task_params(config, CriteoDlrmParams)  # eval_fraction in (0, 1), eval_fold within its folds
    name = params.train_file
    if name is None:
        found = [n for n in CRITEO_TRAIN_FILES if (root / n).is_file()]
        name = found[0] if found else CRITEO_TRAIN_FILES[0]
    shape = DlrmShape.from_config(config)
    fraction, fold = params.eval_fraction, params.eval_fold
    data = load_criteo(root / name, table_size=shape.table_size, max_rows=params.max_rows)
    test_idx, train_idx, distinct = _held_out_split(data, fraction, config.job.seed, fold)
    if len(test_idx) == 0 or len(train_idx) == 0:
        raise ConfigError(f"{root / name}: {distinct} distinct rows are too few for eval_fraction={fraction}")
    if distinct < len(data):
        log.warning("task criteo-dlrm: %s holds %d rows but only %d distinct ones; the held-out split is by "
                    "distinct row, so no evaluation row is also a training row", root / name, len(data), distinct)
    test = data.subset(test_idx)
    train = data.subset(train_idx)
    train = train.subset(_sample(len(train), params.max_train_samples, config.job.seed))
    log.info("task criteo-dlrm: %s, %d train rows, %d held out, table_size %d", root / name, len(train), len(test), shape.table_size)
    return CriteoTask(name="criteo-dlrm", train=train, test=test, config=config, shape=shape)


WORKLOADS: Mapping[str, Callable[[JobConfig], Task]] = {
    "cifar10-resnet20": load_cifar10_resnet20,
    "criteo-dlrm": load_criteo_dlrm,
    "fashion-mnist-resnet20": load_fashion_mnist_resnet20,
    "femnist-lenet": load_femnist_lenet,
    "mnist-lenet": load_mnist_lenet,
}
"""Built-in reference workloads by ``task.name``."""
