"""ProcessPool: client jobs run in other processes, one model file per version, errors name the client."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from enclavefl.config import parse_job
from enclavefl.errors import RoundError
from enclavefl.messages import ClientSettings
from enclavefl.simulation import ClientJob, ClientOutcome, ProcessPool
from enclavefl.tensors import ParamSet
from tests.unit.simulation.clients import AddTrainers, FailingTrainers
from tests.unit.worker.federation import f32

CONFIG = parse_job({"attestation": {"mode": "none"}})
SETTINGS = ClientSettings(epochs=1, batch_size=4, lr=0.5)


def job(index: int, version: int = 0) -> ClientJob:
    return ClientJob(index=index, num_clients=3, round=1, model_version=version, settings=SETTINGS)


def drain(pool: ProcessPool, count: int) -> list[ClientOutcome]:
    outcomes: list[ClientOutcome] = []
    while len(outcomes) < count:
        outcomes += pool.wait(30.0)
    return sorted(outcomes, key=lambda o: o.index)


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[ProcessPool]:
    pool = ProcessPool(CONFIG, AddTrainers(), processes=1, model_dir=tmp_path / "models")
    yield pool
    pool.close()


def test_jobs_run_in_a_pool_process_and_return_their_updates(pool: ProcessPool) -> None:
    for index in range(2):
        pool.submit(job(index), ParamSet({"w": f32([1, 2])}))

    outcomes = drain(pool, 2)

    # Client i adds i + 1: deltas [1, 1] and [2, 2].
    assert [o.update for o in outcomes] == [ParamSet({"w": f32([1, 1])}), ParamSet({"w": f32([2, 2])})]
    assert pool.num_samples(3) == [1, 2, 3]


def test_a_model_version_is_written_once_for_all_its_jobs(pool: ProcessPool, tmp_path: Path) -> None:
    pool.submit(job(0, version=5), ParamSet({"w": f32([1])}))
    pool.submit(job(1, version=5), ParamSet({"w": f32([1])}))
    drain(pool, 2)

    assert sorted(os.listdir(tmp_path / "models")) == ["model-v5.params"]  # and no update file left


def test_a_failing_job_raises_a_round_error_naming_the_client(tmp_path: Path) -> None:
    pool = ProcessPool(CONFIG, FailingTrainers(), processes=1, model_dir=tmp_path)
    try:
        pool.submit(job(1), ParamSet({"w": f32([1])}))
        with pytest.raises(RoundError, match="client 1 .* unreadable"):
            drain(pool, 1)
    finally:
        pool.close()


def test_updates_of_every_shape_and_dtype_come_back_intact(pool: ProcessPool) -> None:
    download = ParamSet({"w": f32([[1, 2], [3, 4]]), "count": np.asarray(7, dtype=np.int64),
                         "flag": np.asarray([True]), "empty": f32(np.zeros((0, 3)))})
    pool.submit(job(0), download)

    (outcome,) = drain(pool, 1)

    # Client 0 adds 1: the float delta is 1 everywhere, the 0-d counter's 1, a bool's delta is all False.
    assert outcome.update == ParamSet({"w": f32([[1, 1], [1, 1]]), "count": np.asarray(1, dtype=np.int64),
                                       "flag": np.asarray([False]), "empty": f32(np.zeros((0, 3)))})
