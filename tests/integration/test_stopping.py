"""A stopped or killed `enclavefl run` leaves no process behind: real processes on 127.0.0.1."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from enclavefl.server.checkpoint import latest_checkpoint
from tests.integration.cluster import wait_for
from tests.integration.processes import children_of, kill_all, running

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")]

REPO = Path(__file__).resolve().parents[2]
# Rounds of a few hundred milliseconds, far more than the test waits for: only a stop ends this job.
# checkpoint_every is above the rounds, so the only checkpoint is the one a stopped PS writes.
LONG_JOB = ["--workers", "2", "--set", "round.min_workers=2", "--set", "job.rounds=1000",
            "--set", "server.checkpoint_every=1000", "--set", "attestation.mode=none"]


def _start_run(out: Path, console: Path) -> subprocess.Popen[bytes]:
    with console.open("wb") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "enclavefl", "run", str(REPO / "examples" / "digits" / "job.yaml"), "--out",
             str(out), "--quiet", *LONG_JOB],
            stdout=f, stderr=subprocess.STDOUT,
        )


def _wait_for_first_round(run: subprocess.Popen[bytes], out: Path, console: Path) -> None:
    metrics = out / "metrics.jsonl"
    wait_for(lambda: (metrics.exists() and metrics.stat().st_size > 0) or run.poll() is not None, 180,
             "the first round")
    assert run.poll() is None, console.read_text()


def test_sigterm_stops_every_child_and_keeps_a_checkpoint(tmp_path: Path) -> None:
    # SIGHUP takes the very same path (tests/unit/cli/test_stopping.py shows both become Stopped).
    signum, code = signal.SIGTERM, 143
    out, console = tmp_path / "run", tmp_path / "console.txt"
    run = _start_run(out, console)
    children = []
    try:
        _wait_for_first_round(run, out, console)
        children = children_of(run.pid)

        run.send_signal(signum)
        run.wait(90)
        output = console.read_text()

        assert len(children) == 3, children  # the PS and two workers
        assert run.returncode == code, output
        wait_for(lambda: not any(running(c) for c in children), 10, "the children to end")
        checkpoint = latest_checkpoint(out / "checkpoints")
        assert checkpoint is not None and checkpoint.round >= 1
        assert f"stopped by {signal.Signals(signum).name}" in output
    finally:
        run.kill()
        run.wait(10)
        kill_all(children)


def test_a_killed_run_leaves_no_child_behind(tmp_path: Path) -> None:
    out, console = tmp_path / "run", tmp_path / "console.txt"
    run = _start_run(out, console)
    children = []
    try:
        _wait_for_first_round(run, out, console)
        children = children_of(run.pid)

        run.send_signal(signal.SIGKILL)
        run.wait(10)

        assert len(children) == 3, children
        wait_for(lambda: not any(running(c) for c in children), 20, "the children of the killed run to end")
    finally:
        kill_all(children)
