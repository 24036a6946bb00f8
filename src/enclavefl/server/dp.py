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

Two variants plug into the same seams. With adaptive clipping (Andrew et al.
2021, :mod:`enclavefl.server.adaptive_clip`) the bound ``C_t`` changes every
round: it travels in the task config, each update carries one more tensor, the
bit ``dp/unclipped``, and the update's noise multiplier is the ``z_delta`` left
once the bit's noise takes its share. In distributed mode the PS adds no noise:
each sampled worker adds ``N(0, (z C)^2 / u)`` per coordinate, ``u`` being
``round.min_updates``, so any round the PS accepts (at least ``u`` updates)
carries noise of variance at least ``(z C)^2`` on its sum, as in central mode,
provided those ``u`` workers are honest. The PS then checks a noised update's
norm against ``C`` plus a bound on the noise's norm that fails with probability
below ``exp(-32)``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from enclavefl.config import DpConfig
from enclavefl.errors import UpdateRejected
from enclavefl.messages import DP_ADAPTIVE_KEY, DP_CLIP_NORM_KEY, DP_NOISE_STD_KEY, DP_UNCLIPPED_TENSOR, ConfigValue
from enclavefl.norms import update_norm
from enclavefl.server.accountant import PrivacyAccountant
from enclavefl.server.adaptive_clip import AdaptiveClip, update_noise_multiplier
from enclavefl.server.aggregator import Aggregator, WeightedMean
from enclavefl.server.algorithms import CloseContext
from enclavefl.tensors import Array, ParamSet, SparseRows, StreamHeader, Tensor, TensorSpec

__all__ = ["CLIP_TOLERANCE", "NOISE_NORM_MARGIN", "ClippedMean", "DpFedAvg", "gaussian_noise", "noise_norm_bound",
           "with_unclipped_bit"]

log = logging.getLogger(__name__)

CLIP_TOLERANCE = 1e-6
"""An update's norm may exceed ``clip_norm`` by this relative margin (float32 rounding of a clipped update)."""

_NOISE_STREAM = 0x44505F4E  # keeps the noise's random stream apart from the sampler's for the same seed

NOISE_NORM_MARGIN = 8.0
"""t in ``sqrt(d) + t``: the norm of d standard normal values exceeds it with probability at most
``exp(-t^2 / 2)`` (the norm is 1-Lipschitz with mean below sqrt(d): Gaussian concentration, e.g.
Boucheron, Lugosi and Massart 2013, Theorem 5.6), below 1e-13 for t = 8."""


def noise_norm_bound(std: float, dims: int) -> float:
    """``std * (sqrt(dims) + NOISE_NORM_MARGIN)``: what the L2 norm of N(0, std^2) noise on ``dims`` values stays below."""
    return std * (math.sqrt(dims) + NOISE_NORM_MARGIN) if std > 0 else 0.0


def with_unclipped_bit(template: StreamHeader) -> StreamHeader:
    """The upload template plus adaptive clipping's bit: a float32 scalar ``dp/unclipped``, last."""
    return StreamHeader((*template.tensors, TensorSpec(DP_UNCLIPPED_TENSOR, "float32", ())))


def _float_values(template: StreamHeader) -> int:
    return sum(math.prod(spec.shape) for spec in template.tensors
               if spec.dtype.startswith("float") and spec.name != DP_UNCLIPPED_TENSOR)


def gaussian_noise(shape: tuple[int, ...], std: float, seed: int, round_: int, index: int) -> Array:
    """N(0, std^2) samples of ``shape`` (float64), the same for the same (seed, round, tensor index)."""
    rng = np.random.default_rng([seed, round_, index, _NOISE_STREAM])
    return rng.normal(0.0, std, size=shape)


