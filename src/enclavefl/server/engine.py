"""Engines decide when rounds open and close; the synchronous one is FedAvg's round loop.

An engine owns every phase transition. The worker-facing handler asks it
which task a worker gets (:meth:`Engine.task_for`) and where an upload goes
(:meth:`Engine.target_for`), always with the server lock held, so a new
engine (async) is a new class, not an edit of the handler.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from enclavefl.config import JobConfig
from enclavefl.errors import RoundError, UpdateRejected
from enclavefl.messages import ConfigValue, TaskInfo, TaskKind, UpdateMeta
from enclavefl.server.checkpoint import params_digest
from enclavefl.server.closing import ClosePipeline
from enclavefl.server.core import JobOutcome, ServerCore
from enclavefl.server.phases import Phase
from enclavefl.server.registry import WorkerRecord
from enclavefl.server.round import Round, RoundRecord
from enclavefl.server.sampling import Sampler, UniformSampler
from enclavefl.server.staging import UpdateTarget
from enclavefl.server.state import PartState
from enclavefl.server.strategy import Strategy
from enclavefl.tensors import StreamHeader

__all__ = ["LINGER_S", "Engine", "SyncEngine"]

log = logging.getLogger(__name__)

LINGER_S = 10.0
"""After the last round, how long the PS keeps answering so workers hear FINISH."""


class Engine(ABC):
    """Runs the job's rounds over a :class:`ServerCore`."""

    def __init__(self, core: ServerCore, strategy: Strategy, pipeline: ClosePipeline,
                 upload_template: StreamHeader) -> None:
        self.core = core
        self.strategy = strategy
        self.pipeline = pipeline
        self.upload_template = upload_template
        self._opened_any = False
        """A round (or the async steps) opened in this process: the job had its workers once."""
        self._lost: list[str] = []
        """Names of the workers lost (silent, or left) since a round last opened."""

    @property
    def config(self) -> JobConfig:
        """The job's settings now (:attr:`ServerCore.config`): an operator may change them between rounds."""
        return self.core.config

    def sampler(self) -> Sampler:
        """The strategy's sampler, with ``round.fraction`` and ``round.min_workers`` as they are now.

        A :class:`UniformSampler` follows changed settings; a custom sampler is used as given.
        """
        sampler, cfg = self.strategy.sampler, self.config.round
        if isinstance(sampler, UniformSampler) and (sampler.fraction, sampler.minimum) != (cfg.fraction, cfg.min_workers):
            return dataclasses.replace(sampler, fraction=cfg.fraction, minimum=cfg.min_workers)
        return sampler

    def open_counts(self) -> tuple[int, int]:
        """Workers asked to train in the open round (or step) and updates accepted in it so far (caller holds the lock)."""
        return 0, 0

    @abstractmethod
    def loop(self) -> None:
        """Runs rounds until the job is done (the core's phase is FINISHED) or raises RoundError."""

    @abstractmethod
    def task_for(self, worker: WorkerRecord) -> TaskInfo | None:
        """A train task for ``worker`` now, or None (caller holds the lock)."""

    def before_finish(self, worker: WorkerRecord) -> None:
        """Called before ``worker`` is told FINISH once this PS has ended (caller holds the lock).

        Raises:
            StaleSession: the worker must not hear FINISH from here (a cluster server that left the
                cluster ends while the job goes on elsewhere: the worker joins another server).
        """

    def wait_config(self, worker: WorkerRecord) -> dict[str, ConfigValue]:
        """What a WAIT answer to ``worker`` carries in its config map (caller holds the lock).

        Empty for one PS; a cluster server names the worker's servers there (see
        :mod:`enclavefl.cluster.engine`). It must not block: long-polls hold the PS lock.
        """
        return {}

    @abstractmethod
    def target_for(self, meta: UpdateMeta) -> tuple[UpdateTarget, int, float]:
        """Where the upload goes, its staleness and the deadline to get a slot (caller holds the lock).

        Raises:
            UpdateRejected: no open round or buffer takes this update.
        """

    def staleness_weight(self, staleness: int) -> float:
        """The factor an update of this staleness is weighed with (1 in sync rounds)."""
        return 1.0

    def note_rejection(self, worker_id: str) -> None:
        """An upload of ``worker_id`` was refused before it reached a target (caller holds the lock)."""

    def on_drop(self, worker_id: str) -> None:
        """A worker left or was dropped (caller holds the lock)."""

    def note_lost(self, name: str) -> None:
        """Worker ``name`` is gone (silent, or it left), after :meth:`on_drop` (caller holds the lock).

        Once the job has had its workers, falling below ``round.min_workers`` is
        said at once: the next round waits one start window for them, then the
        job fails (see :meth:`_missing_lost`).
        """
        self._lost.append(name)
        core, need = self.core, self.config.round.min_workers
        joined = len(core.registry)
        if self._opened_any and joined < need and core.phase is not Phase.FINISHED and not core.ending:
            log.warning("ps %s round %d: %d workers joined, fewer than min_workers=%d: the job fails unless %d "
                        "(re)join within %s", core.instance, core.next_round, joined, need, need - joined,
                        self._grace_window())

    def _grace_window(self) -> str:
        """The window lost workers have to join again in, for messages."""
        return f"start_window_s={self.config.round.start_window_s:g} of the next round"

    def _opened(self) -> None:
        """A round opened with enough workers: workers lost before it no longer matter (caller holds the lock)."""
        if not self._opened_any:
            log.info("ps %s round %d: the first round opens, %d workers joined", self.core.instance,
                     self.core.next_round, len(self.core.registry), extra={"event": "first_round"})
        self._opened_any = True
        self._lost.clear()

    def _missing_lost(self) -> list[str]:
        """The lost workers that have not joined again (caller holds the lock)."""
        joined = {w.name for w in self.core.registry.records()}
        return sorted({name for name in self._lost if name not in joined})

    def _fail_if_lost(self, round_: int, waited: str) -> None:
        """After a window without min_workers: fail now if workers lost after the job had its workers are missing.

        Args:
            waited: the window that just passed, for the message (``start_window_s=60``).

        Raises:
            RoundError: fewer than ``min_workers`` are joined and lost workers have not come back;
                retrying the window would not bring them back.
        """
        cfg = self.config.round
        with self.core.cond:
            joined = len(self.core.registry)
            missing = self._missing_lost() if self._opened_any and joined < cfg.min_workers else []
        if missing:
            raise RoundError(f"round {round_}: {joined} workers joined, fewer than min_workers={cfg.min_workers}, "
                             f"and {', '.join(missing)} (lost) did not join again within {waited}; not retried")

    def on_download(self, worker_id: str, nbytes: int) -> None:
        """A worker pulled the model (caller holds the lock)."""

    def state(self) -> PartState:
        return PartState()

    def load_state(self, state: PartState) -> None:
        """Restores what :meth:`state` returned (a resumed job)."""

    def run(self) -> None:
        """Runs the job, then tells workers to finish.

        Raises:
            RoundError: the job could not make progress (too few workers or updates after retries).
        """
        core = self.core
        outcome: JobOutcome = "failed"
        try:
            self.loop()
            outcome = "stopped" if core.ending else "finished"
        except RoundError as exc:
            core.failure = str(exc)
            raise
        finally:
            # A failed or stopped job keeps its last completed round, whatever checkpoint_every says.
            self.pipeline.checkpoint_latest()
            with core.cond:
                if core.ending and core.failure is None and core.next_round <= self.config.job.rounds:
                    core.failure = f"stopped after round {core.next_round - 1}"
                if core.phase is not Phase.FINISHED:
                    core.set_phase(Phase.FINISHED)
                reason = core.failure or f"{core.next_round - 1} rounds done"
                core.end(outcome, reason)
            self._linger()

    def _retry_or_fail(self, attempt: int, why: str) -> None:
        if attempt > self.config.round.max_retries:
            raise RoundError(f"{why}; gave up after {self.config.round.max_retries} retries")
        log.warning("ps %s round %d: %s; retry %d of %d", self.core.instance, self.core.next_round, why, attempt,
                    self.config.round.max_retries)

    def _await_workers(self) -> bool:
        cfg = self.config.round
        deadline = time.monotonic() + cfg.start_window_s
        with self.core.cond:
            while len(self.core.registry) < cfg.min_workers and not self.core.ending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.core.cond.wait(remaining)
        return True

    def _linger(self) -> None:
        """Answers FINISH to every joined worker, for at most LINGER_S."""
        deadline = time.monotonic() + LINGER_S
        with self.core.cond:
            while not self.core.registry.all_finished():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.core.cond.wait(remaining)


