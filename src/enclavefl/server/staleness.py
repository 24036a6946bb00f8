"""Staleness functions s(tau): how much an update trained on an older model still counts.

In asynchronous training an update reaches the server ``tau`` server steps
after the model it was trained on; the older it is, the less it should pull
the new model. The async engine multiplies an update's weight by ``s(tau)``.
The three shapes here are the ones the job file's ``round.staleness`` names:

- constant: ``s(tau) = 1``, every update counts fully;
- polynomial: ``s(tau) = (1 + tau) ** -a``, the FedBuff default with ``a = 0.5``
  (Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous Aggregation");
- hinge: ``s(tau) = 1`` up to ``cutoff``, then ``1 / (slope * (tau - cutoff) + 1)``
  (Xie et al. 2019, "Asynchronous Federated Optimization", FedAsync).

Each is a positive, non-increasing function of ``tau >= 0`` with ``s(0) = 1``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import final

from enclavefl.config import ConstantStaleness, HingeStaleness, PolynomialStaleness

__all__ = ["Constant", "Hinge", "Polynomial", "StalenessFunction", "make_staleness"]

StalenessFunction = Callable[[int], float]
"""s(tau): the factor an update ``tau`` server steps old is weighed with."""


def _check_tau(tau: int) -> None:
    # A negative staleness means an update from the future: the caller's bug, not a worker's.
    if tau < 0:
        raise ValueError(f"staleness must be >= 0 server steps, got tau={tau}")


@final
@dataclass(frozen=True, slots=True)
class Constant:
    """s(tau) = 1: staleness is ignored."""

    def __call__(self, tau: int) -> float:
        _check_tau(tau)
        return 1.0


@final
@dataclass(frozen=True, slots=True)
class Polynomial:
    """s(tau) = (1 + tau) ** -exponent; exponent 0 is the constant function."""

    exponent: float

    def __call__(self, tau: int) -> float:
        _check_tau(tau)
        return float((1.0 + tau) ** -self.exponent)


@final
@dataclass(frozen=True, slots=True)
class Hinge:
    """s(tau) = 1 for tau <= cutoff, else 1 / (slope * (tau - cutoff) + 1)."""

    slope: float
    cutoff: int

    def __call__(self, tau: int) -> float:
        _check_tau(tau)
        if tau <= self.cutoff:
            return 1.0
        return 1.0 / (self.slope * (tau - self.cutoff) + 1.0)


def make_staleness(config: ConstantStaleness | PolynomialStaleness | HingeStaleness) -> StalenessFunction:
    """The staleness function ``round.staleness`` describes.

    Args:
        config: one variant of the job file's ``round.staleness`` union (already validated).
    """
    if isinstance(config, PolynomialStaleness):
        return Polynomial(config.exponent)
    if isinstance(config, HingeStaleness):
        return Hinge(config.slope, config.cutoff)
    return Constant()
