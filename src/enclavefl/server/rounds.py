"""The synchronous round state machine: explicit phases and allowed transitions.

::

    WAITING ──(min_workers joined)──▶ TRAINING ──(enough updates | window)──▶ AGGREGATING
       ▲                                                                        │
       └────────────(next round, or retry of the same round)────────────────────┘
    any phase ──(last round done | fatal error)──▶ FINISHED
"""

from __future__ import annotations

import enum
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from enclavefl.errors import RoundError

__all__ = ["Phase", "RoundState", "check_transition", "sample_workers"]


class Phase(enum.Enum):
    WAITING = "waiting"          # not enough workers yet
    TRAINING = "training"        # sampled workers pull, train and push
    AGGREGATING = "aggregating"  # the server optimizer makes the next version
    FINISHED = "finished"        # every worker is told to leave


_ALLOWED = {
    Phase.WAITING: {Phase.TRAINING, Phase.FINISHED},
    Phase.TRAINING: {Phase.AGGREGATING, Phase.FINISHED},
    Phase.AGGREGATING: {Phase.WAITING, Phase.FINISHED},
    Phase.FINISHED: set(),
}


def check_transition(current: Phase, new: Phase) -> None:
    """Raises RoundError for a transition the table does not allow (a bug, loudly)."""
    if new not in _ALLOWED[current]:
        raise RoundError(f"illegal round transition {current.value} -> {new.value}")


@dataclass(slots=True)
class RoundState:
    """One attempt at a round: who was asked, who answered, and what it cost."""

    number: int
    model_version: int
    attempt: int
    sampled: frozenset[str]
    required: int
    opened_at: float = field(default_factory=time.monotonic)
    deadline: float = 0.0
    pushed: set[str] = field(default_factory=set)
    dropped: set[str] = field(default_factory=set)
    uploading: set[str] = field(default_factory=set)
    folding: int = 0
    rejected: int = 0
    num_samples: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    worker_metrics: list[dict[str, float]] = field(default_factory=list)
    closed: bool = False

    def done(self) -> bool:
        """Enough updates arrived, or nobody else can still answer."""
        if len(self.pushed) >= self.required:
            return True
        outstanding = self.sampled - self.pushed - self.dropped
        return not outstanding and not self.uploading


def sample_workers(worker_ids: Sequence[str], fraction: float, minimum: int, seed: int, round_: int, attempt: int) -> list[str]:
    """Samples ``ceil(fraction * n)`` workers (at least ``minimum``), reproducibly per round."""
    n = len(worker_ids)
    k = min(n, max(minimum, math.ceil(fraction * n)))
    rng = random.Random(f"{seed}:{round_}:{attempt}")
    return sorted(rng.sample(sorted(worker_ids), k))
