"""The Redis store beyond the shared contract: Redis down and back, AOF across a restart, ACL users, names."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from enclavefl.cluster import (
    Member,
    RedisSettings,
    RedisStore,
    RoundPhase,
    Session,
    StoreError,
    StoreUnavailable,
    UpdateRef,
)
from enclavefl.errors import ConfigError
from tests.unit.cluster.conftest import redis_store
from tests.unit.cluster.redis_server import RedisServer, make_tls_files, needs_redis


@pytest.fixture
def store(fresh_redis: RedisServer) -> Iterator[RedisStore]:
    made = redis_store(fresh_redis, job="restart", retries=2)
    yield made
    made.close()


def test_job_name_with_a_brace_is_refused() -> None:
    with pytest.raises(ConfigError, match="cluster job name 'a}b'"):
        RedisStore(RedisSettings(), job="a}b")


def test_settings_repr_hides_the_password() -> None:
    assert "s3cret" not in repr(RedisSettings(username="efl", password="s3cret"))


@needs_redis
def test_operations_raise_store_unavailable_while_redis_is_down(fresh_redis: RedisServer, store: RedisStore) -> None:
    fresh_redis.stop()

    with pytest.raises(StoreUnavailable, match=rf"redis://127.0.0.1:{fresh_redis.port}/0: get config: Redis is unreachable"):
        store.config()


@needs_redis
def test_transition_scripts_raise_store_unavailable_while_redis_is_down(fresh_redis: RedisServer,
                                                                       store: RedisStore) -> None:
    fresh_redis.stop()

    with pytest.raises(StoreUnavailable):
        store.publish_model(0, b"m0")


@needs_redis
def test_store_works_again_once_redis_returns(fresh_redis: RedisServer, store: RedisStore) -> None:
    store.put_config(b"before")
    fresh_redis.stop()
    with pytest.raises(StoreUnavailable):
        store.config()

    fresh_redis.start()

    assert store.config() == b"before"


@needs_redis
def test_round_state_survives_a_redis_crash_with_aof(fresh_redis: RedisServer, store: RedisStore) -> None:
    store.publish_model(0, b"m0", strategy_state=b"s0")
    store.open_round(1, 0, model_version=0, sampled=["w1", "w2"], required=2)
    store.accept(1, 0, "s1", [UpdateRef("w1", "u1")], b"partial", generation=0, counts={"num_samples": 7})
    store.bind_session(Session("w1", "ab12", "s1"))

    fresh_redis.kill()
    fresh_redis.start()

    state = store.round_state()
    assert state is not None and (state.number, state.phase, state.counters) == (
        1, RoundPhase.OPEN, {"accepted": 1, "num_samples": 7})
    assert store.partials(1, 0)["s1"].blob == b"partial"
    assert (store.model().blob, store.session("w1")) == (b"m0", Session("w1", "ab12", "s1"))  # type: ignore[union-attr]


@needs_redis
def test_transitions_run_after_a_restart_emptied_the_script_cache(fresh_redis: RedisServer, store: RedisStore) -> None:
    store.publish_model(0, b"m0")
    store.open_round(1, 0, model_version=0, sampled=["w1", "w2"], required=2)
    fresh_redis.stop()
    fresh_redis.start()

    assert store.accept(1, 0, "s1", [UpdateRef("w2", "u2")], b"partial", generation=0) == 1


@needs_redis
def test_fencing_tokens_keep_growing_across_a_restart(fresh_redis: RedisServer, store: RedisStore) -> None:
    first = store.acquire_lease("leader", "s1", ttl_s=30)
    store.release_lease(first)  # type: ignore[arg-type]
    fresh_redis.kill()
    fresh_redis.start()

    second = store.acquire_lease("leader", "s2", ttl_s=30)

    assert first is not None and second is not None and second.token > first.token


@needs_redis
def test_state_is_lost_without_aof(tmp_path: Path) -> None:
    # What docs/cluster.md says: without appendonly, a restarted Redis is empty (servers restore a checkpoint).
    server = RedisServer(tmp_path, appendonly=False)
    server.start()
    store = redis_store(server, job="no-aof")
    try:
        store.publish_model(0, b"m0")
        server.kill()
        server.start()

        assert store.model() is None
    finally:
        store.close()
        server.stop()


@needs_redis
def test_acl_user_with_its_password_gets_in(fresh_redis: RedisServer) -> None:
    admin = fresh_redis.client()
    admin.acl_setuser("efl", enabled=True, passwords=["+s3cret"], keys=["efl:*"], commands=["+@all"])
    admin.close()
    store = RedisStore(RedisSettings(port=fresh_redis.port, username="efl", password="s3cret", retries=0), job="acl")
    try:
        store.register(Member("s1", "server", "h:1"), ttl_s=5)

        assert [m.member_id for m in store.members()] == ["s1"]
    finally:
        store.close()


@needs_redis
def test_wrong_password_is_a_store_error_not_unavailable(fresh_redis: RedisServer) -> None:
    admin = fresh_redis.client()
    admin.acl_setuser("efl", enabled=True, passwords=["+s3cret"], keys=["efl:*"], commands=["+@all"])
    admin.close()
    store = RedisStore(RedisSettings(port=fresh_redis.port, username="efl", password="wrong", retries=0), job="acl")
    try:
        with pytest.raises(StoreError, match="Redis refused user efl") as refused:
            store.config()
        assert not isinstance(refused.value, StoreUnavailable)
        assert "wrong" not in str(refused.value)
    finally:
        store.close()


@needs_redis
def test_acl_user_limited_to_other_keys_is_refused(fresh_redis: RedisServer) -> None:
    admin = fresh_redis.client()
    admin.acl_setuser("other", enabled=True, passwords=["+pw"], keys=["other:*"], commands=["+@all"])
    admin.close()
    store = RedisStore(RedisSettings(port=fresh_redis.port, username="other", password="pw", retries=0), job="acl")
    try:
        with pytest.raises(StoreError, match="get config"):
            store.config()
    finally:
        store.close()


@needs_redis
def test_store_reaches_redis_over_tls(tmp_path: Path) -> None:
    tls = make_tls_files(tmp_path)
    server = RedisServer(tmp_path, tls=tls)
    server.start()
    store = RedisStore(RedisSettings(port=server.port, tls=True, ca_file=str(tls.ca), retries=0), job="tls")
    try:
        store.put_config(b"over tls")

        assert store.config() == b"over tls"
    finally:
        store.close()
        server.stop()


@needs_redis
def test_plain_connection_to_a_tls_redis_is_unavailable(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, tls=make_tls_files(tmp_path))
    server.start()
    store = RedisStore(RedisSettings(port=server.port, retries=0, timeout_s=2), job="tls")
    try:
        with pytest.raises(StoreUnavailable):
            store.config()
    finally:
        store.close()
        server.stop()


@needs_redis
def test_a_redis_restart_within_the_retry_budget_is_logged_and_heard(fresh_redis: RedisServer,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    # Prepare: retries with up to 1 s between them; Redis is down for about 0.5 s.
    import threading
    import time

    store = RedisStore(RedisSettings(port=fresh_redis.port, retries=10, backoff_base_s=0.1, backoff_cap_s=1.0),
                       job="logged")
    heard: list[tuple[bool, str]] = []
    store.on_outage = lambda up, reason: heard.append((up, reason))
    store.put_config(b"cfg")
    fresh_redis.stop()
    restart = threading.Timer(0.5, fresh_redis.start)
    restart.start()

    # Execute: the call waits for Redis instead of failing.
    with caplog.at_level("WARNING", logger="enclavefl.cluster.redis_store"):
        started = time.monotonic()
        assert store.config() == b"cfg"
    restart.join()
    store.close()

    # Assert: the outage and the return are both in the log, and the listener heard both, once each.
    assert [up for up, _ in heard] == [False, True], heard
    assert "answers again after" in heard[1][1]
    messages = [r.getMessage() for r in caplog.records]
    assert any("unreachable" in m and "retrying" in m for m in messages), messages
    assert any("answers again after" in m for m in messages), messages
    assert time.monotonic() - started >= 0.3
