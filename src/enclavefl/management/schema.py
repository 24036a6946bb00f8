"""The management plane's contract: what a running job reports and what an operator may ask of it.

How this works: a :class:`JobHandle` is the only thing the management API,
the dashboard, the Prometheus exporter and the CLI see of a job. A single
parameter server implements it today; the cluster's scheduler will implement
the same protocol, so every route, page and script keeps working there. The
models below are the JSON bodies of ``/api/v1`` (field names are the API's:
rename nothing, add freely). Nothing here imports grpc, FastAPI or torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    # Only a type here: importing enclavefl.server at run time would close a circle
    # (enclavefl.server imports its handle, which imports these models).
    from enclavefl.server.events import EventBus

__all__ = [
    "Identity",
    "JobHandle",
    "JobState",
    "RoundsPage",
    "StopMode",
    "Status",
    "WorkerInfo",
    "WorkerState",
]

JobState = Literal["starting", "running", "paused", "finished", "failed", "stopped"]
WorkerState = Literal["joined", "training", "uploaded", "dropped", "left"]
StopMode = Literal["finish", "abort"]
"""``finish``: the open round completes (aggregated, checkpointed), then the job ends;
``abort``: the open round is abandoned, the last completed one is checkpointed."""


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Identity(_Out):
    """What a node's attestation proved (for a PS: about itself; for a worker: at its join)."""

    evidence: Literal["sgx", "tdx", "simulated", "none"] = "none"
    mr_enclave: str = ""
    mr_signer: str = ""
    isv_prod_id: int | None = None
    isv_svn: int | None = None
    tcb_status: str | None = None
    """Intel's TCB status from collateral; None when it was not evaluated (simulated, none, no collateral)."""
    advisories: tuple[str, ...] = ()
    weaker: tuple[str, ...] = ()
    """Policy allowances the acceptance relied on (``missing_collateral``, ...): a weaker verdict."""
    fingerprint: str = ""
    """SHA-256 (hex) of the TLS certificate the node used."""


class Status(_Out):
    """``GET /api/v1/status``."""

    job: str
    instance: str
    state: JobState
    phase: str
    round: int
    """The open round, or the next one to open."""
    rounds: int
    """Rounds the job runs in all (``job.rounds``; ``PATCH /api/v1/config`` may change it)."""
    rounds_done: int
    rounds_left: int
    model_version: int
    participants: int
    """Workers sampled for the open round (0 when none is open)."""
    updates: int
    """Updates accepted in the open round so far."""
    workers_joined: int
    started_at: float
    """Unix time the PS started."""
    uptime_s: float
    eta_s: float | None = None
    """Rounds left times the mean seconds per completed round; None before the first."""
    attestation_mode: Literal["simulated", "gramine", "none"]
    identity: Identity
    failure: str | None = None


class WorkerInfo(_Out):
    """One row of ``GET /api/v1/workers``."""

    worker_id: str
    name: str
    state: WorkerState
    last_seen_s: float
    """Seconds since the PS last heard from it."""
    rounds_contributed: int
    bytes_in: int
    """Update bytes received from it."""
    bytes_out: int
    """Model bytes sent to it."""
    identity: Identity
    reason: str = ""
    """Why it was dropped or left."""


class RoundsPage(_Out):
    """``GET /api/v1/rounds?offset=&limit=``: metrics rows as in metrics.jsonl, oldest first."""

    total: int
    offset: int
    rows: list[dict[str, Any]] = Field(default_factory=list)


class JobHandle(Protocol):
    """A running job as the management plane sees it. Every method is thread-safe and returns quickly."""

    @property
    def events(self) -> EventBus:
        """Phase changes, accepted and refused updates, worker and attestation decisions, round rows."""

    def status(self) -> Status: ...

    def workers(self) -> list[WorkerInfo]:
        """Every worker the job knows, joined or departed (departed ones: the most recent, bounded)."""

    def rounds(self, offset: int, limit: int) -> RoundsPage: ...

    def stop(self, mode: StopMode, *, by: str) -> None:
        """Ends the job as ``mode`` says; a checkpoint is written either way; returns at once."""

    def pause(self, *, by: str) -> bool:
        """No new round opens until :meth:`resume`; the open one runs on. False if already paused."""

    def resume(self, *, by: str) -> bool:
        """Rounds open again. False if it was not paused."""

    def settings(self) -> dict[str, Any]:
        """The settings :meth:`patch_settings` may change, with their current values (dotted keys)."""

    def patch_settings(self, changes: Mapping[str, Any], *, by: str) -> dict[str, Any]:
        """Validates ``changes`` (dotted keys) like the job file and applies them from the next round.

        Returns the settings after the change.

        Raises:
            ConfigError: an unknown or unchangeable key, or a value the job file would refuse (named).
        """
