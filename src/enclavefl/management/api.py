"""The management API of a running job: FastAPI routes over a :class:`~enclavefl.management.schema.JobHandle`.

How this works: :func:`create_app` builds one FastAPI application for one
job. ``/api/v1/*`` reads the job (status, workers, rounds, events, settings)
and controls it (stop, pause, resume, settings changes); the cloud cluster's
five routes (:mod:`enclavefl.management.cloud`) answer at the root with that
cluster's JSON shapes. Every route that calls the handle is a plain function,
which FastAPI runs on its thread pool: the event loop never waits for the
PS, and the handle's methods return quickly by contract. Errors never leave
the app: a refused token is a 401 (:mod:`enclavefl.management.auth`), a bad
body a 4xx naming the field, anything unexpected a 500 with one log line,
and the PS thread never sees any of them.

Other parts of the management plane (the dashboard, the Prometheus
exporter) plug in as *mounts*: functions called with the app and the handle
after the API's own routes are in place, which add routes of their own and
may protect them with :func:`require_read` and :func:`require_control`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Final

from fastapi import Body, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from enclavefl.errors import ConfigError
from enclavefl.management.auth import TokenGuard
from enclavefl.management.bodylimit import DEFAULT_MAX_BODY_BYTES, BodyLimit
from enclavefl.management.cloud import ERROR_CODE, CloudReply, CloudRoutes
from enclavefl.management.schema import JobHandle, RoundsPage, Status, StopMode, WorkerInfo
from enclavefl.management.sse import stream_events
from enclavefl.transport.audit import AuditLog

__all__ = ["API_PREFIX", "CLOUD_PATHS", "Mount", "StopRequest", "create_app", "require_control", "require_read"]

log = logging.getLogger(__name__)

API_PREFIX: Final = "/api/v1"
CLOUD_PATHS: Final = frozenset({"/state", "/queryInstance", "/newInstance", "/enableFLS", "/disableFLS"})
"""The cloud cluster's routes: their errors (401 included) use its ``code``/``error_message`` shape."""

Mount = Callable[[FastAPI, JobHandle], None]
"""Adds routes to the app for one job (the dashboard's page, the Prometheus exporter)."""

_ENDED: Final = frozenset({"finished", "failed", "stopped"})
_MAX_ROUNDS_PAGE: Final = 1000


