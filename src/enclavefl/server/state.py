"""The checkpointable state of the server's stateful parts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from enclavefl.tensors import ParamSet

__all__ = ["PartState", "Stateful"]


@dataclass(frozen=True, slots=True)
class PartState:
    """The checkpointable state of one stateful server part (optimizer moments, step counters...)."""

    meta: Mapping[str, Any] = field(default_factory=dict)
    """JSON-able scalars, lists and dicts only."""
    tensors: ParamSet = field(default_factory=ParamSet)


class Stateful(Protocol):
    """A server part whose state goes into the checkpoint and comes back on ``--resume``."""

    def state(self) -> PartState: ...

    def load_state(self, state: PartState) -> None:
        """Restores ``state``; raises CheckpointError (part unchanged) if it does not fit."""
        ...
