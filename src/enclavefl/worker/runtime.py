"""The worker: join, long-poll, pull, train locally, push the delta; repeat.

It survives a PS restart: an unreachable PS is retried with exponential
backoff (bounded by ``give_up_s``), and a PS that no longer knows this worker
(new instance, or it dropped us) is joined again. After the PS was unreachable
the channel is rebuilt and the worker joins again, so the credentials check the
(possibly new) PS certificate afresh before anything is sent.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from enclavefl.errors import (
    DeadlineExceeded,
    StaleSession,
    TransportError,
    Unavailable,
)
from enclavefl.tensors import ParamSet, SparseRows
from enclavefl.training import FitConfig, Trainer
from enclavefl.transport.client import FederationClient
from enclavefl.transport.credentials import Credentials
from enclavefl.messages import ClientSettings, JoinInfo, TaskKind

__all__ = ["Worker", "WorkerSettings", "compute_delta", "sparsify_rows"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    name: str
    chunk_bytes: int
    seed: int = 0
    poll_s: float = 10.0
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 5.0
    give_up_s: float = 300.0


def compute_delta(new: ParamSet, old: ParamSet) -> ParamSet:
    """``new - old`` per tensor, in the tensor's own dtype."""
    out = []
    for name, value in new.items():
        base = old[name]
        a = value.to_dense() if isinstance(value, SparseRows) else value
        b = base.to_dense() if isinstance(base, SparseRows) else base
        if a.dtype == np.bool_:
            out.append((name, np.zeros_like(a)))
        else:
            # asarray: on 0-d tensors (BatchNorm num_batches_tracked) ufuncs return a numpy scalar.
            out.append((name, np.asarray(np.subtract(a, b, dtype=a.dtype))))
    return ParamSet(out)


def sparsify_rows(update: ParamSet, touched: Mapping[str, np.ndarray]) -> ParamSet:
    """Sends the tensors in ``touched`` as SparseRows of those row ids (embedding tables).

    A trainer that looks up few rows per round (DLRM) reports them through a
    ``touched_rows()`` method; the PS averages each row over the workers that sent it.

    Raises:
        ValueError: a name is not in ``update`` or a row id is out of range.
    """
    out: list[tuple[str, np.ndarray | SparseRows]] = []
    for name, value in update.items():
        ids = touched.get(name)
        if ids is None:
            out.append((name, value))
            continue
        dense = value.to_dense() if isinstance(value, SparseRows) else value
        out.append((name, SparseRows.from_dense(dense, np.unique(np.asarray(ids, dtype=np.int64)))))
    unknown = sorted(set(touched) - set(update))
    if unknown:
        raise ValueError(f"touched_rows names tensors the model does not have: {unknown[:5]}")
    return ParamSet(out)


