"""The Python API: build a parameter server or a worker from a job, or simulate a federation in one process.

The command line is argument parsing over these functions. :func:`simulate`
runs the very same server (engine, strategy, staging, close pipeline) and
worker runtime as a real deployment, with workers on threads that talk to the
server through :class:`~enclavefl.worker.inmemory.InMemoryClient` instead of
gRPC and TLS: no processes, no certificates, for research and notebooks.

Example::

    from enclavefl.app import simulate
    from enclavefl.config import parse_job
    from enclavefl.tasks import load_task

    config = parse_job({"job": {"rounds": 5, "workers": 100}, "round": {"min_workers": 100}})
    result = simulate(load_task(config), config, workers=100, out_dir=Path("runs/sim"))
    print(result.history[-1]["eval_accuracy"])
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from enclavefl.config import JobConfig
from enclavefl.errors import RoundError
from enclavefl.messages import PeerIdentity
from enclavefl.server.checkpoint import latest_checkpoint
from enclavefl.server.closing import Evaluator
from enclavefl.server.ps import ParameterServer
from enclavefl.server.strategy import Strategy
from enclavefl.tensors import ParamSet
from enclavefl.training import Task, Trainer
from enclavefl.worker.faults import faults_for
from enclavefl.worker.inmemory import InMemoryClient
from enclavefl.worker.pipeline import default_transforms
from enclavefl.worker.runtime import Worker, WorkerSettings

__all__ = ["SimulationResult", "build_server", "simulate", "trainer_evaluator"]

log = logging.getLogger(__name__)

SIM_POLL_S = 0.5
"""How long a simulated worker's WaitTask long-poll lasts (short: nothing crosses a network)."""


def trainer_evaluator(trainer: Trainer) -> Evaluator:
    """Scores a global model with a task's held-out trainer (the PS's evaluation each round).

    Serialised by a lock: one trainer holds one model at a time.
    """
    lock = threading.Lock()

    def evaluate(params: ParamSet) -> Mapping[str, float]:
        with lock:
            trainer.set_parameters(params)
            return trainer.evaluate()

    return evaluate


def build_server(config: JobConfig, task: Task, *, out_dir: Path, resume: bool = False,
                 strategy: Strategy | None = None) -> ParameterServer:
    """A parameter server for ``task`` as ``config`` describes it (not yet running: call ``run()``).

    Args:
        resume: continue from the newest checkpoint in ``out_dir`` (a warning and round 1 if there is none).
        strategy: replaces the job file's strategy (custom optimizers, aggregators, samplers).

    Raises:
        CheckpointError: the newest checkpoint is corrupt or does not fit.
        ConfigError: a strategy part refuses the job's settings.
    """
    initial = task.initial_parameters()
    checkpoint = None
    if resume:
        checkpoint = latest_checkpoint(out_dir / config.server.checkpoint_dir)
        if checkpoint is None:
            log.warning("no checkpoint in %s; starting at round 1", out_dir / config.server.checkpoint_dir)
    evaluator_trainer = task.server_evaluator()
    evaluator = trainer_evaluator(evaluator_trainer) if evaluator_trainer is not None else None
    return ParameterServer(config, initial, out_dir=out_dir, evaluator=evaluator, resume_from=checkpoint,
                           strategy=strategy)


@dataclass(frozen=True)
class SimulationResult:
    """What a simulated job produced."""

    params: ParamSet
    history: list[dict[str, Any]]
    out_dir: Path


def simulate(task: Task, config: JobConfig, *, workers: int | None = None, out_dir: Path,
             strategy: Strategy | None = None, chunk_bytes: int = 1 << 20,
             make_trainer: Callable[[int, int], Trainer] | None = None) -> SimulationResult:
    """Runs the job in this process: the real server and ``workers`` worker runtimes on threads.

    Worker ``i`` trains ``task.worker_trainer(i, workers)`` (or ``make_trainer(i, workers)``) and is
    named ``worker-<i>``, exactly as ``enclavefl run`` names its processes, so sampling matches. The
    final model is bit-identical to ``enclavefl run``'s for the same job when the ML framework uses
    one thread here, as the worker processes do (``torch.set_num_threads(1)``); with more threads
    its reductions run in another order and the models differ by about a float32 ulp.

    Raises:
        RoundError: the job failed (too few updates after retries), or a worker raised.
        ConfigError: the job's ``faults`` section asks for more attackers or stragglers than workers.
    """
    n = workers or config.job.workers
    faults = [faults_for(config, i, n) for i in range(n)]  # experiments only; none by default
    out_dir.mkdir(parents=True, exist_ok=True)
    ps = build_server(config, task, out_dir=out_dir, strategy=strategy)
    stop = threading.Event()
    errors: list[BaseException] = []

    def run_worker(index: int) -> None:
        try:
            trainer = make_trainer(index, n) if make_trainer else task.worker_trainer(index, n)
            peer = PeerIdentity(fingerprint=f"simulated-{index:08d}", label=f"worker-{index} (simulated)")
            attacks, slowdown = faults[index]
            settings = WorkerSettings(name=f"worker-{index}", seed=config.job.seed, poll_s=SIM_POLL_S,
                                      slowdown=slowdown)
            Worker(lambda: InMemoryClient(ps, peer, chunk_bytes=chunk_bytes), trainer, settings, stop=stop,
                   transforms=[*default_transforms(trainer), *attacks]).run()
        except BaseException as exc:  # reported below; a worker thread must not die silently
            errors.append(exc)
            log.error("simulated worker %d failed: %s", index, exc)

    threads = [threading.Thread(target=run_worker, args=(i,), name=f"sim-worker-{i}", daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    started = time.monotonic()
    try:
        ps.run()
    finally:
        stop.set()
        for t in threads:
            t.join(max(5.0, 30.0 - (time.monotonic() - started)))
    if errors:
        raise RoundError(f"{len(errors)} simulated worker(s) failed; first: {errors[0]}") from errors[0]
    return SimulationResult(ps.params, list(ps.metrics.history), out_dir)
