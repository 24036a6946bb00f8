"""The cluster's own read routes on the scheduler's management API (a :data:`~enclavefl.management.api.Mount`).

- ``GET /api/v1/cluster/servers``: the live servers (id, address) and the leader-lease holder;
- ``GET /api/v1/cluster/assignment/{worker}``: the server a worker (by name) should use, and its
  alternatives in failover order (:func:`~enclavefl.cluster.assignment.balance`).

- ``POST /api/v1/scale`` ``{"servers": N}``: drains servers down to N, or starts more when the scheduler
  can (:meth:`~enclavefl.cluster.scheduler.Scheduler.scale`); 422 names what it cannot do.

The first two are read routes: they need the job's bearer token unless ``management.public_read``;
scaling is a control route (always the token).
"""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from enclavefl.cluster.assignment import balance
from enclavefl.cluster.scheduler import MAX_SERVERS, ClusterHandle
from enclavefl.errors import ConfigError
from enclavefl.management.api import API_PREFIX, ControlCaller, require_read
from enclavefl.management.schema import JobHandle

__all__ = ["mount"]

_MAX_NAME_CHARS = 64


class ScaleRequest(BaseModel):
    """``POST /api/v1/scale``: how many servers the cluster should run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    servers: int = Field(ge=1, le=MAX_SERVERS)


def mount(app: FastAPI, handle: JobHandle) -> None:
    """Adds the cluster routes for ``handle`` (a :class:`ClusterHandle`; other handles get none)."""
    if not isinstance(handle, ClusterHandle):
        return
    cluster = handle

    def servers() -> dict[str, Any]:
        return {"servers": [{"id": m.member_id, "address": m.address} for m in cluster.servers()],
                "leader": cluster.leader()}

    def assignment(worker: str) -> dict[str, Any]:
        if not 0 < len(worker) <= _MAX_NAME_CHARS:
            raise HTTPException(422, f"worker name must be 1..{_MAX_NAME_CHARS} characters")
        # The placement the servers compute (the joined workers' names, this one among them).
        ordered = balance([*(w.name for w in cluster.workers()), worker], cluster.servers()).get(worker, [])
        if not ordered:
            raise HTTPException(503, "no server is live")
        entries = [{"id": m.member_id, "address": m.address} for m in ordered]
        return {"worker": worker, "server": entries[0], "alternatives": entries[1:]}

    def scale(body: ScaleRequest, by: ControlCaller) -> Any:
        try:
            return cluster.scale(body.servers, by=by)
        except ConfigError as exc:
            return JSONResponse({"detail": str(exc), "fields": ["servers"]}, status_code=422)

    app.add_api_route(f"{API_PREFIX}/scale", scale, methods=["POST"])
    app.add_api_route(f"{API_PREFIX}/cluster/servers", servers, methods=["GET"], dependencies=[Depends(require_read)])
    app.add_api_route(f"{API_PREFIX}/cluster/assignment/{{worker}}", assignment, methods=["GET"],
                      dependencies=[Depends(require_read)])
