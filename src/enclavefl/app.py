"""The Python API: build a parameter server or a worker from a job, or simulate a federation in one process.

The command line is argument parsing over these functions: ``enclavefl ps``
is :func:`build_server` then :func:`serve`, ``enclavefl worker`` is
:func:`run_worker` over :func:`~enclavefl.worker.runtime.grpc_client_factory`,
and ``enclavefl simulate`` is :func:`simulate`. :func:`simulate`
runs the very same server (engine, strategy, staging, close pipeline) as a
real deployment, with its workers either on threads (the worker runtime
itself, talking to the server through
:class:`~enclavefl.worker.inmemory.InMemoryClient` instead of gRPC and TLS)
or played by a :class:`~enclavefl.simulation.Driver` whose sampled clients
train on a pool of processes or Ray actors (:mod:`enclavefl.simulation`):
no certificates, for research, notebooks and simulations of many clients.

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from enclavefl.config import JobConfig
from enclavefl.errors import ConfigError, RoundError
from enclavefl.job_digest import job_digests
from enclavefl.messages import PeerIdentity, WorkerClient
from enclavefl.server.checkpoint import latest_checkpoint
from enclavefl.server.closing import Evaluator
from enclavefl.server.ps import EngineFactory, ParameterServer
from enclavefl.server.strategy import Strategy
from enclavefl.tensors import ParamSet, StreamHeader
from enclavefl.training import Task, Trainer
from enclavefl.worker.faults import faults_for
from enclavefl.worker.inmemory import InMemoryClient, SecAggSigner
from enclavefl.worker.pipeline import UpdateTransform, default_transforms
from enclavefl.worker.runtime import Worker, WorkerSettings

if TYPE_CHECKING:
    from enclavefl.management.api import Mount
    from enclavefl.management.serve import ManagementServer
    from enclavefl.simulation import ClientPool
    from enclavefl.transport.credentials import Credentials

__all__ = ["ManagementSetup", "RoundCallback", "SimulationResult", "build_server", "run_worker", "serve", "simulate",
           "trainer_evaluator"]

log = logging.getLogger(__name__)

SIM_POLL_S = 0.5
"""How long a simulated worker's WaitTask long-poll lasts (short: nothing crosses a network)."""

RoundCallback = Callable[[dict[str, Any]], None]
"""Receives each completed round's metrics row (the keys of ``metrics.jsonl``), as it is recorded."""


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
                 strategy: Strategy | None = None, engine: EngineFactory | None = None) -> ParameterServer:
    """A parameter server for ``task`` as ``config`` describes it (not yet running: call ``run()``).

    Args:
        resume: continue from the newest checkpoint in ``out_dir`` (a warning and round 1 if there is none).
        strategy: replaces the job file's strategy (custom optimizers, aggregators, samplers).
        engine: makes the engine that runs the rounds (a cluster server's); default: the job's round.mode.

    Raises:
        CheckpointError: the newest checkpoint is corrupt or does not fit.
        ConfigError: a strategy part refuses the job's settings, or ``summary.tensorboard`` is on
            without the ``tensorboard`` extra installed.
    """
    initial = task.initial_parameters()
    checkpoint = None
    if resume:
        checkpoint = latest_checkpoint(out_dir / config.server.checkpoint_dir)
        if checkpoint is None:
            log.warning("no checkpoint in %s; starting at round 1", out_dir / config.server.checkpoint_dir)
    evaluator_trainer = task.server_evaluator()
    evaluator = trainer_evaluator(evaluator_trainer) if evaluator_trainer is not None else None
    ps = ParameterServer(config, initial, out_dir=out_dir, evaluator=evaluator, resume_from=checkpoint,
                         strategy=strategy, engine=engine)
    if config.summary.tensorboard:
        from enclavefl.server.tensorboard import TensorBoardLog

        ps.metrics.subscribe(TensorBoardLog(out_dir / "tensorboard"))
    return ps


