"""A real HTTP server for the dashboard and exporter tests.

:func:`serving` runs a FastAPI app under uvicorn on 127.0.0.1 (a port the OS
picks) on a thread, so requests go through real HTTP; the job behind the app
is the in-memory :class:`~enclavefl.management.memory.MemoryJob` or a real PS's
handle. TLS is the API's own business and is tested there and in the browser test.
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI

from enclavefl.management.api import Mount, create_app
from enclavefl.management.schema import JobHandle

TOKEN = "test-token-0123456789"


@dataclass(frozen=True)
class Served:
    url: str

    def get(self, path: str, headers: Mapping[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """GET ``path``: status, headers (lower-case names) and body; an error status is returned, not raised."""
        request = urllib.request.Request(self.url + path, headers=dict(headers or {}))
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def app_for(job: JobHandle, mounts: Sequence[Mount], *, public_read: bool = False) -> FastAPI:
    """The API's app over ``job`` with ``mounts``; :func:`serving` ends its event streams when it stops."""
    stopping = threading.Event()
    app = create_app(job, token=TOKEN, public_read=public_read, mounts=mounts, stopping=stopping)
    app.state.test_stopping = stopping
    return app


@contextmanager
def serving(app: FastAPI) -> Iterator[Served]:
    """Runs ``app`` on 127.0.0.1 on a free port until the block ends."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start within 10 s")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield Served(f"http://127.0.0.1:{port}")
    finally:
        stopping = getattr(app.state, "test_stopping", None)
        if stopping is not None:
            stopping.set()  # open event streams end at their next poll
        server.should_exit = True
        thread.join(10)
