"""Digests of the job settings every node must share, compared when a worker joins.

A worker trains what its own job file says about the task: its name and
params, how the data is split, the seed, and therefore the model it builds.
Everything else about training comes from the PS with each task (see
:class:`~enclavefl.messages.ClientSettings`). When a worker's file differs in
one of these settings, its update does not fit the PS's model or was trained
on the wrong share of the data, and without a check the mistake shows only
as a shape error after the first pull. So a worker sends a digest of each
setting when it joins, the PS compares them with its own, and a join whose
digests differ is refused with the keys that differ.

The privacy sections (``privacy.dp``, ``privacy.local_dp``,
``privacy.secure_aggregation``) are compared too: the worker follows what the
PS's tasks say, so without the check a PS set up without secure aggregation or
DP (by mistake, or to see more) would get plain updates from workers whose
owners asked for them; with it the worker refuses to join, naming the section.

A digest is the first 16 hex digits of the SHA-256 of the setting's value as
canonical JSON: enough to tell values apart, and nothing about a value is sent.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from enclavefl.config import JobConfig
from enclavefl.tensors import StreamHeader

__all__ = ["MODEL_KEY", "differing_settings", "job_digests"]

MODEL_KEY = "model"
"""The key of the model's digest: tensor names, dtypes and shapes, in order."""

_ALPHA_PARTITIONS = ("dirichlet", "quantity")

_PRIVACY_SECTIONS = ("dp", "local_dp", "secure_aggregation")
"""What the workers' owners ask of the aggregation: a PS must run the same (upload compression is not here:
it changes the bytes, not who may see an update)."""


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def job_digests(config: JobConfig, model: StreamHeader) -> dict[str, str]:
    """One digest per setting that must match across nodes, keyed by its dotted name.

    ``task.alpha`` is included only for the partitions that read it; ``task.data_dir``
    is not (each host keeps its data in its own place).

    Args:
        model: the tensors of the model this node's task builds.
    """
    task = config.task
    settings: dict[str, Any] = {
        "job.name": config.job.name,
        "job.seed": config.job.seed,
        "task.name": task.name,
        "task.params": task.params,
        "task.partition": task.partition,
        MODEL_KEY: [[t.name, t.dtype, list(t.shape)] for t in model.tensors],
    }
    if task.partition in _ALPHA_PARTITIONS:
        settings["task.alpha"] = task.alpha
    for name in _PRIVACY_SECTIONS:
        settings[f"privacy.{name}"] = getattr(config.privacy, name).model_dump(mode="json")
    return {key: _digest(value) for key, value in settings.items()}


def differing_settings(ours: Mapping[str, str], theirs: Mapping[str, str]) -> list[str]:
    """The keys whose digests differ, or that only one side has, sorted."""
    return sorted(key for key in set(ours) | set(theirs) if ours.get(key) != theirs.get(key))
