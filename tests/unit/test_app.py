"""The Python API: build_server, run_worker and simulate, in one process (no gRPC, no TLS).

The toy task's workers add a fixed step to every weight and its evaluator
reports the sum of the weights as the loss, so each round's model and score
can be followed by hand. One test runs the bundled digits task for real.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from enclavefl.app import build_server, run_worker, simulate
from enclavefl.config import JobConfig, parse_job
from enclavefl.errors import ConfigError
from enclavefl.messages import WorkerClient
from enclavefl.server.checkpoint import latest_checkpoint
from enclavefl.server.metrics import REQUIRED_KEYS
from enclavefl.server.ps import ParameterServer
from enclavefl.tasks import load_task
from enclavefl.tensors import ParamSet
from enclavefl.training import Trainer
from enclavefl.worker import InMemoryClient
from tests.unit.worker.federation import AddTrainer, f32, peer

INITIAL = ParamSet({"w": f32([1, 2])})


def weights(params: ParamSet) -> list[float]:
    value = params["w"]
    assert isinstance(value, np.ndarray)
    return [float(x) for x in value]


class SumEvaluator:
    """Scores a model by the sum of its weights (as "loss"); records every model it was given."""

    def __init__(self) -> None:
        self.params = ParamSet()
        self.seen: list[ParamSet] = []

    @property
    def num_samples(self) -> int:
        return 0

    def get_parameters(self) -> ParamSet:
        return self.params.copy()

    def set_parameters(self, params: ParamSet) -> None:
        self.params = params.copy()
        self.seen.append(self.params)

    def fit(self, config: Any) -> Any:
        raise AssertionError("the evaluator is never trained")

    def evaluate(self) -> Mapping[str, float]:
        return {"loss": sum(weights(self.params)), "accuracy": 0.5}


class AddTask:
    """Worker ``i`` adds ``i + 1`` to every weight each round, with one sample."""

    name = "add"

    def __init__(self) -> None:
        self.evaluator = SumEvaluator()

    def initial_parameters(self) -> ParamSet:
        return INITIAL.copy()

    def worker_trainer(self, index: int, num_workers: int) -> Trainer:
        return AddTrainer(float(index + 1), 1)

    def server_evaluator(self) -> Trainer | None:
        return self.evaluator


def job(*, rounds: int = 2, workers: int = 2) -> JobConfig:
    return parse_job({
        "job": {"rounds": rounds, "workers": workers},
        "round": {"min_workers": workers, "start_window_s": 20, "update_window_s": 20, "max_retries": 0},
        "attestation": {"mode": "none"},
    })


def connect(ps: ParameterServer, name: str) -> Callable[[], WorkerClient]:
    return lambda: InMemoryClient(ps, peer(name))


def run_job(ps: ParameterServer, config: JobConfig, task: AddTask, timeout_s: float = 30.0) -> list[int]:
    """Runs ``ps`` and ``job.workers`` run_worker calls on threads; returns each worker's accepted rounds."""
    n = config.job.workers
    done: list[int] = [-1] * n
    errors: list[BaseException] = []

    def guarded(target: Callable[[], Any]) -> threading.Thread:
        def body() -> None:
            try:
                target()
            except BaseException as exc:  # reported below
                errors.append(exc)

        thread = threading.Thread(target=body, daemon=True)
        thread.start()
        return thread

    def worker(i: int) -> None:
        done[i] = run_worker(config, task, i, n, connect(ps, f"w{i}"))

    threads = [guarded(ps.run)] + [guarded(functools.partial(worker, i)) for i in range(n)]
    for thread in threads:
        thread.join(timeout_s)
    assert not [t for t in threads if t.is_alive()], "the job hung"
    assert not errors, errors
    return done


# ------------------------------------------------------------------ build_server


def test_build_server_scores_each_new_model_with_the_task_evaluator(tmp_path: Path) -> None:
    # Prepare
    task, config = AddTask(), job()
    ps = build_server(config, task, out_dir=tmp_path)

    # Execute
    run_job(ps, config, task)

    # Assert: workers add 1 and 2 with one sample each: each round moves w by 1.5.
    # Round 1: w = (2.5, 3.5), sum 6; round 2: w = (4, 5), sum 9.
    assert [weights(s) for s in task.evaluator.seen] == [[2.5, 3.5], [4.0, 5.0]]
    assert [row["eval_loss"] for row in ps.metrics.history] == [6.0, 9.0]


