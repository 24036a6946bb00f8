"""A strategy: how a federation samples, aggregates and steps, as one value the PS is given.

``Strategy`` is a composition of independent parts, not a class hierarchy:
the client :class:`~enclavefl.server.algorithms.Algorithm` (FedAvg, FedProx,
SCAFFOLD), the :class:`~enclavefl.server.optimizer.ServerOptimizer`, a factory
for each round's :class:`~enclavefl.server.aggregator.Aggregator`, the
:class:`~enclavefl.server.sampling.Sampler`, and post-processing hooks that
see the aggregate before the optimizer does (later: unmasking, DP noise).
Optional stages (differential privacy) add more through generic seams: gates
the engine asks before it opens a round, values for every metrics row,
settings for every train task and stateful parts for the checkpoint.
:func:`build_strategy` makes one from the job file; Python callers may build
their own, or replace one part with ``dataclasses.replace``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from enclavefl.config import JobConfig, RegisteredOptimizer
from enclavefl.errors import ConfigError
from enclavefl.server.aggregator import Aggregator, WeightedMean
from enclavefl.server.algorithms import Algorithm, CloseContext, FedAvgAlgorithm, Scaffold
from enclavefl.server.optimizer import SERVER_OPTIMIZERS, ServerOptimizer
from enclavefl.messages import (
    COMPRESSION_BITS_KEY,
    COMPRESSION_SPARSE_RATE_KEY,
    COMPRESSION_TYPE_KEY,
    COMPRESSION_WARMUP_KEY,
    ConfigValue,
    UpdateKind,
)
from enclavefl.server.sampling import Sampler, UniformSampler
from enclavefl.server.state import Stateful
from enclavefl.tensors import ParamSet, StreamHeader

__all__ = ["AggregatorFactory", "PostProcess", "RoundGate", "RoundStages", "RowMetrics", "Strategy", "build_strategy"]

log = logging.getLogger(__name__)

AggregatorFactory = Callable[[StreamHeader], Aggregator]
"""Makes a fresh aggregator for one round, given the header every update must match."""

PostProcess = Callable[[ParamSet, CloseContext], ParamSet]
"""Sees a round's aggregate before the server optimizer (noise, unmasking, ...); returns the one to use."""

RowMetrics = Callable[[], Mapping[str, Any]]
"""Values for the metrics row of the round just closed (called after the post-process hooks)."""


class RoundGate(Protocol):
    """Asked by the engine before it opens a round, once the round's workers are sampled.

    A gate that refuses ends the job cleanly after the last completed round
    (a final checkpoint, FINISH to the workers, the job counts as finished):
    it is how a budget (a privacy budget, say) stops a job.
    """

    def may_open(self, round_: int, sampled: int, joined: int) -> str | None:
        """None to let round ``round_`` open with ``sampled`` of ``joined`` workers; else why the job ends.

        Called with the server lock held: keep it short and do not call into the server.
        """
        ...


class RoundStages(Protocol):
    """A round protocol with stages of its own around the upload (secure aggregation's key and unmask stages).

    The synchronous engine calls it at four points of a round attempt; every
    method but :meth:`finish` is called with the server lock held and must not
    block. A round with stages sees its uploads folded by the strategy's
    aggregator as usual; :meth:`finish` then turns that aggregator into the one
    the close pipeline reads (unmasking, say).
    """

    def upload(self, template: StreamHeader) -> tuple[StreamHeader, UpdateKind]:
        """The header and kind of what workers upload for updates shaped like ``template``."""
        ...

    def open(self, round_: int, attempt: int, sampled: frozenset[str]) -> Mapping[str, ConfigValue]:
        """A round attempt opened with these workers; returns settings its train tasks add (a nonce, say)."""
        ...

    def admit(self, worker_id: str) -> None:
        """Raises UpdateRejected if ``worker_id`` may not upload now (it skipped a stage)."""
        ...

    def on_drop(self, worker_id: str) -> None:
        """A worker of the open attempt left or was dropped: its stages stop waiting for it."""
        ...

    def finish(self, pushed: frozenset[str], aggregator: Aggregator) -> Aggregator:
        """Runs the stages after the upload window (may block); returns what the close pipeline aggregates.

        Raises:
            RoundError: the round cannot complete (too few workers for a stage); it is retried.
        """
        ...

    def abandon(self) -> None:
        """The open attempt ends without :meth:`finish` (too few updates, a stop): forget it."""
        ...


