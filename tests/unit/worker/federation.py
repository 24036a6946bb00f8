"""A federation in one process for the worker tests: a real ParameterServer, real Workers, no mocks.

The PS runs its rounds on one thread; each worker runs ``Worker.run()`` on its
own thread and reaches the PS through an InMemoryClient, so every update is
staged, validated and aggregated by the server's own code.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from enclavefl.config import JobConfig, parse_job
from enclavefl.errors import StaleSession, UpdateRejected
from enclavefl.messages import (
    ClientSettings,
    JoinInfo,
    PeerIdentity,
    TaskInfo,
    TaskKind,
    UpdateMeta,
    UpdateSink,
)
from enclavefl.server.ps import ParameterServer
from enclavefl.tensors import ParamSet, StreamDecoder
from enclavefl.training import FitConfig, FitResult
from enclavefl.worker import InMemoryClient, UpdateTransform, Worker, WorkerSettings


def f32(values: Any) -> npt.NDArray[np.float32]:
    return np.asarray(values, dtype=np.float32)


def peer(name: str, **proved: Any) -> PeerIdentity:
    """A worker's identity as the transport hands it to the PS; ``proved``: what its attestation proved."""
    return PeerIdentity(fingerprint=hashlib.sha256(name.encode()).hexdigest(), label=name, **proved)


def job(*, rounds: int = 2, workers: int = 2, client: Mapping[str, Any] | None = None,
        strategy: Any = None) -> JobConfig:
    """A job whose rounds close as soon as every sampled worker pushed."""
    doc: dict[str, Any] = {
        "job": {"rounds": rounds},
        "round": {"min_workers": workers, "start_window_s": 20, "update_window_s": 20, "max_retries": 0},
        "client": dict(client or {"epochs": 1, "batch_size": 4, "lr": 0.5}),
        "attestation": {"mode": "none"},
    }
    if strategy is not None:
        doc["server"] = {"strategy": strategy}
    return parse_job(doc)


class AddTrainer:
    """Local training that adds ``step`` to every weight, once per ``fit``; records each FitConfig."""

    def __init__(self, step: float, num_samples: int) -> None:
        self.step = step
        self._num_samples = num_samples
        self.params = ParamSet()
        self.configs: list[FitConfig] = []

    @property
    def num_samples(self) -> int:
        return self._num_samples

    def get_parameters(self) -> ParamSet:
        return self.params.copy()

    def set_parameters(self, params: ParamSet) -> None:
        self.params = params.copy()

    def fit(self, config: FitConfig) -> FitResult:
        self.configs.append(config)
        self.params = self.params.map(lambda a: np.asarray(a + a.dtype.type(self.step)))
        return FitResult(self._num_samples, {"loss": 0.0}, steps=1)

    def evaluate(self) -> Mapping[str, float]:
        return {}


class SparseAddTrainer(AddTrainer):
    """AddTrainer whose data looks up only ``rows`` of tensor ``table`` (a SparseTrainer)."""

    def __init__(self, step: float, num_samples: int, table: str, rows: Sequence[int]) -> None:
        super().__init__(step, num_samples)
        self._touched = {table: np.asarray(rows, dtype=np.int64)}

    def touched_rows(self) -> Mapping[str, npt.NDArray[np.int64]]:
        return dict(self._touched)


class GradientTrainer(AddTrainer):
    """``steps`` SGD steps on a loss with a constant gradient ``grad``: y <- y - lr * (grad + correction)."""

    def __init__(self, grad: ParamSet, num_samples: int, steps: int) -> None:
        super().__init__(0.0, num_samples)
        self.grad = grad
        self.steps = steps

    def fit(self, config: FitConfig) -> FitResult:
        self.configs.append(config)
        correction = config.correction or ParamSet()
        out = []
        for name, value in self.params.items():
            assert isinstance(value, np.ndarray)
            y = value.copy()
            for _ in range(self.steps):
                g = np.asarray(self.grad[name], dtype=y.dtype)
                if name in correction:
                    g = g + np.asarray(correction[name], dtype=y.dtype)
                y = y - y.dtype.type(config.lr) * g
            out.append((name, y))
        self.params = ParamSet(out)
        return FitResult(self._num_samples, {"loss": 0.0}, steps=self.steps)


@dataclass
class Federation:
    """A finished in-process job: the PS and the workers it ran with."""

    ps: ParameterServer
    workers: list[Worker] = field(default_factory=list)