def test_build_server_resumes_from_the_newest_checkpoint(tmp_path: Path) -> None:
    # Prepare: a finished two-round job leaves round-000002.ckpt with w = (4, 5).
    task = AddTask()
    run_job(build_server(job(rounds=2), task, out_dir=tmp_path), job(rounds=2), task)

    # Execute: the same run directory, a job one round longer.
    ps = build_server(job(rounds=3), AddTask(), out_dir=tmp_path, resume=True)

    # Assert
    assert (ps.next_round, ps.version) == (3, 2)
    assert weights(ps.params) == [4.0, 5.0]
    assert [row["round"] for row in ps.metrics.history] == [1, 2]


def test_build_server_resume_without_a_checkpoint_starts_at_round_one(tmp_path: Path) -> None:
    ps = build_server(job(), AddTask(), out_dir=tmp_path, resume=True)

    assert (ps.next_round, ps.version) == (1, 0)
    assert ps.params == INITIAL


# ------------------------------------------------------------------ run_worker


def test_run_worker_trains_every_round_until_the_ps_finishes(tmp_path: Path) -> None:
    task, config = AddTask(), job(rounds=3)
    ps = build_server(config, task, out_dir=tmp_path)

    done = run_job(ps, config, task)

    assert done == [3, 3]
    # Three rounds of +1.5 from (1, 2).
    assert weights(ps.params) == [5.5, 6.5]


@pytest.mark.parametrize("index", [-1, 2])
def test_run_worker_refuses_an_index_outside_the_workers(tmp_path: Path, index: int) -> None:
    ps = build_server(job(), AddTask(), out_dir=tmp_path)

    with pytest.raises(ConfigError, match=rf"worker index {index} is outside 0\.\.1"):
        run_worker(job(), AddTask(), index, 2, connect(ps, "w"))


# ------------------------------------------------------------------ simulate


def test_simulate_hands_each_round_to_on_round_once_it_is_in_metrics_jsonl(tmp_path: Path) -> None:
    # Prepare: at each call, note the rounds metrics.jsonl holds already.
    seen: list[tuple[int, list[int]]] = []

    def on_round(row: dict[str, Any]) -> None:
        lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
        seen.append((row["round"], [json.loads(line)["round"] for line in lines]))

    # Execute
    result = simulate(AddTask(), job(rounds=2), out_dir=tmp_path, on_round=on_round)

    # Assert
    assert seen == [(1, [1]), (2, [1, 2])]
    assert [row["eval_loss"] for row in result.history] == [6.0, 9.0]


def test_simulate_goes_on_when_on_round_raises(tmp_path: Path) -> None:
    def on_round(row: dict[str, Any]) -> None:
        raise RuntimeError("observer broke")

    result = simulate(AddTask(), job(rounds=2), out_dir=tmp_path, on_round=on_round)

    assert [row["round"] for row in result.history] == [1, 2]
    assert weights(result.params) == [4.0, 5.0]


def test_simulate_trains_digits_with_five_workers(tmp_path: Path) -> None:
    # Prepare
    config = parse_job({
        "job": {"rounds": 2, "workers": 5, "seed": 3},
        "round": {"min_workers": 5, "update_window_s": 60},
        "task": {"name": "digits-mlp", "partition": "iid"},
        "client": {"epochs": 1, "batch_size": 32, "lr": 0.1, "momentum": 0.9},
        "attestation": {"mode": "none"},
    })

    # Execute
    result = simulate(load_task(config), config, out_dir=tmp_path)

    # Assert: ten classes, so chance is 0.1.
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == result.history
    assert [r["round"] for r in rows] == [1, 2]
    assert all(set(REQUIRED_KEYS) <= set(r) and r["participants"] == 5 for r in rows)
    checkpoint = latest_checkpoint(tmp_path / "checkpoints")
    assert checkpoint is not None and checkpoint.round == 2 and checkpoint.params == result.params
    assert rows[-1]["eval_accuracy"] > 0.3
