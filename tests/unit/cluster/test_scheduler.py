"""Tests for enclavefl.cluster.scheduler: the job in the store, and the cluster as the management plane sees it."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from enclavefl.cluster import Member, MemoryStore, Session
from enclavefl.cluster.engine import PAUSE_LEASE
from enclavefl.cluster.scheduler import ClusterHandle, Scheduler
from enclavefl.management.cloud import CloudRoutes
from tests.unit.cluster.cluster_job import cluster_job, run_cluster
from tests.unit.cluster.test_engine import INITIAL, trainers


def test_the_scheduler_records_every_round_and_sees_the_job_finish(tmp_path: Path) -> None:
    # Prepare
    config = cluster_job(rounds=2, workers=4)
    store = MemoryStore()
    scheduler = Scheduler(config, store, out_dir=tmp_path / "scheduler")
    ended: list[str] = []
    thread = threading.Thread(target=lambda: ended.append(scheduler.run()), daemon=True)
    thread.start()

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
