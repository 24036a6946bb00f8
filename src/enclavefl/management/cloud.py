"""The cloud FL cluster's management routes, over a :class:`~enclavefl.management.schema.JobHandle`.

How this works: operators of the cloud federated-learning cluster we replace
drive it with scripts against five REST routes of its scheduler (``/state``,
``/queryInstance``, ``/newInstance``, ``/enableFLS``, ``/disableFLS``). This
module answers them with that cluster's JSON field names and codes, so those
scripts keep working: every answer has ``code`` (``"0"`` success, ``"1"``
failure); a success carries ``message`` and an HTTP 200, a failure
``error_message`` and an HTTP 400.

The cluster's state machine maps onto the job's:

==================  ===========================  ==============================
``cluster_state``   job state                    ``enableFLS`` / ``disableFLS``
==================  ===========================  ==============================
CLUSTER_READY       starting, running            refused / pauses the job
CLUSTER_DISABLE     paused                       resumes the job / refused
CLUSTER_FINISH      finished, failed, stopped    refused / refused
==================  ===========================  ==============================

``/newInstance`` takes hyper-parameters by the cluster's names, converts them
to job-file keys (:data:`HYPER_PARAMETERS`; milliseconds become seconds) and
applies them from the next round through
:meth:`~enclavefl.management.schema.JobHandle.patch_settings`, which validates
them like the job file. Nothing here imports FastAPI: the routes in
:mod:`enclavefl.management.api` only move bytes in and out.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, final

from enclavefl.config import CLOUD_KEY_ALIASES
from enclavefl.errors import ConfigError
from enclavefl.management.schema import JobHandle, JobState

__all__ = [
    "ERROR_CODE",
    "HYPER_PARAMETERS",
    "SUCCESS_CODE",
    "CloudReply",
    "CloudRoutes",
    "ClusterState",
    "HyperParameter",
    "cluster_state",
    "from_cloud",
    "to_cloud",
]

SUCCESS_CODE: Final = "0"
ERROR_CODE: Final = "1"

ClusterState = Literal["CLUSTER_READY", "CLUSTER_DISABLE", "CLUSTER_FINISH"]

_FINISHED: Final[frozenset[JobState]] = frozenset({"finished", "failed", "stopped"})


def cluster_state(state: JobState) -> ClusterState:
    """The cloud cluster's state for a job in ``state``."""
    if state in _FINISHED:
        return "CLUSTER_FINISH"
    if state == "paused":
        return "CLUSTER_DISABLE"
    return "CLUSTER_READY"


@dataclass(frozen=True, slots=True)
class HyperParameter:
    """How one cloud hyper-parameter maps onto a job-file key.

    Attributes:
        key: the dotted job-file key (``round.update_window_s``).
        kind: ``count`` (a JSON integer >= 0), ``ratio`` (a number in (0, 1]),
            ``positive`` (a number > 0) or ``ms`` (a JSON integer >= 0 of milliseconds, stored as seconds).
    """

    key: str
    kind: Literal["count", "ratio", "positive", "ms"]


_VALUE_KINDS: Final[Mapping[str, Literal["ratio", "positive"]]] = {
    "update_model_ratio": "ratio",
    "client_learning_rate": "positive",
}


def _kind(name: str, factor: float | None) -> Literal["count", "ratio", "positive", "ms"]:
    if factor is not None:
        return "ms"
    return _VALUE_KINDS.get(name, "count")


HYPER_PARAMETERS: Final[Mapping[str, HyperParameter]] = {
    name: HyperParameter(key, _kind(name, factor)) for name, (key, factor) in CLOUD_KEY_ALIASES.items()
}
"""Cloud hyper-parameter name -> job-file key: the job file's own aliases
(:data:`~enclavefl.config.CLOUD_KEY_ALIASES`), so a name means the same in a job
file and in ``/newInstance``. A name not listed here is refused by ``/newInstance``."""


