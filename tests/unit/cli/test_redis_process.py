"""Tests for enclavefl.cli.redis_process: the redis-server `enclavefl run --servers` starts."""

from __future__ import annotations

import shutil
import socket
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