class Worker:
    """Runs one worker until the PS says the job is finished."""

    def __init__(
        self,
        target: str,
        credentials: Credentials,
        trainer: Trainer,
        settings: WorkerSettings,
        *,
        stop: threading.Event | None = None,
        make_update: Callable[[ParamSet, ParamSet], ParamSet] = compute_delta,
    ) -> None:
        self._target = target
        self._credentials = credentials
        self._trainer = trainer
        self._settings = settings
        self._stop = stop or threading.Event()
        self._make_update = make_update
        self._client: FederationClient | None = None
        self._join: JoinInfo | None = None
        self.rounds_done = 0

    def _backoff(self, started: float, attempt: int, why: Exception) -> None:
        s = self._settings
        if time.monotonic() - started > s.give_up_s:
            raise Unavailable(f"worker {s.name}: PS {self._target} unreachable for {s.give_up_s:.0f}s: {why}") from why
        delay = min(s.backoff_max_s, s.backoff_initial_s * 2**attempt) * (0.5 + random.random() / 2)
        log.info("worker %s: PS unreachable (%s), retry in %.1fs", s.name, why, delay)
        self._stop.wait(delay)

    def _connect(self) -> JoinInfo:
        started, attempt = time.monotonic(), 0
        while not self._stop.is_set():
            try:
                if self._client is None:
                    self._client = FederationClient(self._target, self._credentials, chunk_bytes=self._settings.chunk_bytes)
                info = self._client.join(self._settings.name, self._trainer.num_samples)
                log.info("worker %s: joined job %s as %s (PS instance %s)", self._settings.name, info.job_name, info.worker_id, info.ps_instance)
                return info
            except (Unavailable, DeadlineExceeded) as exc:
                self.close()  # the next channel re-verifies the PS (it may have restarted with a new key)
                self._backoff(started, attempt, exc)
                attempt += 1
        raise Unavailable(f"worker {self._settings.name}: stopped before joining")

    def run(self) -> None:
        """Blocks until FINISH (returns) or an unrecoverable error (raises).

        Raises:
            Unavailable: the PS stayed unreachable for ``give_up_s``.
            VerificationError: the PS (or we, for the PS) failed verification.
        """
        s = self._settings
        try:
            self._join = self._connect()
            started, attempt = time.monotonic(), 0
            while not self._stop.is_set():
                assert self._client is not None and self._join is not None
                try:
                    task = self._client.wait_task(self._join.worker_id, s.poll_s)
                    attempt = 0
                    started = time.monotonic()
                except StaleSession as exc:
                    log.info("worker %s: %s; joining again", s.name, exc)
                    self._join = self._connect()
                    continue
                except Unavailable as exc:
                    self._backoff(started, attempt, exc)
                    self.close()  # rebuild the channel: the PS is verified again before we rejoin
                    self._join = self._connect()
                    attempt = 0
                    started = time.monotonic()
                    continue
                except DeadlineExceeded as exc:
                    self._backoff(started, attempt, exc)
                    attempt += 1
                    continue
                if task.ps_instance != self._join.ps_instance:
                    log.info("worker %s: PS restarted (instance %s); joining again", s.name, task.ps_instance)
                    self._join = self._connect()
                    continue
                if task.kind is TaskKind.FINISH:
                    log.info("worker %s: job finished after %d rounds here (%s)", s.name, self.rounds_done, task.message)
                    return
                if task.kind is TaskKind.TRAIN:
                    try:
                        self._train_round(task.round, task.model_version, task.client)
                    except StaleSession as exc:
                        log.info("worker %s round %d: %s; joining again", s.name, task.round, exc)
                        self._join = self._connect()
                    except TransportError as exc:
                        log.warning("worker %s round %d: round lost: %s", s.name, task.round, exc)
        finally:
            self.close()

    def _train_round(self, round_: int, version: int, client_settings: ClientSettings | None) -> None:
        s = self._settings
        assert self._client is not None and self._join is not None
        t0 = time.monotonic()
        got_version, global_params, nbytes = self._client.pull_model(self._join.worker_id, version)
        t1 = time.monotonic()
        log.info("worker %s round %d: training on model version %d (%d B pulled in %.2fs)",
                 s.name, round_, got_version, nbytes, t1 - t0)
        self._trainer.set_parameters(global_params)
        if client_settings is None:
            raise TransportError(f"round {round_}: the PS sent a train task without client settings")
        c = client_settings
        result = self._trainer.fit(FitConfig(c.epochs, c.batch_size, c.lr, round=round_, seed=s.seed))
        update = self._make_update(self._trainer.get_parameters(), global_params)
        touched = getattr(self._trainer, "touched_rows", None)
        if callable(touched):
            update = sparsify_rows(update, touched())
        t2 = time.monotonic()
        metrics = dict(result.metrics)
        metrics["seconds_fit"] = t2 - t1
        reply = self._client.push_update(self._join.worker_id, round_, got_version, update, result.num_samples, metrics)
        t3 = time.monotonic()
        if reply.accepted:
            self.rounds_done += 1
            log.info("worker %s round %d: trained %.2fs (loss %.4f), pushed %d B in %.2fs, accepted",
                     s.name, round_, t2 - t1, metrics.get("loss", float("nan")), reply.bytes_sent, t3 - t2)
        else:
            log.warning("worker %s round %d: update refused by the PS: %s", s.name, round_, reply.reason)

    def close(self) -> None:
        """Closes the channel. Idempotent."""
        if self._client is not None:
            self._client.close()
            self._client = None
