"""Tests for enclavefl.cluster.scheduler: the job in the store, and the cluster as the management plane sees it."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from enclavefl.cluster import Member, MemoryStore, RedisSettings, RedisStore, RoundPhase, RoundState, Session, StoreUnavailable
from enclavefl.cluster.engine import DRAIN_LEASE_PREFIX, PAUSE_LEASE
from enclavefl.cluster.scheduler import ClusterHandle, Scheduler
from enclavefl.errors import ConfigError
from enclavefl.management.cloud import CloudRoutes
from tests.unit.cluster.cluster_job import FAST_LEASES, after_version, cluster_job, run_cluster, start_scheduler
from tests.unit.cluster.conftest import redis_store
from tests.unit.cluster.redis_server import RedisServer
from tests.unit.cluster.test_engine import INITIAL, trainers


def test_the_scheduler_records_every_round_and_sees_the_job_finish(tmp_path: Path) -> None:
    # Prepare
    config = cluster_job(rounds=2, workers=4)
    store = MemoryStore()
    scheduler = Scheduler(config, store, out_dir=tmp_path / "scheduler")
    thread, ended = start_scheduler(scheduler)

    # Execute
    run = run_cluster(config, INITIAL, trainers(4), lambda i: store, tmp_path, servers=2)
    thread.join(10)

    # Assert
    assert not run.errors, run.errors
    assert ended == ["finished"]
    status = ClusterHandle(scheduler).status()
    assert (status.state, status.rounds_done, status.model_version, status.phase) == ("finished", 2, 2, "finished")
    assert [r["round"] for r in ClusterHandle(scheduler).rounds(0, 10).rows] == [1, 2]
    assert store.config() is not None


def test_state_lists_every_live_server_and_its_workers(tmp_path: Path) -> None:
    # Prepare: two live servers, a worker on each, and a worker of a server that is gone.
    store = MemoryStore()
    for i in range(2):
        store.register(Member(f"server-{i}", "server", f"127.0.0.1:{7000 + i}"), 30)
        store.bind_session(Session(f"w-{i}", f"fp{i}", f"server-{i}", f"worker-{i}"))
    store.bind_session(Session("w-9", "fp9", "server-gone", "worker-9"))
    handle = ClusterHandle(Scheduler(cluster_job(rounds=1, workers=2), store, out_dir=tmp_path))

    # Execute
    reply = CloudRoutes(handle).state()

    # Assert
    assert reply.body["nodes"] == [
        {"node_id": "server-0", "tcp_address": "127.0.0.1:7000", "role": "SERVER"},
        {"node_id": "server-1", "tcp_address": "127.0.0.1:7001", "role": "SERVER"},
        {"node_id": "w-0", "tcp_address": "", "role": "WORKER"},
        {"node_id": "w-1", "tcp_address": "", "role": "WORKER"},
    ]


def test_a_pause_is_the_pause_lease_held_by_the_scheduler(tmp_path: Path) -> None:
    # Prepare
    store = MemoryStore()
    handle = ClusterHandle(Scheduler(cluster_job(rounds=1, workers=2), store, out_dir=tmp_path))

    # Execute / Assert
    assert handle.pause(by="test") is True
    assert handle.pause(by="test") is False
    held = store.lease(PAUSE_LEASE)
    assert held is not None and held.holder == "scheduler"
    assert handle.resume(by="test") is True
    assert store.lease(PAUSE_LEASE) is None


def test_a_restarted_scheduler_recovers_every_round_from_its_file_and_the_store(tmp_path: Path) -> None:
    # Prepare: a scheduler that stops once it recorded a round, while the cluster goes on.
    config = cluster_job(rounds=3, workers=2)
    store = MemoryStore()
    first = Scheduler(config, store, out_dir=tmp_path / "scheduler")
    runner = threading.Thread(target=first.run, daemon=True)
    runner.start()
    cluster = threading.Thread(target=lambda: run_cluster(config, INITIAL, trainers(2), lambda i: store,
                                                          tmp_path / "cluster", servers=2), daemon=True)
    cluster.start()
    deadline = time.monotonic() + 30
    while not first.metrics.history and time.monotonic() < deadline:
        time.sleep(0.01)
    first.stop()
    runner.join(10)
    cluster.join(60)

    # Execute: a new scheduler on the same directory and store, after the job ended.
    second = Scheduler(config, store, out_dir=tmp_path / "scheduler")
    state = second.run()

    # Assert: every round once, in order: from its file, then from the last close's state.
    assert state == "finished"
    assert [r["round"] for r in second.metrics.history] == [1, 2, 3]
    lines = (tmp_path / "scheduler" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2, 3]


def _scheduler_over(tmp_path: Path, store: MemoryStore, servers: int, spawned: list[str] | None = None) -> Scheduler:
    for i in range(servers):
        store.register(Member(f"server-{i}", "server", f"127.0.0.1:{7000 + i}"), 30)
    return Scheduler(cluster_job(rounds=1, workers=2), store, out_dir=tmp_path,
                     spawn=None if spawned is None else spawned.append)


def test_scaling_down_asks_the_highest_ids_to_drain_until_they_leave(tmp_path: Path) -> None:
    # Prepare: server-0 .. server-10 (server-10 sorts after server-9).
    store = MemoryStore()
    scheduler = _scheduler_over(tmp_path, store, 11)

    # Execute
    answer = scheduler.scale(9)

    # Assert: server-9 and server-10 hold drain leases (the scheduler's) until they deregister.
    assert answer["draining"] == ["server-9", "server-10"] and answer["live"][-1] == "server-8"
    assert all(store.lease(f"{DRAIN_LEASE_PREFIX}server-{i}") is not None for i in (9, 10))
    assert store.lease(f"{DRAIN_LEASE_PREFIX}server-8") is None
    store.deregister("server-10")
    scheduler._hold_drains()
    assert store.lease(f"{DRAIN_LEASE_PREFIX}server-10") is None
    assert store.lease(f"{DRAIN_LEASE_PREFIX}server-9") is not None


def test_scaling_up_without_a_way_to_start_servers_is_refused(tmp_path: Path) -> None:
    scheduler = _scheduler_over(tmp_path, MemoryStore(), 2)

    with pytest.raises(ConfigError, match="starts no servers"):
        scheduler.scale(3)


def test_scaling_up_starts_servers_under_free_ids(tmp_path: Path) -> None:
    # Prepare: server-0 and server-1 live, server-1 draining.
    store = MemoryStore()
    spawned: list[str] = []
    scheduler = _scheduler_over(tmp_path, store, 2, spawned)
    scheduler.scale(1)

    # Execute
    answer = scheduler.scale(3)

    # Assert: two new servers, neither reusing server-1's id while it is still a member.
    assert spawned == ["server-2", "server-3"] == answer["starting"]


def test_a_second_scale_up_counts_the_servers_still_starting_and_no_id_is_reused(tmp_path: Path) -> None:
    # Prepare: server-0 and server-1 live; a scale to 3 starts server-2, which has not registered yet.
    store = MemoryStore()
    spawned: list[str] = []
    scheduler = _scheduler_over(tmp_path, store, 2, spawned)
    scheduler.scale(3)

    # Execute: the same request again, then server-1 leaves and a scale to 3 comes after server-2 registered.
    again = scheduler.scale(3)
    store.deregister("server-1")
    store.register(Member("server-2", "server", "127.0.0.1:7002"), 30)
    later = scheduler.scale(3)

    # Assert: nothing started twice; the replacement of server-1 gets a new id (its directory and log stay).
    assert again["starting"] == ["server-2"]
    assert spawned == ["server-2", "server-3"]
    assert later["starting"] == ["server-3"] and later["live"] == ["server-0", "server-2"]


class _Outage(MemoryStore):
    """A memory store whose reads fail with StoreUnavailable while ``down`` is set (Redis restarting)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = threading.Event()

    def round_state(self, number: int | None = None) -> RoundState | None:
        if self.down.is_set():
            raise StoreUnavailable("connection refused (the test's outage)")
        return super().round_state(number)


