"""The worker runtime."""

from enclavefl.worker.runtime import Worker, WorkerSettings, compute_delta

__all__ = ["Worker", "WorkerSettings", "compute_delta"]
