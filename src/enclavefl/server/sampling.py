"""Client sampling: which of the joined workers a round asks to train."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Candidate", "Sampler", "UniformSampler"]


@dataclass(frozen=True, slots=True)
class Candidate:
    """A joined worker as a sampler sees it: its id for this PS, its stable name and its data size."""

    worker_id: str
    name: str
    num_samples: int


class Sampler(Protocol):
    """Picks the workers of one attempt at a round. Must be reproducible for a given seed."""

    def sample(self, candidates: Sequence[Candidate], round_: int, attempt: int) -> list[str]:
        """Returns the worker ids to ask (a non-empty subset of ``candidates``)."""
        ...


@dataclass(frozen=True, slots=True)
class UniformSampler:
    """``ceil(fraction * n)`` workers (at least ``minimum``), uniformly, seeded per round and attempt.

    Workers are ordered by name before sampling, not by their per-PS ids (which
    are random), so the same job with the same seed samples the same workers in
    every run, in-process or over the network.
    """

    fraction: float = 1.0
    minimum: int = 1
    seed: int = 0

    def sample(self, candidates: Sequence[Candidate], round_: int, attempt: int) -> list[str]:
        n = len(candidates)
        k = min(n, max(self.minimum, math.ceil(self.fraction * n - 1e-9)))
        ordered = sorted(candidates, key=lambda c: (c.name, c.worker_id))
        rng = random.Random(f"{self.seed}:{round_}:{attempt}")
        return sorted(c.worker_id for c in rng.sample(ordered, k))