class ClippedMean(Aggregator):
    """The equal-weight mean of updates whose whole L2 norm is at most ``clip_norm`` (plus ``noise_slack``).

    Row-sparse updates are made dense first: each row is then averaged over every
    participant, not only the workers that touched it (a per-row denominator would
    let one worker move a rarely touched row by up to ``C``). ``noise_slack`` admits
    the norm of a worker's own noise (distributed DP). An update holding the
    adaptive-clipping bit ``dp/unclipped`` must hold 0 or 1 there; the bit is not
    part of the norm, and its mean over the participants is in the result.
    """

    mergeable: ClassVar[bool] = True
    """Each server of a cluster checks and folds its own workers' updates; the leader merges the sums."""

    def __init__(self, template: StreamHeader, clip_norm: float, *, noise_slack: float = 0.0) -> None:
        self._inner = WeightedMean(template)
        self.clip_norm = clip_norm
        self.noise_slack = noise_slack

    @property
    def count(self) -> int:
        return self._inner.count

    def add(self, update: ParamSet, weight: float) -> None:
        """Folds ``update`` with weight 1, whatever ``weight`` says.

        Raises:
            UpdateRejected: its norm exceeds the bound (it was not clipped), its bit is not 0 or 1,
                or it does not fit.
        """
        bit = update[DP_UNCLIPPED_TENSOR] if DP_UNCLIPPED_TENSOR in update else None
        if bit is not None:
            value = bit.to_dense() if isinstance(bit, SparseRows) else bit
            if value.size != 1 or float(value.reshape(-1)[0]) not in (0.0, 1.0):
                raise UpdateRejected(f"{DP_UNCLIPPED_TENSOR} must be 0 or 1 (adaptive clipping's bit), got {value!r}")
            measured = ParamSet((n, v) for n, v in update.items() if n != DP_UNCLIPPED_TENSOR)
        else:
            measured = update
        norm = update_norm(measured)
        bound = self.clip_norm * (1 + CLIP_TOLERANCE) + self.noise_slack
        if not norm <= bound:
            what = (f"above privacy.dp.clip_norm={self.clip_norm:g}" if self.noise_slack == 0 else
                    f"above privacy.dp.clip_norm={self.clip_norm:g} plus the noise's bound {self.noise_slack:.6g}")
            raise UpdateRejected(f"the update's L2 norm is {norm:.6g}, {what}: "
                                 "a worker must clip its update (ClipUpdate) when differential privacy is on")
        dense: list[tuple[str, Tensor]] = [
            (name, value.to_dense() if isinstance(value, SparseRows) else value) for name, value in update.items()
        ]
        self._inner.add(ParamSet(dense), 1.0)

    def result(self) -> ParamSet:
        return self._inner.result()

    def partial(self) -> bytes:
        """The equal-weight sum so far (:meth:`WeightedMean.partial`): every update in it passed the bound."""
        return self._inner.partial()

    def merge(self, partials: Mapping[str, bytes]) -> None:
        """Folds the sums other servers' clipped means made (the bound was checked where each was folded)."""
        self._inner.merge(partials)

    def close(self) -> None:
        self._inner.close()


class _TaskConfig(Mapping[str, ConfigValue]):
    """What every train task carries for DP, read live: the bound moves with adaptive clipping."""

    def __init__(self, dp: DpFedAvg, base: Mapping[str, ConfigValue]) -> None:
        self._dp = dp
        self._base = base

    def _values(self) -> dict[str, ConfigValue]:
        dp = self._dp
        out: dict[str, ConfigValue] = {**self._base, DP_CLIP_NORM_KEY: dp.clip_norm}
        if dp.adaptive is not None:
            out[DP_ADAPTIVE_KEY] = True
        if dp.config.mode == "distributed":
            out[DP_NOISE_STD_KEY] = dp.worker_noise_std
        return out

    def __getitem__(self, key: str) -> ConfigValue:
        return self._values()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values())

    def __len__(self) -> int:
        return len(self._values())


@dataclass
class _Opened:
    sampled: int
    rate: float