class StopRequest(BaseModel):
    """``POST /api/v1/stop``: how to end the job (default ``finish``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: StopMode = "finish"


class _Unauthorized(Exception):
    def __init__(self, message: str, *, cloud: bool) -> None:
        super().__init__(message)
        self.cloud = cloud


def _peer(request: Request) -> str:
    client = request.client
    return f"{client.host}:{client.port}" if client is not None else "unknown"


def _authorize(request: Request, *, control: bool) -> str:
    guard: TokenGuard = request.app.state.guard
    header = request.headers.get("authorization")
    peer = _peer(request)
    if not guard.allows(header, control=control):
        message = guard.refuse(peer, f"{request.method} {request.url.path}", header)
        raise _Unauthorized(message, cloud=request.url.path in CLOUD_PATHS)
    return f"api {peer}"


async def require_read(request: Request) -> str:
    """A dependency for read routes: the token, unless ``management.public_read``. Returns who asked."""
    return _authorize(request, control=False)


async def require_control(request: Request) -> str:
    """A dependency for control routes: always the token. Returns who asked (for the job's records)."""
    return _authorize(request, control=True)


ReadCaller = Annotated[str, Depends(require_read)]
ControlCaller = Annotated[str, Depends(require_control)]


def _flatten(changes: dict[str, Any], settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested JSON (``{"round": {"fraction": 0.5}}``) as dotted keys; a known setting's value stays whole."""
    flat: dict[str, Any] = {}
    for key, value in changes.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted not in settings:
            flat.update(_flatten(value, settings, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _job_ended(handle: JobHandle) -> str | None:
    state = handle.status().state
    return state if state in _ENDED else None


def _add_api_routes(app: FastAPI, handle: JobHandle, stopping: threading.Event) -> None:
    @app.get(f"{API_PREFIX}/status", response_model=Status)
    def status(_: ReadCaller) -> Status:
        return handle.status()

    @app.get(f"{API_PREFIX}/workers", response_model=list[WorkerInfo])
    def workers(_: ReadCaller) -> list[WorkerInfo]:
        return handle.workers()

    @app.get(f"{API_PREFIX}/rounds", response_model=RoundsPage)
    def rounds(_: ReadCaller, offset: Annotated[int, Query(ge=0)] = 0,
               limit: Annotated[int, Query(ge=1, le=_MAX_ROUNDS_PAGE)] = 100) -> RoundsPage:
        return handle.rounds(offset, limit)

    @app.get(f"{API_PREFIX}/events")
    async def events(request: Request, _: ReadCaller,
                     after: Annotated[int | None, Query(ge=0)] = None) -> StreamingResponse:
        last_id = request.headers.get("last-event-id", "").strip()
        start = after if after is not None else int(last_id) if last_id.isdigit() else 0
        stream = stream_events(handle.events, start, ended=lambda: _job_ended(handle) is not None,
                               stopping=stopping)
        return StreamingResponse(stream, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post(f"{API_PREFIX}/stop")
    def stop(by: ControlCaller, body: StopRequest | None = None) -> dict[str, Any]:
        mode = (body or StopRequest()).mode
        ended = _job_ended(handle)
        if ended is not None:
            raise HTTPException(409, f"the job has already ended ({ended})")
        handle.stop(mode, by=by)
        return {"stopping": True, "mode": mode}

    @app.post(f"{API_PREFIX}/pause")
    def pause(by: ControlCaller) -> dict[str, Any]:
        ended = _job_ended(handle)
        if ended is not None:
            raise HTTPException(409, f"the job has already ended ({ended})")
        return {"paused": True, "changed": handle.pause(by=by)}

    @app.post(f"{API_PREFIX}/resume")
    def resume(by: ControlCaller) -> dict[str, Any]:
        ended = _job_ended(handle)
        if ended is not None:
            raise HTTPException(409, f"the job has already ended ({ended})")
        return {"paused": False, "changed": handle.resume(by=by)}

    @app.get(f"{API_PREFIX}/config")
    def get_config(_: ReadCaller) -> dict[str, Any]:
        return handle.settings()

    @app.patch(f"{API_PREFIX}/config")
    def patch_config(by: ControlCaller, changes: Annotated[dict[str, Any], Body()]) -> Any:
        flat = _flatten(changes, handle.settings())
        if not flat:
            return JSONResponse({"detail": "the body names no setting to change", "fields": []}, status_code=422)
        try:
            return handle.patch_settings(flat, by=by)
        except ConfigError as exc:
            message = str(exc)
            fields = [key for key in flat if key in message] or sorted(flat)
            return JSONResponse({"detail": message, "fields": fields}, status_code=422)


def _add_cloud_routes(app: FastAPI, cloud: CloudRoutes) -> None:
    def reply(answer: CloudReply) -> JSONResponse:
        return JSONResponse(answer.body, status_code=answer.status)

    @app.api_route("/state", methods=["GET", "POST"])
    def state(_: ReadCaller) -> JSONResponse:
        return reply(cloud.state())

    @app.api_route("/queryInstance", methods=["GET", "POST"])
    def query_instance(_: ReadCaller) -> JSONResponse:
        return reply(cloud.query_instance())

    @app.post("/newInstance")
    async def new_instance(request: Request, by: ControlCaller) -> JSONResponse:
        body = await request.body()  # BodyLimit bounds it
        return reply(await run_in_threadpool(cloud.new_instance, body, by=by))

    @app.post("/enableFLS")
    def enable(by: ControlCaller) -> JSONResponse:
        return reply(cloud.enable(by=by))

    @app.post("/disableFLS")
    def disable(by: ControlCaller) -> JSONResponse:
        return reply(cloud.disable(by=by))


def _add_error_handlers(app: FastAPI) -> None:
    async def unauthorized(request: Request, exc: Exception) -> JSONResponse:
        cloud = isinstance(exc, _Unauthorized) and exc.cloud
        body = {"code": ERROR_CODE, "error_message": str(exc)} if cloud else {"detail": str(exc)}
        return JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("management API: %s %s failed: %s: %s", request.method, request.url.path,
                  type(exc).__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG))
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); see the PS log"}, status_code=500)

    app.add_exception_handler(_Unauthorized, unauthorized)
    app.add_exception_handler(Exception, unexpected)


def create_app(handle: JobHandle, *, token: str, public_read: bool = False, audit: AuditLog | None = None,
               server_address: str = "", mounts: Sequence[Mount] = (),
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, stopping: threading.Event | None = None) -> FastAPI:
    """The management API of the job behind ``handle``.

    Args:
        token: the job's bearer token (see :mod:`enclavefl.management.auth`).
        public_read: read routes without the token; control routes always need it.
        audit: the run's audit log, for refused tokens (None: the log only).
        server_address: the PS's worker-facing ``host:port`` (the cloud ``/state``'s ``tcp_address``).
        mounts: called with the app and ``handle`` after the API's routes exist (the dashboard, ``/metrics``).
        max_body_bytes: larger request bodies get 413 before they are read.
        stopping: set it to end open event streams (the server is shutting down).

    Returns:
        The app; ``app.state.guard`` is its :class:`~enclavefl.management.auth.TokenGuard`
        (close it when the app is done) and ``app.state.handle`` the handle.
    """
    app = FastAPI(title="enclavefl management API", version="1", docs_url=None, redoc_url=None,
                  openapi_url=f"{API_PREFIX}/openapi.json")
    app.state.guard = TokenGuard(token, public_read=public_read, audit=audit)
    app.state.handle = handle
    _add_error_handlers(app)
    _add_api_routes(app, handle, stopping or threading.Event())
    _add_cloud_routes(app, CloudRoutes(handle, server_address=server_address))
    for mount in mounts:
        mount(app, handle)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    return app
