"""Cluster faults with real processes: a server SIGKILLed mid-round (its workers fail over), Redis, the leader."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from enclavefl.cli.cluster_run import connect_targets
from enclavefl.cli.redis_process import RedisProcess
from enclavefl.cluster import Member, RedisStore, RoundPhase
from enclavefl.cluster.assignment import balance
from enclavefl.cluster.settings import redis_settings_from_url
from enclavefl.transport.certs import create_job_certs
from tests.integration.cluster import BASE_JOB, merge, read_log, spawn_enclavefl, wait_for

pytestmark = [pytest.mark.slow]

WORKERS, SERVERS = 6, 3
JOB = merge(BASE_JOB, {"job": {"name": "cluster-faults", "rounds": 3, "workers": WORKERS, "seed": 5},
                       "round": {"min_workers": 4, "start_window_s": 120, "update_window_s": 12},
                       "client": {"epochs": 40},
                       "cluster": {"poll_s": 0.05}})


class Procs:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "logs").mkdir(exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        proc = spawn_enclavefl(self.root, name, args)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return read_log(self.root, name)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path / "redis")
    try:
        server.start()
    except Exception as exc:  # ConfigError when redis-server is missing
        pytest.skip(str(exc))
    yield server
    server.stop()


def _port(path: Path, proc: subprocess.Popen[bytes], what: str) -> int:
    wait_for(lambda: path.exists() or proc.poll() is not None, 90, what)
    assert proc.poll() is None, f"{what}: exited with {proc.returncode}"
    return int(path.read_text())


def _start_cluster(procs: Procs, redis: RedisProcess, job_doc: dict[str, Any], *, failover: bool = False,
                   connect_timeout_s: int | None = None) -> subprocess.Popen[bytes]:
    """Writes the job and its certificates, starts the scheduler, SERVERS servers and WORKERS workers; the scheduler.

    Worker i connects to the server the cluster places it on (``connect_targets``, as ``enclavefl run``);
    with ``failover`` it is also given the other servers to fail over to.
    """
    root = procs.root
    job = root / "job.yaml"
    job.write_text(yaml.safe_dump(job_doc))
    create_job_certs(root / "certs", JOB["job"]["name"], workers=WORKERS)
    tls = ["--tls-dir", str(root / "certs")]
    scheduler = procs.spawn("scheduler", ["scheduler", "--config", str(job), "--store", redis.url, "--out",
                                          str(root / "scheduler"), "--port-file", str(root / "s.port"), *tls])
    at = _port(root / "s.port", scheduler, "the scheduler to listen")
    ports = []
    for i in range(SERVERS):
        server = procs.spawn(f"server-{i}", ["server", "--config", str(job), "--store", redis.url, "--scheduler",
                                             f"127.0.0.1:{at}", "--id", f"server-{i}", "--out",
                                             str(root / f"server-{i}"), "--port-file", str(root / f"{i}.port"), *tls])
        ports.append(_port(root / f"{i}.port", server, f"server-{i} to listen"))
    for i in range(WORKERS):
        targets = connect_targets(i, ports, WORKERS)
        targets = targets if failover else targets.split(",")[0]
        timeout = [] if connect_timeout_s is None else ["--connect-timeout", str(connect_timeout_s)]
        procs.spawn(f"worker-{i}", ["worker", "--config", str(job), "--connect", targets, "--index", str(i),
                                    *timeout, *tls])
    return scheduler


def test_a_server_killed_mid_round_loses_no_update_its_workers_fail_over_and_none_counts_twice(
        tmp_path: Path, redis: RedisProcess) -> None:
    # Prepare: a scheduler, 3 servers, 6 workers (each on its server, then the others), two on server-2.
    procs = Procs(tmp_path)
    servers = [Member(f"server-{k}", "server", "") for k in range(SERVERS)]
    placement = balance([f"worker-{i}" for i in range(WORKERS)], servers)
    doomed = sorted(name for name, order in placement.items() if order[0].member_id == "server-2")
    assert len(doomed) == 2
    try:
        scheduler = _start_cluster(procs, redis, JOB, failover=True, connect_timeout_s=20)

        # Execute: SIGKILL server-2 once one of its workers trains in round 2.
        wait_for(lambda: any(f"{w} round 2: training" in procs.log(w) for w in doomed), 240,
                 "a worker of server-2 to train in round 2")
        procs.procs["server-2"].send_signal(signal.SIGKILL)
        procs.procs["server-2"].wait(10)
        assert scheduler.wait(300) == 0, procs.log("scheduler")[-3000:]
    finally:
        procs.close()

    # Assert, from the store (ledgers and counters are not sealed) and the scheduler's metrics:
    store = RedisStore(redis_settings_from_url(redis.url), job=JOB["job"]["name"])
    rows = [json.loads(line) for line in (tmp_path / "scheduler" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    for row in rows:
        state = store.round_state(row["round"])
        assert state is not None and state.phase is RoundPhase.CLOSED and state.attempt == row["attempt"]
        ledger = store.accepted(row["round"], state.attempt)
        # Every accepted update is counted once: one per update id and per worker, as many as the row's.
        assert len(ledger) == state.counters["accepted"] == row["participants"]
        assert len({a.worker for a in ledger.values()}) == len(ledger)
    # Round 2: the worker of server-2 that was training when it died re-sent its update to another server,
    # where it counts as the worker the round sampled. Round 3 ran on the two live servers, with every
    # worker (server-2's failed over).
    resent = [a for uid, a in store.accepted(2, rows[1]["attempt"]).items()
              if uid in {f"2/{w}" for w in doomed} and a.server != "server-2"]
    assert resent, "".join(procs.log(w)[-2000:] for w in doomed)
    assert rows[2]["participants"] == WORKERS
    assert {a.server for a in store.accepted(3, rows[2]["attempt"]).values()} == {"server-0", "server-1"}
    store.close()


def test_a_redis_crash_pauses_the_rounds_and_the_job_finishes(tmp_path: Path, redis: RedisProcess) -> None:
    # Prepare: a scheduler, 3 servers, 6 workers.
    procs = Procs(tmp_path)
    try:
        scheduler = _start_cluster(procs, redis, merge(JOB, {"round": {"min_workers": 6, "update_window_s": 60},
                                                             "client": {"epochs": 20}}))

        # Execute: Redis crashes while round 2 trains, and comes back 2 s later with its append-only file.
        wait_for(lambda: "round 2: training" in procs.log("worker-0"), 240, "worker-0 to train in round 2")
        redis.kill()
        time.sleep(2.0)
        redis.start()
        assert scheduler.wait(300) == 0, procs.log("scheduler")[-3000:]
    finally:
        procs.close()

    # Assert: three rounds, each closed in the store with the ledger its row reports, and the servers said
    # what happened in their logs.
    rows = [json.loads(line) for line in (tmp_path / "scheduler" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    store = RedisStore(redis_settings_from_url(redis.url), job=JOB["job"]["name"])
    for row in rows:
        state = store.round_state(row["round"])
        assert state is not None and state.phase is RoundPhase.CLOSED
        assert len(store.accepted(row["round"], state.attempt)) == row["participants"]
    store.close()
    logs = "".join((tmp_path / f"server-{i}" / "logs" / "server.log").read_text() for i in range(SERVERS))
    assert "unreachable" in logs, "no server logged the outage"
    assert "answers again" in logs or "reachable again" in logs, "no server logged Redis's return"
    # The scheduler said it too: in its log, and as cluster events (the dashboard's audit feed).
    said = (tmp_path / "scheduler" / "logs" / "scheduler.log").read_text()
    assert "the store is unreachable, rounds pause" in said and "the store is reachable again after" in said


def test_the_leader_killed_during_a_close_is_replaced_and_no_version_is_skipped_or_doubled(
        tmp_path: Path, redis: RedisProcess) -> None:
    # Prepare: a model large enough (about 4M parameters) that a close takes a while to merge, step,
    # evaluate and seal; 6 workers on 3 servers, 4 enough to go on.
    job = merge(JOB, {"task": {"name": "digits-mlp", "params": {"hidden": [2048, 1024]}}, "client": {"epochs": 1},
                      "round": {"min_workers": 4, "update_window_s": 30}})
    procs = Procs(tmp_path)
    server_logs = [tmp_path / f"server-{i}" / "logs" / "server.log" for i in range(SERVERS)]

    def text(path: Path) -> str:
        return path.read_text(errors="replace") if path.exists() else ""

    try:
        scheduler = _start_cluster(procs, redis, job, connect_timeout_s=20)

        # Execute: SIGKILL whichever server starts closing round 2, as soon as it logs it.
        def closing() -> int | None:
            for i, path in enumerate(server_logs):
                if "round 2: closing attempt" in text(path):
                    return i
            return None

        wait_for(lambda: closing() is not None, 240, "a leader to start closing round 2", poll_s=0.005)
        leader = closing()
        assert leader is not None
        procs.procs[f"server-{leader}"].send_signal(signal.SIGKILL)
        procs.procs[f"server-{leader}"].wait(10)
        assert scheduler.wait(300) == 0, procs.log("scheduler")[-3000:]
    finally:
        procs.close()

    # Assert: the killed leader did not publish round 2; another server finished it; versions 1, 2, 3 once each.
    assert "round 2: closed" not in text(server_logs[leader])
    finishers = [i for i, path in enumerate(server_logs) if "round 2: closed" in text(path)]
    assert len(finishers) == 1 and finishers[0] != leader
    rows = [json.loads(line) for line in (tmp_path / "scheduler" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["model_version"]) for r in rows] == [(1, 1), (2, 2), (3, 3)]
    store = RedisStore(redis_settings_from_url(redis.url), job=JOB["job"]["name"])
    for number in (1, 2, 3):
        state = store.round_state(number)
        assert state is not None and state.phase is RoundPhase.CLOSED and state.model_version == number - 1
    store.close()
