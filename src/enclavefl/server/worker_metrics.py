"""The metrics a worker reports with its update, checked at receipt: they are data from a peer.

A worker's ``loss``, ``accuracy`` and timing reach ``metrics.jsonl`` (as the
round's ``train_loss`` and ``train_accuracy`` means), so one NaN or a value
like 3.3e307 would spoil the round's row for everyone. Only the keys this
release's workers send are kept, and only finite values within each key's
range; the rest are dropped, logged and counted in the round's row
(``metrics_dropped``). The update itself is judged on its tensors, not on
these numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

__all__ = ["WORKER_METRICS", "check_worker_metrics"]

WORKER_METRICS: Final[Mapping[str, tuple[float, float]]] = MappingProxyType({
    "loss": (0.0, 1e9),  # a training loss is >= 0; above 1e9 it is a broken or hostile worker's
    "accuracy": (0.0, 1.0),  # a fraction of the local samples
    "seconds_fit": (0.0, 30 * 24 * 3600.0),  # local training time; a month bounds any round
})
"""Each metric a worker may report, with its inclusive range ``(low, high)``."""


def check_worker_metrics(metrics: Mapping[str, float]) -> tuple[dict[str, float], list[str]]:
    """Splits a worker's reported metrics into the ones kept and the names of the ones dropped.

    Kept: a key of :data:`WORKER_METRICS` whose value is a finite number within
    its range. Dropped: anything else (unknown key, NaN, infinity, out of range).

    Returns:
        ``(kept, dropped)``: the kept metrics as floats, and the dropped keys in the order given.
    """
    kept: dict[str, float] = {}
    dropped: list[str] = []
    for key, value in metrics.items():
        bounds = WORKER_METRICS.get(key)
        number = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan
        if bounds is None or not math.isfinite(number) or not bounds[0] <= number <= bounds[1]:
            dropped.append(key)
        else:
            kept[key] = number
    return kept, dropped