@dataclass(frozen=True)
class Strategy:
    """The parts that decide what a round does. Stateful parts have state()/load_state()."""

    algorithm: Algorithm
    optimizer: ServerOptimizer
    aggregator: AggregatorFactory
    sampler: Sampler
    post_process: tuple[PostProcess, ...] = ()
    buffers: bool = False
    """Whether the aggregator keeps every update until the round closes (robust aggregators)."""
    gates: tuple[RoundGate, ...] = ()
    """Asked, in order, before each synchronous round opens; the first refusal ends the job."""
    row_metrics: tuple[RowMetrics, ...] = ()
    """Each adds its values to every round's metrics row."""
    task_config: Mapping[str, ConfigValue] = field(default_factory=dict)
    """Settings every train task carries for the worker's update pipeline (namespaced keys)."""
    parts: tuple[tuple[str, Stateful], ...] = ()
    """More stateful parts, by checkpoint name, saved and restored like the optimizer."""
    stages: RoundStages | None = None
    """Stages of each synchronous round around its upload (secure aggregation); None: upload only."""


def _aggregator_factory(config: JobConfig, spill_dir: Path) -> tuple[AggregatorFactory, bool]:
    settings = config.server.aggregator
    if settings.name == "mean":
        return functools.partial(WeightedMean, accumulate=settings.accumulate), False
    from enclavefl.server.robust import AGGREGATORS

    cls: Any = AGGREGATORS[settings.name]
    options: Mapping[str, Any] = settings.model_dump(exclude={"name"})
    buffers = bool(getattr(cls, "buffers", False))
    if buffers:
        limit = config.server.max_buffered_updates

        def make(template: StreamHeader) -> Aggregator:
            spill_dir.mkdir(parents=True, exist_ok=True)
            made: Aggregator = cls(template, spill_dir=spill_dir, max_buffered=limit, **options)
            return made

        return make, True

    def make_streaming(template: StreamHeader) -> Aggregator:
        made: Aggregator = cls(template, **options)
        return made

    return make_streaming, False


def build_strategy(config: JobConfig, model: StreamHeader, *, spill_dir: Path) -> Strategy:
    """The strategy the job file describes.

    Args:
        model: the global model's header (SCAFFOLD sizes its control variates from it).
        spill_dir: where buffering aggregators keep updates (a directory in the run directory).

    Raises:
        ConfigError: a part refuses its settings.
    """
    server = config.server
    opt = server.optimizer
    cls = SERVER_OPTIMIZERS.get(opt.name)
    if cls is None:
        raise ConfigError(f"server.optimizer.name = {opt.name!r}: no such server optimizer "
                          f"(known: {', '.join(sorted(SERVER_OPTIMIZERS))}; a custom one must be registered "
                          "with register_optimizer in a module the PS imports, such as the task's)")
    options = opt.options if isinstance(opt, RegisteredOptimizer) else opt.model_dump(exclude={"name"})
    try:
        optimizer = cls(server.lr, **options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"server.optimizer {opt.name}: {exc}") from exc
    algorithm: Algorithm
    if server.strategy.name == "scaffold":
        algorithm = Scaffold(model)
    elif server.strategy.name == "fedprox":
        algorithm = FedAvgAlgorithm(proximal_mu=server.strategy.mu)
    else:
        algorithm = FedAvgAlgorithm()
    aggregator, buffers = _aggregator_factory(config, spill_dir)
    sampler = UniformSampler(config.round.fraction, config.round.min_workers, config.job.seed)
    strategy = Strategy(algorithm=algorithm, optimizer=optimizer, aggregator=aggregator, sampler=sampler, buffers=buffers)
    upload = config.privacy.compression.upload
    if upload.type != "none" and not config.privacy.secure_aggregation.enabled:
        # Workers compress as each task says (their own job file is not trusted for it). With secure
        # aggregation only top-k with dense_fallback passes the config: the masked upload goes dense.
        strategy = dataclasses.replace(strategy, task_config={
            **strategy.task_config, COMPRESSION_TYPE_KEY: upload.type, COMPRESSION_BITS_KEY: upload.bits,
            COMPRESSION_SPARSE_RATE_KEY: upload.sparse_rate, COMPRESSION_WARMUP_KEY: upload.warmup_rounds})
    if config.privacy.local_dp.enabled:
        strategy = _with_local_dp(strategy, config, model)
    if config.privacy.dp.enabled:  # after the fixed settings: its task config is a live view over them
        strategy = _with_dp(strategy, config)
    if config.privacy.secure_aggregation.enabled:
        strategy = _with_secure_aggregation(strategy, config, algorithm.upload_template(model))
    return strategy


