"""Built-in tasks and the resolution of user tasks (``package.module:function``).

A task is what the job's ``task`` section names: a model, its training data
split deterministically across workers, and the held-out data the PS scores
each round. A user task is a function ``(JobConfig) -> Task`` in an importable
module; like the rest of the node's code, that module is part of what the node
attests, which is why a job file may name it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from enclavefl.config import JobConfig
from enclavefl.errors import ConfigError
from enclavefl.ml.array_task import ArrayTask
from enclavefl.ml.datasets.arrays import ArrayDataset
from enclavefl.ml.keras_tasks import KERAS_TASKS
from enclavefl.ml.models import MODELS
from enclavefl.ml.workloads import WORKLOADS
from enclavefl.task_params import DigitsMlpParams, task_params
from enclavefl.training import Task

__all__ = ["TASKS", "ArrayTask", "load_digits_task"]

TaskFactory = Callable[[JobConfig], Task]


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
    hidden = tuple(task_params(config, DigitsMlpParams).hidden)
    return ArrayTask(
        name="digits-mlp",
        make_model=lambda: MODELS["mlp"](in_features=64, hidden=hidden, num_classes=10),
        train=ArrayDataset(x[train_idx], y[train_idx]),
        test=ArrayDataset(x[test_idx], y[test_idx]),
        config=config,
        num_classes=10,
    )


TASKS: dict[str, TaskFactory] = {"digits-mlp": load_digits_task, **WORKLOADS, **KERAS_TASKS}
"""Built-in tasks by ``task.name``: the digits demo, the reference workloads and their Keras versions.

Each has its ``task.params`` model in :data:`enclavefl.task_params.BUILTIN_TASK_PARAMS` (a test keeps the two in step).
"""

