"""Tests for enclavefl.cli.supervisor, with real (tiny) child processes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from enclavefl.cli.supervisor import WorkerSupervisor


def child(code: int) -> subprocess.Popen[bytes]:
    """A process that exits with ``code`` (negative: killed by that signal), already finished."""
    script = f"import os, signal; os.kill(os.getpid(), {-code})" if code < 0 else f"raise SystemExit({code})"
    proc = subprocess.Popen([sys.executable, "-c", script])
    proc.wait(30)
    return proc


class Respawner:
    def __init__(self, code: int = 0) -> None:
        self.code = code
        self.started: list[str] = []

    def __call__(self, name: str) -> subprocess.Popen[bytes]:
        self.started.append(name)
        return child(self.code)


def test_a_killed_worker_is_restarted_after_its_backoff_and_the_console_says_so() -> None:
    # Prepare
    lines: list[str] = []
    respawn = Respawner()
    sup = WorkerSupervisor(respawn, lines.append, restart=True, min_workers=1, backoff_s=1.0)
    sup.watch("worker-3", child(-9))

    # Execute
    sup.poll(now=100.0)
    sup.poll(now=100.5)
    started_early = list(respawn.started)
    sup.poll(now=101.0)

    # Assert
    assert lines == ["worker-3 exited with -9; restarting (1/5) in 1s"]
    assert started_early == [] and respawn.started == ["worker-3"]
    assert sup.restarts == {"worker-3": 1}


def test_backoff_doubles_and_restarts_stop_at_the_limit() -> None:
    lines: list[str] = []
    respawn = Respawner(code=1)
    sup = WorkerSupervisor(respawn, lines.append, restart=True, min_workers=1, max_restarts=2, backoff_s=1.0)
    sup.watch("worker-0", child(1))

    for now in (0.0, 1.0, 1.0, 3.0, 3.0):
        sup.poll(now=now)

    assert lines[:2] == ["worker-0 exited with 1; restarting (1/2) in 1s",
                         "worker-0 exited with 1; restarting (2/2) in 2s"]
    assert lines[2].startswith("worker-0 exited with 1; not restarted (limit of 2 restarts)")
    assert respawn.started == ["worker-0", "worker-0"]


def test_without_restarts_a_crash_is_reported_and_too_few_workers_is_said_at_once() -> None:
    lines: list[str] = []
    respawn = Respawner()
    sup = WorkerSupervisor(respawn, lines.append, restart=False, min_workers=2)
    sup.watch("worker-0", child(0))
    sup.watch("worker-1", child(-9))

    sup.poll(now=0.0)
    sup.poll(now=60.0)

    assert respawn.started == []
    assert lines == ["worker-1 exited with -9; not restarted (--no-restart-workers)",
                     "1 workers left, fewer than round.min_workers=2: the job cannot go on; "
                     "the PS ends it after the round in progress and one start window"]


@pytest.mark.parametrize(("code", "why"), [(2, "configuration error"), (3, "attestation refused")])
def test_a_worker_that_would_fail_again_is_not_restarted(code: int, why: str) -> None:
    lines: list[str] = []
    respawn = Respawner()
    sup = WorkerSupervisor(respawn, lines.append, restart=True, min_workers=1,
                           why_exit=lambda name: "enclavefl worker: error: bad --index")
    sup.watch("worker-1", child(code))

    sup.poll(now=0.0)

    assert respawn.started == []
    assert lines[0] == (f"worker-1 exited with {code} ({why}); not restarted, it would fail again: "
                        "enclavefl worker: error: bad --index")


def test_a_worker_that_finished_is_left_alone() -> None:
    lines: list[str] = []
    respawn = Respawner()
    sup = WorkerSupervisor(respawn, lines.append, restart=True, min_workers=1)
    sup.watch("worker-0", child(0))

    sup.poll(now=0.0)

    assert lines == [] and respawn.started == []