def _with_secure_aggregation(strategy: Strategy, config: JobConfig, upload: StreamHeader) -> Strategy:
    """SecAgg+ plugged into the stages seam (server/secagg.py); its modular sum replaces the aggregator.

    With DP on, workers weigh 1 each (DP-FedAvg's equal weights) and the noise hook runs
    on the unmasked mean, inside the attested PS.
    """
    from enclavefl.server.secagg import SecAggCoordinator

    settings = config.privacy.secure_aggregation
    coordinator = SecAggCoordinator(settings, upload, equal_weights=config.privacy.dp.enabled)
    log.info("privacy.secure_aggregation: threshold=%s neighbours=%s quantization_bits=%d clip_range=%g "
             "rounding=%s weight_cap=%d stage_timeout_s=%g; the PS sees only masked uploads", settings.threshold,
             settings.neighbours or "auto", settings.quantization_bits, settings.clip_range, settings.rounding,
             settings.weight_cap, settings.stage_timeout_s)
    return dataclasses.replace(strategy, aggregator=coordinator.aggregator, stages=coordinator,
                               row_metrics=(*strategy.row_metrics, coordinator.row))


def _with_dp(strategy: Strategy, config: JobConfig) -> Strategy:
    """DP-FedAvg plugged into the strategy's seams (server/dp.py); equal weights replace num_samples."""
    from enclavefl.server.dp import DpFedAvg
    from enclavefl.server.upload_layout import UploadLayout

    dp = DpFedAvg(config.privacy.dp, config.job.seed, min_updates=config.round.min_updates)
    adaptive = config.privacy.dp.adaptive_clipping
    log.info("privacy.dp: mode=%s clip_norm=%g%s noise_multiplier=%g delta=%g accountant=%s target_epsilon=%s; "
             "updates are averaged with equal weights (num_samples is ignored)", dp.config.mode, dp.config.clip_norm,
             f" (adaptive: quantile {adaptive.target_quantile:g}, update noise multiplier "
             f"{dp.update_noise_multiplier:.6g})" if adaptive.enabled else "", dp.config.noise_multiplier,
             dp.config.delta, dp.config.accountant, dp.config.target_epsilon)
    if dp.config.mode == "distributed":
        log.info("privacy.dp: distributed: each sampled worker adds noise of std %.6g (z C / sqrt(round.min_updates="
                 "%d)); the PS adds none", dp.worker_noise_std, dp.min_updates)
    parts: tuple[tuple[str, Stateful], ...] = (("accountant", dp.accountant),)
    algorithm = strategy.algorithm
    if dp.adaptive is not None:
        parts += (("dp_clip", dp.adaptive),)
        algorithm = UploadLayout(algorithm, dp.upload_layout)
    return dataclasses.replace(
        strategy, algorithm=algorithm, aggregator=dp.aggregator, post_process=(*strategy.post_process, dp.post_process),
        gates=(*strategy.gates, dp), row_metrics=(*strategy.row_metrics, dp.row),
        task_config=dp.task_config(strategy.task_config),
        parts=(*strategy.parts, *parts),
    )


def _with_local_dp(strategy: Strategy, config: JobConfig, model: StreamHeader) -> Strategy:
    """Local DP's settings, round count and metrics (server/local_dp.py); SignDS also replaces the upload and
    the aggregator (server/signds.py)."""
    from enclavefl.server.local_dp import LocalDpRelease
    from enclavefl.server.signds import SignDsSum, float_values, signds_template
    from enclavefl.server.upload_layout import UploadLayout

    local = LocalDpRelease(config.privacy.local_dp, model)
    settings = config.privacy.local_dp
    strategy = dataclasses.replace(
        strategy, post_process=(*strategy.post_process, local.post_process),
        row_metrics=(*strategy.row_metrics, local.row), task_config={**strategy.task_config, **local.task_config},
        parts=(*strategy.parts, ("local_dp", local)),
    )
    if settings.mechanism == "gaussian":
        log.info("privacy.local_dp: gaussian, epsilon=%g delta=%g per upload, clip_norm=%g: each worker adds noise of "
                 "std %.6g (analytic Gaussian mechanism, sensitivity 2 clip_norm)", settings.epsilon, settings.delta,
                 settings.clip_norm, local.sigma)
        return strategy
    log.info("privacy.local_dp: signds, epsilon=%g per upload, k=%d of %d values, h=%d indices per upload, "
             "global_lr=%g", settings.epsilon, local.top_k, float_values(model), local.dims_out, settings.global_lr)

    def aggregator(template: StreamHeader) -> Aggregator:
        return SignDsSum(model, local.dims_out, settings.global_lr)

    return dataclasses.replace(
        strategy, algorithm=UploadLayout(strategy.algorithm, lambda _: signds_template(local.dims_out)),
        aggregator=aggregator, buffers=False,
    )

