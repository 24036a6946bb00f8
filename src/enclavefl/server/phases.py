"""The PS's phases and the transitions the engines may make between them.

::

    WAITING ──(min_workers joined)──▶ TRAINING ──(enough updates | window)──▶ AGGREGATING
       ▲                                                                        │
       └────────────(next round, or retry of the same round)────────────────────┘
    any phase ──(last round done | fatal error)──▶ FINISHED

The async engine stays in TRAINING while it folds updates and passes through
AGGREGATING for each server step.
"""

from __future__ import annotations

import enum

from enclavefl.errors import RoundError

__all__ = ["Phase", "check_transition"]


class Phase(enum.Enum):
    WAITING = "waiting"          # not enough workers yet
    TRAINING = "training"        # sampled workers pull, train and push
    AGGREGATING = "aggregating"  # the close pipeline makes the next version
    FINISHED = "finished"        # every worker is told to leave


_ALLOWED = {
    Phase.WAITING: {Phase.TRAINING, Phase.FINISHED},
    Phase.TRAINING: {Phase.AGGREGATING, Phase.WAITING, Phase.FINISHED},
    Phase.AGGREGATING: {Phase.WAITING, Phase.TRAINING, Phase.FINISHED},
    Phase.FINISHED: set(),
}


def check_transition(current: Phase, new: Phase) -> None:
    """Raises RoundError for a transition the table does not allow (a bug, loudly)."""
    if new not in _ALLOWED[current]:
        raise RoundError(f"illegal round transition {current.value} -> {new.value}")
