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
client's own state, which the driver stores between rounds: SCAFFOLD's
variate and top-k's error-feedback residual); the host answers with a
:class:`ClientOutcome` (the update to push and the state to keep if the PS
accepts it).

:func:`fit_client` runs the worker's own local round
(:mod:`enclavefl.worker.local_round`: same settings check, seed, fit settings,
pipeline and upload compression), so a client trains to the same bits and
uploads the same encoding whichever process runs it. A trainer holds
nothing across rounds but its parameters (each ``fit`` makes a fresh
optimizer, and the shuffle depends on the job seed and the round only), which
is why a host may build a client's trainer anew in any round.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, TypeAlias, final

import numpy as np
import numpy.typing as npt

from enclavefl.messages import ClientSettings, ConfigValue, UpdateKind
from enclavefl.tensors import EncodedUpdate, ParamSet, Tensor
from enclavefl.training import Trainer
from enclavefl.worker.compression import UploadCompressor
from enclavefl.worker.control import ScaffoldClient
from enclavefl.worker.faults import Slowdown
from enclavefl.worker.local_round import check_settings, split_download, train_local_round
from enclavefl.worker.pipeline import UpdateTransform, default_transforms

if TYPE_CHECKING:
    from enclavefl.config import JobConfig
    from enclavefl.training import Task

__all__ = ["RESIDUAL_PREFIX", "ClientHost", "ClientJob", "ClientOutcome", "TaskTrainers", "TrainerFactory", "fit_client",
           "pack_state", "unpack_state"]

log = logging.getLogger(__name__)

Array: TypeAlias = npt.NDArray[Any]

TrainerFactory = Callable[[int, int], Trainer]
"""``(client index, number of clients) -> Trainer``: client ``index``'s model and data partition."""

RESIDUAL_PREFIX: Final = "topk.residual/"
"""Where a client's top-k error-feedback residual sits in its stored state (its SCAFFOLD variate has no prefix)."""


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
        state: the client's state as last accepted (:func:`pack_state`: SCAFFOLD's variate ``c_i``,
            top-k's residual); None: none yet (first round: zero variate, no residual).
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
    """What a client's round produced: the update to push, and the state to keep if it is accepted.

    Attributes:
        update: what to push: a delta, or its encoding under upload compression (kind QUANTIZED).
        state: the client's state after this round (:func:`pack_state`; None if it keeps none); the
            driver stores it only when the PS accepts the update, as a worker rolls its variate and
            its residual back otherwise.
        fit_s: local training time, in seconds.
    """

    index: int
    round: int
    model_version: int
    update: ParamSet | EncodedUpdate
    kind: UpdateKind
    num_samples: int
    metrics: Mapping[str, float]
    state: ParamSet | None
    fit_s: float


def pack_state(variate: ParamSet | None, residual: Mapping[str, Array]) -> ParamSet | None:
    """One client's state as one tensor set: ``c_i`` under its parameter names, the residual under
    :data:`RESIDUAL_PREFIX`; None if there is neither."""
    items: list[tuple[str, Tensor]] = list(variate.items()) if variate is not None else []
    items += [(f"{RESIDUAL_PREFIX}{name}", value) for name, value in residual.items()]
    return ParamSet(items) if items else None


def unpack_state(state: ParamSet | None) -> tuple[ParamSet | None, dict[str, Array]]:
    """The SCAFFOLD variate (None if the state holds none) and the top-k residual of a packed state."""
    if state is None:
        return None, {}
    variate: list[tuple[str, Tensor]] = []
    residual: dict[str, Array] = {}
    for name, value in state.items():
        if name.startswith(RESIDUAL_PREFIX) and isinstance(value, np.ndarray):
            residual[name[len(RESIDUAL_PREFIX) :]] = value
        else:
            variate.append((name, value))
    return (ParamSet(variate) if variate else None), residual


def fit_client(trainer: Trainer, transforms: list[UpdateTransform], download: ParamSet, job: ClientJob, *,
               seed: int, slowdown: float = 1.0) -> ClientOutcome:
    """Trains one client on ``download``, runs its update pipeline and compresses the upload, as a worker does.

    The steps are the worker's own (:mod:`enclavefl.worker.local_round`); what a worker
    keeps in memory between rounds (SCAFFOLD's ``c_i``, top-k's residual) comes from
    ``job.state`` and goes back, advanced, in the outcome's ``state``.

    Args:
        trainer: the client's model and data.
        transforms: its update pipeline (``default_transforms(trainer)``, then any fault's attack).
        download: the model as the PS broadcasts it, dense (with ``scaffold.c/`` tensors under SCAFFOLD).
        seed: the job seed; with the round it fixes the local shuffle.
        slowdown: FOR EXPERIMENTS (``faults``): above 1 the client waits ``(slowdown - 1) x``
            its fit time before returning, a straggler.

    Raises:
        ProtocolError: the settings name an unknown client algorithm, or the model's SCAFFOLD
            tensors do not fit the algorithm.
        ConfigError: SCAFFOLD, and ``transforms`` leave out the control delta.
        ValueError: a transform or the compression refused the update, or the SCAFFOLD variate is not finite.
        CheckpointError: ``job.state`` does not fit the model.
    """
    c, round_ = job.settings, job.round
    check_settings(c, round_)
    global_params, server_control = split_download(download, c, round_)
    stored_variate, residual = unpack_state(job.state)
    variate: ScaffoldClient | None = None
    if c.algorithm == "scaffold":
        variate = ScaffoldClient(global_params)
        if stored_variate is not None:
            variate.load_state(stored_variate)
    compressor = UploadCompressor(residual=residual)
    after_fit = Slowdown(slowdown, threading.Event()).after_fit if slowdown != 1.0 else None
    local = train_local_round(trainer, transforms, compressor, c, round_, global_params, server_control, seed=seed,
                              variate=variate, task_config=job.task_config, name=f"worker-{job.index}",
                              after_fit=after_fit)
    if local is None:  # pragma: no cover - nothing sets the event
        raise RuntimeError("a simulated client's round was abandoned")
    # This compressor lives for one round: settling it now gives the residual to keep *if* the PS
    # accepts; the driver stores the state only then, as a worker's settle(accepted) would.
    compressor.settle(True)
    metrics = {k: float(v) for k, v in local.result.metrics.items()}
    metrics["seconds_fit"] = local.fit_s
    state = pack_state(variate.state() if variate is not None else None, compressor.residual)
    return ClientOutcome(job.index, round_, job.model_version, local.payload, local.kind, local.result.num_samples,
                         metrics, state, local.fit_s)


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
