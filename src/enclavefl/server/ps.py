"""The parameter server: round engine, worker registry and update staging.

How this works: gRPC threads call the :class:`FederationHandler` methods
(join, wait_task, model_for, open_update, leave); the engine thread runs
:meth:`ParameterServer.run`, which owns every phase transition. Both sides
share one lock and one condition variable; every wait has a deadline.

Updates stream into a :class:`_StagedUpdate` (a bounded decode buffer). At
most ``max_concurrent_uploads`` are staged at once (a semaphore), so PS memory
is O(model x (max_concurrent_uploads + 2)) however many workers there are. An
update is checked whole (header, sizes, finite values, round still open) before
it is folded into the running weighted sum, so a rejected one leaves no trace.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from enclavefl.config import JobConfig
from enclavefl.errors import ProtocolError, RoundError, StaleSession, UpdateRejected
from enclavefl.server.aggregator import WeightedMean
from enclavefl.server.checkpoint import Checkpoint, params_digest, save_checkpoint
from enclavefl.server.metrics import MetricsLog
from enclavefl.server.optimizer import SERVER_OPTIMIZERS
from enclavefl.server.rounds import Phase, RoundState, check_transition, sample_workers
from enclavefl.tensors import CodecLimits, ParamSet, SparseRows, StreamDecoder, StreamHeader
from enclavefl.transport.credentials import PeerIdentity
from enclavefl.transport.messages import ClientSettings, JoinInfo, TaskInfo, TaskKind, UpdateMeta, UpdateSink

__all__ = ["Evaluator", "ParameterServer"]

log = logging.getLogger(__name__)

Evaluator = Callable[[ParamSet], Mapping[str, float]]
"""Scores a global model on held-out data (keys ``loss`` and ``accuracy``, say)."""

LINGER_S = 10.0
"""After the last round, how long the PS keeps answering so workers hear FINISH."""


@dataclass(slots=True)
class _Worker:
    worker_id: str
    name: str
    fingerprint: str
    num_samples: int
    last_seen: float
    finished: bool = False


class _StagedUpdate(UpdateSink):
    def __init__(self, ps: ParameterServer, rnd: RoundState, meta: UpdateMeta, decoder: StreamDecoder, slot: threading.Semaphore) -> None:
        self._ps = ps
        self._round = rnd
        self._meta = meta
        self._decoder = decoder
        self._slot = slot
        self._done = False

    def feed(self, chunk: bytes | memoryview) -> None:
        self._decoder.feed(chunk)

    def commit(self) -> None:
        try:
            try:
                update = self._decoder.finish()
            except ProtocolError as exc:
                raise UpdateRejected(str(exc)) from exc
            _check_finite(update)
            self._ps._fold(self._round, self._meta, update, self._decoder.bytes_received)
        except UpdateRejected as exc:
            self._ps._note_rejection(self._round, self._meta.worker_id, str(exc))
            raise
        finally:
            self._release()

    def abort(self, reason: str) -> None:
        if not self._done:
            self._ps._note_rejection(self._round, self._meta.worker_id, reason)
        self._release()

    def _release(self) -> None:
        if not self._done:
            self._done = True
            with self._ps._cond:
                self._round.uploading.discard(self._meta.worker_id)
                self._ps._cond.notify_all()
            self._slot.release()


def _check_finite(update: ParamSet) -> None:
    for name, value in update.items():
        data = value.rows if isinstance(value, SparseRows) else value
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            raise UpdateRejected(f"tensor {name!r} holds NaN or Inf values")


class ParameterServer:
    """Owns the global model and the rounds; implements the gRPC handler contract."""

    def __init__(
        self,
        config: JobConfig,
        initial: ParamSet,
        *,
        out_dir: Path,
        evaluator: Evaluator | None = None,
        resume_from: Checkpoint | None = None,
        limits: CodecLimits | None = None,
    ) -> None:
        self.config = config
        self.instance = uuid.uuid4().hex[:12]
        self._evaluator = evaluator
        self._checkpoint_dir = out_dir / config.server.checkpoint_dir
        self._limits = limits or CodecLimits(
            max_total_bytes=config.server.max_update_bytes, max_chunk_bytes=config.transport.chunk_bytes
        )
        self._optimizer = SERVER_OPTIMIZERS[config.server.optimizer](config.server.lr)
        self._slots = threading.Semaphore(config.server.max_concurrent_uploads)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._workers: dict[str, _Worker] = {}
        self._phase = Phase.WAITING
        self._round: RoundState | None = None
        self._aggregator: WeightedMean | None = None
        self._failure: str | None = None
        history: list[dict[str, Any]] = []
        self.params = initial
        self.next_round = 1
        self.version = 0
        if resume_from is not None:
            reason = StreamHeader.of(resume_from.params).matches(StreamHeader.of(initial))
            if reason is not None:
                raise RoundError(f"checkpoint {resume_from.path} does not fit this task's model: {reason}")
            self.params = resume_from.params
            self.next_round = resume_from.round + 1
            self.version = resume_from.model_version
            history = resume_from.history
            log.info(
                "ps %s resumed from %s: next round %d, model version %d, digest %s",
                self.instance, resume_from.path, self.next_round, self.version, params_digest(self.params)[:16],
            )
        self._template = StreamHeader.of(self.params)
        self.metrics = MetricsLog(out_dir / config.summary.metrics_file, history)

    # ---------------------------------------------------------------- handler
    def _worker(self, peer: PeerIdentity, worker_id: str) -> _Worker:
        w = self._workers.get(worker_id)
        if w is None:
            raise StaleSession(f"worker {worker_id!r} is not joined to PS {self.instance}; join again")
        if w.fingerprint != peer.fingerprint:
            raise StaleSession(f"worker {worker_id!r} is bound to another certificate")
        w.last_seen = time.monotonic()
        return w

    def join(self, peer: PeerIdentity, worker_name: str, num_samples: int) -> JoinInfo:
        with self._cond:
            for old in [w for w in self._workers.values() if w.fingerprint == peer.fingerprint]:
                self._drop(old.worker_id, "re-joined")
            worker_id = f"w-{uuid.uuid4().hex[:8]}"
            self._workers[worker_id] = _Worker(worker_id, worker_name[:64], peer.fingerprint, max(num_samples, 0), time.monotonic())
            log.info("ps %s round %d: worker %s (%s, %s) joined, %d joined",
                     self.instance, self.next_round, worker_id, worker_name[:64], peer.label, len(self._workers))
            self._cond.notify_all()
        return JoinInfo(worker_id, self.config.job.name, self.instance, self.config.job.rounds)

    def wait_task(self, peer: PeerIdentity, worker_id: str, max_wait_s: float) -> TaskInfo:
        deadline = time.monotonic() + max_wait_s
        with self._cond:
            while True:
                w = self._worker(peer, worker_id)
                if self._phase is Phase.FINISHED:
                    w.finished = True
                    self._cond.notify_all()
                    return TaskInfo(TaskKind.FINISH, self.instance, message=self._failure or "job complete")
                rnd = self._round
                if (
                    self._phase is Phase.TRAINING and rnd is not None and worker_id in rnd.sampled
                    and worker_id not in rnd.pushed and worker_id not in rnd.uploading
                ):
                    c = self.config.client
                    return TaskInfo(
                        TaskKind.TRAIN, self.instance, round=rnd.number, model_version=rnd.model_version,
                        client=ClientSettings(c.epochs, c.batch_size, c.lr),
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return TaskInfo(TaskKind.WAIT, self.instance, round=self.next_round, retry_after_s=0.0)
                self._cond.wait(remaining)

    def model_for(self, peer: PeerIdentity, worker_id: str, model_version: int) -> tuple[int, ParamSet]:
        with self._cond:
            self._worker(peer, worker_id)
            params, version = self.params, self.version
            if self._round is not None and worker_id in self._round.sampled:
                self._round.bytes_out += params.nbytes
        return version, params

    def open_update(self, peer: PeerIdentity, meta: UpdateMeta) -> UpdateSink:
        with self._cond:
            self._worker(peer, meta.worker_id)
            rnd = self._round
            reason = None
            if self._phase is not Phase.TRAINING or rnd is None:
                reason = f"no round is open (phase {self._phase.value})"
            elif meta.round != rnd.number or meta.model_version != rnd.model_version:
                reason = f"update for round {meta.round} v{meta.model_version}, open is round {rnd.number} v{rnd.model_version}"
            elif meta.worker_id not in rnd.sampled:
                reason = f"worker {meta.worker_id} was not sampled for round {rnd.number}"
            elif meta.worker_id in rnd.pushed or meta.worker_id in rnd.uploading:
                reason = f"worker {meta.worker_id} already pushed round {rnd.number}"
            elif meta.num_samples <= 0:
                reason = f"num_samples must be positive, got {meta.num_samples}"
            else:
                mismatch = meta.tensors.matches(self._template)
                if mismatch is not None:
                    reason = mismatch
            if reason is not None:
                if rnd is not None:
                    rnd.rejected += 1
                log.warning("ps %s round %d: rejected update from %s: %s", self.instance, meta.round, meta.worker_id, reason)
                raise UpdateRejected(reason)
            assert rnd is not None  # for mypy: checked above
            rnd.uploading.add(meta.worker_id)
            wait_s = max(rnd.deadline - time.monotonic(), 0.1)
        if not self._slots.acquire(timeout=wait_s):
            self._abandon_upload(rnd, meta.worker_id, "no upload slot before the round closed")
        try:
            decoder = StreamDecoder(meta.tensors, self._limits, expected=self._template)
        except ProtocolError as exc:
            self._slots.release()
            self._abandon_upload(rnd, meta.worker_id, str(exc))
        return _StagedUpdate(self, rnd, meta, decoder, self._slots)

    def _abandon_upload(self, rnd: RoundState, worker_id: str, reason: str) -> NoReturn:
        """Forgets an upload that never got staged, logs why and refuses it."""
        self._note_rejection(rnd, worker_id, reason)
        with self._cond:
            rnd.uploading.discard(worker_id)
            self._cond.notify_all()
        raise UpdateRejected(reason)

    def leave(self, peer: PeerIdentity, worker_id: str, reason: str) -> None:
        with self._cond:
            self._worker(peer, worker_id)
            self._drop(worker_id, f"left: {reason}")
            self._cond.notify_all()

    # ------------------------------------------------------------ internals
    def _drop(self, worker_id: str, why: str) -> None:
        """Forgets a worker (caller holds the lock)."""
        if self._workers.pop(worker_id, None) is None:
            return
        if self._round is not None and worker_id in self._round.sampled:
            self._round.dropped.add(worker_id)
        log.info("ps %s round %d: worker %s dropped (%s)", self.instance, self.next_round, worker_id, why)

    def _note_rejection(self, rnd: RoundState, worker_id: str, reason: str) -> None:
        with self._cond:
            rnd.rejected += 1
        log.warning("ps %s round %d: rejected update from %s: %s", self.instance, rnd.number, worker_id, reason)

    def _fold(self, rnd: RoundState, meta: UpdateMeta, update: ParamSet, nbytes: int) -> None:
        """Adds a fully received, validated update to the sum, if its round is still open."""
        with self._cond:
            if rnd.closed or self._round is not rnd or self._aggregator is None:
                raise UpdateRejected(f"round {rnd.number} closed before the update was complete")
            aggregator = self._aggregator
            rnd.folding += 1
        # The aggregator has its own lock; folding outside ours keeps WaitTask responsive.
        # The engine waits for `folding` to drop to zero before it reads the sum.
        try:
            aggregator.add(update, float(meta.num_samples))
        finally:
            with self._cond:
                rnd.folding -= 1
                self._cond.notify_all()
        with self._cond:
            rnd.pushed.add(meta.worker_id)
            rnd.num_samples += meta.num_samples
            rnd.bytes_in += nbytes
            rnd.worker_metrics.append({k: float(v) for k, v in meta.metrics.items()})
            log.info("ps %s round %d: accepted update from %s (%d samples, %d bytes), %d/%d",
                     self.instance, rnd.number, meta.worker_id, meta.num_samples, nbytes, len(rnd.pushed), rnd.required)
            self._cond.notify_all()

    def _set_phase(self, new: Phase) -> None:
        check_transition(self._phase, new)
        self._phase = new
        self._cond.notify_all()

    # ---------------------------------------------------------------- engine
    def run(self) -> None:
        """Runs rounds until the job is done; returns after telling workers to finish.

        Raises:
            RoundError: a round could not gather enough workers or updates within
                ``round.max_retries`` retries.
        """
        cfg = self.config
        attempt = 0
        try:
            while self.next_round <= cfg.job.rounds:
                wait_started = time.monotonic()
                if not self._await_workers():
                    attempt += 1
                    self._retry_or_fail(attempt, f"fewer than min_workers={cfg.round.min_workers} joined within start_window_s={cfg.round.start_window_s}")
                    continue
                seconds_wait = time.monotonic() - wait_started
                rnd = self._open_round(attempt)
                self._await_round(rnd)
                ok = self._close_round(rnd, seconds_wait)
                if ok:
                    attempt = 0
                else:
                    attempt += 1
                    self._retry_or_fail(attempt, f"round {rnd.number} got {len(rnd.pushed)} updates, min_updates={cfg.round.min_updates}")
        except RoundError as exc:
            self._failure = str(exc)
            raise
        finally:
            with self._cond:
                if self._phase is not Phase.FINISHED:
                    self._set_phase(Phase.FINISHED)
            self._linger()

    def _retry_or_fail(self, attempt: int, why: str) -> None:
        if attempt > self.config.round.max_retries:
            raise RoundError(f"{why}; gave up after {self.config.round.max_retries} retries")
        log.warning("ps %s round %d: %s; retry %d of %d", self.instance, self.next_round, why, attempt, self.config.round.max_retries)

    def _await_workers(self) -> bool:
        cfg = self.config.round
        deadline = time.monotonic() + cfg.start_window_s
        with self._cond:
            while len(self._workers) < cfg.min_workers:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def _open_round(self, attempt: int) -> RoundState:
        cfg = self.config
        with self._cond:
            ids = sample_workers(list(self._workers), cfg.round.fraction, cfg.round.min_workers, cfg.job.seed, self.next_round, attempt)
            required = max(1, int(np.ceil(cfg.round.update_ratio * len(ids) - 1e-9)))
            rnd = RoundState(self.next_round, self.version, attempt, frozenset(ids), required)
            rnd.deadline = rnd.opened_at + cfg.round.update_window_s
            self._round = rnd
            self._aggregator = WeightedMean(self._template)
            self._set_phase(Phase.TRAINING)
        log.info("ps %s round %d: opened (attempt %d), model version %d digest %s, sampled %d of %d, need %d",
                 self.instance, rnd.number, attempt, rnd.model_version, params_digest(self.params)[:16],
                 len(ids), len(self._workers), required)
        return rnd

    def _await_round(self, rnd: RoundState) -> None:
        with self._cond:
            while not rnd.done():
                remaining = rnd.deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            rnd.closed = True
            self._set_phase(Phase.AGGREGATING)
            # An update that is mid-fold finishes before we read the sum; uploads
            # still streaming will be refused when they try to fold.
            while rnd.folding:
                self._cond.wait(1.0)
            late = rnd.sampled - rnd.pushed - rnd.dropped
            for worker_id in late:
                self._drop(worker_id, f"no update by the end of round {rnd.number}")
            if late:
                log.warning("ps %s round %d: closed by its window with %d of %d updates",
                            self.instance, rnd.number, len(rnd.pushed), len(rnd.sampled))

    def _close_round(self, rnd: RoundState, seconds_wait: float) -> bool:
        cfg = self.config
        seconds_train = time.monotonic() - rnd.opened_at
        aggregator = self._aggregator
        if aggregator is None or aggregator.count < cfg.round.min_updates:
            with self._cond:
                self._set_phase(Phase.WAITING)
            return False
        t0 = time.monotonic()
        new_params = self._optimizer.step(self.params, aggregator.result())
        seconds_aggregate = time.monotonic() - t0
        t1 = time.monotonic()
        evaluation = dict(self._evaluator(new_params)) if self._evaluator else {}
        seconds_eval = time.monotonic() - t1

        def mean(key: str) -> float | None:
            vals = [m[key] for m in rnd.worker_metrics if key in m]
            return float(np.mean(vals)) if vals else None

        row: dict[str, Any] = {
            "round": rnd.number,
            "participants": len(rnd.pushed),
            "sampled": len(rnd.sampled),
            "rejected": rnd.rejected,
            "attempt": rnd.attempt,
            "model_version": rnd.model_version + 1,
            "num_samples": rnd.num_samples,
            "train_loss": mean("loss"),
            "train_accuracy": mean("accuracy"),
            "eval_loss": evaluation.get("loss"),
            "eval_accuracy": evaluation.get("accuracy"),
            "bytes_in": rnd.bytes_in,
            # What the same updates would have cost as dense tensors (sparse embedding rows save the rest).
            "bytes_in_dense": len(rnd.pushed) * self._template.total_bytes,
            "bytes_out": rnd.bytes_out,
            "seconds_wait": round(seconds_wait, 4),
            "seconds_train": round(seconds_train, 4),
            "seconds_aggregate": round(seconds_aggregate, 4),
            "seconds_eval": round(seconds_eval, 4),
            "time": round(time.time(), 3),
        }
        for key, value in evaluation.items():
            if key not in ("loss", "accuracy"):
                row[f"eval_{key}"] = value
        with self._cond:
            self.params = new_params
            self.version = rnd.model_version + 1
            self.next_round = rnd.number + 1
            self._round = None
            self._aggregator = None
            self.metrics.append(row)
            last = rnd.number == cfg.job.rounds
            self._set_phase(Phase.FINISHED if last else Phase.WAITING)
        if rnd.number % cfg.server.checkpoint_every == 0 or rnd.number == cfg.job.rounds:
            path = save_checkpoint(self._checkpoint_dir, Checkpoint(rnd.number, self.version, new_params, list(self.metrics.history)))
            log.info("ps %s round %d: checkpoint %s", self.instance, rnd.number, path.name)
        log.info("ps %s round %d: aggregated %d updates (%d samples) in %.3fs, eval_loss=%s eval_accuracy=%s",
                 self.instance, rnd.number, len(rnd.pushed), rnd.num_samples, seconds_aggregate,
                 row["eval_loss"], row["eval_accuracy"])
        return True

    def _linger(self) -> None:
        """Answers FINISH to every joined worker, for at most LINGER_S."""
        deadline = time.monotonic() + LINGER_S
        with self._cond:
            while any(not w.finished for w in self._workers.values()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
