"""Real parts for the management tests: a running parameter server, and a real HTTP server in front of it.

:func:`held_job` starts a real ParameterServer with two real workers on
threads (:class:`~tests.unit.server.live_job.LiveJob`: every join, pull and
push goes through the server's own handler) and returns once round 1 is open
and held there: the workers' local fits wait on the job's gate until the test
allows them. :func:`finished_job` runs a short job to its end. Either one's
``handle`` is the PS's own :class:`~enclavefl.server.handle.PsHandle`.

:func:`serving` runs a FastAPI app under uvicorn on 127.0.0.1 (a port the OS
picks) on a thread, so requests go through real HTTP. TLS is the API's own
business and is tested there and in the browser test.
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from fastapi import FastAPI

from enclavefl.management.api import Mount, create_app
from enclavefl.management.schema import JobHandle
from enclavefl.tensors import ParamSet
from enclavefl.transport.audit import AuditLog
from tests.unit.server.live_job import Gate, LiveJob, controls, job, wait_for

MR_ENCLAVE = "ab" * 32
"""What the held job's workers proved by default: simulated evidence of this enclave."""


def score(params: ParamSet) -> dict[str, float]:
    """The PS's evaluator in these jobs: from the mean weight m, loss 1 / (1 + m) and accuracy m / (1 + m).

    Each round adds 1 to every weight (the workers' training, averaged), so after
    round r: m = r, loss 1 / (1 + r), accuracy r / (1 + r).
    """
    mean = float(np.mean([np.mean(np.asarray(a)) for a in params.values()]))
    return {"loss": 1.0 / (1.0 + mean), "accuracy": mean / (1.0 + mean)}


@contextmanager
def held_job(out_dir: Path, *, rounds: int = 5, name: str = "job", mode: str = "sync", names: Sequence[str] = (),
             proved: Mapping[int, Mapping[str, Any]] | None = None) -> Iterator[LiveJob]:
    """A simulated-attestation job of two workers, yielded once both train in round 1, which stays open
    until the test opens ``job.gate``; closed (whatever still runs is stopped) when the block ends.

    Args:
        names: worker ``i`` joins as ``names[i]`` (default ``worker-i``).
        proved: what worker ``i`` proved at its join; default: simulated evidence of :data:`MR_ENCLAVE`.
    """
    if proved is None:
        proved = {i: {"evidence": "simulated", "measurement": MR_ENCLAVE} for i in range(2)}
    live = LiveJob(job(rounds=rounds, name=name, mode=mode, attestation="simulated"), out_dir, gate=Gate(0),
                   names=names, proved=proved, evaluator=score)
    try:
        wait_for(lambda: [w.state for w in live.handle.workers()] == ["training", "training"],
                 what="both workers training in round 1")
        yield live
    finally:
        live.close()


@contextmanager
def finished_job(out_dir: Path, *, rounds: int = 3) -> Iterator[LiveJob]:
    """A job of two workers that ran its ``rounds`` rounds to the end (state ``finished``)."""
    live = LiveJob(job(rounds=rounds), out_dir, evaluator=score)
    try:
        live.wait_done()
        yield live
    finally:
        live.close()


@contextmanager
def audit_log(live: LiveJob) -> Iterator[AuditLog]:
    """An audit log (no file) whose decisions reach the job's events, as the PS's credentials' log does."""
    audit = AuditLog()
    audit.subscribe(live.handle.audit_listener())
    try:
        yield audit
    finally:
        audit.close()


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
