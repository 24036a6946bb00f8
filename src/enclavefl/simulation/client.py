"""One simulated client's round, without a connection: the worker's local work as a function.

How this works: in a deployment, :class:`~enclavefl.worker.runtime.Worker`
pulls the model, trains, runs the update pipeline and pushes, all in one
process that lives for the whole job. A simulation of a thousand clients
cannot keep a thousand of those alive, so it splits the round: the driver
(:mod:`enclavefl.simulation.driver`) talks to the parameter server for every
client, and a :class:`ClientHost` in some process (a local pool's, a Ray
actor) does the part in the middle for whichever client it is handed. A
:class:`ClientJob` carries what the worker would know at that point (the
round, the PS's client settings, the task's per-round config, and the
client's own SCAFFOLD variate, which the driver stores between rounds); the
host answers with a :class:`ClientOutcome` (the update to push and the
variate to keep if the PS accepts it).

:func:`fit_client` does what ``Worker._train_round`` does between the pull and
the push, step for step (same seed, same fit settings, same pipeline), so a
client trains to the same bits whichever process runs it. A trainer holds
nothing across rounds but its parameters (each ``fit`` makes a fresh
optimizer, and the shuffle depends on the job seed and the round only), which
is why a host may build a client's trainer anew in any round.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, final

from enclavefl.errors import ProtocolError
from enclavefl.messages import CONTROL_PREFIX, ClientSettings, ConfigValue, UpdateKind
from enclavefl.tensors import ParamSet, Tensor
from enclavefl.training import FitConfig, Trainer
from enclavefl.worker.control import ScaffoldClient
from enclavefl.worker.pipeline import UpdateContext, UpdateTransform, default_transforms, run_pipeline

if TYPE_CHECKING:
    from enclavefl.config import JobConfig
    from enclavefl.training import Task

__all__ = ["ClientHost", "ClientJob", "ClientOutcome", "TaskTrainers", "TrainerFactory", "fit_client"]

log = logging.getLogger(__name__)

TrainerFactory = Callable[[int, int], Trainer]
"""``(client index, number of clients) -> Trainer``: client ``index``'s model and data partition."""

ALGORITHMS: Final = ("fedavg", "fedprox", "scaffold")
"""The client algorithms a simulated client runs (those of the worker runtime)."""


@dataclass(frozen=True, slots=True)
class ClientJob:
    """One sampled client's share of a round, as the driver hands it to a pool.

    Attributes:
        index: the client, ``0 .. num_clients - 1`` (named ``worker-<index>`` at the PS).
        num_clients: how many clients the job simulates (the data is split that many ways).
        round: the federation round.
        model_version: the version of the model the client trains on.
        settings: the PS's client settings for this round.
        task_config: the train task's per-round settings (``privacy.dp.clip_norm``, ...).
        state: the client's SCAFFOLD variate ``c_i`` as last accepted; None: zero (first round).
    """

    index: int
    num_clients: int
    round: int
    model_version: int
    settings: ClientSettings
    task_config: Mapping[str, ConfigValue] = field(default_factory=dict)
    state: ParamSet | None = None


@dataclass(frozen=True, slots=True)
class ClientOutcome:
    """What a client's round produced: the update to push, and the variate to keep if it is accepted.

    Attributes:
        state: SCAFFOLD's ``c_i`` after this round (None for other algorithms); the driver stores
            it only when the PS accepts the update, as a worker rolls its variate back otherwise.
        fit_s: local training time, in seconds.
    """

    index: int
    round: int
    model_version: int
    update: ParamSet
    kind: UpdateKind
    num_samples: int
    metrics: Mapping[str, float]
    state: ParamSet | None
    fit_s: float


def split_control(download: ParamSet) -> tuple[ParamSet, ParamSet]:
    """The downloaded model, and SCAFFOLD's server variate keyed by parameter name."""
    model: list[tuple[str, Tensor]] = []
    control: list[tuple[str, Tensor]] = []
    for name, value in download.items():
        if name.startswith(CONTROL_PREFIX):
            control.append((name[len(CONTROL_PREFIX) :], value))
        else:
            model.append((name, value))
    return ParamSet(model), ParamSet(control)


