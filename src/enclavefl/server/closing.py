"""The round-close pipeline: aggregate -> post-process -> server optimizer -> evaluate -> metrics -> checkpoint.

Both engines close through it. A round whose aggregate (after the hooks) is not
finite is refused before it can become the model: the caller retries it. The
new model, its version, the metrics row and the checkpoint are installed in
that order, the first three as one change under the server lock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from enclavefl.errors import UpdateRejected
from enclavefl.server.aggregator import Aggregator
from enclavefl.server.algorithms import CloseContext
from enclavefl.server.checkpoint import Checkpoint, save_checkpoint
from enclavefl.server.core import ServerCore
from enclavefl.server.round import RoundRecord
from enclavefl.server.staging import check_finite
from enclavefl.server.strategy import Strategy
from enclavefl.tensors import ParamSet

__all__ = ["ClosePipeline", "Evaluator"]

log = logging.getLogger(__name__)

Evaluator = Callable[[ParamSet], Mapping[str, float]]
"""Scores a global model on held-out data (keys ``loss`` and ``accuracy``, say)."""


def _mean(rows: tuple[Mapping[str, float], ...], key: str) -> float | None:
    values = [float(r[key]) for r in rows if key in r]
    return float(np.mean(values)) if values else None


class ClosePipeline:
    """Turns a closed round's aggregator into the next model version, its metrics row and checkpoint."""

    def __init__(self, core: ServerCore, strategy: Strategy, evaluator: Evaluator | None, *, checkpoint_dir: Path,
                 checkpoint_every: int, dense_update_bytes: int) -> None:
        """Prepares the pipeline; the job's last round is read from ``core.config`` at each close
        (an operator may change ``job.rounds`` while the job runs)."""
        self._core = core
        self._strategy = strategy
        self._evaluator = evaluator
        self._checkpoint_dir = checkpoint_dir
        self._checkpoint_every = checkpoint_every
        self._dense_update_bytes = dense_update_bytes
        self._saved_round = core.next_round - 1  # a resumed job: that round is on disk already

    def close(self, record: RoundRecord, aggregator: Aggregator, *, seconds_wait: float,
              extra: Mapping[str, Any] | None = None, scale: float = 1.0) -> None:
        """Makes version ``record.model_version + 1`` and records round ``record.number``.

        ``scale`` multiplies the aggregate's floating tensors before anything else sees it
        (the async engine shrinks a step made of stale updates with it).

        Raises:
            UpdateRejected: the aggregate, or the model the optimizer makes of it, is not finite;
                nothing changed (the optimizer's state is restored): retry the round.
        """
        core, strategy = self._core, self._strategy
        seconds_train = time.monotonic() - record.opened_at
        context = CloseContext(record.number, len(record.pushed), max(len(core.registry), len(record.pushed)))
        t0 = time.monotonic()
        try:
            aggregate = aggregator.result()
        finally:
            aggregator.close()
        if scale != 1.0:
            aggregate = ParamSet((name, np.asarray(value * scale, dtype=value.dtype) if isinstance(value, np.ndarray)
                                  and value.dtype.kind == "f" else value) for name, value in aggregate.items())
        for hook in strategy.post_process:
            aggregate = hook(aggregate, context)
        try:
            check_finite(aggregate)
        except UpdateRejected as exc:
            raise UpdateRejected(f"round {record.number}: the aggregate is not finite ({exc}); refused") from exc
        # Parts' states are immutable snapshots: keeping them is how a refused step is undone.
        saved = (strategy.optimizer.state(), strategy.algorithm.state())
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked for just below
            new_params = strategy.algorithm.apply(core.params, aggregate, strategy.optimizer, context)
        try:
            check_finite(new_params)
        except UpdateRejected as exc:
            strategy.optimizer.load_state(saved[0])
            strategy.algorithm.load_state(saved[1])
            raise UpdateRejected(f"round {record.number}: the next model would not be finite ({exc}); refused") from exc
        seconds_aggregate = time.monotonic() - t0
        t1 = time.monotonic()
        evaluation = dict(self._evaluator(new_params)) if self._evaluator else {}
        seconds_eval = time.monotonic() - t1
        row: dict[str, Any] = {
            "round": record.number,
            "participants": len(record.pushed),
            "sampled": len(record.sampled),
            "rejected": record.rejected,
            "rejected_ids": sorted(record.rejected_ids),
            "dropped": len(record.dropped),
            "dropped_ids": sorted(record.dropped),
            "attempt": record.attempt,
            "model_version": record.model_version + 1,
            "num_samples": record.num_samples,
            "weight": record.weight,
            "train_loss": _mean(record.worker_metrics, "loss"),
            "train_accuracy": _mean(record.worker_metrics, "accuracy"),
            # Reported metrics refused at receipt since the last row (server/worker_metrics.py).
            "metrics_dropped": core.take_metrics_dropped(),
            "eval_loss": evaluation.get("loss"),
            "eval_accuracy": evaluation.get("accuracy"),
            "bytes_in": record.bytes_in,
            # What the same updates would have cost as dense tensors (sparse embedding rows save the rest).
            "bytes_in_dense": len(record.pushed) * self._dense_update_bytes,
            "bytes_out": record.bytes_out,
            "seconds_wait": round(seconds_wait, 4),
            "seconds_train": round(seconds_train, 4),
            "seconds_aggregate": round(seconds_aggregate, 4),
            "seconds_eval": round(seconds_eval, 4),
            "time": round(time.time(), 3),
        }
        for contribute in strategy.row_metrics:
            row.update(contribute())
        row.update(extra or {})
        for key, value in evaluation.items():
            if key not in ("loss", "accuracy"):
                row[f"eval_{key}"] = value
        last = record.number >= core.config.job.rounds
        core.install(new_params, record.model_version + 1, record.number + 1, row)
        if record.number % self._checkpoint_every == 0 or last:
            self._save(record.number, record.model_version + 1, new_params)
        if last:  # workers hear FINISH only once the last checkpoint is on disk
            core.finish()
        log.info("ps %s round %d: aggregated %d updates (%d samples) in %.3fs, eval_loss=%s eval_accuracy=%s",
                 core.instance, record.number, len(record.pushed), record.num_samples, seconds_aggregate,
                 row["eval_loss"], row["eval_accuracy"])

    def _save(self, round_: int, version: int, params: ParamSet) -> None:
        core = self._core
        path = save_checkpoint(self._checkpoint_dir, Checkpoint(
            round_, version, params, list(core.metrics.history), parts=core.part_states()))
        self._saved_round = round_
        log.info("ps %s round %d: checkpoint %s", core.instance, round_, path.name)

    def checkpoint_latest(self) -> None:
        """Writes the last completed round if no checkpoint holds it yet (a job that fails or is stopped)."""
        core = self._core
        with core.cond:
            round_, version, params = core.next_round - 1, core.version, core.params
        if round_ > self._saved_round and round_ >= 1:
            self._save(round_, version, params)
