"""Finding the task a job names, without tying the core to a framework.

Built-in tasks live in :mod:`enclavefl.ml` (PyTorch) and are imported only when
a job names one; a user task ``package.module:function`` may use any framework.
Like the rest of a node's code, the user module is part of what the node
attests, which is why a job file may name it.
"""

from __future__ import annotations

import importlib

from enclavefl.config import JobConfig
from enclavefl.errors import ConfigError
from enclavefl.training import Task

__all__ = ["load_task"]


def load_task(config: JobConfig) -> Task:
    """Builds the task the job names.

    Raises:
        ConfigError: the name is neither built in nor an importable ``module:function``,
            or the function returned something that is not a task.
    """
    name = config.task.name
    if ":" not in name:
        from enclavefl.ml.tasks import TASKS

        if name not in TASKS:
            raise ConfigError(f"task.name = {name!r}: not a built-in task ({', '.join(sorted(TASKS))}) nor module:function")
        return TASKS[name](config)
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
            raise ConfigError(f"task.name = {name!r}: {func_name}() returned an object without {attr}()")
    return task  # type: ignore[no-any-return]
