"""The worker runtime: local training, the update pipeline, and its clients to the PS."""

from enclavefl.worker.clipping import ClipUpdate
from enclavefl.worker.compression import UploadCompressor
from enclavefl.worker.control import ScaffoldClient
from enclavefl.worker.heartbeat import Heartbeat
from enclavefl.worker.inmemory import InMemoryClient
from enclavefl.worker.local_round import LocalUpdate, train_local_round
from enclavefl.worker.noise import DistributedNoise, LocalDp
from enclavefl.worker.pipeline import (
    ControlDelta,
    Delta,
    SparseTrainer,
    SparsifyRows,
    UpdateContext,
    UpdateTransform,
    compute_delta,
    default_transforms,
    run_pipeline,
    sparsify_rows,
)
from enclavefl.worker.runtime import Worker, WorkerSettings, grpc_client_factory

__all__ = [
    "ClipUpdate",
    "ControlDelta",
    "Delta",
    "DistributedNoise",
    "Heartbeat",
    "InMemoryClient",
    "LocalDp",
    "LocalUpdate",
    "ScaffoldClient",
    "SparseTrainer",
    "SparsifyRows",
    "UpdateContext",
    "UpdateTransform",
    "UploadCompressor",
    "Worker",
    "WorkerSettings",
    "compute_delta",
    "default_transforms",
    "grpc_client_factory",
    "run_pipeline",
    "sparsify_rows",
    "train_local_round",
]
