"""Adaptive clipping for DP-FedAvg: the clipping bound follows a quantile of the update norms.

Andrew, Thakkar, McMahan and Ramaswamy 2021 ("Differentially Private Learning
with Adaptive Clipping"). In round t every sampled worker clips to the bound
``C_t`` and also reports one bit ``b_i = [||delta_i|| <= C_t]`` (measured before
clipping). The PS estimates the fraction of unclipped updates privately,

    b = (sum_i b_i + N(0, sigma_b^2)) / m,

over the ``m`` sampled workers (one that sent nothing adds no bit), and moves
the bound geometrically towards the ``gamma`` quantile of the norms:

    C_{t+1} = C_t * exp(-eta_C * (b - gamma)).

The count and the update are released together. Their noises compose: with
the count centred (``b_i - 1/2``, sensitivity 1/2) the pair is one Gaussian
mechanism whose noise multiplier z satisfies ``z^-2 = z_delta^-2 + (2 sigma_b)^-2``,
so the update's noise multiplier is ``z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)``
(their Theorem 1) and the accountant keeps composing rounds at ``z``.
The bound's history is checkpointed, and the count's noise is drawn from the
job seed and round, so a resumed job continues bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from enclavefl.errors import CheckpointError
from enclavefl.server.state import PartState

__all__ = ["AdaptiveClip", "ClipStep", "next_clip_norm", "update_noise_multiplier"]

_COUNT_STREAM = 0x44505F43  # the count's noise: apart from the update's noise and the sampler's stream


def update_noise_multiplier(noise_multiplier: float, count_stddev: float | None) -> float:
    """z_delta, the update's share of noise multiplier ``z`` once the count takes its share.

    0 when ``z`` is 0 (no noise at all). Raises ValueError unless ``2 * count_stddev > z``.
    """
    if noise_multiplier == 0:
        return 0.0
    if count_stddev is None or not 2 * count_stddev > noise_multiplier:
        raise ValueError(f"the count's noise sigma_b={count_stddev} must exceed z/2={noise_multiplier / 2:g}")
    return float((noise_multiplier**-2 - (2 * count_stddev) ** -2) ** -0.5)


def next_clip_norm(clip_norm: float, unclipped: float, target_quantile: float, learning_rate: float) -> float:
    """``C * exp(-eta * (b - gamma))``: the geometric update of Andrew et al. 2021."""
    return float(clip_norm * math.exp(-learning_rate * (unclipped - target_quantile)))


@dataclass(frozen=True, slots=True)
class ClipStep:
    """One round's use of the bound: the round, the bound it clipped to, and the noised unclipped fraction."""

    round: int
    clip_norm: float
    unclipped: float


class AdaptiveClip:
    """The current bound, its update rule and its history; the ``dp_clip`` checkpoint part."""

    def __init__(self, initial: float, *, target_quantile: float, learning_rate: float,
                 count_stddev: float | None, seed: int) -> None:
        self.clip_norm = float(initial)
        self.target_quantile = target_quantile
        self.learning_rate = learning_rate
        self.count_stddev = count_stddev or 0.0
        self.seed = seed
        self.history: list[ClipStep] = []

    @property
    def last(self) -> ClipStep | None:
        """The latest round's step, or None before the first."""
        return self.history[-1] if self.history else None

    def step(self, round_: int, unclipped_sum: float, sampled: int) -> ClipStep:
        """Noises the round's count of unclipped updates, records it and moves the bound.

        Args:
            unclipped_sum: sum of the received bits.
            sampled: m, the workers sampled for the round.
        """
        noise = 0.0
        if self.count_stddev > 0:
            noise = float(np.random.default_rng([self.seed, round_, _COUNT_STREAM]).normal(0.0, self.count_stddev))
        unclipped = (unclipped_sum + noise) / max(sampled, 1)
        step = ClipStep(round_, self.clip_norm, unclipped)
        self.history.append(step)
        self.clip_norm = next_clip_norm(self.clip_norm, unclipped, self.target_quantile, self.learning_rate)
        return step

    def state(self) -> PartState:
        history = [[s.round, s.clip_norm, s.unclipped] for s in self.history]
        return PartState({"clip_norm": self.clip_norm, "history": history})

    def load_state(self, state: PartState) -> None:
        """Restores the bound and its history.

        Raises:
            CheckpointError: the state is malformed; the part is unchanged.
        """
        meta = state.meta
        clip, history = meta.get("clip_norm"), meta.get("history")
        if isinstance(clip, bool) or not isinstance(clip, int | float) or not (clip > 0 and math.isfinite(clip)):
            raise CheckpointError(f"dp_clip clip_norm: expected a positive finite number, got {clip!r}")
        if not isinstance(history, list):
            raise CheckpointError(f"dp_clip history: expected a list, got {type(history).__name__}")
        steps = []
        for entry in history:
            ok = (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], int)
                  and all(isinstance(v, int | float) and not isinstance(v, bool) for v in entry[1:]))
            if not ok:
                raise CheckpointError(f"dp_clip history entry {entry!r}: expected [round, clip_norm, unclipped]")
            steps.append(ClipStep(int(entry[0]), float(entry[1]), float(entry[2])))
        self.clip_norm = float(clip)
        self.history = steps