def run_federation(
    config: JobConfig,
    initial: ParamSet,
    trainers: Sequence[tuple[str, AddTrainer]],
    out_dir: Path,
    *,
    transforms: Sequence[UpdateTransform] | None = None,
    timeout_s: float = 30.0,
) -> Federation:
    """Runs the job to the end and returns; fails if the PS or a worker raised or hung."""
    ps = ParameterServer(config, initial, out_dir=out_dir)
    stop = threading.Event()
    errors: dict[str, BaseException] = {}

    def guarded(name: str, target: Any) -> threading.Thread:
        def body() -> None:
            try:
                target()
            except BaseException as exc:  # reported below, not by the thread hook
                errors[name] = exc

        thread = threading.Thread(target=body, name=name, daemon=True)
        thread.start()
        return thread

    federation = Federation(ps)
    threads = [guarded("ps", ps.run)]
    for name, trainer in trainers:
        who = peer(name)
        worker = Worker(
            lambda who=who: InMemoryClient(ps, who, chunk_bytes=64),
            trainer,
            WorkerSettings(name=name, seed=7, poll_s=0.2),
            stop=stop,
            transforms=transforms,
        )
        federation.workers.append(worker)
        threads.append(guarded(name, worker.run))
    for thread in threads:
        thread.join(timeout_s)
    stop.set()
    hung = [t.name for t in threads if t.is_alive()]
    assert not hung, f"still running after {timeout_s}s: {hung}; errors so far: {errors}"
    assert not errors, errors
    return federation


class _RecordingSink(UpdateSink):
    def __init__(self, handler: ScriptedHandler, meta: UpdateMeta) -> None:
        self._handler = handler
        self._meta = meta
        self._decoder = StreamDecoder(meta.tensors)

    def feed(self, chunk: bytes | memoryview) -> None:
        self._decoder.feed(chunk)

    def commit(self) -> None:
        self._handler.pushed.append((self._meta, self._decoder.finish()))

    def abort(self, reason: str) -> None:
        pass


class ScriptedHandler:
    """A PS that hands out one train task with ``settings`` and ``model``, keeps what is pushed, then FINISH."""

    def __init__(self, settings: ClientSettings, model: ParamSet, *, rounds: int = 1, refuse: int = 0,
                 forget_after_round: int | None = None) -> None:
        """``refuse``: the first pushes refused; ``forget_after_round``: then the worker must join again."""
        self.settings = settings
        self.model = model
        self.rounds = rounds
        self.refuse = refuse
        self.forget_after_round = forget_after_round
        self.handed_out = 0
        self.joins = 0
        self.pushed: list[tuple[UpdateMeta, ParamSet]] = []

    def join(self, peer: PeerIdentity, worker_name: str, num_samples: int) -> JoinInfo:
        self.joins += 1
        return JoinInfo(f"w{self.joins}", "scripted", "ps-1", self.rounds)

    def wait_task(self, peer: PeerIdentity, worker_id: str, max_wait_s: float) -> TaskInfo:
        if worker_id != f"w{self.joins}":
            raise StaleSession(f"worker {worker_id!r} is not joined")
        if self.handed_out == self.forget_after_round:
            self.forget_after_round = None
            raise StaleSession(f"worker {worker_id!r} was dropped")
        if self.handed_out < self.rounds:
            self.handed_out += 1
            return TaskInfo(TaskKind.TRAIN, "ps-1", round=self.handed_out, model_version=self.handed_out - 1,
                            client=self.settings)
        return TaskInfo(TaskKind.FINISH, "ps-1", message="scripted job done")

    def model_for(self, peer: PeerIdentity, worker_id: str, model_version: int) -> tuple[int, ParamSet]:
        return model_version, self.model

    def open_update(self, peer: PeerIdentity, meta: UpdateMeta) -> UpdateSink:
        if self.refuse > 0:
            self.refuse -= 1
            raise UpdateRejected("scripted refusal")
        return _RecordingSink(self, meta)

    def leave(self, peer: PeerIdentity, worker_id: str, reason: str) -> None:
        pass


def run_scripted(handler: ScriptedHandler, trainer: AddTrainer,
                 transforms: Sequence[UpdateTransform] | None = None) -> Worker:
    """Runs one worker against ``handler`` on this thread, to FINISH or the error it raises."""
    worker = Worker(lambda: InMemoryClient(handler, peer("solo")), trainer, WorkerSettings(name="solo", poll_s=0.1),
                    transforms=transforms)
    worker.run()
    return worker
