"""Central client-level differential privacy on the PS: DP-FedAvg.

McMahan et al. 2018 ("Learning Differentially Private Recurrent Language
Models"), with fixed weights: every sampled worker clips its whole update to
L2 norm ``C`` (:mod:`enclavefl.norms`), the PS averages the clipped updates with
*equal* weights over the ``m`` workers sampled for the round (a worker that
sent nothing counts as a zero update), and adds Gaussian noise to the mean:

    mean = (1/m) * sum_i clip(delta_i),    noise ~ N(0, (z * C / m)^2) per coordinate.

Adding or removing one worker moves the sum by at most ``C``, so the sum's noise
``z * C`` makes each round a Gaussian mechanism with noise multiplier ``z``;
dividing both by ``m`` keeps the ratio. ``num_samples`` is ignored: a weight
that grows with a worker's data would let one worker move the mean by more
than ``C / m``. The PS measures every update again and refuses one whose norm
exceeds ``C`` (a worker outside an enclave runs code nobody attested), and the
:class:`~enclavefl.server.accountant.PrivacyAccountant` composes the rounds.

The noise is drawn from a numpy Generator seeded with (job seed, round), so a
rerun of the same job adds the same noise, and a resumed job continues the sequence.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from enclavefl.config import DpConfig
from enclavefl.errors import UpdateRejected
from enclavefl.norms import update_norm
from enclavefl.server.accountant import PrivacyAccountant
from enclavefl.server.aggregator import Aggregator, WeightedMean
from enclavefl.server.algorithms import CloseContext
from enclavefl.tensors import Array, ParamSet, SparseRows, StreamHeader, Tensor

__all__ = ["CLIP_TOLERANCE", "ClippedMean", "DpFedAvg", "gaussian_noise"]

log = logging.getLogger(__name__)

CLIP_TOLERANCE = 1e-6
"""An update's norm may exceed ``clip_norm`` by this relative margin (float32 rounding of a clipped update)."""

_NOISE_STREAM = 0x44505F4E  # keeps the noise's random stream apart from the sampler's for the same seed


def gaussian_noise(shape: tuple[int, ...], std: float, seed: int, round_: int, index: int) -> Array:
    """N(0, std^2) samples of ``shape`` (float64), the same for the same (seed, round, tensor index)."""
    rng = np.random.default_rng([seed, round_, index, _NOISE_STREAM])
    return rng.normal(0.0, std, size=shape)


class ClippedMean(Aggregator):
    """The equal-weight mean of updates whose whole L2 norm is at most ``clip_norm``.

    Row-sparse updates are made dense first: each row is then averaged over every
    participant, not only the workers that touched it (a per-row denominator would
    let one worker move a rarely touched row by up to ``C``).
    """

    def __init__(self, template: StreamHeader, clip_norm: float) -> None:
        self._inner = WeightedMean(template)
        self.clip_norm = clip_norm

    @property
    def count(self) -> int:
        return self._inner.count

    def add(self, update: ParamSet, weight: float) -> None:
        """Folds ``update`` with weight 1, whatever ``weight`` says.

        Raises:
            UpdateRejected: its norm exceeds ``clip_norm`` (it was not clipped), or it does not fit.
        """
        norm = update_norm(update)
        if not norm <= self.clip_norm * (1 + CLIP_TOLERANCE):
            raise UpdateRejected(f"the update's L2 norm is {norm:.6g}, above privacy.dp.clip_norm={self.clip_norm:g}: "
                                 "a worker must clip its update (ClipUpdate) when differential privacy is on")
        dense: list[tuple[str, Tensor]] = [
            (name, value.to_dense() if isinstance(value, SparseRows) else value) for name, value in update.items()
        ]
        self._inner.add(ParamSet(dense), 1.0)

    def result(self) -> ParamSet:
        return self._inner.result()


@dataclass
class _Opened:
    sampled: int
    rate: float


class DpFedAvg:
    """DP-FedAvg's server side: the aggregator, the noise hook, the budget gate and the metrics.

    :func:`~enclavefl.server.strategy.build_strategy` plugs its methods into the
    strategy's seams; the accountant is the ``accountant`` checkpoint part.

    Raises:
        ConfigError: the ``dp-accounting`` library is missing (the ``privacy`` extra).
    """

    def __init__(self, config: DpConfig, seed: int) -> None:
        self.config = config
        self.seed = seed
        self.accountant = PrivacyAccountant(config.noise_multiplier, config.delta, config.accountant)
        self._opened: dict[int, _Opened] = {}

    def aggregator(self, template: StreamHeader) -> Aggregator:
        """A round's aggregator: the equal-weight mean of clipped updates."""
        return ClippedMean(template, self.config.clip_norm)

    def may_open(self, round_: int, sampled: int, joined: int) -> str | None:
        """Refuses the round if composing it would exceed ``target_epsilon``; remembers its sampling rate."""
        rate = min(1.0, sampled / max(joined, 1))
        target = self.config.target_epsilon
        if target is not None:
            eps = self.accountant.epsilon(next_rate=rate)
            if eps > target:
                return (f"privacy budget: round {round_} would reach epsilon={eps:.4g} > target_epsilon={target:g} "
                        f"(delta={self.config.delta:g}); stopping after round {round_ - 1}")
        self._opened[round_] = _Opened(sampled, rate)
        return None

    def post_process(self, aggregate: ParamSet, context: CloseContext) -> ParamSet:
        """Rescales the mean over participants to one over the sampled workers, adds the noise and accounts for it."""
        opened = self._opened.pop(context.round, None)
        if opened is None:  # a round no gate saw (a custom engine): its counts at close are the best we know
            opened = _Opened(max(context.participants, 1),
                             min(1.0, context.participants / max(context.num_workers, 1)))
        m = max(opened.sampled, context.participants)
        share = context.participants / m
        std = self.config.noise_multiplier * self.config.clip_norm / m
        out: list[tuple[str, Tensor]] = []
        for index, (name, value) in enumerate(aggregate.items()):
            dense = value.to_dense() if isinstance(value, SparseRows) else value
            if dense.dtype.kind != "f":
                out.append((name, dense))
                continue
            noisy = np.asarray(dense, dtype=np.float64) * share
            if std > 0:
                noisy += gaussian_noise(dense.shape, std, self.seed, context.round, index)
            out.append((name, np.asarray(noisy, dtype=dense.dtype)))
        self.accountant.record(opened.rate)
        eps = self.accountant.epsilon()
        log.info("round %d: DP noise std %.4g on the mean of %d sampled (%d sent), q=%.4g; epsilon=%s at delta=%g",
                 context.round, std, m, context.participants, opened.rate,
                 f"{eps:.4g}" if math.isfinite(eps) else "unbounded", self.config.delta)
        return ParamSet(out)
