"""The centralized baseline: the reference a federated run is judged against.

Trains the job's model on the pooled data (every worker's partition, that is
the whole training split: the task's trainer for worker 0 of 1) with the same
client hyper-parameters and the same number of passes (``job.rounds`` x
``client.epochs`` epochs), and scores the same held-out set after every
``client.epochs`` epochs, a "round". Rows go to ``baseline.jsonl`` in the run
directory, with the keys of ``metrics.jsonl`` where they mean the same thing,
so ``enclavefl report`` can put both curves side by side.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from enclavefl.config import JobConfig
from enclavefl.errors import ConfigError
from enclavefl.training import FitConfig, Task

__all__ = ["BASELINE_FILE", "train_baseline"]

log = logging.getLogger(__name__)

BASELINE_FILE = "baseline.jsonl"


def _clean(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def train_baseline(task: Task, config: JobConfig, out_dir: Path) -> list[dict[str, Any]]:
    """Runs the centralized training and writes ``out_dir/baseline.jsonl``; returns its rows.

    Each row is written (and flushed) as its round ends, and one log line per
    round reports progress: a centralized run of a large model takes a while.

    Raises:
        ConfigError: the task has no held-out evaluation set.
    """
    evaluator = task.server_evaluator()
    if evaluator is None:
        raise ConfigError(f"task {config.task.name!r} has no held-out set; a baseline needs one to score")
    trainer = task.worker_trainer(0, 1)
    trainer.set_parameters(task.initial_parameters())
    c = config.client
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / BASELINE_FILE
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    with path.open("w", encoding="utf-8") as f:
        for rnd in range(1, config.job.rounds + 1):
            t0 = time.monotonic()
            result = trainer.fit(FitConfig(c.epochs, c.batch_size, c.lr, round=rnd, seed=config.job.seed))
            evaluator.set_parameters(trainer.get_parameters())
            evaluation = dict(evaluator.evaluate())
            row: dict[str, Any] = {
                "round": rnd,
                "epochs": rnd * c.epochs,
                "num_samples": result.num_samples,
                "train_loss": result.metrics.get("loss"),
                "train_accuracy": result.metrics.get("accuracy"),
                "eval_loss": evaluation.get("loss"),
                "eval_accuracy": evaluation.get("accuracy"),
            }
            row.update({f"eval_{k}": v for k, v in evaluation.items() if k not in ("loss", "accuracy")})
            row["seconds"] = round(time.monotonic() - t0, 4)
            row["seconds_total"] = round(time.monotonic() - started, 4)
            row = {k: _clean(v) for k, v in row.items()}
            f.write(json.dumps(row, separators=(",", ":")) + "\n")
            f.flush()
            rows.append(row)
            auc = f" eval_auc={row['eval_auc']}" if row.get("eval_auc") is not None else ""
            log.info("baseline round %d/%d: eval_loss=%s eval_accuracy=%s%s (%.1fs)", rnd, config.job.rounds,
                     row["eval_loss"], row["eval_accuracy"], auc, row["seconds"])
    return rows
