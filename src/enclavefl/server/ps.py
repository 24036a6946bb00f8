"""The parameter server: a thin facade that wires the server's parts and answers workers.

How this works: gRPC threads (or an in-memory transport) call the
:class:`~enclavefl.messages.FederationHandler` methods (join, wait_task,
model_for, open_update, leave, heartbeat); the engine thread runs :meth:`run`,
which owns every phase transition. The parts:

- :class:`~enclavefl.server.core.ServerCore`: the lock, phase, global model, worker registry;
- :class:`~enclavefl.server.strategy.Strategy`: sampler, aggregator factory, server optimizer, client algorithm;
- an engine (:class:`~enclavefl.server.engine.SyncEngine` or
  :class:`~enclavefl.server.async_engine.AsyncEngine`) that opens and closes rounds;
- :class:`~enclavefl.server.staging.StagedUpdate`: bounded decode of one upload;
- :class:`~enclavefl.server.closing.ClosePipeline`: aggregate to next model, metrics, checkpoint;
- :class:`~enclavefl.server.liveness.LivenessMonitor`: drops workers silent for ``round.worker_timeout_s``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn

from enclavefl.bufferpool import BufferPool
from enclavefl.compression import CompressedDecoder
from enclavefl.config import JobConfig
from enclavefl.errors import CheckpointError, ConfigError, ProtocolError, RoundError, UpdateRejected
from enclavefl.messages import JoinInfo, PeerIdentity, TaskInfo, TaskKind, UpdateKind, UpdateMeta, UpdateSink
from enclavefl.server.checkpoint import Checkpoint, params_digest
from enclavefl.server.closing import ClosePipeline, Evaluator
from enclavefl.server.core import ServerCore
from enclavefl.server.downloads import DownloadPolicy
from enclavefl.server.engine import Engine, SyncEngine
from enclavefl.server.liveness import LivenessMonitor
from enclavefl.server.metrics import MetricsLog
from enclavefl.server.phases import Phase
from enclavefl.server.registry import WorkerRecord
from enclavefl.server.staging import StagedUpdate, UpdateTarget
from enclavefl.server.state import PartState, Stateful
from enclavefl.server.strategy import Strategy, build_strategy
from enclavefl.server.worker_metrics import WORKER_METRICS, check_worker_metrics
from enclavefl.tensors import CodecLimits, ParamSet, StreamDecoder, StreamHeader

if TYPE_CHECKING:
    from enclavefl.management.schema import Identity
    from enclavefl.privacy.secagg.stages import SecAggAnswer, SecAggCall
    from enclavefl.server.handle import AttestationMode, PsHandle

__all__ = ["EngineFactory", "Evaluator", "ParameterServer"]

log = logging.getLogger(__name__)

EngineFactory = Callable[[ServerCore, Strategy, ClosePipeline, StreamHeader], Engine]
"""Makes the engine that runs the rounds, given the core, strategy, close pipeline and upload template."""


class ParameterServer:
    """Owns the global model and the rounds; implements the worker-facing handler contract."""

    def __init__(
        self,
        config: JobConfig,
        initial: ParamSet,
        *,
        out_dir: Path,
        evaluator: Evaluator | None = None,
        resume_from: Checkpoint | None = None,
        limits: CodecLimits | None = None,
        strategy: Strategy | None = None,
        engine: EngineFactory | None = None,
    ) -> None:
        """Builds the server's parts; nothing runs until :meth:`run`.

        Args:
            strategy: the parts that decide what a round does; default: the job file's.
            engine: makes the engine that runs the rounds (a cluster server's opens and closes them
                through the shared store); default: the job's ``round.mode`` (sync or async).

        Raises:
            RoundError: ``resume_from`` does not fit this task's model.
            CheckpointError: its saved strategy state does not fit this strategy.
            ConfigError: the job's strategy settings are refused by a part.
        """
        self._limits = limits or CodecLimits(
            max_total_bytes=config.server.max_update_bytes, max_chunk_bytes=config.transport.chunk_bytes
        )
        template = StreamHeader.of(initial)
        self.strategy = strategy or build_strategy(config, template, spill_dir=out_dir / "spill")
        self._slots = threading.Semaphore(config.server.max_concurrent_uploads)
        # One resident payload buffer per upload slot, reused round after round (no page faults),
        # for models up to 256 MiB: a larger one is freed after each upload, so that the close of a
        # round (old model, aggregate, new model) does not also hold idle upload buffers.
        self._upload_buffers = BufferPool(config.server.max_concurrent_uploads, max_buffer_bytes=256 * 2**20)
        params, version, next_round, history = initial, 0, 1, []
        if resume_from is not None:
            reason = StreamHeader.of(resume_from.params).matches(template)
            if reason is not None:
                raise RoundError(f"checkpoint {resume_from.path} does not fit this task's model: {reason}")
            params, version, next_round = resume_from.params, resume_from.model_version, resume_from.round + 1
            history = resume_from.history
        self._downloads = DownloadPolicy(config, params, version)
        self.strategy = dataclasses.replace(self.strategy, row_metrics=(*self.strategy.row_metrics, self._downloads.row))
        self.metrics = MetricsLog(out_dir / config.summary.metrics_file, history)
        self.core = ServerCore(params, version=version, next_round=next_round, metrics=self.metrics,
                               part_states=self._part_states, config=config)
        self.core.install_hooks.append(self._downloads.on_install)
        self.metrics.subscribe(self._publish_row)
        self._template = template
        upload_template = self.strategy.algorithm.upload_template(template)
        dense_upload = upload_template
        # What every upload must announce: compressed jobs push QUANTIZED encodings of their delta.
        compressed = config.privacy.compression.upload.type != "none"
        self._upload_kind = UpdateKind.QUANTIZED if compressed else UpdateKind.DELTA
        if self.strategy.stages is not None:  # secure aggregation: workers upload masked words
            upload_template, self._upload_kind = self.strategy.stages.upload(upload_template)
        pipeline = ClosePipeline(
            self.core, self.strategy, evaluator, checkpoint_dir=out_dir / config.server.checkpoint_dir,
            checkpoint_every=config.server.checkpoint_every,
            dense_update_bytes=dense_upload.total_bytes,
        )
        self._handle: PsHandle | None = None
        self._handle_lock = threading.Lock()
        self.engine: Engine
        if engine is not None:
            self.engine = engine(self.core, self.strategy, pipeline, upload_template)
        elif config.round.mode == "async":
            from enclavefl.server.async_engine import AsyncEngine

            self.engine = AsyncEngine(self.core, self.strategy, pipeline, upload_template)
        else:
            self.engine = SyncEngine(self.core, self.strategy, pipeline, upload_template)
        if resume_from is not None:
            self._load_parts(resume_from)
            log.info("ps %s resumed from %s: next round %d, model version %d, digest %s", self.instance,
                     resume_from.path, next_round, version, params_digest(params)[:16])

    # ------------------------------------------------------------ state
    @property
    def config(self) -> JobConfig:
        """The job's settings now (the job file's, with an operator's changes since; see :meth:`handle`)."""
        return self.core.config

    @property
    def instance(self) -> str:
        return self.core.instance

    @property
    def params(self) -> ParamSet:
        return self.core.params

    @property
    def version(self) -> int:
        return self.core.version

    @property
    def next_round(self) -> int:
        return self.core.next_round

    def _stateful_parts(self) -> dict[str, Stateful]:
        """Every part whose state the checkpoint holds, by name (the strategy may add some)."""
        parts: dict[str, Stateful] = {
            "optimizer": self.strategy.optimizer, "algorithm": self.strategy.algorithm, "engine": self.engine,
        }
        for name, part in self.strategy.parts:
            if name in parts:
                raise ConfigError(f"strategy part {name!r}: the name is taken by a built-in part")
            parts[name] = part
        return parts

    def _part_states(self) -> dict[str, PartState]:
        return {name: part.state() for name, part in self._stateful_parts().items()}

    def _load_parts(self, ckpt: Checkpoint) -> None:
        parts = self._stateful_parts()
        for name, part in parts.items():
            state = ckpt.parts.get(name)
            if state is not None:
                try:
                    part.load_state(state)
                except CheckpointError as exc:
                    raise CheckpointError(f"{ckpt.path}: {name}: {exc}") from exc

    def run(self) -> None:
        """Runs the job's rounds, then tells workers to finish; workers silent for too long are dropped meanwhile.

        Raises:
            RoundError: too few workers or updates within ``round.max_retries`` retries, or
                fewer than ``round.min_workers`` after workers were lost and a start window passed.
        """
        with self.core.cond:
            self.core.running = True
        with LivenessMonitor(self.core, self._drop_silent, timeout_s=self.config.round.worker_timeout_s):
            self.engine.run()

    def stop(self, mode: Literal["finish", "abort"] = "abort") -> None:
        """Ends the job from another thread; the last completed round is checkpointed either way.

        Args:
            mode: ``abort``: the open round is abandoned; ``finish``: it completes (aggregated,
                checkpointed, its metrics row written) and no other opens.

        ``run()`` returns (after telling workers to finish) without raising.
        """
        if mode == "finish":
            self.core.request_finish()
        else:
            self.core.request_stop()

    def handle(self, *, attestation_mode: AttestationMode | None = None,
               identity: Identity | None = None) -> PsHandle:
        """The management plane's view of this PS (:class:`~enclavefl.server.handle.PsHandle`), made once.

        The first call makes it; later calls return the same handle and ignore their arguments.

        Args:
            attestation_mode: shown in its status; default the job's ``attestation.mode``.
            identity: what this PS's own attestation proves, for its status; default: no evidence
                (see :meth:`PsHandle.connect_credentials`, which fills it in from the PS's credentials).
        """
        from enclavefl.server.handle import PsHandle

        with self._handle_lock:
            if self._handle is None:
                self._handle = PsHandle(self, attestation_mode=attestation_mode, identity=identity)
            return self._handle

    def _publish_row(self, row: dict[str, Any]) -> None:
        self.core.events.publish("round", **row)

    # ---------------------------------------------------------- handler
    def join(self, peer: PeerIdentity, worker_name: str, num_samples: int) -> JoinInfo:
        core = self.core
        with core.cond:
            record, stale = core.registry.add(peer, worker_name, num_samples)
            for old in stale:
                self._drop(old, "re-joined")
            log.info("ps %s round %d: worker %s (%s, %s) joined, %d joined", core.instance, core.next_round,
                     record.worker_id, record.name, peer.label, len(core.registry))
            core.cond.notify_all()
        return JoinInfo(record.worker_id, self.config.job.name, core.instance, self.config.job.rounds,
                        heartbeat_s=self.config.round.heartbeat_s)

    def wait_task(self, peer: PeerIdentity, worker_id: str, max_wait_s: float) -> TaskInfo:
        core = self.core
        # A long-poll ends by round.heartbeat_s, so a waiting worker is heard that often (its next poll).
        deadline = time.monotonic() + min(max_wait_s, self.config.round.heartbeat_s)
        with core.cond:
            while True:
                worker = core.registry.get(peer, worker_id)
                if core.phase is Phase.FINISHED:
                    self.engine.before_finish(worker)  # a cluster server that left sends the worker on instead
                    worker.finished = True
                    core.cond.notify_all()
                    return TaskInfo(TaskKind.FINISH, core.instance, message=core.failure or "job complete")
                task = None if core.stopping else self.engine.task_for(worker)
                if task is not None:
                    core.registry.set_state(worker.worker_id, "training")
                    return task
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return TaskInfo(TaskKind.WAIT, core.instance, round=core.next_round, retry_after_s=0.0,
                                    config=self.engine.wait_config(worker))
                core.cond.wait(remaining)

    def model_for(self, peer: PeerIdentity, worker_id: str, model_version: int) -> tuple[int, ParamSet]:
        with self.core.cond:
            worker = self.core.registry.get(peer, worker_id)
            params, version = self.core.params, self.core.version
            # model_version: the version the worker holds (-1: none); changed rows are relative to it.
            outgoing = self._downloads.encode(self.strategy.algorithm.broadcast(params), version, model_version,
                                              worker_id)
            if not self._downloads.compresses:
                self.engine.on_download(worker_id, outgoing.nbytes)
                worker.bytes_out += outgoing.nbytes
                return version, outgoing
        # Quantizing a large model takes a while: outside the PS lock (once per version, shared by every download).
        outgoing = self._downloads.compress(outgoing, version)
        with self.core.cond:
            self.engine.on_download(worker_id, outgoing.nbytes)
            worker.bytes_out += outgoing.nbytes
        return version, outgoing

    def _weight_cap(self, worker: WorkerRecord, claimed: int) -> int:
        """A worker's ``num_samples`` is a claim: capped by its join declaration and the job's limit."""
        cap = self.config.server.max_weight_per_update
        limit = worker.num_samples if cap is None else min(worker.num_samples, cap)
        return min(claimed, limit)

    def open_update(self, peer: PeerIdentity, meta: UpdateMeta) -> UpdateSink:
        core = self.core
        with core.cond:
            worker = core.registry.get(peer, meta.worker_id)
            reason = None
            if meta.kind is not self._upload_kind:
                reason = (f"update kind {meta.kind.value} is not what this job aggregates ({self._upload_kind.value}, "
                          f"privacy.compression.upload.type {self.config.privacy.compression.upload.type})")
            elif meta.num_samples <= 0:
                reason = f"num_samples must be positive, got {meta.num_samples}"
            elif worker.num_samples <= 0:
                reason = f"worker {meta.worker_id} declared no training samples at join"
            else:
                reason = meta.tensors.matches(self.engine.upload_template)
            target: UpdateTarget | None = None
            staleness, deadline = 0, 0.0
            if reason is not None:
                self.engine.note_rejection(meta.worker_id)
            else:
                try:
                    target, staleness, deadline = self.engine.target_for(meta)
                except UpdateRejected as exc:  # the target counted it
                    reason = str(exc)
            if reason is not None or target is None:
                log.warning("ps %s round %d: rejected update from %s: %s", core.instance, meta.round, meta.worker_id, reason)
                self._note_update(worker, meta.round, False, str(reason), 0)
                raise UpdateRejected(str(reason))
            num_samples = self._weight_cap(worker, meta.num_samples)
            weight = float(num_samples) * self.engine.staleness_weight(staleness)
            kept, dropped = check_worker_metrics(meta.metrics)
            if dropped:
                core.note_metrics_dropped(len(dropped))
                meta = dataclasses.replace(meta, metrics=kept)
        if dropped:
            shown = ", ".join(repr(k[:40]) for k in dropped[:5]) + (f" and {len(dropped) - 5} more" if len(dropped) > 5 else "")
            log.warning("ps %s round %d: dropped %d reported metrics from %s: %s (expected finite values of %s)",
                        core.instance, meta.round, len(dropped), meta.worker_id, shown,
                        ", ".join(f"{k} in [{lo:g}, {hi:g}]" for k, (lo, hi) in WORKER_METRICS.items()))
        if num_samples < meta.num_samples:
            log.info("ps %s round %d: worker %s claimed %d samples, weighed as %d", core.instance, meta.round,
                     meta.worker_id, meta.num_samples, num_samples)
        if not self._slots.acquire(timeout=max(deadline - time.monotonic(), 0.1)):
            self._refuse(target, meta, "no upload slot before the round closed")
        try:
            decoder: StreamDecoder | CompressedDecoder
            if meta.kind is UpdateKind.QUANTIZED:  # decoded chunk by chunk into the staged dense tensors
                decoder = CompressedDecoder(meta.tensors, self._limits, expected=self.engine.upload_template)
            else:
                decoder = StreamDecoder(meta.tensors, self._limits, expected=self.engine.upload_template,
                                        pool=self._upload_buffers)
        except ProtocolError as exc:
            self._slots.release()
            self._refuse(target, meta, str(exc))
        staged_to: UpdateTarget = target

        def ended(accepted: bool, reason: str, nbytes: int) -> None:
            with core.cond:
                self._note_update(worker, staged_to.number, accepted, reason, nbytes)

        return StagedUpdate(target, meta, decoder, self._slots, weight=weight, num_samples=num_samples,
                            staleness=staleness, log_prefix=f"ps {core.instance}", on_end=ended)

    def _refuse(self, target: UpdateTarget, meta: UpdateMeta, reason: str) -> NoReturn:
        """Forgets an upload that never got staged, logs why and refuses it."""
        target.note_rejection(meta.worker_id)
        target.end_upload(meta.worker_id)
        log.warning("ps %s round %d: rejected update from %s: %s", self.core.instance, meta.round, meta.worker_id, reason)
        with self.core.cond:
            worker = self.core.registry.find(meta.worker_id)
            if worker is not None:
                self._note_update(worker, meta.round, False, reason, 0)
        raise UpdateRejected(reason)

    def _note_update(self, worker: WorkerRecord, round_: int, accepted: bool, reason: str, nbytes: int) -> None:
        """Records how an upload ended in the worker's row and publishes it (caller holds the lock)."""
        if accepted:
            worker.rounds_contributed += 1
            worker.bytes_in += nbytes
        if worker.worker_id in self.core.registry:  # a departed worker keeps its final state
            self.core.registry.set_state(worker.worker_id, "uploaded" if accepted else "joined")
        self.core.events.publish("update", round=round_, worker_id=worker.worker_id, worker=worker.name,
                                 accepted=accepted, reason=reason, bytes=nbytes)

    def leave(self, peer: PeerIdentity, worker_id: str, reason: str) -> None:
        with self.core.cond:
            self.core.registry.get(peer, worker_id)
            self._drop(worker_id, f"left: {reason}", lost=True, state="left")
            self.core.cond.notify_all()

    def heartbeat(self, peer: PeerIdentity, worker_id: str) -> None:
        """Notes that the worker is alive (``registry.get`` stamps it).

        Raises:
            StaleSession: the worker was dropped (or joined another PS instance): it must join again.
        """
        with self.core.cond:
            self.core.registry.get(peer, worker_id)

    def secagg_exchange(self, peer: PeerIdentity, call: SecAggCall) -> SecAggAnswer:
        """A worker's secure-aggregation stage call (see :class:`~enclavefl.privacy.secagg.stages.SecAggHandler`).

        Raises:
            ProtocolError: this job runs no secure aggregation, or the message is refused.
            RoundError: no open attempt has the call's round and nonce.
            StaleSession: the worker is not (or no longer) joined.
        """
        exchange = getattr(self.strategy.stages, "exchange", None)
        if exchange is None:
            raise ProtocolError("SecAggExchange: this job runs no secure aggregation")
        with self.core.cond:
            self.core.registry.get(peer, call.worker_id)  # the caller owns the id; stamps it alive
        answer: SecAggAnswer = exchange(peer, call)
        return answer

    def _drop_silent(self, worker_id: str, why: str) -> None:
        """The liveness monitor's verdict (caller holds the lock)."""
        self._drop(worker_id, why, lost=True)
        self.core.cond.notify_all()

    def _drop(self, worker_id: str, why: str, *, lost: bool = False,
              state: Literal["dropped", "left"] = "dropped") -> None:
        """Forgets a worker (caller holds the lock).

        Args:
            lost: the worker is gone (silent, or it left), rather than replaced by a new session of its own.
            state: how the management plane shows it: ``left`` (it said so) or ``dropped``.
        """
        record = self.core.registry.remove(worker_id, state=state, reason=why)
        if record is None:
            return
        self.engine.on_drop(worker_id)
        log.warning("ps %s round %d: worker %s (%s) dropped (%s)", self.core.instance, self.core.next_round,
                    worker_id, record.name, why)
        if lost:
            self.engine.note_lost(record.name)
