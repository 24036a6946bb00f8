"""The privacy accountant: how much of the budget DP-FedAvg's rounds have spent.

Each round of DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private
Recurrent Language Models") is a subsampled Gaussian mechanism: a fraction
``q`` of the joined workers is sampled, and the noise multiplier ``z`` is the
noise's standard deviation over the sensitivity of the sum. The accountant
composes one ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` per released
round, with the round's actual ``q`` (sampled / joined), in Google's
``dp-accounting`` library: Renyi DP (Mironov 2017; the subsampled bound of
Mironov, Talwar and Zhang 2019) or privacy loss distributions (PLD), then
converts to epsilon at the job's delta. The state is the count of rounds per
distinct (q, z), so it is small, exact and order-free; it is checkpointed as the
``accountant`` part and restored on ``--resume``.

Uniform sampling without replacement of a fixed number of workers is accounted
as Poisson sampling at the same rate, as McMahan et al. do; the library offers
no exact bound for fixed-size client sampling under add/remove adjacency.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping
from typing import Any, Literal

from enclavefl.errors import CheckpointError, ConfigError
from enclavefl.server.state import PartState

__all__ = ["PrivacyAccountant"]

AccountantKind = Literal["rdp", "pld"]


def _library() -> Any:
    try:
        return importlib.import_module("dp_accounting")  # untyped: used through Any
    except ImportError as exc:
        raise ConfigError("privacy.dp.enabled needs the dp-accounting library: pip install 'enclavefl[privacy]'") from exc


class PrivacyAccountant:
    """Composes DP-FedAvg's rounds and reports (epsilon, delta); state()/load_state() for checkpoints.

    Raises:
        ConfigError: the ``dp-accounting`` library is not installed (the ``privacy`` extra).
    """

    def __init__(self, noise_multiplier: float, delta: float, kind: AccountantKind = "rdp") -> None:
        if noise_multiplier < 0 or not 0 < delta < 1:
            raise ValueError(f"need noise_multiplier >= 0 and 0 < delta < 1, got {noise_multiplier} and {delta}")
        self._dp = _library()
        self.noise_multiplier = noise_multiplier
        self.delta = delta
        self.kind = kind
        self._counts: dict[tuple[float, float], int] = {}
        """Released rounds per (sampling rate q, noise multiplier z), in first-seen order."""

    @property
    def rounds(self) -> int:
        """How many rounds were composed."""
        return sum(self._counts.values())

    def record(self, rate: float) -> None:
        """Composes one released round sampled at ``rate`` (sampled / joined)."""
        self._check_rate(rate)
        key = (float(rate), float(self.noise_multiplier))
        self._counts[key] = self._counts.get(key, 0) + 1

    def epsilon(self, *, next_rate: float | None = None) -> float:
        """Epsilon at ``delta`` for the rounds composed so far (plus one at ``next_rate``, if given).

        0 before any round; ``inf`` when the noise multiplier is 0 (no noise: no bound).
        """
        counts = dict(self._counts)
        if next_rate is not None:
            self._check_rate(next_rate)
            key = (float(next_rate), float(self.noise_multiplier))
            counts[key] = counts.get(key, 0) + 1
        if not counts:
            return 0.0
        if any(z == 0 for _, z in counts):
            return math.inf
        dp = self._dp
        if self.kind == "pld":
            accountant = dp.pld.PLDAccountant()
        else:
            accountant = dp.rdp.RdpAccountant()
        for (q, z), count in counts.items():
            accountant.compose(dp.PoissonSampledDpEvent(q, dp.GaussianDpEvent(z)), count)
        return float(accountant.get_epsilon(self.delta))

    def row(self) -> Mapping[str, float | None]:
        """``dp_epsilon`` (None when unbounded) and ``dp_delta`` for a metrics row."""
        eps = self.epsilon()
        return {"dp_epsilon": eps if math.isfinite(eps) else None, "dp_delta": self.delta}

    def state(self) -> PartState:
        events = [[q, z, count] for (q, z), count in self._counts.items()]
        return PartState({"kind": self.kind, "delta": self.delta, "events": events})

    def load_state(self, state: PartState) -> None:
        """Restores the composed rounds.

        Raises:
            CheckpointError: the state is malformed, or was kept at another delta or by the other
                accountant (its epsilon would not be the one this job reports); the accountant is unchanged.
        """
        meta = state.meta
        if meta.get("kind") != self.kind or meta.get("delta") != self.delta:
            raise CheckpointError(f"the checkpoint's accountant is {meta.get('kind')!r} at delta={meta.get('delta')!r}, "
                                  f"this job's is {self.kind!r} at delta={self.delta!r}")
        counts: dict[tuple[float, float], int] = {}
        events = meta.get("events")
        if not isinstance(events, list):
            raise CheckpointError(f"accountant events: expected a list, got {type(events).__name__}")
        for event in events:
            ok = (isinstance(event, list) and len(event) == 3 and all(isinstance(v, int | float) for v in event)
                  and isinstance(event[2], int) and event[2] > 0 and 0 < event[0] <= 1 and event[1] >= 0)
            if not ok:
                raise CheckpointError(f"accountant event {event!r}: expected [q in (0, 1], z >= 0, count > 0]")
            key = (float(event[0]), float(event[1]))
            counts[key] = counts.get(key, 0) + int(event[2])
        self._counts = counts

    @staticmethod
    def _check_rate(rate: float) -> None:
        if not 0 < rate <= 1:
            raise ValueError(f"a round's sampling rate must be in (0, 1], got {rate}")