def fit_client(trainer: Trainer, transforms: list[UpdateTransform], download: ParamSet, job: ClientJob, *,
               seed: int, slowdown: float = 1.0) -> ClientOutcome:
    """Trains one client on ``download`` and runs its update pipeline, as a worker does in a round.

    Args:
        trainer: the client's model and data.
        transforms: its update pipeline (``default_transforms(trainer)``, then any fault's attack).
        download: the model as the PS broadcasts it (with ``scaffold.c/`` tensors under SCAFFOLD).
        seed: the job seed; with the round it fixes the local shuffle.
        slowdown: FOR EXPERIMENTS (``faults``): above 1 the client waits ``(slowdown - 1) x``
            its fit time before returning, a straggler.

    Raises:
        ProtocolError: the settings name an unknown client algorithm, or the model's SCAFFOLD
            tensors do not fit the algorithm.
        ValueError: a transform refused the update, or the SCAFFOLD variate is not finite.
        CheckpointError: ``job.state`` does not fit the model.
    """
    c, round_ = job.settings, job.round
    if c.algorithm not in ALGORITHMS:
        raise ProtocolError(f"round {round_}: the PS asks for client algorithm {c.algorithm!r}; "
                            f"a simulated client runs {list(ALGORITHMS)}")
    global_params, server_control = split_control(download)
    scaffold = c.algorithm == "scaffold"
    if scaffold != bool(len(server_control)):
        raise ProtocolError(f"round {round_}: the task runs {c.algorithm} but the model holds "
                            f"{len(server_control)} {CONTROL_PREFIX} tensors")
    variate: ScaffoldClient | None = None
    correction = None
    if scaffold:
        variate = ScaffoldClient(global_params)
        if job.state is not None:
            variate.load_state(job.state)
        correction = variate.correction(server_control)
    started = time.monotonic()
    trainer.set_parameters(global_params)
    result = trainer.fit(FitConfig(
        epochs=c.epochs, batch_size=c.batch_size, lr=c.lr, round=round_, seed=seed,
        proximal_mu=c.proximal_mu if c.algorithm == "fedprox" else 0.0, correction=correction,
        optimizer=c.optimizer, momentum=c.momentum, weight_decay=c.weight_decay,
    ))
    local_params = trainer.get_parameters()
    fit_s = time.monotonic() - started
    if slowdown > 1.0:
        time.sleep((slowdown - 1.0) * fit_s)
    control_delta = None
    if variate is not None:
        control_delta = variate.update(global_params, local_params, server_control, result.steps, c.lr)
    context = UpdateContext(global_params, local_params, result, c, round_, control_delta,
                            task_config=job.task_config)
    update, kind = run_pipeline(transforms, context)
    metrics = {k: float(v) for k, v in result.metrics.items()}
    metrics["seconds_fit"] = fit_s
    return ClientOutcome(job.index, round_, job.model_version, update, kind, result.num_samples, metrics,
                         variate.state() if variate is not None else None, fit_s)


@final
class TaskTrainers:
    """The default :data:`TrainerFactory` of a pool process: the job's task, built once per process.

    Picklable (it holds the job, not the task), so a process pool or a Ray actor can
    build the task where it runs, as a deployed worker process does
    (``enclavefl.tasks.load_task``).
    """

    def __init__(self, config: JobConfig) -> None:
        self._config = config
        self._task: Task | None = None

    def __getstate__(self) -> dict[str, object]:
        return {"config": self._config}

    def __setstate__(self, state: dict[str, object]) -> None:
        self._config = state["config"]  # type: ignore[assignment]
        self._task = None

    def __call__(self, index: int, num_clients: int) -> Trainer:
        if self._task is None:
            from enclavefl.tasks import load_task

            self._task = load_task(self._config)
        return self._task.worker_trainer(index, num_clients)


@final
class ClientHost:
    """Runs the clients a process is handed, one at a time, keeping a few trainers for reuse.

    A host lives in a pool process or a Ray actor and serves any client: it builds
    client ``i``'s trainer on first use and keeps the ``trainers_kept`` most recently
    used ones (a trainer holds a model and a data partition; a thousand would not
    fit). Not thread-safe.
    """

    def __init__(self, config: JobConfig, make_trainer: TrainerFactory, *, trainers_kept: int = 4) -> None:
        """Prepares the host; no trainer is built until a client runs.

        Raises:
            ValueError: ``trainers_kept`` is below 1.
        """
        if trainers_kept < 1:
            raise ValueError(f"ClientHost: trainers_kept must be >= 1, got {trainers_kept}")
        self._config = config
        self._make_trainer = make_trainer
        self._kept = trainers_kept
        self._trainers: OrderedDict[int, tuple[Trainer, list[UpdateTransform], float]] = OrderedDict()

    def _client(self, index: int, num_clients: int) -> tuple[Trainer, list[UpdateTransform], float]:
        found = self._trainers.get(index)
        if found is not None:
            self._trainers.move_to_end(index)
            return found
        from enclavefl.worker.faults import faults_for

        trainer = self._make_trainer(index, num_clients)
        attacks, slowdown = faults_for(self._config, index, num_clients)  # experiments only; none by default
        entry = (trainer, [*default_transforms(trainer), *attacks], slowdown)
        self._trainers[index] = entry
        while len(self._trainers) > self._kept:
            self._trainers.popitem(last=False)
        return entry

    def num_samples(self, index: int, num_clients: int) -> int:
        """Client ``index``'s training examples (what it declares when it joins)."""
        return self._client(index, num_clients)[0].num_samples

    def run(self, job: ClientJob, download: ParamSet) -> ClientOutcome:
        """Runs ``job`` on ``download`` (see :func:`fit_client`, whose errors it raises)."""
        trainer, transforms, slowdown = self._client(job.index, job.num_clients)
        return fit_client(trainer, transforms, download, job, seed=self._config.job.seed, slowdown=slowdown)
