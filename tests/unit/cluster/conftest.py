from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from enclavefl.cluster import MemoryStore, RedisSettings, RedisStore, SealedStore, Sealer, Store
from tests.unit.cluster.redis_server import REDIS_SERVER, RedisServer

_jobs = itertools.count()


@pytest.fixture
def fresh_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone (restart tests stop and start it)."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not on PATH (Debian: apt-get install redis-server; .ci/run installs it)")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_without_aof(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone without append-only file: a restart empties it."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not on PATH (Debian: apt-get install redis-server; .ci/run installs it)")
    server = RedisServer(tmp_path, appendonly=False)
    server.start()
    yield server
    server.stop()


def redis_store(server: RedisServer, *, job: str | None = None, retries: int = 5) -> RedisStore:
    return RedisStore(RedisSettings(port=server.port, retries=retries, backoff_base_s=0.02, backoff_cap_s=0.2),
                      job=job or f"test-{next(_jobs)}")


CLUSTER_KEY = bytes(range(32))


@pytest.fixture(params=["memory", "redis", "sealed-redis"])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    """Each store implementation, empty (sealed-redis: a SealedStore over Redis, as servers use it)."""
    made: Store
    if request.param == "memory":
        made = MemoryStore()
    elif request.param == "redis":
        made = redis_store(request.getfixturevalue("redis_server"))
    else:
        inner = redis_store(request.getfixturevalue("redis_server"))
        made = SealedStore(inner, Sealer(CLUSTER_KEY, job="sealed"))
    yield made
    made.close()