@dataclass(frozen=True)
class ManagementSetup:
    """Where :func:`serve` starts the job's management API (``management.enabled``; docs/management.md).

    Attributes:
        run_dir: receives ``management.json``, ``management.token`` (and ``management-tls/``
            when the job has no CA of its own).
        tls_dir: the job's certificate directory (``ca.pem``, ``ps.pem``, ``ps.key``), if it has one.
        audit_path: the run's ``audit.jsonl``, where refused tokens are recorded.
        mounts: more routes on the same server (the dashboard, ``/metrics``).
        on_start: called with the running API (its ``url``, ``token_file``) before the first round.
    """

    run_dir: Path
    tls_dir: Path | None = None
    audit_path: Path | None = None
    mounts: Sequence[Mount] = ()
    on_start: Callable[[ManagementServer], None] | None = None


def _start_management(ps: ParameterServer, setup: ManagementSetup, server_address: str) -> ManagementServer:
    from enclavefl.management.serve import ManagementServer

    config = ps.config
    api = ManagementServer.start(ps.handle(), config.management, setup.run_dir, job_name=config.job.name,
                                 tls_dir=setup.tls_dir, server_address=server_address,
                                 audit_path=setup.audit_path, mounts=setup.mounts)
    if setup.on_start is not None:
        setup.on_start(api)
    return api


def serve(ps: ParameterServer, credentials: Credentials, *,
          on_listening: Callable[[int], None] | None = None, management: ManagementSetup | None = None) -> None:
    """Serves ``ps`` to workers over gRPC and TLS on ``transport.listen`` until the job ends.

    A worker whose job settings (task, partition, seed, model) differ from the
    PS's is refused at join (:mod:`enclavefl.job_digest`). gRPC is imported
    here, not with this module: a simulation never needs it.

    Args:
        credentials: the PS's TLS identity (see :func:`enclavefl.transport.provisioning.make_credentials`).
        on_listening: called with the bound port once the server listens, before the first round
            (``transport.listen`` may ask for port 0, any free port).
        management: with ``management.enabled``, the management API starts once the server
            listens (before ``on_listening``) and stops when the job ends.

    Raises:
        RoundError: too few workers or updates within ``round.max_retries`` retries.
        TransportError: the address cannot be bound (in use, or not on this host), the
            management API's included.
    """
    from enclavefl.transport.service import FederationServer, handler_threads

    config = ps.config
    # The management plane shows the PS's own identity and hears every trust decision from here on.
    ps.handle().connect_credentials(credentials)
    server = FederationServer.start(ps, credentials, listen=config.transport.listen,
                                    chunk_bytes=config.transport.chunk_bytes,
                                    max_threads=handler_threads(config.job.workers),
                                    max_downloads=config.server.max_concurrent_downloads,
                                    job_settings=job_digests(config, StreamHeader.of(ps.params)))
    api: ManagementServer | None = None
    try:
        log.info("ps %s: listening on port %d, job %s, %d rounds, model %d tensors / %d bytes",
                 ps.instance, server.port, config.job.name, config.job.rounds, len(ps.params), ps.params.nbytes)
        if management is not None and config.management.enabled:
            host = config.transport.listen.rpartition(":")[0]
            api = _start_management(ps, management, f"{host}:{server.port}")
        if on_listening is not None:
            on_listening(server.port)
        ps.run()
    finally:
        if api is not None:
            api.close()
        server.stop()
    log.info("ps %s: job %s finished", ps.instance, config.job.name)