def to_cloud(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The cloud hyper-parameters that ``settings`` (dotted job-file keys) holds, by their cloud names."""
    out: dict[str, Any] = {}
    for name, param in HYPER_PARAMETERS.items():
        if param.key not in settings:
            continue
        value = settings[param.key]
        out[name] = int(round(float(value) * 1000)) if param.kind == "ms" else value
    return out


def _check(name: str, param: HyperParameter, value: object) -> int | float:
    """``value`` as the job-file key wants it. Raises ConfigError naming ``name``."""
    if param.kind in ("count", "ms"):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"field {name} should be an unsigned integer, got {json.dumps(value)}")
        return value / 1000 if param.kind == "ms" else value
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"field {name} should be a number, got {json.dumps(value)}")
    if value <= 0 or (param.kind == "ratio" and value > 1):
        expected = "in (0, 1]" if param.kind == "ratio" else "greater than 0"
        raise ConfigError(f"field {name} should be {expected}, got {value!r}")
    return value


def from_cloud(body: object, changeable: Mapping[str, Any]) -> dict[str, Any]:
    """The job-file changes (dotted keys) that a ``/newInstance`` body asks for.

    Args:
        body: the parsed JSON body.
        changeable: the settings the job lets change (its keys are what counts).

    Raises:
        ConfigError: the body is not an object, names an unknown hyper-parameter or one this job
            cannot change while it runs, or a value of the wrong type or range (the field is named).
    """
    if not isinstance(body, dict):
        raise ConfigError(f"the body should be a JSON object of hyper-parameters, got {type(body).__name__}")
    changes: dict[str, Any] = {}
    for name, value in body.items():
        param = HYPER_PARAMETERS.get(name)
        if param is None:
            known = ", ".join(sorted(HYPER_PARAMETERS))
            raise ConfigError(f"field {name} is not a hyper-parameter enclavefl maps (known: {known})")
        if param.key not in changeable:
            raise ConfigError(f"field {name} ({param.key}) cannot be changed while the job runs")
        changes[param.key] = _check(name, param, value)
    if not changes:
        raise ConfigError("the body names no hyper-parameter")
    return changes


@dataclass(frozen=True, slots=True)
class CloudReply:
    """An HTTP status and the JSON body the cloud cluster would send."""

    status: int
    body: dict[str, Any] = field(default_factory=dict)


def _ok(message: str, **extra: Any) -> CloudReply:
    return CloudReply(200, {"code": SUCCESS_CODE, "message": message, **extra})


def _error(message: str) -> CloudReply:
    return CloudReply(400, {"code": ERROR_CODE, "error_message": message})


@final
class CloudRoutes:
    """The answers of the five cloud routes for one job. Thread-safe as the handle is."""

    def __init__(self, handle: JobHandle, *, server_address: str = "") -> None:
        """Serves ``handle``.

        Args:
            server_address: the PS's worker-facing ``host:port``, reported as its ``tcp_address``.
        """
        self._handle = handle
        self._server_address = server_address

    def _nodes(self, instance: str) -> list[dict[str, str]]:
        listed = getattr(self._handle, "nodes", None)
        if callable(listed):  # a cluster's handle lists its servers (SERVER) and workers (WORKER) itself
            cluster_nodes: list[dict[str, str]] = listed()
            return cluster_nodes
        nodes = [{"node_id": instance, "tcp_address": self._server_address, "role": "SERVER"}]
        nodes += [{"node_id": w.worker_id, "tcp_address": "", "role": "WORKER"}
                  for w in self._handle.workers() if w.state not in ("dropped", "left")]
        return nodes

    def state(self) -> CloudReply:
        """``GET /state``: the cluster state and its nodes (the PS as SERVER, each live worker as WORKER)."""
        status = self._handle.status()
        return _ok(f"cluster state of job {status.job}", cluster_state=cluster_state(status.state),
                   nodes=self._nodes(status.instance))

    def query_instance(self) -> CloudReply:
        """``POST /queryInstance``: the current hyper-parameters in ``result``, by their cloud names."""
        status = self._handle.status()
        return _ok(f"hyper-parameters of job {status.job}", result=to_cloud(self._handle.settings()),
                   nodes=self._nodes(status.instance))

    def new_instance(self, body: bytes, *, by: str) -> CloudReply:
        """``POST /newInstance``: applies the body's hyper-parameters from the next round."""
        state = cluster_state(self._handle.status().state)
        if state == "CLUSTER_FINISH":
            return _error("the job has finished: its hyper-parameters can no longer change")
        try:
            parsed = json.loads(body) if body.strip() else None
        except (ValueError, UnicodeDecodeError) as exc:
            return _error(f"the body is not valid JSON: {exc}")
        try:
            changes = from_cloud(parsed, self._handle.settings())
            self._handle.patch_settings(changes, by=by)
        except ConfigError as exc:
            return _error(f"new hyper-parameters refused: {exc}")
        return _ok(f"hyper-parameters {', '.join(sorted(changes))} apply from the next round")

    def enable(self, *, by: str) -> CloudReply:
        """``POST /enableFLS``: resumes a paused (disabled) job."""
        state = cluster_state(self._handle.status().state)
        if state == "CLUSTER_FINISH":
            return _error("the job has finished and cannot be enabled")
        if state == "CLUSTER_READY" or not self._handle.resume(by=by):
            return _error("the job is already enabled")
        return _ok("the job is enabled: rounds open again")

    def disable(self, *, by: str) -> CloudReply:
        """``POST /disableFLS``: pauses the job (the open round runs on; no new one opens)."""
        state = cluster_state(self._handle.status().state)
        if state == "CLUSTER_FINISH":
            return _error("the job has finished and cannot be disabled")
        if state == "CLUSTER_DISABLE" or not self._handle.pause(by=by):
            return _error("the job is already disabled")
        return _ok("the job is disabled: no new round opens until /enableFLS")
