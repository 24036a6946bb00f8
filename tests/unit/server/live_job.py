"""A running job in one process for the management tests: a real ParameterServer and real Workers.

The PS runs its rounds on a thread and each worker runs ``Worker.run()`` on its
own thread through an InMemoryClient, so every join, pull and push goes through
the server's own handler. The workers' local training waits on a :class:`Gate`
the test opens round by round, which is how a test holds a round open while it
pauses, stops or patches the job.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from enclavefl.config import JobConfig, parse_job
from enclavefl.messages import PeerIdentity
from enclavefl.server.closing import Evaluator
from enclavefl.server.ps import ParameterServer
from enclavefl.tensors import ParamSet
from enclavefl.training import FitConfig, FitResult
from enclavefl.worker import InMemoryClient, Worker, WorkerSettings
from tests.unit.worker.federation import AddTrainer, f32, peer

INITIAL = ParamSet({"w": np.zeros((2, 2), dtype=np.float32), "b": np.zeros(2, dtype=np.float32)})


def job(*, rounds: int = 2, workers: int = 2, mode: str = "sync", checkpoint_every: int = 1, name: str = "job",
        attestation: str = "none", **round_section: Any) -> JobConfig:
    """A job whose rounds close as soon as every sampled worker pushed."""
    section: dict[str, Any] = {"mode": mode, "min_workers": workers, "start_window_s": 20, "update_window_s": 20,
                               "max_retries": 0}
    if mode == "async":
        section["buffer_size"] = workers
    section.update(round_section)
    return parse_job({
        "job": {"name": name, "rounds": rounds, "workers": workers},
        "round": section,
        "client": {"epochs": 1, "batch_size": 4, "lr": 0.5},
        "server": {"checkpoint_every": checkpoint_every},
        "attestation": {"mode": attestation},
    })


def wait_for(predicate: Callable[[], bool], timeout_s: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.01)


class Gate:
    """How many local fits each worker may run; a fit beyond that waits until the test allows it."""

    def __init__(self, allowed: int = 1_000_000) -> None:
        self._cond = threading.Condition()
        self._allowed = allowed

    def allow(self, fits: int) -> None:
        with self._cond:
            self._allowed = fits
            self._cond.notify_all()

    def wait(self, fit: int, timeout_s: float = 30.0) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._allowed >= fit, timeout_s):
                raise TimeoutError(f"fit {fit} was never allowed")


class GatedTrainer(AddTrainer):
    """Local training that adds 1 to every weight, once per ``fit``, when the gate allows; records each FitConfig."""

    def __init__(self, gate: Gate, num_samples: int = 4) -> None:
        super().__init__(1.0, num_samples)
        self.gate = gate

    def fit(self, config: FitConfig) -> FitResult:
        self.gate.wait(len(self.configs) + 1)
        super().fit(config)
        return FitResult(self.num_samples, {"loss": 0.25, "accuracy": 0.5}, steps=1)


class LiveJob:
    """A PS and ``workers`` workers on threads; :meth:`close` stops whatever still runs."""

    def __init__(self, config: JobConfig, out_dir: Path, *, workers: int | None = None,
                 gate: Gate | None = None, gates: Mapping[int, Gate] | None = None,
                 names: Sequence[str] = (), proved: Mapping[int, Mapping[str, Any]] | None = None,
                 evaluator: Evaluator | None = None) -> None:
        """Starts the PS and the workers; worker ``i`` fits when ``gates[i]`` (else ``gate``) allows.

        Args:
            names: worker ``i`` joins as ``names[i]`` (default ``worker-i``).
            proved: what worker ``i``'s attestation proved (:class:`PeerIdentity` fields), as the
                transport would hand it to the PS; default: no evidence.
            evaluator: scores each new global model (the metrics rows' ``eval_*``).
        """
        self.ps = ParameterServer(config, INITIAL, out_dir=out_dir, evaluator=evaluator)
        self.handle = self.ps.handle()
        self.gate = gate or Gate()
        self.out_dir = out_dir
        self.trainers: list[GatedTrainer] = []
        self.peers: list[PeerIdentity] = []
        """Who worker ``i`` is to the PS (its certificate's fingerprint and what it proved)."""
        self.errors: dict[str, BaseException] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._start("ps", self.ps.run)
        for index in range(workers or config.job.workers):
            name = names[index] if index < len(names) else f"worker-{index}"
            trainer = GatedTrainer((gates or {}).get(index, self.gate))
            self.trainers.append(trainer)
            who = peer(f"worker-{index}", **(proved or {}).get(index, {}))
            self.peers.append(who)
            worker = Worker(lambda who=who: InMemoryClient(self.ps, who, chunk_bytes=64), trainer,
                            WorkerSettings(name=name, seed=7, poll_s=0.2), stop=self._stop)
            self._start(name, worker.run)

    def _start(self, name: str, target: Callable[[], Any]) -> None:
        def body() -> None:
            try:
                target()
            except BaseException as exc:  # reported by the test, not by the thread hook
                self.errors[name] = exc

        thread = threading.Thread(target=body, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def worker_id(self, index: int) -> str:
        """The id the PS gave worker ``index`` when it joined."""
        fingerprint = self.peers[index].fingerprint
        with self.ps.core.cond:
            return next(r.worker_id for r in self.ps.core.registry.records() if r.fingerprint == fingerprint)

    def leave(self, index: int, reason: str) -> None:
        """Worker ``index`` tells the PS it leaves, with ``reason`` (the call its client's ``leave`` makes)."""
        self.ps.leave(self.peers[index], self.worker_id(index), reason)

    def wait_done(self, timeout_s: float = 30.0) -> None:
        """Waits for the PS and every worker to return; fails if one raised or hung."""
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0.0))
        hung = [t.name for t in self._threads if t.is_alive()]
        assert not hung, f"still running after {timeout_s}s: {hung}; errors so far: {self.errors}"
        assert not self.errors, self.errors

    def close(self) -> None:
        for gate in {id(t.gate): t.gate for t in self.trainers}.values():
            gate.allow(1_000_000)
        self.ps.stop()
        self._threads[0].join(15)  # the PS first: its workers hear FINISH while it lingers
        self._stop.set()
        for thread in self._threads[1:]:
            thread.join(15)


def start(live: list[LiveJob], out_dir: Path, gate: Gate | None = None, **job_settings: Any) -> LiveJob:
    """A :class:`LiveJob` of :func:`job` (``job_settings``), added to ``live`` so the test's fixture closes it."""
    j = LiveJob(job(**job_settings), out_dir, gate=gate)
    live.append(j)
    return j


def controls(j: LiveJob) -> list[dict[str, Any]]:
    """The operator actions the job recorded (its ``control`` events), oldest first."""
    return [dict(e.data) for e in j.handle.events.read(0, limit=2048).events if e.kind == "control"]