def run_worker(config: JobConfig, task: Task, index: int, num_workers: int,
               client_factory: Callable[[], WorkerClient], *, name: str | None = None,
               stop: threading.Event | None = None, connect_timeout_s: float = 300.0) -> int:
    """Runs worker ``index`` of ``num_workers`` until the PS finishes the job or ``stop`` is set.

    The worker trains ``task.worker_trainer(index, num_workers)`` (its partition of
    the data) and, like every worker, takes its training settings from the PS.

    Args:
        client_factory: opens a connection to the PS (see :class:`~enclavefl.worker.runtime.Worker`):
            :func:`~enclavefl.worker.runtime.grpc_client_factory` in a deployment.
        name: shown in the PS's logs; default ``worker-<index>``, the name ``enclavefl run`` gives.
        stop: set it from another thread to make the worker return at its next wait.
        connect_timeout_s: how long an unreachable PS is retried (at the start, or after
            it went away) before the worker gives up.

    Returns:
        How many of this worker's updates the PS accepted.

    Raises:
        ConfigError: ``index`` is not in ``0..num_workers - 1``, the job's ``faults`` section
            asks for more attackers or stragglers than workers, the PS refused this worker's
            job settings (they differ from its own), or TLS refused the PS certificate.
        Unavailable: the PS stayed unreachable for ``connect_timeout_s``.
        VerificationError: the PS (or this worker, for the PS) failed verification.
        ProtocolError: the PS sent a task or model this worker cannot follow.
    """
    if not 0 <= index < num_workers:
        raise ConfigError(f"worker index {index} is outside 0..{num_workers - 1} (num_workers {num_workers})")
    attacks, slowdown = faults_for(config, index, num_workers)  # experiments only; none by default
    trainer = task.worker_trainer(index, num_workers)
    settings = WorkerSettings(name=name or f"worker-{index}", seed=config.job.seed, slowdown=slowdown,
                              give_up_s=connect_timeout_s,
                              job_settings=job_digests(config, StreamHeader.of(trainer.get_parameters())))
    worker = Worker(client_factory, trainer, settings, stop=stop, transforms=[*default_transforms(trainer), *attacks])
    worker.run()
    return worker.rounds_done


@dataclass(frozen=True)
class SimulationResult:
    """What a simulated job produced."""

    params: ParamSet
    history: list[dict[str, Any]]
    out_dir: Path


def simulate(task: Task, config: JobConfig, *, workers: int | None = None, out_dir: Path,
             strategy: Strategy | None = None, chunk_bytes: int = 1 << 20,
             make_trainer: Callable[[int, int], Trainer] | None = None,
             on_round: RoundCallback | None = None, pool: ClientPool | None = None, resume: bool = False,
             management: ManagementSetup | None = None) -> SimulationResult:
    """Runs the job in this process: the real server, and its workers on threads or on a client pool.

    Without ``pool``, ``workers`` worker runtimes run on threads: worker ``i`` trains
    ``task.worker_trainer(i, workers)`` (or ``make_trainer(i, workers)``). With a
    :class:`~enclavefl.simulation.ClientPool`, a :class:`~enclavefl.simulation.Driver`
    plays the ``workers`` clients instead, and only the clients sampled for a round train,
    as jobs on the pool (local processes, Ray actors), so a thousand clients cost what
    the sampled ones cost; the pool builds the trainers (``make_trainer`` is not used), and each
    client's declared examples come from ``task.partition_summary(workers)`` when the task has
    one (the built-in tasks do), else from the pool.
    Either way client ``i`` is named ``worker-<i>``, exactly as ``enclavefl run`` names its
    processes, so sampling matches, and the final model is bit-identical to ``enclavefl run``'s
    for the same job when the ML framework uses one thread per client, as the worker processes
    do (``torch.set_num_threads(1)``, the pools' default); with more threads its reductions run
    in another order and the models differ by about a float32 ulp.
    ``out_dir`` receives ``metrics.jsonl`` and the checkpoints, as a deployed PS writes them,
    and with a pool ``clients/``, the clients' state between rounds (SCAFFOLD variates, top-k
    residuals). Secure aggregation runs on threads only: each worker then signs its keys with a
    certificate key of its own (:class:`~enclavefl.simulation.identity.SimulatedIdentity`).

    Args:
        on_round: called with each completed round's metrics row as it is recorded, on this
            thread (which runs the rounds) while the server holds its lock: keep it short
            (print, collect) and do not call into the server. If it raises, the error is
            logged and the job goes on.
        pool: where clients train (the caller closes it); None: one thread per worker.
        resume: continue from the newest checkpoint in ``out_dir`` (see :func:`build_server`).
        management: with ``management.enabled``, the job's management API and dashboard
            run while it does, as in ``enclavefl run`` (the handle is the simulated PS's).

    Raises:
        RoundError: the job failed (too few updates after retries), or a worker raised.
        ConfigError: the job's ``faults`` section asks for more attackers or stragglers than workers,
            or it runs secure aggregation on a ``pool`` (its stages need every client alive
            through the round: use threads).
        CheckpointError: ``resume`` found a corrupt checkpoint.
        TransportError: the management API's address cannot be bound.
    """
    n = workers or config.job.workers
    if pool is not None and config.privacy.secure_aggregation.enabled:
        raise ConfigError(
            "privacy.secure_aggregation.enabled is true, but secure aggregation needs each client alive across its "
            "round's stages (advertise keys, share keys, upload, unmask), and a client pool (--clients with "
            "--backend processes, or --ray) runs a client only for its training; simulate it with "
            "--backend threads, or switch secure aggregation off"
        )
    faults = [faults_for(config, i, n) for i in range(n)] if pool is None else []  # experiments only
    out_dir.mkdir(parents=True, exist_ok=True)
    ps = build_server(config, task, out_dir=out_dir, strategy=strategy, resume=resume)
    if on_round is not None:
        ps.metrics.subscribe(on_round)
    api = _start_management(ps, management, "in-process simulation") \
        if management is not None and config.management.enabled else None
    try:
        if pool is None:
            _run_threads(ps, task, config, n, faults, chunk_bytes, make_trainer)
        else:
            _run_pool(ps, pool, task, n, out_dir, chunk_bytes)
    finally:
        if api is not None:
            api.close()
    return SimulationResult(ps.params, list(ps.metrics.history), out_dir)


