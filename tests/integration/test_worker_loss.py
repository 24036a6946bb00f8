"""A worker process SIGKILLed in round 2 of ``enclavefl run``: restarted, or the job goes on or fails quickly.

Real processes: ``enclavefl run`` starts the PS and three workers on 127.0.0.1;
the test kills worker-2 while it trains round 2 and reads the run's console
line by line, noting when each line came.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.cluster import BASE_JOB, merge, wait_for

pytestmark = pytest.mark.slow

HEARTBEAT_S = 0.5
WORKER_TIMEOUT_S = 2.0
START_WINDOW_S = 15.0


class Run:
    """``enclavefl run`` in a child process; its console lines, each with the time it was read."""

    def __init__(self, tmp_path: Path, args: list[str], **sections: dict[str, Any]) -> None:
        job = merge(BASE_JOB, {
            "round": {"heartbeat_s": HEARTBEAT_S, "worker_timeout_s": WORKER_TIMEOUT_S,
                      "start_window_s": START_WINDOW_S, "update_window_s": 60},
            "client": {"epochs": 25},
        })
        job = merge(job, sections)
        self.job_file = tmp_path / "job.yaml"
        self.job_file.write_text(yaml.safe_dump(job))
        self.out = tmp_path / "run"
        env = dict(os.environ, COLUMNS="400", PYTHONUNBUFFERED="1")  # one console line per line, unwrapped
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "enclavefl", "run", str(self.job_file), "--out", str(self.out), *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        )
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append((time.monotonic(), raw.decode(errors="replace").rstrip()))

    @property
    def console(self) -> str:
        return "\n".join(text for _, text in self.lines)

    def line_time(self, pattern: str) -> float | None:
        """When the first console line matching ``pattern`` was read, or None."""
        for at, text in list(self.lines):
            if re.search(pattern, text):
                return at
        return None

    def log(self, name: str) -> str:
        path = self.out / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def rows(self) -> list[dict[str, Any]]:
        path = self.out / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def kill_worker_in_round_2(self, index: int) -> float:
        """SIGKILLs worker ``index`` once it trains round 2; returns when."""
        wait_for(lambda: f"worker-{index} round 2: training" in self.log(f"worker-{index}")
                 or self.proc.poll() is not None, 120, f"worker-{index} to train round 2")
        assert self.proc.poll() is None, self.console
        pid = worker_pid(self.out, index)
        os.kill(pid, signal.SIGKILL)
        return time.monotonic()

    def wait(self, timeout_s: float) -> int:
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.close()
            raise AssertionError(f"enclavefl run still running after {timeout_s}s:\n{self.console}") from None
        self.close()
        return code

    def close(self) -> None:
        """Stops a run still going (as Ctrl-C does) and closes its output pipe."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(30)
        self._reader.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def worker_pid(run_dir: Path, index: int) -> int:
    """The pid of the worker process ``--index index`` started for ``run_dir`` (from /proc)."""
    config = str(run_dir / "config.yaml")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "worker" in argv and config in argv and argv[argv.index("--index") + 1] == str(index):
            return int(entry.name)
    raise AssertionError(f"no worker --index {index} process for {run_dir}")


@pytest.fixture
def start_run(tmp_path: Path) -> Iterator[Callable[..., Run]]:
    runs: list[Run] = []

    def start(args: list[str], **sections: dict[str, Any]) -> Run:
        run = Run(tmp_path, args, **sections)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.close()


def test_run_restarts_a_killed_worker_and_finishes_every_round(start_run: Callable[..., Run]) -> None:
    # Prepare: 3 workers, all needed (min_workers 3), 4 rounds. The restarted worker must join within
    # one start window: a whole process start (torch, data) takes 15 s and more on a loaded machine, and
    # the job goes on as soon as it joins, so a wider window costs the passing run nothing.
    run = start_run([], job={"rounds": 4}, round={"start_window_s": 60.0})

    # Execute
    killed_at = run.kill_worker_in_round_2(2)
    code = run.wait(240)

    # Assert: the job finished all its rounds, with worker-2 back after the kill.
    assert code == 0, run.console
    rows = run.rows()
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert (rows[1]["participants"], rows[1]["dropped"]) == (2, 1)
    assert len(rows[1]["dropped_ids"]) == 1
    assert [r["participants"] for r in rows[2:]] == [3, 3]
    # The console said so within 10 s of the kill: the restart, and the PS's drop of the old session.
    restart_at = run.line_time(r"^worker-2 exited with -9; restarting \(1/5\)")
    drop_at = run.line_time(r"^ps: round 2: worker w-\w+ \(worker-2\) dropped")
    assert restart_at is not None and restart_at - killed_at < 10, run.console
    assert drop_at is not None and drop_at - killed_at < 10, run.console
    assert run.line_time(r"^start-up \d+\.\ds: round 1: the first round opens, 3 workers joined") is not None


def test_without_restarts_the_run_goes_on_with_the_workers_left(start_run: Callable[..., Run]) -> None:
    # Prepare: rounds go on with 2 of the 3 workers.
    run = start_run(["--no-restart-workers"], job={"rounds": 4}, round={"min_workers": 2})

    # Execute
    run.kill_worker_in_round_2(2)
    code = run.wait(240)

    # Assert
    assert code == 0, run.console
    rows = run.rows()
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    # Round 1 may open with the first two workers to join; from round 2 on worker-2 is sampled, then gone.
    assert [r["participants"] for r in rows[1:]] == [2, 2, 2]
    assert rows[1]["dropped"] == 1
    assert run.line_time(r"^worker-2 exited with -9; not restarted \(--no-restart-workers\)") is not None
    assert "resume with" not in run.console


def test_without_restarts_too_few_workers_fail_quickly_with_a_checkpoint_and_a_resume_hint(
    start_run: Callable[..., Run]
) -> None:
    # Prepare: all 3 workers needed; checkpoints only every 10 rounds, so only the failure writes one.
    run = start_run(["--no-restart-workers"], job={"rounds": 6}, server={"checkpoint_every": 10})

    # Execute
    killed_at = run.kill_worker_in_round_2(2)
    code = run.wait(240)
    ended_at = time.monotonic()

    # Assert: said at once; failed within worker_timeout_s + one start window (plus round 2's
    # remaining training and process start/stop); round 2 checkpointed; the exact resume command shown.
    assert code == 1, run.console
    said_at = run.line_time(r"^2 workers left, fewer than round\.min_workers=3: the job cannot go on")
    assert said_at is not None and said_at - killed_at < 5, run.console
    assert ended_at - killed_at < WORKER_TIMEOUT_S + START_WINDOW_S + 20, run.console
    assert [r["round"] for r in run.rows()] == [1, 2]
    assert (run.out / "checkpoints" / "round-000002.ckpt").is_file()
    assert "worker-2 (lost) did not join again" in run.console
    hint = f"round 2 is checkpointed; resume with: enclavefl run --resume --out {run.out}"
    assert hint in run.console, run.console
