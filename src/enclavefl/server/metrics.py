"""``metrics.jsonl``: one flat JSON object per completed round.

The keys listed in :data:`REQUIRED_KEYS` are a contract: later features add
keys, never rename these.
"""

from __future__ import annotations

import json
import math
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["REQUIRED_KEYS", "MetricsLog", "RowListener"]

log = logging.getLogger(__name__)

RowListener = Callable[[dict[str, Any]], None]
"""Receives a copy of each row as it is recorded (progress output, dashboards, event streams)."""

REQUIRED_KEYS = (
    "round",
    "participants",
    "num_samples",
    "train_loss",
    "train_accuracy",
    "eval_loss",
    "eval_accuracy",
    "bytes_in",
    "bytes_out",
    "seconds_wait",
    "seconds_train",
    "seconds_aggregate",
)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Appends rounds to a JSONL file and keeps the history for checkpoints."""

    def __init__(self, path: Path, history: Iterable[Mapping[str, Any]] = ()) -> None:
        self.path = path
        self.history: list[dict[str, Any]] = [dict(h) for h in history]
        self._listeners: list[RowListener] = []
        path.parent.mkdir(parents=True, exist_ok=True)
        # Rewritten from the history, so a resumed job's file matches its checkpoint.
        with path.open("w", encoding="utf-8") as f:
            for row in self.history:
                f.write(json.dumps(row, separators=(",", ":")) + "\n")

    def append(self, row: Mapping[str, Any]) -> None:
        missing = [k for k in REQUIRED_KEYS if k not in row]
        if missing:
            raise ValueError(f"metrics row lacks {missing}")
        clean = {k: _clean(v) for k, v in row.items()}
        self.history.append(clean)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(clean, separators=(",", ":")) + "\n")
        for listener in list(self._listeners):
            try:
                listener(dict(clean))
            except Exception:
                # The row and the model are already recorded: a failing listener must not fail the round.
                log.exception("a metrics listener failed on round %s; the job goes on", clean.get("round"))

    def subscribe(self, listener: RowListener) -> None:
        """Calls ``listener`` with each later row, on the thread that records it (keep it short)."""
        self._listeners.append(listener)
