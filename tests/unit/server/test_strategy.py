"""Tests for enclavefl.server.strategy and the settings the PS must honour.

Each test plays the workers in-process against a real ParameterServer (no
gRPC), so that ignoring a setting (server.lr, round.fraction, checkpoint_every,
max_concurrent_uploads, the optimizer's state on resume, the weight cap) fails
a test.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from enclavefl.config import JobConfig, parse_job
from enclavefl.errors import UpdateRejected
from enclavefl.messages import PeerIdentity, TaskKind, UpdateMeta
from enclavefl.server.aggregator import WeightedMean
from enclavefl.server.algorithms import FedAvgAlgorithm, Scaffold
from enclavefl.server.checkpoint import latest_checkpoint
from enclavefl.server.optimizer import FedAdam, FedAvg, FedAvgM
from enclavefl.server.ps import ParameterServer
from enclavefl.server.robust import Krum, TrimmedMean
from enclavefl.server.strategy import build_strategy
from enclavefl.tensors import ParamSet, StreamHeader, iter_chunks
from tests.unit.server.test_ps import INITIAL, Engine, f32

PEERS = [PeerIdentity(fingerprint=f"{i:x}" * 64, label=f"worker-{i}") for i in range(6)]


def config(**sections: dict[str, Any]) -> JobConfig:
    doc: dict[str, Any] = {
        "job": {"rounds": 1, "seed": 3},
        "round": {"min_workers": 2, "start_window_s": 5, "update_window_s": 5, "max_retries": 0},
        "attestation": {"mode": "none"},
    }
    for section, values in sections.items():
        doc.setdefault(section, {}).update(values)
    return parse_job(doc)


def delta(value: float) -> ParamSet:
    return ParamSet({"w": np.full((2, 2), value, dtype=np.float32), "b": np.full(2, value, dtype=np.float32)})


def push(ps: ParameterServer, peer: PeerIdentity, worker_id: str, update: ParamSet, num_samples: int,
         round_: int, version: int) -> None:
    meta = UpdateMeta(worker_id, round_, version, num_samples, StreamHeader.of(update), {"loss": 1.0})
    sink = ps.open_update(peer, meta)
    for chunk in iter_chunks(update, 8):
        sink.feed(bytes(chunk))
    sink.commit()


def play(ps: ParameterServer, workers: int, updates: Callable[[int, int], ParamSet], *,
         samples: Callable[[int], int] = lambda i: 1, timeout_s: float = 20) -> list[set[int]]:
    """Joins ``workers`` workers and answers every train task until FINISH; returns who trained each round."""
    ids = [ps.join(PEERS[i], f"worker-{i}", samples(i)).worker_id for i in range(workers)]
    engine = Engine(ps)
    trained: dict[int, set[int]] = {}
    done = [False] * workers
    deadline = time.monotonic() + timeout_s
    while not all(done):
        assert time.monotonic() < deadline, "the job did not finish"
        for i in range(workers):
            if done[i]:
                continue
            task = ps.wait_task(PEERS[i], ids[i], 0.05)
            if task.kind is TaskKind.FINISH:
                done[i] = True
            elif task.kind is TaskKind.TRAIN:
                trained.setdefault(task.round, set()).add(i)
                push(ps, PEERS[i], ids[i], updates(i, task.round), samples(i), task.round, task.model_version)
    engine.join(15)
    assert engine.error is None, engine.error
    return [trained[r] for r in sorted(trained)]


# ---------------------------------------------------------------- build_strategy


@pytest.mark.parametrize(("optimizer", "cls"), [("fedavg", FedAvg), ("fedavgm", FedAvgM), ("fedadam", FedAdam)])
def test_build_strategy_makes_the_named_optimizer_with_the_server_lr(tmp_path: Path, optimizer: str, cls: type) -> None:
    strategy = build_strategy(config(server={"optimizer": optimizer, "lr": 0.25}), StreamHeader.of(INITIAL),
                              spill_dir=tmp_path)
    assert isinstance(strategy.optimizer, cls) and strategy.optimizer.lr == 0.25


def test_build_strategy_passes_optimizer_settings(tmp_path: Path) -> None:
    strategy = build_strategy(config(server={"optimizer": {"name": "fedadam", "beta1": 0.5, "tau": 0.01}}),
                              StreamHeader.of(INITIAL), spill_dir=tmp_path)
    assert isinstance(strategy.optimizer, FedAdam)
    assert (strategy.optimizer.beta1, strategy.optimizer.tau) == (0.5, 0.01)


def test_build_strategy_makes_buffering_aggregators_that_spill_in_the_given_directory(tmp_path: Path) -> None:
    cfg = config(server={"aggregator": {"name": "trimmed_mean", "trim_ratio": 0.2}, "max_buffered_updates": 3})
    strategy = build_strategy(cfg, StreamHeader.of(INITIAL), spill_dir=tmp_path / "spill")
    aggregator = strategy.aggregator(StreamHeader.of(INITIAL))
    try:
        assert isinstance(aggregator, TrimmedMean) and strategy.buffers
        for _ in range(3):
            aggregator.add(delta(1.0), 1.0)
        assert list((tmp_path / "spill").iterdir())
        with pytest.raises(UpdateRejected, match="max_buffered_updates"):
            aggregator.add(delta(1.0), 1.0)
    finally:
        aggregator.close()


def test_build_strategy_krum_and_streaming_default(tmp_path: Path) -> None:
    header = StreamHeader.of(INITIAL)
    krum = build_strategy(config(server={"aggregator": {"name": "krum", "byzantine": 2}}), header, spill_dir=tmp_path)
    made = krum.aggregator(header)
    assert isinstance(made, Krum) and made.byzantine == 2
    made.close()
    plain = build_strategy(config(), header, spill_dir=tmp_path)
    assert isinstance(plain.aggregator(header), WeightedMean) and not plain.buffers


def test_build_strategy_client_algorithms(tmp_path: Path) -> None:
    header = StreamHeader.of(INITIAL)
    fedprox = build_strategy(config(server={"strategy": {"name": "fedprox", "mu": 0.1}}), header, spill_dir=tmp_path)
    assert isinstance(fedprox.algorithm, FedAvgAlgorithm)
    settings = fedprox.algorithm.client_settings(config().client, 1)
    assert (settings.algorithm, settings.proximal_mu) == ("fedprox", 0.1)
    scaffold = build_strategy(config(server={"strategy": "scaffold"}), header, spill_dir=tmp_path)
    assert isinstance(scaffold.algorithm, Scaffold)
    assert [s.name for s in scaffold.algorithm.upload_template(header).tensors] == ["w", "b", "scaffold.dc/w", "scaffold.dc/b"]


# ---------------------------------------------------------------- settings honoured


def test_server_lr_scales_the_step(tmp_path: Path) -> None:
    # 2 workers each push +1 everywhere: FedAvg with lr 0.5 moves every weight by 0.5.
    ps = ParameterServer(config(server={"lr": 0.5}), INITIAL, out_dir=tmp_path)
    play(ps, 2, lambda i, r: delta(1.0))
    np.testing.assert_array_equal(ps.params["w"], f32([[1.5, 2.5], [3.5, 4.5]]))


def test_fedadam_first_step_through_the_server(tmp_path: Path) -> None:
    # Mean delta d = 1: m = 0.1, v = 0.99 * 1e-6 + 0.01 * 1 = 0.01000099, step = lr * m / (sqrt(v) + tau).
    ps = ParameterServer(config(server={"optimizer": "fedadam", "lr": 0.1}), INITIAL, out_dir=tmp_path)
    play(ps, 2, lambda i, r: delta(1.0))
    step = 0.1 * 0.1 / (np.sqrt(0.99 * 1e-6 + 0.01) + 1e-3)
    np.testing.assert_allclose(ps.params["b"], [step, step], rtol=1e-6)


def test_round_fraction_samples_that_share_of_the_workers(tmp_path: Path) -> None:
    cfg = config(job={"rounds": 3}, round={"min_workers": 1, "fraction": 0.5, "update_window_s": 2})
    ps = ParameterServer(cfg, INITIAL, out_dir=tmp_path)
    trained = play(ps, 4, lambda i, r: delta(0.0))
    assert [len(t) for t in trained] == [2, 2, 2]
    assert [row["sampled"] for row in ps.metrics.history] == [2, 2, 2]


def test_checkpoint_every_is_honoured(tmp_path: Path) -> None:
    cfg = config(job={"rounds": 5}, server={"checkpoint_every": 2})
    ps = ParameterServer(cfg, INITIAL, out_dir=tmp_path)
    written: list[str] = []
    stop = threading.Event()

    def scan() -> None:
        written.extend(p.name for p in (tmp_path / "checkpoints").glob("round-*.ckpt") if p.name not in written)

    def watch() -> None:
        while not stop.is_set():
            scan()
            time.sleep(0.002)
        scan()

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        play(ps, 2, lambda i, r: delta(0.0))
    finally:
        stop.set()
        watcher.join()
    # Rounds 2 and 4, and the last round always.
    assert sorted(written) == ["round-000002.ckpt", "round-000004.ckpt", "round-000005.ckpt"]


def test_max_concurrent_uploads_bounds_staged_updates(tmp_path: Path) -> None:
    cfg = config(round={"min_workers": 3}, server={"max_concurrent_uploads": 2})
    ps = ParameterServer(cfg, INITIAL, out_dir=tmp_path)
    ids = [ps.join(PEERS[i], f"worker-{i}", 1).worker_id for i in range(3)]
    engine = Engine(ps)
    for i in range(3):
        assert ps.wait_task(PEERS[i], ids[i], 5).kind is TaskKind.TRAIN
    header = StreamHeader.of(delta(1.0))
    sinks = [ps.open_update(PEERS[i], UpdateMeta(ids[i], 1, 0, 1, header)) for i in range(2)]
    # A third upload waits for a slot: it gets none until one of the first two ends.
    got: list[Any] = []
    third = threading.Thread(target=lambda: got.append(ps.open_update(PEERS[2], UpdateMeta(ids[2], 1, 0, 1, header))))
    third.start()
    third.join(0.5)
    assert third.is_alive() and not got
    sinks[0].abort("test")
    third.join(5)
    assert got
    got[0].abort("test")
    sinks[1].abort("test")
    engine.join(15)


# ---------------------------------------------------------------- weights are claims


def test_num_samples_is_capped_by_the_join_declaration(tmp_path: Path) -> None:
    # Worker 0 declared 1 sample at join and claims 2**62 in its update: weighed as 1.
    # Mean of +4 (weight 1) and 0 (weight 1) is +2.
    ps = ParameterServer(config(), INITIAL, out_dir=tmp_path)
    ids = [ps.join(PEERS[i], f"worker-{i}", 1).worker_id for i in range(2)]
    engine = Engine(ps)
    for i in range(2):
        assert ps.wait_task(PEERS[i], ids[i], 5).kind is TaskKind.TRAIN
    push(ps, PEERS[0], ids[0], delta(4.0), 2**62, 1, 0)
    push(ps, PEERS[1], ids[1], delta(0.0), 1, 1, 0)
    for i in range(2):
        assert ps.wait_task(PEERS[i], ids[i], 5).kind is TaskKind.FINISH
    engine.join(15)
    np.testing.assert_array_equal(ps.params["b"], [2.0, 2.0])
    assert ps.metrics.history[0]["num_samples"] == 2


def test_max_weight_per_update_caps_below_the_join_declaration(tmp_path: Path) -> None:
    # Declared 100 and 1 at join; the cap of 3 makes the weights 3 and 1: (3 * 4 + 0) / 4 = 3.
    ps = ParameterServer(config(server={"max_weight_per_update": 3}), INITIAL, out_dir=tmp_path)
    play(ps, 2, lambda i, r: delta(4.0 if i == 0 else 0.0), samples=lambda i: 100 if i == 0 else 1)
    np.testing.assert_array_equal(ps.params["b"], [3.0, 3.0])


@pytest.mark.parametrize("optimizer", ["fedavg", "fedavgm"])
def test_a_non_finite_next_model_is_refused_and_the_round_retried(tmp_path: Path, optimizer: str) -> None:
    # Updates of float32's largest value, stepped with lr 2, would overflow the model to Inf:
    # the round is refused (optimizer state restored) and the retry, with +1 updates, is applied.
    cfg = config(round={"max_retries": 1, "update_window_s": 1}, server={"lr": 2.0, "optimizer": optimizer})
    ps = ParameterServer(cfg, INITIAL, out_dir=tmp_path)
    reference = ParameterServer(cfg, INITIAL, out_dir=tmp_path / "reference")
    huge = float(np.finfo(np.float32).max)
    attempts: list[int] = []

    def update(i: int, r: int) -> ParamSet:
        attempts.append(r)
        return delta(huge) if len(attempts) <= 2 else delta(1.0)

    play(ps, 2, update)
    play(reference, 2, lambda i, r: delta(1.0))
    assert np.isfinite(ps.params["w"]).all()
    assert ps.params.equal(reference.params)
    assert ps.metrics.history[0]["attempt"] == 1


def test_fedadam_resume_continues_bit_identically(tmp_path: Path) -> None:
    # 3 rounds straight vs 2 rounds, a restart from the checkpoint, and round 3.
    def run(out: Path, rounds: int, resume: bool) -> ParameterServer:
        cfg = config(job={"rounds": rounds}, server={"optimizer": "fedadam", "lr": 0.05})
        ckpt = latest_checkpoint(out / "checkpoints") if resume else None
        ps = ParameterServer(cfg, INITIAL, out_dir=out, resume_from=ckpt)
        play(ps, 2, lambda i, r: delta(0.5 * (i + 1) * (-1) ** r))
        return ps

    straight = run(tmp_path / "a", 3, False)
    run(tmp_path / "b", 2, False)
    resumed = run(tmp_path / "b", 3, True)
    assert resumed.params.equal(straight.params)
    assert latest_checkpoint(tmp_path / "b" / "checkpoints").parts["optimizer"].meta["step"] == 3  # type: ignore[union-attr]


def test_stop_abandons_the_open_round_and_checkpoints_the_last_completed_one(tmp_path: Path) -> None:
    # checkpoint_every 100: without the stop's checkpoint, round 1 would be lost.
    cfg = config(job={"rounds": 5}, server={"checkpoint_every": 100})
    ps = ParameterServer(cfg, INITIAL, out_dir=tmp_path)
    ids = [ps.join(PEERS[i], f"worker-{i}", 1).worker_id for i in range(2)]
    engine = Engine(ps)
    for i in range(2):
        assert ps.wait_task(PEERS[i], ids[i], 5).round == 1
        push(ps, PEERS[i], ids[i], delta(1.0), 1, 1, 0)
    assert ps.wait_task(PEERS[0], ids[0], 5).round == 2  # round 2 is open

    ps.stop()
    finish = ps.wait_task(PEERS[0], ids[0], 5)
    ps.wait_task(PEERS[1], ids[1], 5)
    engine.join(15)

    assert engine.error is None and finish.kind is TaskKind.FINISH and "stopped after round 1" in finish.message
    ckpt = latest_checkpoint(tmp_path / "checkpoints")
    assert ckpt is not None and ckpt.round == 1 and ckpt.params.equal(ps.params)
    assert [row["round"] for row in ps.metrics.history] == [1]


def test_stop_while_waiting_for_workers_ends_the_job(tmp_path: Path) -> None:
    ps = ParameterServer(config(round={"min_workers": 2, "start_window_s": 30}), INITIAL, out_dir=tmp_path)
    engine = Engine(ps)
    time.sleep(0.2)
    started = time.monotonic()
    ps.stop()
    engine.join(5)
    assert engine.error is None and time.monotonic() - started < 5
    assert latest_checkpoint(tmp_path / "checkpoints") is None
