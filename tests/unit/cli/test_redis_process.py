"""Tests for enclavefl.cli.redis_process: the redis-server `enclavefl run --servers` starts."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from enclavefl.cli.redis_process import RedisProcess
from enclavefl.errors import ConfigError


def test_a_missing_redis_server_names_the_package_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no redis-server on PATH

    with pytest.raises(ConfigError, match="redis-server is not on PATH.*apt-get install redis-server"):
        RedisProcess(tmp_path / "redis").start()


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not on PATH")
def test_a_restarted_redis_keeps_its_port_and_answers(tmp_path: Path) -> None:
    # Prepare
    redis = RedisProcess(tmp_path / "redis")
    redis.start()
    port = redis.port

    # Execute: a crash, then a start again.
    try:
        redis.kill()
        redis.start()
        with socket.create_connection(("127.0.0.1", redis.port), timeout=2) as s:
            s.sendall(b"PING\r\n")
            answer = s.recv(16)
    finally:
        redis.stop()

    # Assert
    assert redis.port == port and answer.startswith(b"+PONG")


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie that nobody reaped yet has ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(shutil.which("redis-server") is None or not sys.platform.startswith("linux"),
                    reason="needs redis-server on PATH and Linux's parent-death signal")
def test_a_redis_started_to_stop_with_its_parent_ends_when_the_parent_is_sigkilled(tmp_path: Path) -> None:
    # Prepare: a parent process that starts Redis and then waits (as `enclavefl run --servers` does).
    starter = ("import sys, time; from pathlib import Path; from enclavefl.cli.redis_process import RedisProcess; "
               "r = RedisProcess(Path(sys.argv[1]), stop_with_parent=True); r.start(); print(r.pid, flush=True); "
               "time.sleep(120)")
    parent = subprocess.Popen([sys.executable, "-c", starter, str(tmp_path / "redis")], stdout=subprocess.PIPE)
    assert parent.stdout is not None
    pid = int(parent.stdout.readline())
    try:
        assert _alive(pid)

        # Execute
        parent.kill()
        parent.wait(10)

        # Assert: the kernel told redis-server to stop, and it did.
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid)
    finally:
        parent.stdout.close()
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not on PATH")
def test_a_relative_directory_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `enclavefl run job.yaml --servers 2 --out myrun` hands it a relative path; redis-server changes into
    # its --dir before it opens its log file, so the paths it is given must not be relative.
    monkeypatch.chdir(tmp_path)
    redis = RedisProcess(Path("myrun") / "redis")
    try:
        redis.start()
    finally:
        redis.stop()
    assert (tmp_path / "myrun" / "redis" / "redis.log").exists()