def _partition_sizes(task: Task, n: int) -> list[int] | None:
    """Every worker's training examples from the task's partition summary, if it has one (built-in tasks do).

    One partition of the data instead of ``n`` trainers built to count their examples.
    """
    summarize = getattr(task, "partition_summary", None)
    if not callable(summarize):
        return None
    return [int(row.size) for row in summarize(n)]


def _run_pool(ps: ParameterServer, pool: ClientPool, task: Task, n: int, out_dir: Path, chunk_bytes: int) -> None:
    """Runs ``ps`` with ``n`` clients played by a driver on ``pool``."""
    from enclavefl.simulation import ClientStateStore, Driver

    driver = Driver(ps, pool, num_clients=n, store=ClientStateStore(out_dir / "clients"), chunk_bytes=chunk_bytes)
    driver.join(_partition_sizes(task, n))
    errors: list[BaseException] = []

    def drive() -> None:
        try:
            driver.run()
        except BaseException as exc:  # reported below; the server must not wait for clients that are gone
            errors.append(exc)
            log.error("simulation driver failed: %s", exc)
            ps.stop("abort")

    thread = threading.Thread(target=drive, name="sim-driver", daemon=True)
    thread.start()
    try:
        ps.run()
    finally:
        driver.stop()
        thread.join(30.0)
    if errors:
        if isinstance(errors[0], RoundError):
            raise errors[0]
        raise RoundError(f"the simulation driver failed: {errors[0]}") from errors[0]


def _run_threads(ps: ParameterServer, task: Task, config: JobConfig, n: int,
                 faults: list[tuple[list[UpdateTransform], float]], chunk_bytes: int,
                 make_trainer: Callable[[int, int], Trainer] | None) -> None:
    """Runs ``ps`` with ``n`` worker runtimes on threads, connected in memory."""
    stop = threading.Event()
    errors: list[BaseException] = []
    secagg = config.privacy.secure_aggregation.enabled

    def run_worker(index: int) -> None:
        try:
            trainer = make_trainer(index, n) if make_trainer else task.worker_trainer(index, n)
            peer = PeerIdentity(fingerprint=f"simulated-{index:08d}", label=f"worker-{index} (simulated)")
            signer: SecAggSigner | None = None
            if secagg:  # the worker signs its keys with a certificate key whose fingerprint the PS knows it by
                from enclavefl.simulation.identity import SimulatedIdentity

                identity = SimulatedIdentity(index)
                peer, signer = identity.peer, identity.sign
            attacks, slowdown = faults[index]
            settings = WorkerSettings(name=f"worker-{index}", seed=config.job.seed, poll_s=SIM_POLL_S,
                                      slowdown=slowdown)
            Worker(lambda: InMemoryClient(ps, peer, chunk_bytes=chunk_bytes, secagg_signer=signer), trainer, settings,
                   stop=stop, transforms=[*default_transforms(trainer), *attacks]).run()
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
