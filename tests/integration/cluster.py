"""Real PS and worker processes on 127.0.0.1 for integration tests."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from enclavefl.transport.certs import create_job_certs

BASE_JOB: dict[str, Any] = {
    "job": {"name": "itest", "rounds": 3, "seed": 1, "workers": 3},
    "round": {"min_workers": 3, "start_window_s": 60, "update_window_s": 30},
    "task": {"name": "digits-mlp"},
    "client": {"epochs": 1, "batch_size": 32, "lr": 0.1, "momentum": 0.9},
    "server": {"checkpoint_every": 1},
    "attestation": {"mode": "none"},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in extra.items():
        out.setdefault(section, {}).update(values)
    return out


def spawn_enclavefl(root: Path, name: str, args: list[str]) -> subprocess.Popen[bytes]:
    """``enclavefl ARGS`` in a child process, one torch thread, its output appended to ``root/logs/NAME.log``."""
    log = (root / "logs" / f"{name}.log").open("ab")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "enclavefl", *args], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=env)
    log.close()
    return proc


def read_log(root: Path, name: str) -> str:
    """What the child process ``name`` wrote so far ("" before it wrote anything)."""
    path = root / "logs" / f"{name}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(poll_s)


@dataclass
class Cluster:
    """A job directory with certificates, plus the processes started in it."""

    root: Path
    job: dict[str, Any]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @classmethod
    def create(cls, root: Path, **sections: dict[str, Any]) -> Cluster:
        job = merge(BASE_JOB, sections)
        (root / "logs").mkdir(parents=True, exist_ok=True)
        (root / "job.yaml").write_text(yaml.safe_dump(job))
        create_job_certs(root / "certs", job["job"]["name"], workers=job["job"]["workers"])
        return cls(root, job)

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        proc = spawn_enclavefl(self.root, name, args)
        self.procs[name] = proc
        return proc

    def start_ps(self, port: int, *, resume: bool = False) -> subprocess.Popen[bytes]:
        port_file = self.root / "ps.port"
        port_file.unlink(missing_ok=True)
        args = ["ps", "--config", str(self.root / "job.yaml"), "--out", str(self.root), "--tls-dir",
                str(self.root / "certs"), "--set", f"transport.listen=127.0.0.1:{port}", "--port-file", str(port_file)]
        proc = self._spawn("ps", args + (["--resume"] if resume else []))
        wait_for(lambda: port_file.exists() or proc.poll() is not None, 60, "the PS to listen")
        if proc.poll() is not None:
            raise RuntimeError(f"PS exited early:\n{self.log('ps')}")
        return proc

    def start_worker(self, index: int, port: int) -> subprocess.Popen[bytes]:
        return self._spawn(f"worker-{index}", ["worker", "--config", str(self.root / "job.yaml"), "--tls-dir",
                                               str(self.root / "certs"), "--connect", f"127.0.0.1:{port}",
                                               "--index", str(index)])

    def log(self, name: str) -> str:
        return read_log(self.root, name)

    def log_has(self, name: str, pattern: str) -> bool:
        return re.search(pattern, self.log(name)) is not None

    def wait_all(self, timeout_s: float) -> dict[str, int]:
        deadline = time.monotonic() + timeout_s
        codes = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                codes[name] = -999
        return codes

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