class DpFedAvg:
    """DP-FedAvg's server side: the aggregator, the noise hook, the budget gate and the metrics.

    :func:`~enclavefl.server.strategy.build_strategy` plugs its methods into the
    strategy's seams; the accountant is the ``accountant`` checkpoint part, the
    adaptive bound (if any) the ``dp_clip`` part. :meth:`task_config` is a live
    view: keep it as it is (a copy would freeze the adaptive bound).

    Raises:
        ConfigError: the ``dp-accounting`` library is missing (the ``privacy`` extra).
    """

    def __init__(self, config: DpConfig, seed: int, *, min_updates: int = 1) -> None:
        self.config = config
        self.seed = seed
        self.min_updates = min_updates
        self.accountant = PrivacyAccountant(config.noise_multiplier, config.delta, config.accountant)
        adaptive = config.adaptive_clipping
        self.adaptive: AdaptiveClip | None = None
        self.update_noise_multiplier = config.noise_multiplier
        if adaptive.enabled:
            self.adaptive = AdaptiveClip(config.clip_norm, target_quantile=adaptive.target_quantile,
                                         learning_rate=adaptive.learning_rate,
                                         count_stddev=adaptive.clipped_count_stddev, seed=seed)
            self.update_noise_multiplier = update_noise_multiplier(config.noise_multiplier,
                                                                   adaptive.clipped_count_stddev)
        self._opened: dict[int, _Opened] = {}

    def task_config(self, base: Mapping[str, ConfigValue]) -> Mapping[str, ConfigValue]:
        """``base`` plus DP's settings for every train task, as a live view (the adaptive bound moves)."""
        return _TaskConfig(self, base)

    @property
    def clip_norm(self) -> float:
        """The bound of the next (or open) round: ``clip_norm``, or the adaptive one."""
        return self.adaptive.clip_norm if self.adaptive is not None else self.config.clip_norm

    @property
    def worker_noise_std(self) -> float:
        """Distributed mode: each worker's noise std, ``z C / sqrt(round.min_updates)``."""
        return self.config.noise_multiplier * self.clip_norm / math.sqrt(self.min_updates)

    def upload_layout(self, template: StreamHeader) -> StreamHeader:
        """The upload template: the model's, plus the bit with adaptive clipping."""
        return with_unclipped_bit(template) if self.adaptive is not None else template

    def aggregator(self, template: StreamHeader) -> Aggregator:
        """A round's aggregator: the equal-weight mean of clipped (in distributed mode, noised) updates."""
        slack = 0.0
        if self.config.mode == "distributed":
            slack = noise_norm_bound(self.worker_noise_std, _float_values(template))
        return ClippedMean(template, self.clip_norm, noise_slack=slack)

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
        """Rescales the mean over participants to one over the sampled workers, adds the noise and accounts for it.

        With adaptive clipping it also takes the bit out of the aggregate and moves the bound;
        in distributed mode the workers added the noise.
        """
        opened = self._opened.pop(context.round, None)
        if opened is None:  # a round no gate saw (a custom engine): its counts at close are the best we know
            opened = _Opened(max(context.participants, 1),
                             min(1.0, context.participants / max(context.num_workers, 1)))
        m = max(opened.sampled, context.participants)
        share = context.participants / m
        clip_norm = self.clip_norm
        z = 0.0 if self.config.mode == "distributed" else self.update_noise_multiplier
        std = z * clip_norm / m
        out: list[tuple[str, Tensor]] = []
        unclipped_sum = 0.0
        for index, (name, value) in enumerate(aggregate.items()):
            dense = value.to_dense() if isinstance(value, SparseRows) else value
            if name == DP_UNCLIPPED_TENSOR:
                unclipped_sum = float(np.asarray(dense, dtype=np.float64).reshape(-1)[0]) * context.participants
                continue
            if dense.dtype.kind != "f":
                out.append((name, dense))
                continue
            noisy = np.asarray(dense, dtype=np.float64) * share
            if std > 0:
                noisy += gaussian_noise(dense.shape, std, self.seed, context.round, index)
            out.append((name, np.asarray(noisy, dtype=dense.dtype)))
        self.accountant.record(opened.rate)
        if self.adaptive is not None:
            step = self.adaptive.step(context.round, unclipped_sum, m)
            log.info("round %d: adaptive clipping: %.4g of %d sampled unclipped (noised) at C=%.6g; next C=%.6g",
                     context.round, step.unclipped, m, step.clip_norm, self.adaptive.clip_norm)
        eps = self.accountant.epsilon()
        log.info("round %d: DP noise std %.4g on the mean of %d sampled (%d sent, %s), q=%.4g; epsilon=%s at delta=%g",
                 context.round, std, m, context.participants,
                 "noise added by the workers" if self.config.mode == "distributed" else "noise added here",
                 opened.rate, f"{eps:.4g}" if math.isfinite(eps) else "unbounded", self.config.delta)
        return ParamSet(out)

    def row(self) -> Mapping[str, float | str | None]:
        """``dp_epsilon`` and ``dp_delta``; with adaptive clipping the round's ``dp_clip_norm`` and
        ``dp_unclipped_fraction`` (noised), in distributed mode ``dp_worker_noise_std``."""
        out: dict[str, float | str | None] = dict(self.accountant.row())
        last = self.adaptive.last if self.adaptive is not None else None
        if last is not None:
            out["dp_clip_norm"] = last.clip_norm
            out["dp_unclipped_fraction"] = last.unclipped
        if self.config.mode == "distributed":
            out["dp_worker_noise_std"] = self.worker_noise_std  # adaptive clipping is central-only: C is fixed
        return out
