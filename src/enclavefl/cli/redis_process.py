"""A redis-server child process on 127.0.0.1, for ``enclavefl run --servers N``.

It listens on a free loopback port only, keeps its files in the run
directory, and writes an append-only file synced on every write
(``appendfsync always``): a worker hears "accepted" only once Redis has the
update on disk, so even a crash of Redis loses no acknowledged update (at the
cost of one fsync per accept; ``everysec`` would lose up to a second). A
deployment runs Redis on its own (with TLS and an ACL user, docs/cluster.md);
this is the one-host development path.

Started with ``stop_with_parent``, redis-server gets SIGTERM from the kernel
when the thread that started it ends (Linux ``PR_SET_PDEATHSIG``), so a
``run`` killed with SIGKILL leaves no server holding its port and files.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from enclavefl.errors import ConfigError, Unavailable

__all__ = ["RedisProcess"]

START_TIMEOUT_S: Final = 15.0
_PR_SET_PDEATHSIG: Final = 1


def _terminate_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking the kernel to SIGTERM the child when its parent thread ends; None off Linux.

    The C library is loaded here, before the fork, so the child only makes one
    system call between fork and exec. A parent that died before the request
    was made is caught by comparing the parent pid.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisProcess:
    """One redis-server on a free loopback port, with its directory (data, log) in ``directory``.

    Raises (from :meth:`start`):
        ConfigError: redis-server is not on PATH (naming the Debian package that installs it).
        Unavailable: it exited or did not answer PING within START_TIMEOUT_S.
    """

    def __init__(self, directory: Path, *, stop_with_parent: bool = False) -> None:
        """A server keeping its files in ``directory``, not started yet.

        Args:
            stop_with_parent: the kernel stops redis-server when the thread that calls
                :meth:`start` ends, even by SIGKILL (Linux); start it from a thread that
                lives as long as Redis should, as ``run``'s main thread does.
        """
        self.directory = directory.absolute()  # redis-server changes into it before opening its log file
        self.port = 0
        self._stop_with_parent = stop_with_parent
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """redis-server's process id while it was started and not stopped here."""
        return None if self._proc is None else self._proc.pid

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Starts it (again, after :meth:`stop` or a crash: on the same port, with the same data)."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise ConfigError("redis-server is not on PATH: cluster mode needs it (Debian/Ubuntu: "
                              "apt-get install redis-server; other systems: see redis.io)")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = self.port or _free_port()
        log_path = self.directory / "redis.log"
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--protected-mode", "yes",
                "--dir", str(self.directory), "--save", "", "--appendonly", "yes", "--appendfsync", "always",
                "--logfile", str(log_path)]
        self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True,
                                      preexec_fn=_terminate_with_parent() if self._stop_with_parent else None)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-1000:] if log_path.exists() else "(no log)"
                raise Unavailable(f"redis-server exited with code {self._proc.returncode} on port {self.port}:\n{tail}")
            if self._pong():
                return
            time.sleep(0.05)
        self.stop()
        raise Unavailable(f"redis-server on port {self.port} did not answer within {START_TIMEOUT_S:.0f}s "
                          f"(log: {log_path})")

    def _pong(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: a crash (what the append-only file holds survives)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def stop(self, grace_s: float = 10.0) -> None:
        """Stops it (SIGTERM, then SIGKILL after ``grace_s``). Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