class SyncEngine(Engine):
    """Synchronous rounds: sample, wait for ``update_ratio`` of the updates or the window, close."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.round: Round | None = None
        self._round_config = self.config
        """The settings the open round was opened with (an operator's change applies from the next)."""
        self._round_task_config: dict[str, ConfigValue] = {}
        """What the strategy's stages add to the open round's train tasks."""

    def loop(self) -> None:
        core = self.core
        attempt = 0
        while core.next_round <= self.config.job.rounds and core.phase is not Phase.FINISHED and not core.ending:
            with core.cond:
                core.hold_while_paused()
            cfg = self.config  # the settings of this round: an operator's change applies from the next
            wait_started = time.monotonic()
            if not self._await_workers():
                if core.ending:
                    break
                if core.paused:  # the window passed while paused: not a failure of the round
                    continue
                self._fail_if_lost(core.next_round, self._grace_window())
                attempt += 1
                self._retry_or_fail(attempt, f"fewer than min_workers={cfg.round.min_workers} joined within "
                                             f"start_window_s={cfg.round.start_window_s}")
                continue
            with core.cond:
                if core.paused or core.ending:  # asked for while waiting for workers: no round opens
                    continue
            seconds_wait = time.monotonic() - wait_started
            rnd = self._open_round(attempt)
            if rnd is None:  # a strategy gate ended the job (a budget): it stops cleanly after the last round
                self.pipeline.checkpoint_latest()
                core.finish()
                break
            record = self._await_round(rnd)
            stages = self.strategy.stages
            if core.stopping:
                rnd.aggregator.close()
                if stages is not None:
                    stages.abandon()
                log.warning("ps %s round %d: stopped; the open round is abandoned", core.instance, rnd.number)
                break
            if core.finishing:
                log.info("ps %s round %d: stop asked for; this round completes, then the job ends",
                         core.instance, rnd.number)
            failure = None
            if len(record.pushed) < cfg.round.min_updates:
                failure = f"round {rnd.number} got {len(record.pushed)} updates, min_updates={cfg.round.min_updates}"
                rnd.aggregator.close()
                if stages is not None:
                    stages.abandon()
            else:
                try:
                    aggregator = rnd.aggregator if stages is None else stages.finish(record.pushed, rnd.aggregator)
                    self.pipeline.close(record, aggregator, seconds_wait=seconds_wait)
                except (UpdateRejected, RoundError) as exc:  # the round is retried; nothing became the model
                    rnd.aggregator.close()
                    failure = str(exc)
            with core.cond:
                self.round = None
                if core.phase is Phase.AGGREGATING:
                    core.set_phase(Phase.WAITING)
            if failure is None:
                attempt = 0
            else:
                attempt += 1
                self._retry_or_fail(attempt, failure)

    def _gate(self, round_: int, sampled: int, joined: int) -> str | None:
        """The first refusal of the strategy's gates for this round, or None (caller holds the lock)."""
        for gate in self.strategy.gates:
            reason = gate.may_open(round_, sampled, joined)
            if reason is not None:
                return reason
        return None

    def _open_round(self, attempt: int) -> Round | None:
        """Samples and opens the next round; None if a strategy gate refuses it (the job must end)."""
        core, cfg = self.core, self.config
        with core.cond:
            self._round_config = cfg
            ids = self.sampler().sample(core.registry.candidates(), core.next_round, attempt)
            refusal = self._gate(core.next_round, len(ids), len(core.registry))
            if refusal is not None:
                log.warning("ps %s round %d: not opened: %s", core.instance, core.next_round, refusal,
                            extra={"event": "gate_stop"})
                return None
            core.registry.settle()
            required = max(1, int(np.ceil(cfg.round.update_ratio * len(ids) - 1e-9)))
            rnd = Round(core.next_round, core.version, attempt, frozenset(ids), required,
                        self.strategy.aggregator(self.upload_template), self.upload_template,
                        cfg.round.update_window_s, notify=core.notify)
            stages = self.strategy.stages
            self._round_task_config = {} if stages is None else dict(stages.open(rnd.number, attempt, rnd.sampled))
            self.round = rnd
            self._opened()
            core.set_phase(Phase.TRAINING)
            joined = len(core.registry)
        log.info("ps %s round %d: opened (attempt %d), model version %d digest %s, sampled %d of %d, need %d",
                 core.instance, rnd.number, attempt, rnd.model_version, params_digest(core.params)[:16],
                 len(ids), joined, required)
        return rnd

    def _await_round(self, rnd: Round) -> RoundRecord:
        core = self.core
        with core.cond:
            while not rnd.done() and not core.stopping:
                remaining = rnd.deadline - time.monotonic()
                if remaining <= 0:
                    break
                core.cond.wait(remaining)
            core.set_phase(Phase.AGGREGATING)
            # Waits for an accept in progress; uploads still streaming are refused when they finish.
            record = rnd.close()
            late = frozenset() if core.stopping else record.sampled - record.pushed - record.dropped
            for worker_id in late:
                if core.registry.remove(worker_id, reason=f"no update by the end of round {rnd.number}") is not None:
                    log.info("ps %s round %d: worker %s dropped (no update by the end of round %d)",
                             core.instance, rnd.number, worker_id, rnd.number)
            if late:
                log.warning("ps %s round %d: closed by its window with %d of %d updates",
                            core.instance, rnd.number, len(record.pushed), len(record.sampled))
                record = dataclasses.replace(record, dropped=record.dropped | late)
        return record

    def task_for(self, worker: WorkerRecord) -> TaskInfo | None:
        rnd = self.round
        if self.core.phase is not Phase.TRAINING or rnd is None or not rnd.is_training(worker.worker_id):
            return None
        return TaskInfo(TaskKind.TRAIN, self.core.instance, round=rnd.number, model_version=rnd.model_version,
                        client=self.strategy.algorithm.client_settings(self._round_config.client, rnd.number),
                        config={**self.strategy.task_config, **self._round_task_config})

    def target_for(self, meta: UpdateMeta) -> tuple[UpdateTarget, int, float]:
        rnd = self.round
        if self.core.phase is not Phase.TRAINING or rnd is None:
            raise UpdateRejected(f"no round is open (phase {self.core.phase.value})")
        if self.strategy.stages is not None:
            try:
                self.strategy.stages.admit(meta.worker_id)
            except UpdateRejected:
                rnd.note_rejection(meta.worker_id)
                raise
        rnd.admit(meta)
        return rnd, 0, rnd.deadline

    def note_rejection(self, worker_id: str) -> None:
        if self.round is not None:
            self.round.note_rejection(worker_id)

    def on_drop(self, worker_id: str) -> None:
        if self.round is not None:
            self.round.mark_dropped(worker_id)
            if self.strategy.stages is not None:
                self.strategy.stages.on_drop(worker_id)

    def on_download(self, worker_id: str, nbytes: int) -> None:
        if self.round is not None and worker_id in self.round.sampled:
            self.round.note_download(nbytes)

    def open_counts(self) -> tuple[int, int]:
        rnd = self.round
        if rnd is None or rnd.closed:
            return 0, 0
        return len(rnd.sampled), len(rnd.pushed)
