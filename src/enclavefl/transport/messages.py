"""Plain value types that cross the seam between the gRPC service and the PS logic."""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from enclavefl.tensors import ParamSet, StreamHeader
from enclavefl.transport.credentials import PeerIdentity

__all__ = [
    "ClientSettings",
    "FederationHandler",
    "JoinInfo",
    "TaskInfo",
    "TaskKind",
    "UpdateMeta",
    "UpdateSink",
]


class TaskKind(enum.Enum):
    WAIT = "wait"
    TRAIN = "train"
    FINISH = "finish"


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """Local-training settings the PS hands to every worker with a task."""

    epochs: int
    batch_size: int
    lr: float


@dataclass(frozen=True, slots=True)
class JoinInfo:
    worker_id: str
    job_name: str
    ps_instance: str
    rounds: int


@dataclass(frozen=True, slots=True)
class TaskInfo:
    kind: TaskKind
    ps_instance: str
    round: int = 0
    model_version: int = 0
    retry_after_s: float = 0.0
    client: ClientSettings | None = None
    message: str = ""


@dataclass(frozen=True, slots=True)
class UpdateMeta:
    """The header of a pushed update, as the worker announced it (not yet trusted)."""

    worker_id: str
    round: int
    model_version: int
    num_samples: int
    tensors: StreamHeader
    metrics: Mapping[str, float] = field(default_factory=dict)


class UpdateSink(ABC):
    """Receives one update's chunks; either commit() or abort() ends it."""

    @abstractmethod
    def feed(self, chunk: bytes | memoryview) -> None:
        """Stages one chunk. Raises ProtocolError on a chunk the header did not announce."""

    @abstractmethod
    def commit(self) -> None:
        """Validates the whole update and folds it into the aggregate.

        Raises:
            UpdateRejected: the update is invalid or late; the aggregate is unchanged.
        """

    @abstractmethod
    def abort(self, reason: str) -> None:
        """Drops the staged update (broken stream); the aggregate is unchanged. Idempotent."""


class FederationHandler(Protocol):
    """What the gRPC service asks of the parameter server. Methods may block."""

    def join(self, peer: PeerIdentity, worker_name: str, num_samples: int) -> JoinInfo: ...

    def wait_task(self, peer: PeerIdentity, worker_id: str, max_wait_s: float) -> TaskInfo: ...

    def model_for(self, peer: PeerIdentity, worker_id: str, model_version: int) -> tuple[int, ParamSet]: ...

    def open_update(self, peer: PeerIdentity, meta: UpdateMeta) -> UpdateSink: ...

    def leave(self, peer: PeerIdentity, worker_id: str, reason: str) -> None: ...
