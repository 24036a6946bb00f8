"""Fixtures shared by the unit tests of several packages."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.unit.cluster.redis_server import REDIS_SERVER, RedisServer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session (each test uses its own job prefix): the cluster's store conformance
    tests and the PS tests run on it."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not on PATH (Debian: apt-get install redis-server; .ci/run installs it)")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()