def test_the_scheduler_tells_the_feed_when_servers_join_and_leave_the_leader_changes_and_the_store_fails(
        tmp_path: Path) -> None:
    # Prepare
    config = cluster_job(rounds=1, workers=2, cluster={"poll_s": 0.01, "heartbeat_s": 0.05, "member_ttl_s": 5,
                                                       "lease_ttl_s": 5})
    store = _Outage()
    scheduler = Scheduler(config, store, out_dir=tmp_path)
    thread = threading.Thread(target=scheduler.run, daemon=True)
    thread.start()

    def cluster_events(count: int) -> list[dict[str, object]]:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            found = [e.as_dict() for e in scheduler.events.read(0).events if e.kind == "cluster"]
            if len(found) >= count:
                return found
            time.sleep(0.01)
        raise AssertionError(f"fewer than {count} cluster events: {found}")

    # Execute: a server joins and takes the leader lease, another joins, the first leaves; the store goes down
    # for a while and comes back.
    try:
        store.register(Member("server-0", "server", "127.0.0.1:7000"), 30)
        store.acquire_lease("leader", "server-0", 30)
        cluster_events(2)
        store.register(Member("server-1", "server", "127.0.0.1:7001"), 30)
        cluster_events(3)
        store.deregister("server-0")
        cluster_events(4)
        store.down.set()
        cluster_events(5)
        store.down.clear()
        events = cluster_events(6)
    finally:
        scheduler.stop()
        thread.join(10)

    # Assert
    described = [(e["event"], e.get("servers", e.get("leader", ""))) for e in events]
    assert described[:4] == [("servers", ["server-0"]), ("leader", "server-0"), ("servers", ["server-0", "server-1"]),
                             ("servers", ["server-1"])]
    assert events[3]["left"] == ["server-0"] and events[2]["joined"] == ["server-1"]
    assert [e["event"] for e in events[4:]] == ["store_down", "store_back"]
    assert "connection refused" in str(events[4]["reason"])


