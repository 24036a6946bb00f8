"""Tests for enclavefl.cluster.engine: several servers run one job through a shared store."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from enclavefl.cluster import Member, MemoryStore, RoundPhase, Session, Store, UpdateRef
from enclavefl.cluster import StoreUnavailable
from enclavefl.cluster.assignment import balance
from enclavefl.cluster.blobs import decode_model
from enclavefl.cluster.engine import PAUSE_LEASE, ClusterEngine, cluster_engine
from enclavefl.cluster.ledger import StoreAggregator
from enclavefl.cluster.scheduler import Scheduler
from enclavefl.errors import StaleSession
from enclavefl.messages import TaskKind
from enclavefl.server.aggregator import WeightedMean
from enclavefl.server.ps import ParameterServer
from enclavefl.tensors import ParamSet, StreamHeader
from enclavefl.worker import InMemoryClient
from tests.unit.cluster.cluster_job import FAST_LEASES, after_version, cluster_job, run_cluster, start_scheduler
from tests.unit.cluster.conftest import redis_store
from tests.unit.cluster.redis_server import RedisServer
from tests.unit.worker.federation import AddTrainer, f32, peer, run_federation

INITIAL = ParamSet({"w": f32([[0.5, -1.25], [2.0, 0.0]]), "b": f32([0.125, 3.0])})


def trainers(n: int) -> list[tuple[str, AddTrainer]]:
    # Worker i adds (i + 1) / 16 to every weight and weighs 10 + i samples: every float64 sum of
    # weight x delta is exact, so the merge of per-server sums cannot differ from one PS's sum.
    return [(f"worker-{i}", AddTrainer((i + 1) / 16, 10 + i)) for i in range(n)]


def test_three_servers_end_with_the_single_ps_model_bit_for_bit(tmp_path: Path) -> None:
    # Prepare
    config = cluster_job(rounds=3, workers=12)
    store = MemoryStore()

    # Execute
    run = run_cluster(config, INITIAL, trainers(12), lambda i: store, tmp_path / "cluster", servers=3)
    single = run_federation(config, INITIAL, trainers(12), tmp_path / "single")

    # Assert: every server serves the same final model, the one a single PS makes.
    assert not run.errors, run.errors
    for ps in run.servers:
        assert ps.version == 3
        assert ps.params.equal(single.ps.params)
    # Hand check of round 1: the weighted mean delta is sum((10+i)(i+1)/16) / sum(10+i) over i < 12.
    delta = sum((10 + i) * (i + 1) / 16 for i in range(12)) / sum(10 + i for i in range(12))
    assert not np.array_equal(single.ps.params["b"], INITIAL["b"])
    np.testing.assert_allclose(single.ps.params["b"], f32([0.125, 3.0]) + 3 * delta, rtol=1e-6)


def test_the_store_counts_each_update_once_in_exactly_one_partial(tmp_path: Path) -> None:
    # Prepare
    config = cluster_job(rounds=2, workers=6)
    store = MemoryStore()

    # Execute
    run = run_cluster(config, INITIAL, trainers(6), lambda i: store, tmp_path, servers=3)

    # Assert
    assert not run.errors, run.errors
    for number in (1, 2):
        state = store.round_state(number)
        assert state is not None and state.phase is RoundPhase.CLOSED
        ledger = store.accepted(number, state.attempt)
        assert len(ledger) == 6 == state.counters["accepted"]
        assert sorted(a.update_id for a in ledger.values()) == sorted(f"{number}/worker-{i}" for i in range(6))
        assert {a.server for a in ledger.values()} == {"server-0", "server-1", "server-2"}
    model = store.model()
    assert model is not None and model.version == 2


def test_every_server_records_the_leaders_metrics_rows(tmp_path: Path) -> None:
    # Prepare
    config = cluster_job(rounds=2, workers=4)
    store = MemoryStore()

    # Execute
    run = run_cluster(config, INITIAL, trainers(4), lambda i: store, tmp_path, servers=2)

    # Assert: one row per round on each server, the same rows, with the whole cluster's counts.
    assert not run.errors, run.errors
    rows = [list(ps.metrics.history) for ps in run.servers]
    assert [r["round"] for r in rows[0]] == [1, 2]
    assert rows[0] == rows[1]
    assert rows[0][0]["participants"] == 4
    assert rows[0][0]["num_samples"] == 10 + 11 + 12 + 13
    assert rows[0][0]["train_loss"] == 0.0


def test_servers_over_sealed_redis_end_with_the_single_ps_model(tmp_path: Path, store: Store) -> None:
    # Prepare
    config = cluster_job(rounds=2, workers=6)

    # Execute
    run = run_cluster(config, INITIAL, trainers(6), lambda i: store, tmp_path / "cluster", servers=3)
    single = run_federation(config, INITIAL, trainers(6), tmp_path / "single")

    # Assert
    assert not run.errors, run.errors
    for ps in run.servers:
        assert ps.params.equal(single.ps.params)




def _ticking_server(tmp_path: Path, store: MemoryStore) -> ClusterEngine:
    """A server that has not started its loop: each test calls tick() itself."""
    config = cluster_job(rounds=1, workers=2)
    ps = ParameterServer(config, INITIAL, out_dir=tmp_path, engine=cluster_engine(store, "server-0", config.cluster))
    engine = ps.engine
    assert isinstance(engine, ClusterEngine)
    store.register(Member("server-0", "server", "127.0.0.1:7000"), 30)
    for i in range(2):  # two workers joined to it, as its session sync would bind them
        store.bind_session(Session(f"w-{i}", f"fp{i}", "server-0", f"worker-{i}"))
    return engine


def test_the_leader_opens_no_round_while_the_pause_lease_is_held(tmp_path: Path) -> None:
    # Prepare
    store = MemoryStore()
    engine = _ticking_server(tmp_path, store)
    store.acquire_lease(PAUSE_LEASE, "scheduler", 30)

    # Execute
    engine.tick()

    # Assert: the first model is published, no round opened; once the pause ends, it opens.
    assert store.model() is not None and store.round_state() is None
    held = store.lease(PAUSE_LEASE)
    assert held is not None
    store.release_lease(held)
    engine.tick()
    state = store.round_state()
    assert state is not None and state.phase is RoundPhase.OPEN and state.sampled == {"w-0", "w-1"}


def test_the_leader_finishes_a_closing_round_from_the_partials_the_store_holds(tmp_path: Path) -> None:
    # Prepare: round 1 open on version 0, one update in the partial of a server that died, and the
    # round already CLOSING (a leader that began the close and died, say).
    store = MemoryStore()
    engine = _ticking_server(tmp_path, store)
    engine.tick()  # publishes version 0 and opens round 1
    dead = StoreAggregator(WeightedMean, StreamHeader.of(INITIAL), store, number=1, attempt=0, server="server-dead")
    ref = UpdateRef("w-0", "1/worker-0")
    with dead.name(ref, {"num_samples": 10}):
        dead.add(ParamSet({"w": np.ones((2, 2), np.float32), "b": np.ones(2, np.float32)}), 10.0)
    dead.commit(ref)
    store.begin_close(1, 0)

    # Execute
    engine.tick()

    # Assert: the close is finished from the store's partial: version 1 = initial + the one delta.
    state = store.round_state(1)
    assert state is not None and state.phase is RoundPhase.CLOSED
    model = store.model()
    assert model is not None and model.version == 1
    np.testing.assert_array_equal(decode_model(model.blob)["b"], f32([1.125, 4.0]))


def _unreachable_once(inner: MemoryStore, method: str) -> Store:
    """``inner``, except that the first call of ``method`` applies nothing and raises StoreUnavailable."""
    failed: list[bool] = []

    def delegate(name: str) -> Any:
        def call(self: Store, *args: Any, **kwargs: Any) -> Any:
            if name == method and not failed:
                failed.append(True)
                raise StoreUnavailable(f"{name}: Redis is restarting (test)")
            return getattr(inner, name)(*args, **kwargs)
        return call

    cls = type("UnreachableOnce", (Store,), {name: delegate(name) for name in Store.__abstractmethods__})
    made: Store = cls()
    return made


def test_a_close_the_store_missed_is_published_again_without_a_second_step(tmp_path: Path) -> None:
    # Prepare: round 1 open with one accepted update; the first finish_round finds the store unreachable.
    inner = MemoryStore()
    store = _unreachable_once(inner, "finish_round")
    config = cluster_job(rounds=1, workers=2)
    ps = ParameterServer(config, INITIAL, out_dir=tmp_path, engine=cluster_engine(store, "server-0", config.cluster))
    engine = ps.engine
    assert isinstance(engine, ClusterEngine)
    inner.register(Member("server-0", "server", "127.0.0.1:7000"), 30)
    for i in range(2):
        inner.bind_session(Session(f"w-{i}", f"fp{i}", "server-0", f"worker-{i}"))
    engine.tick()
    agg = StoreAggregator(WeightedMean, StreamHeader.of(INITIAL), inner, number=1, attempt=0, server="server-1")
    ref = UpdateRef("w-0", "1/worker-0")
    with agg.name(ref, {"num_samples": 10}):
        agg.add(ParamSet({"w": np.ones((2, 2), np.float32), "b": np.ones(2, np.float32)}), 10.0)
    agg.commit(ref)
    inner.begin_close(1, 0)

    # Execute: the first tick closes locally and fails to publish; the second publishes the same close.
    with pytest.raises(StoreUnavailable):
        engine.tick()
    engine.tick()

    # Assert: version 1 is initial + one delta (not two), and the server's own model is that one.
    model = inner.model()
    assert model is not None and model.version == 1
    np.testing.assert_array_equal(decode_model(model.blob)["b"], f32([1.125, 4.0]))
    assert ps.version == 1 and ps.params.equal(decode_model(model.blob))


def test_a_close_longer_than_the_lease_ttl_keeps_the_lease(tmp_path: Path) -> None:
    # Prepare: the lease lapses 0.6 s after its last renewal (renewed every 0.1 s, room for a busy
    # machine); evaluating the new model takes 1.5 s.
    store = MemoryStore()
    config = cluster_job(rounds=1, workers=2, cluster={"poll_s": 0.02, "heartbeat_s": 0.1, "member_ttl_s": 1.0,
                                                       "lease_ttl_s": 0.6})

    def slow_evaluation(params: ParamSet) -> dict[str, float]:
        time.sleep(1.5)
        return {"loss": 0.5}

    ps = ParameterServer(config, INITIAL, out_dir=tmp_path, evaluator=slow_evaluation,
                         engine=cluster_engine(store, "server-0", config.cluster))
    engine = ps.engine
    assert isinstance(engine, ClusterEngine)
    store.register(Member("server-0", "server", "127.0.0.1:7000"), 30)
    for i in range(2):
        store.bind_session(Session(f"w-{i}", f"fp{i}", "server-0", f"worker-{i}"))
    engine.tick()
    agg = StoreAggregator(WeightedMean, StreamHeader.of(INITIAL), store, number=1, attempt=0, server="server-1")
    ref = UpdateRef("w-0", "1/worker-0")
    with agg.name(ref, {"num_samples": 10}):
        agg.add(ParamSet({"w": np.ones((2, 2), np.float32), "b": np.ones(2, np.float32)}), 10.0)
    agg.commit(ref)
    store.begin_close(1, 0)

    # Execute: without renewals the lease would lapse mid-close and finish_round be refused (LeaseLost).
    engine.tick()

    # Assert
    model = store.model()
    assert model is not None and model.version == 1
    assert ps.metrics.history[-1]["eval_loss"] == 0.5


def test_a_server_added_while_the_job_runs_serves_from_the_next_round(tmp_path: Path) -> None:
    # Prepare: 4 workers on 2 servers start the job; a third server and its 2 workers start once
    # round 1 has closed.
    config = cluster_job(rounds=4, workers=6, round={"min_workers": 4, "start_window_s": 20, "update_window_s": 20,
                                                     "max_retries": 0})
    store = MemoryStore()

    # Execute
    run = run_cluster(config, INITIAL, trainers(6), lambda i: store, tmp_path, servers=3, late={2: 1})

    # Assert: every server ends with the same model and every round's row (the late one got round 1's
    # from the close's history); its workers are counted by the last round (they may miss round 2,
    # which can open before they joined).
    assert not run.errors, run.errors
    assert all(ps.version == 4 and ps.params.equal(run.servers[0].params) for ps in run.servers)
    assert [r["round"] for r in run.servers[2].metrics.history] == [1, 2, 3, 4]
    assert run.servers[2].metrics.history == run.servers[0].metrics.history
    first = store.accepted(1, 0)
    assert {a.server for a in first.values()} == {"server-0", "server-1"}
    last = store.round_state(4)
    assert last is not None and "server-2" in {a.server for a in store.accepted(4, last.attempt).values()}


def _round_sampled_on_a_dead_server(tmp_path: Path, fingerprint: str) -> tuple[MemoryStore, InMemoryClient, str]:
    """Server-0 serving round 1, which sampled worker-0 as ``w-old`` on server-dead; worker-0 joined server-0."""
    config = cluster_job(rounds=1, workers=2)
    store = MemoryStore()
    ps = ParameterServer(config, INITIAL, out_dir=tmp_path, engine=cluster_engine(store, "server-0", config.cluster))
    engine = ps.engine
    assert isinstance(engine, ClusterEngine)
    engine.tick()  # publishes version 0; opens nothing (no worker yet)
    store.bind_session(Session("w-old", fingerprint, "server-dead", "worker-0"))
    store.bind_session(Session("w-other", "fp-other", "server-dead", "worker-1"))
    store.open_round(1, 0, model_version=0, sampled={"w-old", "w-other"}, required=2, lease=engine.lease)
    client = InMemoryClient(ps, peer("worker-0"), chunk_bytes=64)
    worker_id = client.join("worker-0", 10).worker_id
    engine.tick()  # follows the store: round 1 opens here
    return store, client, worker_id


def test_a_worker_failed_over_from_a_dead_server_is_counted_as_the_worker_the_round_sampled(tmp_path: Path) -> None:
    # Prepare: the dead server's session has worker-0's name and certificate fingerprint.
    store, client, worker_id = _round_sampled_on_a_dead_server(tmp_path, peer("worker-0").fingerprint)
    delta = ParamSet({"w": np.ones((2, 2), np.float32), "b": np.ones(2, np.float32)})

    # Execute: worker-0 re-sends its round-1 update under its new id, then once more.
    first = client.push_update(worker_id, 1, 0, delta, 10, {})
    again = client.push_update(worker_id, 1, 0, delta, 10, {})

    # Assert: one ledger entry, under the sampled id, accepted by server-0; the re-send is refused.
    assert first.accepted and not again.accepted
    assert [(r.worker, r.server) for r in store.accepted(1, 0).values()] == [("w-old", "server-0")]
    assert list(store.accepted(1, 0)) == ["1/worker-0"]


def test_a_worker_with_another_certificate_is_not_taken_for_the_sampled_one(tmp_path: Path) -> None:
    # Prepare: the sampled session of worker-0 was bound to another certificate.
    store, client, worker_id = _round_sampled_on_a_dead_server(tmp_path, "fp-someone-else")
    delta = ParamSet({"w": np.ones((2, 2), np.float32), "b": np.ones(2, np.float32)})

    # Execute
    reply = client.push_update(worker_id, 1, 0, delta, 10, {})

    # Assert
    assert not reply.accepted and "not sampled" in reply.reason
    assert store.accepted(1, 0) == {}


def test_a_drained_server_finishes_its_round_and_its_workers_move_to_the_others(tmp_path: Path) -> None:
    # Prepare: 6 workers on 3 servers, every round needs all 6; server-2 drains once version 1 is out.
    config = cluster_job(rounds=4, workers=6)
    store = MemoryStore()

    # Execute
    run = run_cluster(config, INITIAL, trainers(6), lambda i: store, tmp_path / "cluster", servers=3, drain={2: 1})
    single = run_federation(config, INITIAL, trainers(6), tmp_path / "single")

    # Assert: server-2 left the membership; every round counted each worker once, the last on the two
    # servers left; they end with the single PS's model (no update lost or doubled by the move).
    assert not run.errors, run.errors
    assert run.engine(2).drained
    assert [m.member_id for m in store.members("server")] == []  # all left at the end
    for number in range(1, 5):
        state = store.round_state(number)
        assert state is not None and state.phase is RoundPhase.CLOSED
        ledger = store.accepted(number, state.attempt)
        assert sorted(ledger) == sorted(f"{number}/worker-{i}" for i in range(6))
    last = store.round_state(4)
    assert last is not None
    assert {a.server for a in store.accepted(4, last.attempt).values()} == {"server-0", "server-1"}
    for ps in run.servers[:2]:
        assert ps.version == 4 and ps.params.equal(single.ps.params)
    # A worker whose list still names the drained server, joining it late, is sent on, never told FINISH
    # (it would end while the job goes on); at the job's end the others' workers hear FINISH.
    late = peer("worker-late")
    drained = run.servers[2].join(late, "worker-late", 10).worker_id
    with pytest.raises(StaleSession, match="has left the cluster"):
        run.servers[2].wait_task(late, drained, 0.1)
    ended = run.servers[0].join(late, "worker-late", 10).worker_id
    assert run.servers[0].wait_task(late, ended, 0.1).kind is TaskKind.FINISH


def test_workers_move_to_the_server_the_cluster_assigns_them_and_no_round_fails(tmp_path: Path) -> None:
    # Prepare: 6 workers on 2 servers, worker i first on server i mod 2; the servers' WAIT answers give
    # each worker its servers in the cluster's balanced order, so some are on the wrong server and move.
    config = cluster_job(rounds=4, workers=6, cluster=FAST_LEASES)
    store = MemoryStore()
    members = [Member(f"server-{k}", "server", f"127.0.0.1:{7000 + k}") for k in range(2)]
    home = {name: order[0].member_id for name, order in balance([f"worker-{i}" for i in range(6)], members).items()}
    assert any(home[f"worker-{i}"] != f"server-{i % 2}" for i in range(6))  # the test moves somebody

    # Execute
    run = run_cluster(config, INITIAL, trainers(6), lambda i: store, tmp_path, servers=2, follow=True)

    # Assert: every round closed on its first attempt; the last one took each worker's update on the
    # server the cluster assigns it (names map to ids through the sessions bound on join).
    assert not run.errors, run.errors
    assert all(ps.version == 4 for ps in run.servers)
    for number in range(1, 5):
        state = store.round_state(number)
        assert state is not None and state.phase is RoundPhase.CLOSED and state.attempt == 0
    last = store.accepted(4, 0)
    assert {uid.split("/")[1]: a.server for uid, a in last.items()} == home


def test_the_leader_closes_a_round_once_no_sampled_worker_that_has_not_pushed_has_a_session(tmp_path: Path) -> None:
    # Prepare: round 1 samples w-0 and w-1 (update window 20 s); w-0's update is accepted.
    store = MemoryStore()
    engine = _ticking_server(tmp_path, store)
    engine.tick()  # publishes version 0 and opens round 1
    other = StoreAggregator(WeightedMean, StreamHeader.of(INITIAL), store, number=1, attempt=0, server="server-1")
    with other.name(UpdateRef("w-0", "1/worker-0"), {"num_samples": 10}):
        other.add(ParamSet({"w": np.ones((2, 2), np.float32), "b": np.ones(2, np.float32)}), 10.0)
    other.commit(UpdateRef("w-0", "1/worker-0"))

    # Execute: w-1 still has its session: the round waits; then it leaves (its session is dropped).
    engine.tick()
    waiting = store.round_state(1)
    store.drop_session("w-1")
    engine.tick()

    # Assert: closed with the one update, long before its window.
    assert waiting is not None and waiting.phase is RoundPhase.OPEN
    state = store.round_state(1)
    assert state is not None and state.phase is RoundPhase.CLOSED
    model = store.model()
    assert model is not None and model.version == 1


def test_a_store_that_lost_its_state_is_restored_from_the_servers_and_the_job_finishes(
        tmp_path: Path, redis_without_aof: RedisServer) -> None:
    # Prepare: 2 servers over a Redis without append-only file; it is killed once version 2 is out and comes
    # back empty 0.2 s later.
    server = redis_without_aof
    store = redis_store(server, job="emptied", retries=8)
    config = cluster_job(rounds=5, workers=4, cluster=FAST_LEASES)
    emptied = threading.Event()

    def empty_the_store() -> None:
        server.kill()
        time.sleep(0.2)
        server.start()
        emptied.set()

    killer = after_version(store, 2, empty_the_store)

    # Execute
    try:
        run = run_cluster(config, INITIAL, trainers(4), lambda i: store, tmp_path / "cluster", servers=2)
        single = run_federation(config, INITIAL, trainers(4), tmp_path / "single")
        killer.join(10)
        final = store.model()
        state = store.round_state()
    finally:
        store.close()

    # Assert: every round ran once in the servers' history, version 5 was published after the restore, and the
    # servers end with the single PS's model (the round that was open when the store was lost ran again).
    assert emptied.is_set()
    assert not run.errors, run.errors
    assert final is not None and final.version == 5
    assert state is not None and (state.number, state.phase) == (5, RoundPhase.CLOSED)
    for ps in run.servers:
        assert ps.version == 5 and ps.params.equal(single.ps.params)
        assert [r["round"] for r in ps.metrics.history] == [1, 2, 3, 4, 5]


def _dp_job(rounds: int, target_epsilon: float | None = None) -> Any:
    dp: dict[str, Any] = {"enabled": True, "clip_norm": 1.0, "noise_multiplier": 1.0}
    if target_epsilon is not None:
        dp["target_epsilon"] = target_epsilon
    return cluster_job(rounds=rounds, workers=4, privacy={"dp": dp},
                       cluster=FAST_LEASES)


def test_central_dp_on_two_servers_gives_the_single_ps_model_and_epsilon(tmp_path: Path) -> None:
    pytest.importorskip("dp_accounting", reason="differential privacy needs the privacy extra")
    # Prepare: each worker adds (i + 1) / 16 (clipped to norm 1 by the workers); the leader adds the noise,
    # seeded by (seed, round), to the merged clipped mean.
    config = _dp_job(rounds=3)
    store = MemoryStore()

    # Execute
    run = run_cluster(config, INITIAL, trainers(4), lambda i: store, tmp_path / "cluster", servers=2)
    single = run_federation(config, INITIAL, trainers(4), tmp_path / "single")

    # Assert: the same noisy model (the sums are exact, the noise the same) and the same epsilon per round.
    assert not run.errors, run.errors
    for ps in run.servers:
        assert ps.version == 3
        for name, value in single.ps.params.items():
            np.testing.assert_allclose(ps.params[name], value, rtol=1e-6, atol=1e-7)
        assert [r["dp_epsilon"] for r in ps.metrics.history] == pytest.approx(
            [r["dp_epsilon"] for r in single.ps.metrics.history], abs=1e-9)
    assert not np.array_equal(single.ps.params["b"], INITIAL["b"])


def test_a_privacy_budget_ends_a_cluster_job_after_the_last_round_it_allows(tmp_path: Path) -> None:
    pytest.importorskip("dp_accounting", reason="differential privacy needs the privacy extra")
    import dp_accounting

    def epsilon(rounds: int) -> float:
        accountant = dp_accounting.rdp.RdpAccountant()
        accountant.compose(dp_accounting.PoissonSampledDpEvent(1.0, dp_accounting.GaussianDpEvent(1.0)), rounds)
        return float(accountant.get_epsilon(1e-5))

    # Prepare: a budget between the epsilon of 2 and of 3 rounds (q = 1: every worker is sampled).
    config = _dp_job(rounds=10, target_epsilon=(epsilon(2) + epsilon(3)) / 2)
    store = MemoryStore()
    scheduler = Scheduler(config, store, out_dir=tmp_path / "scheduler")
    thread, ended = start_scheduler(scheduler)

    # Execute
    run = run_cluster(config, INITIAL, trainers(4), lambda i: store, tmp_path, servers=2)
    thread.join(10)

    # Assert: two rounds everywhere, no third opened, the job finished (not failed) on both servers and
    # for the scheduler, which took job.rounds = 2 from the store.
    assert not run.errors, run.errors
    assert ended == ["finished"] and scheduler.config.job.rounds == 2
    assert [ps.version for ps in run.servers] == [2, 2]
    assert all([r["round"] for r in ps.metrics.history] == [1, 2] and ps.core.outcome == "finished"
               for ps in run.servers)
    state = store.round_state()
    assert state is not None and (state.number, state.phase) == (2, RoundPhase.CLOSED)


def test_signds_on_two_servers_sums_every_upload_once(tmp_path: Path) -> None:
    # Prepare: local DP by SignDS: each worker uploads 2 signed indices (drawn from the OS's randomness, so no
    # two runs agree); the servers sum their workers' uploads, the leader merges the sums.
    config = cluster_job(rounds=2, workers=4, cluster=FAST_LEASES, privacy={"local_dp": {
        "enabled": True, "mechanism": "signds", "epsilon": 10.0, "sparse_rate": 0.25, "dims_out": 2,
        "global_lr": 3.0}})
    store = MemoryStore()

    # Execute
    run = run_cluster(config, INITIAL, trainers(4), lambda i: store, tmp_path / "cluster", servers=2)
    single = run_federation(config, INITIAL, trainers(4), tmp_path / "single")

    # Assert: both servers hold one model; every round took 4 uploads; each value moved by whole steps of
    # global_lr / 4 = 0.75 (the sum of +-1 selections over 4 uploads); epsilon as on one PS.
    assert not run.errors, run.errors
    assert run.servers[0].params.equal(run.servers[1].params) and run.servers[0].version == 2
    for number in (1, 2):
        state = store.round_state(number)
        assert state is not None and state.counters["accepted"] == 4
    moved = np.concatenate([(run.servers[0].params[n] - INITIAL[n]).ravel() for n in ("w", "b")]) / 0.75
    np.testing.assert_allclose(moved, np.round(moved), atol=1e-5)
    assert [r["local_dp_epsilon"] for r in run.servers[0].metrics.history] == [
        r["local_dp_epsilon"] for r in single.ps.metrics.history]
