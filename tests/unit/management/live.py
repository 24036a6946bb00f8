"""Real parts for the dashboard and exporter tests: an in-memory JobHandle and a real HTTP server.

:class:`MemoryHandle` implements the management contract over a real
:class:`~enclavefl.server.events.EventBus`, with a status and metrics rows the
test sets; :func:`serving` runs a FastAPI app under uvicorn on 127.0.0.1 (a
port the OS picks) on a thread, so requests go through real HTTP.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI

from enclavefl.management.schema import Identity, RoundsPage, StopMode, Status, WorkerInfo
from enclavefl.server.events import EventBus


def status(**changes: Any) -> Status:
    base: dict[str, Any] = {
        "job": "digits", "instance": "ps-1", "state": "running", "phase": "training", "round": 1, "rounds": 5,
        "rounds_done": 0, "rounds_left": 5, "model_version": 0, "participants": 3, "updates": 0,
        "workers_joined": 3, "started_at": 1_700_000_000.0, "uptime_s": 1.0, "attestation_mode": "simulated",
        "identity": Identity(evidence="simulated", mr_enclave="ab" * 32, mr_signer="cd" * 32),
    }
    return Status(**(base | changes))


@dataclass
class MemoryHandle:
    """A job held in memory: what the test puts in is what the management plane reads."""

    bus: EventBus = field(default_factory=EventBus)
    current: Status = field(default_factory=status)
    rows: list[dict[str, Any]] = field(default_factory=list)
    workers_now: list[WorkerInfo] = field(default_factory=list)
    stops: list[tuple[StopMode, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def events(self) -> EventBus:
        return self.bus

    def status(self) -> Status:
        with self.lock:
            return self.current

    def workers(self) -> list[WorkerInfo]:
        with self.lock:
            return list(self.workers_now)

    def rounds(self, offset: int, limit: int) -> RoundsPage:
        with self.lock:
            return RoundsPage(total=len(self.rows), offset=offset, rows=self.rows[offset:offset + limit])

    def stop(self, mode: StopMode, *, by: str) -> None:
        with self.lock:
            self.stops.append((mode, by))

    def pause(self, *, by: str) -> bool:
        return True

    def resume(self, *, by: str) -> bool:
        return True

    def settings(self) -> dict[str, Any]:
        return {}

    def patch_settings(self, changes: Mapping[str, Any], *, by: str) -> dict[str, Any]:
        return dict(changes)

    def complete_round(self, row: Mapping[str, Any]) -> None:
        """Records a metrics row and publishes it, as the PS does when a round closes."""
        with self.lock:
            self.rows.append(dict(row))
            number = int(row["round"])
            self.current = self.current.model_copy(update={
                "round": number + 1, "rounds_done": number, "rounds_left": self.current.rounds - number,
                "model_version": number})
        self.bus.publish("round", **row)


@dataclass(frozen=True)
class Served:
    url: str

    def get(self, path: str, headers: Mapping[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(self.url + path, headers=dict(headers or {}))
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, dict(response.headers.items()), response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, dict(exc.headers.items()), exc.read()


@contextmanager
def serving(app: FastAPI) -> Iterator[Served]:
    """Runs ``app`` on 127.0.0.1 on a free port until the block ends."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
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
        server.should_exit = True
        thread.join(10)
