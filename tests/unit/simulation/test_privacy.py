"""The privacy and compression options in both simulation modes: the pool mode runs what a worker runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from enclavefl.app import simulate
from enclavefl.config import JobConfig, parse_job
from enclavefl.simulation import ClientStateStore, InlinePool, ProcessPool
from enclavefl.tensors import ParamSet
from enclavefl.training import Trainer
from tests.unit.simulation.clients import AddTrainers, SteadyTrainers
from tests.unit.worker.federation import f32


def job(*, workers: int = 1, rounds: int = 3, **sections: Any) -> JobConfig:
    return parse_job({
        "job": {"rounds": rounds, "workers": workers, "seed": 5},
        "round": {"min_workers": workers, "start_window_s": 20, "update_window_s": 20, "max_retries": 0},
        "client": {"epochs": 1, "batch_size": 4, "lr": 0.5},
        "management": {"enabled": False},
        "attestation": {"mode": "none"},
        **sections,
    })


TOPK = {"privacy": {"compression": {"upload": {"type": "topk", "sparse_rate": 0.5}}}}


class Task:
    """The server's side: the initial model; clients come from ``trainers``."""

    name = "tiny"

    def __init__(self, initial: ParamSet, trainers: Any) -> None:
        self._initial = initial
        self._trainers = trainers

    def initial_parameters(self) -> ParamSet:
        return self._initial.copy()

    def worker_trainer(self, index: int, num_workers: int) -> Trainer:
        return self._trainers(index, num_workers)  # type: ignore[no-any-return]

    def server_evaluator(self) -> Trainer | None:
        return None


def test_a_pool_client_compresses_its_upload_and_keeps_its_residual_across_rounds(tmp_path: Path) -> None:
    config = job(**TOPK)
    task = Task(ParamSet({"w": f32([0, 0])}), SteadyTrainers())

    result = simulate(task, config, out_dir=tmp_path, pool=InlinePool(config, SteadyTrainers()))

    # One client, delta [1, 0.75] each round, top-1 of 2 with error feedback:
    # round 1: total [1, 0.75]   -> sends [1, 0],   residual [0, 0.75], w = [1, 0]
    # round 2: total [1, 1.5]    -> sends [0, 1.5], residual [1, 0],    w = [1, 1.5]
    # round 3: total [2, 0.75]   -> sends [2, 0],   residual [0, 0.75], w = [3, 1.5]
    # (without the residual kept between rounds the client would send [1, 0] three times: w = [3, 0]).
    assert result.params == ParamSet({"w": f32([3, 1.5])})
    assert [r["participants"] for r in result.history] == [1, 1, 1]


def test_a_pool_client_residual_is_stored_per_client_id(tmp_path: Path) -> None:
    config = job(**TOPK)

    simulate(Task(ParamSet({"w": f32([0, 0])}), SteadyTrainers()), config, out_dir=tmp_path,
             pool=InlinePool(config, SteadyTrainers()))

    state = ClientStateStore(tmp_path / "clients").load(0)
    assert state is not None
    assert [np.asarray(v).tolist() for v in state.values()] == [[0.0, 0.75]]  # round 3's residual, above


def test_topk_in_the_pool_mode_ends_with_the_model_of_the_thread_mode(tmp_path: Path) -> None:
    config = job(workers=2, rounds=4, **TOPK)
    task = Task(ParamSet({"w": f32([0, 0])}), SteadyTrainers())

    threads = simulate(task, config, out_dir=tmp_path / "threads")
    pooled = simulate(task, config, out_dir=tmp_path / "pool", pool=InlinePool(config, SteadyTrainers()))

    assert pooled.params.equal(threads.params)


def test_topk_in_pool_processes_ends_with_the_model_of_the_thread_mode(tmp_path: Path) -> None:
    config = job(workers=2, rounds=3, **TOPK)
    task = Task(ParamSet({"w": f32([0, 0])}), SteadyTrainers())

    threads = simulate(task, config, out_dir=tmp_path / "threads")
    pool = ProcessPool(config, SteadyTrainers(), processes=1)
    try:
        pooled = simulate(task, config, out_dir=tmp_path / "pool", pool=pool)
    finally:
        pool.close()

    assert pooled.params.equal(threads.params)
