"""The simulation driver with a real PS: the pool mode trains what the worker runtime trains, sampled clients only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from enclavefl.app import simulate
from enclavefl.config import JobConfig, parse_job
from enclavefl.errors import RoundError
from enclavefl.simulation import ClientStateStore, InlinePool
from enclavefl.tensors import ParamSet
from enclavefl.training import Trainer
from tests.unit.simulation.clients import SCAFFOLD_INITIAL, AddTrainers, CountingTrainers, FailingTrainers, GradientTrainers
from tests.unit.worker.federation import f32


def job(*, workers: int = 2, rounds: int = 2, fraction: float = 1.0, min_workers: int | None = None,
        **server: Any) -> JobConfig:
    return parse_job({
        "job": {"rounds": rounds, "workers": workers},
        "round": {"min_workers": min_workers or workers, "fraction": fraction, "start_window_s": 20, "update_window_s": 20,
                  "max_retries": 0},
        "client": {"epochs": 1, "batch_size": 4, "lr": 0.5},
        "server": server,
        "management": {"enabled": False},
        "attestation": {"mode": "none"},
    })


class Task:
    """The server's side: the initial model; clients come from the pool's factory."""

    name = "tiny"

    def __init__(self, initial: ParamSet) -> None:
        self._initial = initial

    def initial_parameters(self) -> ParamSet:
        return self._initial.copy()

    def worker_trainer(self, index: int, num_workers: int) -> Trainer:
        return AddTrainers()(index, num_workers)

    def server_evaluator(self) -> Trainer | None:
        return None


def test_the_pool_mode_ends_with_the_model_of_the_thread_mode(tmp_path: Path) -> None:
    config = job(workers=3)
    task = Task(ParamSet({"w": f32([1, 2])}))

    threads = simulate(task, config, out_dir=tmp_path / "threads")
    pooled = simulate(task, config, out_dir=tmp_path / "pool", pool=InlinePool(config, AddTrainers()))

    # Clients add 1, 2, 3 with 1, 2, 3 samples: the weighted mean delta is (1 + 4 + 9) / 6 = 7/3 per round.
    assert pooled.params.equal(threads.params)
    assert [r["participants"] for r in pooled.history] == [3, 3]


def test_only_the_sampled_clients_train(tmp_path: Path) -> None:
    config = job(workers=10, rounds=3, fraction=0.3, min_workers=2)
    factory = CountingTrainers()

    result = simulate(Task(ParamSet({"w": f32([0])})), config, out_dir=tmp_path,
                      pool=InlinePool(config, factory, trainers_kept=100))

    assert [r["participants"] for r in result.history] == [3, 3, 3]  # ceil(0.3 x 10) per round
    # Every client's trainer is built once (to count its samples) and kept; 3 rounds x 3 clients fit.
    assert sorted(factory.built) == list(range(10))
    assert sum(len(t.configs) for t in factory.trainers) == 9


def test_scaffold_variates_are_kept_per_client_between_rounds(tmp_path: Path) -> None:
    config = job(strategy="scaffold")

    result = simulate(Task(SCAFFOLD_INITIAL), config, out_dir=tmp_path, pool=InlinePool(config, GradientTrainers()))

    # The two-worker SCAFFOLD case of the worker runtime's test, by hand: round 1 moves x by the weighted mean
    # of -g_i and sets c_i = g_i; in round 2 each corrected gradient is c, so x moves by -c: w [-0.5, -3], b [2].
    assert result.params == ParamSet({"w": f32([-0.5, -3]), "b": f32([2])})
    store = ClientStateStore(tmp_path / "clients")
    assert store.load(0) == ParamSet({"w": f32([1, 0]), "b": f32([2])})  # c_0 = g_0, unchanged in round 2
    assert store.load(1) == ParamSet({"w": f32([0, 2]), "b": f32([-2])})


def test_a_failing_client_fails_the_simulation_with_its_name(tmp_path: Path) -> None:
    config = job(workers=2)

    with pytest.raises(RoundError, match=r"client 1 \(worker-1\) failed in round 1: ValueError: this client"):
        simulate(Task(ParamSet({"w": f32([0])})), config, out_dir=tmp_path, pool=InlinePool(config, FailingTrainers()))