@pytest.mark.parametrize("mode", ["finish", "abort"])
def test_a_stop_through_the_api_ends_the_job_on_every_server(tmp_path: Path, mode: str) -> None:
    # Prepare: a 50-round job on 2 servers, stopped through the cluster's handle once round 1 closed.
    config = cluster_job(rounds=50, workers=4, cluster=FAST_LEASES)
    store = MemoryStore()
    scheduler = Scheduler(config, store, out_dir=tmp_path / "scheduler")
    thread, ended = start_scheduler(scheduler)
    threads = [thread]
    threads.append(after_version(store, 1, lambda: ClusterHandle(scheduler).stop(mode, by="test")))  # type: ignore[arg-type]

    # Execute
    run = run_cluster(config, INITIAL, trainers(4), lambda i: store, tmp_path, servers=2)
    for thread in threads:
        thread.join(10)

    # Assert: the scheduler saw every server leave and says stopped. With finish, the round open at the stop
    # completed (it is CLOSED), no later round opened, and every server holds its model; with abort, a server
    # may have ended before it picked up the last version the leader published.
    assert not run.errors, run.errors
    assert ended == ["stopped"]
    assert ClusterHandle(scheduler).status().state == "stopped"
    state, model = store.round_state(), store.model()
    assert state is not None and model is not None and state.number < 50
    if mode == "finish":
        assert state.phase is RoundPhase.CLOSED
        assert [ps.version for ps in run.servers] == [state.number, state.number] == [model.version] * 2
    else:
        assert all(1 <= ps.version <= model.version for ps in run.servers)
    events = [e.as_dict() for e in scheduler.events.read(0).events]
    assert {"kind": "control", "action": "stop", "by": "test", "mode": mode}.items() <= next(
        e for e in events if e["kind"] == "control").items()


def test_settings_changed_through_the_api_reach_every_server(tmp_path: Path) -> None:
    # Prepare: a 50-round job on 2 servers; once round 1 closed, an operator cuts it to 3 rounds.
    config = cluster_job(rounds=50, workers=4, cluster=FAST_LEASES)
    store = MemoryStore()
    scheduler = Scheduler(config, store, out_dir=tmp_path / "scheduler")
    answers: list[dict[str, object]] = []
    thread, ended = start_scheduler(scheduler)
    threads = [thread]
    threads.append(after_version(store, 1, lambda: answers.append(
        ClusterHandle(scheduler).patch_settings({"job.rounds": 3, "client.lr": 0.25}, by="test"))))

    # Execute
    run = run_cluster(config, INITIAL, trainers(4), lambda i: store, tmp_path, servers=2)
    for thread in threads:
        thread.join(10)

    # Assert: the job ended after round 3 everywhere, and every server runs with the new settings.
    assert not run.errors, run.errors
    assert ended == ["finished"]
    assert answers and answers[0]["job.rounds"] == 3 and answers[0]["client.lr"] == 0.25
    assert [ps.version for ps in run.servers] == [3, 3]
    assert all(ps.core.config.job.rounds == 3 and ps.core.config.client.lr == 0.25 for ps in run.servers)
    state = store.round_state()
    assert state is not None and (state.number, state.phase) == (3, RoundPhase.CLOSED)


def test_a_setting_that_may_not_change_is_refused_and_the_store_keeps_the_job(tmp_path: Path) -> None:
    store = MemoryStore()
    scheduler = Scheduler(cluster_job(rounds=5, workers=2), store, out_dir=tmp_path)
    store.put_config(b"job: {rounds: 5}\n")

    with pytest.raises(ConfigError, match="job.seed: may not change while the job runs"):
        ClusterHandle(scheduler).patch_settings({"job.seed": 9}, by="test")

    assert store.config() == b"job: {rounds: 5}\n" and scheduler.config.job.rounds == 5


def test_the_scheduler_writes_the_job_again_into_a_store_that_lost_it_and_says_so(
        tmp_path: Path, redis_without_aof: RedisServer) -> None:
    server = redis_without_aof
    # A 2 s socket timeout: a read in flight when Redis dies is retried soon, not after the default 30 s.
    store = RedisStore(RedisSettings(port=server.port, retries=8, backoff_base_s=0.02, backoff_cap_s=0.2,
                                     timeout_s=2.0), job="emptied-config")
    config = cluster_job(rounds=2, workers=2, cluster=FAST_LEASES)
    scheduler = Scheduler(config, store, out_dir=tmp_path / "scheduler")
    thread = threading.Thread(target=scheduler.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while store.config() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        first = store.config()

        # Execute: Redis restarts empty.
        server.kill()
        server.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(
                e.kind == "cluster" and e.data.get("event") == "store_emptied" for e in scheduler.events.read(0).events):
            time.sleep(0.02)
        again = store.config()
    finally:
        scheduler.stop()
        thread.join(10)
        store.close()

    # Assert
    assert first is not None and again == first
