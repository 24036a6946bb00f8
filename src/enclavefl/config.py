"""The job file: one YAML document describes a federated job.

Every section is a frozen pydantic model with ``extra="forbid"``, so an unknown
key, a wrong type or an out-of-range value is refused before anything starts,
with a message naming the file, the dotted key path, the value given and what
is allowed (an unknown key's message lists the valid ones and suggests the
closest). ``--set section.key=value`` overrides are applied to the raw
document and validated the same way; an error in a value they gave is blamed
on the ``--set``. Settings that can never work together are refused too: fewer
``job.workers`` than ``round.min_workers`` would wait for a round that never
opens. A built-in task's ``task.params`` are checked against its model
(:mod:`enclavefl.task_params`).

Keys of the cloud FL cluster this project replaces are accepted as top-level
aliases (``fl_iteration_num: 20`` means ``job.rounds: 20``); see
:data:`CLOUD_KEY_ALIASES` and the README for the mapping.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from enclavefl.config_errors import describe_errors
from enclavefl.errors import ConfigError
from enclavefl.task_params import BUILTIN_TASK_PARAMS

__all__ = [
    "BUFFERING_AGGREGATORS",
    "CLOUD_ENCRYPT_PARAMS",
    "CLOUD_ENCRYPT_TYPES",
    "CLOUD_KEY_ALIASES",
    "CLOUD_SECTION_ALIASES",
    "AdaptiveClippingConfig",
    "AggregatorConfig",
    "AttestationConfig",
    "ClientConfig",
    "ClusterConfig",
    "CollateralConfig",
    "CompressionConfig",
    "DownloadCompressionConfig",
    "DpConfig",
    "FaultsConfig",
    "FileCollateralConfig",
    "JobConfig",
    "JobSection",
    "LocalDpConfig",
    "OptimizerConfig",
    "PccsCollateralConfig",
    "PrivacyConfig",
    "RedisConfig",
    "RoundConfig",
    "SecureAggregationConfig",
    "ServerConfig",
    "SparseDownloadsConfig",
    "StalenessConfig",
    "StrategyConfig",
    "ManagementConfig",
    "SummaryConfig",
    "TaskConfig",
    "TlsConfig",
    "TransportConfig",
    "UploadCompressionConfig",
    "apply_overrides",
    "check_worker_count",
    "load_job",
    "override_key",
    "parse_job",
]

MiB = 2**20


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # Lax mode would read YAML's `yes`/`true` as 1: `rounds: yes` must be an error.
        field_name = info.field_name
        if isinstance(value, bool) and field_name is not None:
            if cls.model_fields[field_name].annotation in (int, float, int | None, float | None):
                raise ValueError("expected a number, got a boolean")
        return value


class _Variant(BaseModel):
    """One variant of a tagged union (``name`` picks it); strict, so ``true`` is never a number."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class JobSection(_Section):
    """What the job is called, how long it runs and how many workers `run` starts."""

    name: str = Field(default="job", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    rounds: int = Field(default=10, ge=1, le=1_000_000)
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    workers: int = Field(default=3, ge=1, le=1024, description="workers started by `enclavefl run`")


class ConstantStaleness(_Variant):
    """s(tau) = 1: every update counts fully, however stale."""

    name: Literal["constant"] = "constant"


class PolynomialStaleness(_Variant):
    """s(tau) = (1 + tau) ** -exponent (FedBuff uses exponent 0.5)."""

    name: Literal["polynomial"] = "polynomial"
    exponent: float = Field(default=0.5, ge=0, le=10)


class HingeStaleness(_Variant):
    """s(tau) = 1 for tau <= cutoff, else 1 / (slope * (tau - cutoff) + 1) (Xie et al. 2019, FedAsync)."""

    name: Literal["hinge"] = "hinge"
    slope: float = Field(default=10.0, gt=0)
    cutoff: int = Field(default=4, ge=0)


StalenessConfig = Annotated[ConstantStaleness | PolynomialStaleness | HingeStaleness, Field(discriminator="name")]


def _named(value: Any) -> Any:
    """A bare name stands for the variant with default settings: ``fedadam`` is ``{name: fedadam}``."""
    return {"name": value} if isinstance(value, str) else value


class RoundConfig(_Section):
    """When a round opens, whom it samples, and when it closes (sync), or how updates are buffered (async)."""

    mode: Literal["sync", "async"] = Field(default="sync", description="sync rounds, or FedBuff-style async steps")
    min_workers: int = Field(default=1, ge=1)
    start_window_s: float = Field(default=30.0, gt=0, le=86_400)
    fraction: float = Field(default=1.0, gt=0, le=1)
    update_ratio: float = Field(default=1.0, gt=0, le=1)
    update_window_s: float = Field(default=120.0, gt=0, le=86_400)
    min_updates: int = Field(default=1, ge=1, description="fewer updates at the window's end: retry the round")
    max_retries: int = Field(default=5, ge=0, le=1000)
    heartbeat_s: float = Field(default=2.0, gt=0, le=3600,
                               description="a joined worker is heard at least this often (long-poll or heartbeat)")
    worker_timeout_s: float = Field(default=8.0, gt=0, le=86_400,
                                    description="a worker silent for longer is dropped and its round stops waiting")
    buffer_size: int = Field(default=4, ge=1, le=100_000, description="async: updates folded per server step")
    max_staleness: int = Field(default=10, ge=0, le=1_000_000, description="async: older updates are refused")
    staleness: StalenessConfig = Field(default_factory=PolynomialStaleness)

    @field_validator("staleness", mode="before")
    @classmethod
    def _staleness_name(cls, value: Any) -> Any:
        return _named(value)


class TaskConfig(_Section):
    """Which model and data: a built-in task name or a user task ``module:function``."""

    name: str = Field(default="digits-mlp", min_length=1)
    data_dir: str | None = None
    partition: Literal["iid", "dirichlet", "quantity", "writer"] = "iid"
    alpha: float = Field(default=0.5, gt=0)
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="a built-in task's settings (checked against its model in enclavefl.task_params); "
                    "free-form for a user task",
    )

    @field_validator("name")
    @classmethod
    def _task_name(cls, value: str) -> str:
        if ":" in value:
            module, _, func = value.partition(":")
            ident = r"[A-Za-z_][A-Za-z0-9_]*"
            if not re.fullmatch(rf"{ident}(\.{ident})*", module) or not re.fullmatch(ident, func):
                raise ValueError("a user task is written 'package.module:function'")
        return value


class ClientConfig(_Section):
    """Local training on each worker."""

    epochs: int = Field(default=1, ge=1, le=10_000)
    batch_size: int = Field(default=32, ge=1, le=1_000_000)
    lr: float = Field(default=0.05, gt=0, le=100)
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(default=0.0, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)


class FedAvgOptimizer(_Variant):
    """x += lr * mean delta (McMahan et al. 2017)."""

    name: Literal["fedavg"] = "fedavg"


class FedAvgMOptimizer(_Variant):
    """Server momentum (Hsu et al. 2019)."""

    name: Literal["fedavgm"] = "fedavgm"
    momentum: float = Field(default=0.9, ge=0, lt=1)


class FedAdagradOptimizer(_Variant):
    """Reddi et al. 2021, Algorithm 2 with the Adagrad second moment."""

    name: Literal["fedadagrad"] = "fedadagrad"
    beta1: float = Field(default=0.0, ge=0, lt=1)
    tau: float = Field(default=1e-3, gt=0, le=10)


class FedAdamOptimizer(_Variant):
    """Reddi et al. 2021, Algorithm 2 with the Adam second moment."""

    name: Literal["fedadam"] = "fedadam"
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.99, ge=0, lt=1)
    tau: float = Field(default=1e-3, gt=0, le=10)


class FedYogiOptimizer(_Variant):
    """Reddi et al. 2021, Algorithm 2 with the Yogi second moment."""

    name: Literal["fedyogi"] = "fedyogi"
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.99, ge=0, lt=1)
    tau: float = Field(default=1e-3, gt=0, le=10)


class RegisteredOptimizer(_Variant):
    """A server optimizer added with ``register_optimizer`` (checked by name when the PS starts)."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword settings of its constructor")


_BUILTIN_OPTIMIZERS = ("fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi")


def _optimizer_tag(value: Any) -> str:
    name = value.get("name") if isinstance(value, dict) else getattr(value, "name", None)
    return name if name in _BUILTIN_OPTIMIZERS else "registered"


OptimizerConfig = Annotated[
    Annotated[FedAvgOptimizer, Tag("fedavg")]
    | Annotated[FedAvgMOptimizer, Tag("fedavgm")]
    | Annotated[FedAdagradOptimizer, Tag("fedadagrad")]
    | Annotated[FedAdamOptimizer, Tag("fedadam")]
    | Annotated[FedYogiOptimizer, Tag("fedyogi")]
    | Annotated[RegisteredOptimizer, Tag("registered")],
    Discriminator(_optimizer_tag),
]


class MeanAggregator(_Variant):
    """Streaming weighted mean (FedAvg's aggregation)."""

    name: Literal["mean"] = "mean"
    accumulate: Literal["float32", "float64"] = Field(
        default="float64",
        description="float32 tensors: a float64 sum (the result does not depend on arrival order) or a float32 "
                    "running mean (half the memory; error bound and order dependence in docs/performance.md)",
    )


class MedianAggregator(_Variant):
    """Coordinate-wise median (buffers updates)."""

    name: Literal["median"] = "median"


class TrimmedMeanAggregator(_Variant):
    """Coordinate-wise trimmed mean (buffers updates)."""

    name: Literal["trimmed_mean"] = "trimmed_mean"
    trim_ratio: float = Field(default=0.1, ge=0, lt=0.5, description="fraction cut from each end per coordinate")


class KrumAggregator(_Variant):
    """Krum / multi-Krum (buffers updates)."""

    name: Literal["krum"] = "krum"
    byzantine: int = Field(default=1, ge=0, description="f, the number of faulty updates tolerated")
    multi: int = Field(default=1, ge=1, description="updates selected and averaged (1 is Krum)")


class NormBoundedAggregator(_Variant):
    """Weighted mean of updates clipped to an L2 norm (streaming)."""

    name: Literal["norm_bounded"] = "norm_bounded"
    max_norm: float = Field(gt=0)


AggregatorConfig = Annotated[
    MeanAggregator | MedianAggregator | TrimmedMeanAggregator | KrumAggregator | NormBoundedAggregator,
    Field(discriminator="name"),
]

BUFFERING_AGGREGATORS = frozenset({"median", "trimmed_mean", "krum"})
"""Aggregators that keep every update of a round until it closes (they cannot stream)."""


class FedAvgStrategy(_Variant):
    """Workers train locally and send their delta."""

    name: Literal["fedavg"] = "fedavg"


class FedProxStrategy(_Variant):
    """Local objective plus mu/2 |w - w_global|^2 (Li et al. 2020)."""

    name: Literal["fedprox"] = "fedprox"
    mu: float = Field(default=0.01, gt=0, le=1000)


class ScaffoldStrategy(_Variant):
    """Control variates correct client drift (Karimireddy et al. 2020, option II)."""

    name: Literal["scaffold"] = "scaffold"


StrategyConfig = Annotated[FedAvgStrategy | FedProxStrategy | ScaffoldStrategy, Field(discriminator="name")]


class ServerConfig(_Section):
    """Strategy, aggregation, server optimizer and checkpoints on the parameter server."""

    strategy: StrategyConfig = Field(default_factory=FedAvgStrategy)
    optimizer: OptimizerConfig = Field(default_factory=FedAvgOptimizer)
    aggregator: AggregatorConfig = Field(default_factory=MeanAggregator)
    lr: float = Field(default=1.0, gt=0, le=100, description="server learning rate on the aggregated delta")
    checkpoint_dir: str = "checkpoints"
    checkpoint_every: int = Field(default=1, ge=1)
    max_concurrent_uploads: int = Field(default=4, ge=1, le=1024)
    max_concurrent_downloads: int = Field(default=8, ge=1, le=1024)
    max_update_bytes: int = Field(default=8 * 2**30, ge=1)
    max_buffered_updates: int = Field(default=64, ge=1, le=100_000, description="updates a buffering aggregator keeps")
    max_weight_per_update: int | None = Field(default=None, ge=1, description="cap on an update's claimed num_samples")

    @field_validator("strategy", "optimizer", "aggregator", mode="before")
    @classmethod
    def _bare_names(cls, value: Any) -> Any:
        return _named(value)


class TlsConfig(_Section):
    """Certificate files; empty means `enclavefl run` makes a per-job CA itself."""

    ca_cert: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str = "enclavefl-ps"


class SparseDownloadsConfig(_Section):
    """Downloads of only the rows changed since the worker's copy (embedding tables; docs/results.md).

    The PS keeps, per tracked tensor, the model version at which each row last
    changed; a worker that holds version ``v`` gets, per tracked tensor, the rows
    changed after ``v`` and the other tensors dense. A worker more than
    ``max_behind_versions`` behind, or a tensor with more than ``max_diff_fraction``
    of its rows changed, gets the dense tensor.
    """

    enabled: bool = False
    max_behind_versions: int = Field(default=16, ge=1, le=1_000_000,
                                     description="a worker further behind downloads the dense model")
    max_diff_fraction: float = Field(default=0.25, gt=0, le=1,
                                     description="a tensor with more of its rows changed goes dense")
    tensors: list[str] = Field(default_factory=list, max_length=1024,
                               description="name patterns (fnmatch) of the tracked tensors; empty: every tensor of rank >= 2")


class TransportConfig(_Section):
    """Where the PS listens and how tensors are chunked on the wire."""

    listen: str = Field(default="127.0.0.1:0", pattern=r"^[^\s:]+:\d{1,5}$|^\[[0-9a-fA-F:]+\]:\d{1,5}$")
    chunk_bytes: int = Field(default=2 * MiB, ge=4096, le=64 * MiB)
    tls: TlsConfig = Field(default_factory=TlsConfig)
    sparse_downloads: SparseDownloadsConfig = Field(default_factory=SparseDownloadsConfig)


class FileCollateralConfig(_Section):
    """Collateral from one file in the combined JSON format, loaded once (it expires: see docs/security.md)."""

    source: Literal["file"] = "file"
    path: str = Field(min_length=1, description="the collateral file, relative to the job file")


class PccsCollateralConfig(_Section):
    """Collateral fetched per platform from a PCCS (or Intel's PCS), cached, and refreshed before it expires."""

    source: Literal["pccs"] = "pccs"
    url: str = Field(description="the PCCS or PCS base URL (https only)")
    cache_dir: str = Field(default="collateral-cache", min_length=1,
                           description="fetched responses, relative to the job file")
    refresh_before_s: float = Field(default=7 * 86_400.0, ge=0, le=366 * 86_400,
                                    description="refresh this long before the earliest nextUpdate")
    ca_cert: str | None = Field(default=None, description="PEM file of the CA that issued the PCCS's TLS certificate; "
                                                          "none: the system's trusted CAs")
    timeout_s: float = Field(default=30.0, gt=0, le=600, description="per request")

    @field_validator("url")
    @classmethod
    def _https(cls, value: str) -> str:
        # Intel's signatures are checked whatever the transport, but an on-path attacker could replay
        # older, still-signed collateral (an older TCB info rates more platforms UpToDate): https only.
        if not re.fullmatch(r"https://[^\s/?#]+(/[^\s?#]*)?", value):
            raise ValueError("must be an https:// URL (a PCCS or Intel's PCS, e.g. https://pccs.example:8081)")
        return value


def _collateral_tag(value: Any) -> str | None:
    source = value.get("source", "file") if isinstance(value, dict) else getattr(value, "source", None)
    return source if source in ("file", "pccs") else None


CollateralConfig = Annotated[
    Annotated[FileCollateralConfig, Tag("file")] | Annotated[PccsCollateralConfig, Tag("pccs")],
    Discriminator(_collateral_tag, custom_error_type="collateral_source",
                  custom_error_message="must be a file path, or a mapping whose source is 'file' or 'pccs'"),
]


class AttestationConfig(_Section):
    """How nodes prove their code; see docs/security.md."""

    mode: Literal["simulated", "gramine", "none"] = "simulated"
    policy: str | None = None
    sim_root: str | None = None
    device_dir: str = "/dev/attestation"
    collateral: CollateralConfig | None = Field(
        default=None, description="a file path, {source: file, path}, or {source: pccs, url, cache_dir, ...}")
    allow_missing_collateral: bool = Field(
        default=False, description="gramine mode: let a policy accept quotes without collateral (weaker)")

    @field_validator("collateral", mode="before")
    @classmethod
    def _collateral_path(cls, value: Any) -> Any:
        # The old form, `collateral: file.json`, is a file source.
        return {"source": "file", "path": value} if isinstance(value, str) else value


class SummaryConfig(_Section):
    """Where per-round metrics go (relative to the run directory)."""

    metrics_file: str = "metrics.jsonl"
    tensorboard: bool = Field(default=False, description="also write TensorBoard event files to <run>/tensorboard/")


class ManagementConfig(_Section):
    """The PS's management API and dashboard (HTTPS, a bearer token per job); see docs/management.md."""

    enabled: bool = True
    listen: str = Field(default="127.0.0.1:0", pattern=r"^[^\s:]+:\d{1,5}$|^\[[0-9a-fA-F:]+\]:\d{1,5}$",
                        description="host:port of the API (port 0: a free port, written to the run directory)")
    public_read: bool = Field(default=False, description="read routes without the token (control routes never)")


class RedisConfig(_Section):
    """How cluster members reach Redis (docs/cluster.md). Paths are relative to the job file."""

    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=6379, ge=1, le=65535)
    db: int = Field(default=0, ge=0, le=15)
    tls: bool = Field(default=False, description="reach Redis over TLS (rediss://)")
    ca_cert: str | None = Field(default=None, description="PEM of the CA that signed Redis's certificate")
    cert: str | None = Field(default=None, description="client certificate, when Redis asks for one")
    key: str | None = None
    username: str | None = Field(default=None, description="the ACL user (none: Redis's default user)")
    password_file: str | None = Field(
        default=None, description="a file holding the ACL password (never the job file: its digest is shown)")
    timeout_s: float = Field(default=30.0, gt=0, le=3600, description="for one command")
    retries: int = Field(default=5, ge=0, le=1000, description="retries while Redis is unreachable")


class ClusterConfig(_Section):
    """Several servers sharing one job through Redis (``enclavefl server``/``scheduler``); the single PS ignores it."""

    redis: RedisConfig = Field(default_factory=RedisConfig)
    servers: int = Field(default=2, ge=1, le=256, description="servers started by `enclavefl run --servers`")
    heartbeat_s: float = Field(default=1.0, gt=0, le=3600, description="how often a member renews its membership")
    member_ttl_s: float = Field(default=5.0, gt=0, le=86_400, description="a member silent this long is gone")
    lease_ttl_s: float = Field(default=5.0, gt=0, le=86_400,
                               description="the leader lease lapses this long after its last renewal")
    poll_s: float = Field(default=0.1, gt=0, le=60, description="how often a server looks for a round change")

    @model_validator(mode="after")
    def _ttls(self) -> ClusterConfig:
        for key, ttl in (("member_ttl_s", self.member_ttl_s), ("lease_ttl_s", self.lease_ttl_s)):
            if ttl < 2 * self.heartbeat_s:
                # A live member renews every heartbeat_s plus a round trip to Redis.
                raise ValueError(f"cluster.{key}={ttl:g} must be at least twice cluster.heartbeat_s={self.heartbeat_s:g}")
        return self


class FaultsConfig(_Section):
    """FOR EXPERIMENTS ONLY: makes some workers misbehave on purpose. Off by default.

    This section exists to measure robust aggregators and asynchronous rounds
    against known misbehaviour (Byzantine updates, stragglers) in a real run;
    a production job leaves it out. A worker it applies to logs
    ``FAULT INJECTION`` when it starts.

    Workers ``0 .. byzantine-1`` attack: after the rest of their update
    pipeline they send, for every floating-point tensor of their update
    (integer and bool tensors pass unchanged):

    - ``sign_flip``: ``-scale x delta`` (with ``scale: 1`` the plain sign flip);
    - ``scale``: ``scale x delta``;
    - ``noise``: Gaussian noise ``N(0, scale^2)`` of the delta's shape in place of
      the delta, drawn from (job seed, worker index, round).

    The LAST ``slow`` worker indices are stragglers, so by default they do not
    overlap the attackers: after each local fit such a worker waits
    ``(slowdown - 1) x`` the fit's time before pushing, so its rounds take
    ``slowdown`` times as long. More attackers or stragglers than workers is
    refused when the workers start.
    """

    byzantine: int = Field(default=0, ge=0, le=1024, description="workers 0..byzantine-1 send attacked updates")
    attack: Literal["sign_flip", "scale", "noise"] = "sign_flip"
    scale: float = Field(default=10.0, gt=0, le=1e6, description="sign_flip and scale factor; noise standard deviation")
    slow: int = Field(default=0, ge=0, le=1024, description="the last `slow` workers are stragglers")
    slowdown: float = Field(default=5.0, ge=1, le=1000, description="a straggler's rounds take this many times as long")


class AdaptiveClippingConfig(_Section):
    """Adaptive clipping of DP-FedAvg (Andrew et al. 2021): the bound follows a quantile of the update norms.

    Each worker also reports one bit, whether its update's norm was within the
    round's bound; the PS adds Gaussian noise of standard deviation
    ``clipped_count_stddev`` to their sum and moves the bound geometrically
    towards ``target_quantile``: ``C <- C * exp(-learning_rate * (b - target_quantile))``.
    The bit's noise takes a share of the budget: the update's noise multiplier
    becomes ``(z^-2 - (2 * clipped_count_stddev)^-2)^(-1/2)``, so the round still
    costs what noise multiplier ``z`` costs (docs/privacy.md).
    """

    enabled: bool = False
    target_quantile: float = Field(default=0.5, gt=0, lt=1, description="fraction of updates left unclipped")
    learning_rate: float = Field(default=0.2, gt=0, le=10, description="eta_C of the geometric update")
    clipped_count_stddev: float | None = Field(
        default=None, gt=0, le=1e6,
        description="sigma_b, the noise on the count of unclipped updates (the paper suggests sampled / 20); "
                    "required when noise_multiplier > 0",
    )


class DpConfig(_Section):
    """Client-level differential privacy, DP-FedAvg (McMahan et al. 2018; see docs/privacy.md).

    Each worker clips its whole update to L2 norm ``clip_norm``; the PS averages
    with equal weights over the round's sampled workers and adds Gaussian noise of
    standard deviation ``noise_multiplier * clip_norm / sampled`` per coordinate
    (``mode: central``), or each worker adds its share of that noise before it
    uploads (``mode: distributed``). An accountant composes the rounds into
    (epsilon, ``delta``); with ``target_epsilon`` the job ends before the round
    that would exceed it. ``adaptive_clipping`` lets the bound follow a quantile
    of the update norms, starting at ``clip_norm``.
    """

    enabled: bool = False
    mode: Literal["central", "distributed"] = Field(
        default="central", description="who adds the noise: the PS (central) or each sampled worker (distributed)")
    clip_norm: float = Field(default=1.0, gt=0, description="L2 bound on one worker's whole update (the initial one "
                                                            "with adaptive clipping)")
    noise_multiplier: float = Field(default=1.0, ge=0, le=1000, description="z: noise std over clip_norm, on the sum")
    target_epsilon: float | None = Field(default=None, gt=0, description="the job stops before exceeding it")
    delta: float = Field(default=1e-5, gt=0, lt=1)
    accountant: Literal["rdp", "pld"] = "rdp"
    adaptive_clipping: AdaptiveClippingConfig = Field(default_factory=AdaptiveClippingConfig)


class LocalDpConfig(_Section):
    """Local differential privacy: each worker privatises its own upload, so no aggregator needs trust.

    ``gaussian`` (the cloud cluster's ``DP_ENCRYPT``): the worker clips its update
    to ``clip_norm`` and adds Gaussian noise calibrated, with the analytic Gaussian
    mechanism of Balle and Wang 2018, to make each upload (``epsilon``, ``delta``)-DP
    against any change of the worker's data (sensitivity ``2 * clip_norm``).
    ``signds`` (the cloud cluster's ``SIGNDS``; Jiang et al. 2022): the worker
    uploads only ``dims_out`` dimension indices and one random sign, the indices
    chosen by an ``epsilon``-DP exponential mechanism that favours the
    ``sparse_rate`` fraction of coordinates largest in that sign's direction;
    the PS rebuilds ``global_lr * sign`` on them. See docs/privacy.md.
    """

    enabled: bool = False
    mechanism: Literal["gaussian", "signds"] = "gaussian"
    epsilon: float = Field(default=1.0, gt=0, le=1000, description="per upload")
    delta: float = Field(default=1e-5, gt=0, lt=1, description="per upload (gaussian); the composed epsilon's delta")
    clip_norm: float = Field(default=1.0, gt=0, description="gaussian: L2 bound on the update before the noise")
    sparse_rate: float = Field(default=0.01, gt=0, le=0.25, description="signds: the top-k fraction (sign_k)")
    threshold_ratio: float = Field(default=0.6, ge=0.5, le=1,
                                   description="signds: share of top-k indices the mechanism rewards (sign_thr_ratio)")
    global_lr: float = Field(default=1.0, gt=0, le=1e4, description="signds: the step of one selected index "
                                                                    "(sign_global_lr), summed over workers")
    dims_out: int = Field(default=0, ge=0, le=50, description="signds: indices per upload; 0 chooses them from the "
                                                              "other settings (sign_dim_out)")


class UploadCompressionConfig(_Section):
    """How workers compress their updates (docs/privacy.md, "Update compression").

    ``quantize``: unbiased stochastic quantization to ``bits`` per value;
    ``topk``: the ``sparse_rate`` fraction of values of largest magnitude per
    tensor, with error feedback (what a worker does not send it adds to its next
    update), kept at ``sparse_rate ** (round / warmup_rounds)`` during the first
    ``warmup_rounds``; ``topk_quantize``: both (the cloud cluster's ``DIFF_SPARSE_QUANT``).
    """

    type: Literal["none", "quantize", "topk", "topk_quantize"] = "none"
    bits: Literal[8, 4] = Field(default=8, description="bits per quantized value (quantize, topk_quantize)")
    sparse_rate: float = Field(default=0.01, gt=0, lt=1, description="fraction of each tensor's values a top-k keeps")
    warmup_rounds: int = Field(default=0, ge=0, le=100_000,
                               description="top-k: the kept fraction falls exponentially from 1 to sparse_rate over "
                                           "these first rounds (Deep Gradient Compression's warm-up)")


class DownloadCompressionConfig(_Section):
    """How the model travels to the workers; the PS keeps full precision (docs/privacy.md, "Compression").

    ``quantize``: floating-point tensors go as 8-bit codes per block of
    :data:`enclavefl.download_codec.QUANT_BLOCK` values with the block's minimum and
    step (deterministic rounding to the nearest code: each value is off by at most
    half a step); workers train from the dequantized model and send their delta
    against it.
    """

    type: Literal["none", "quantize"] = "none"
    bits: Literal[8] = 8


class CompressionConfig(_Section):
    """Update and model compression (the PS keeps full precision either way)."""

    upload: UploadCompressionConfig = Field(default_factory=UploadCompressionConfig)
    download: DownloadCompressionConfig = Field(default_factory=DownloadCompressionConfig)


class SecureAggregationConfig(_Section):
    """Secure aggregation, SecAgg+ (Bonawitz et al. 2017; Bell et al. 2020; see docs/privacy.md).

    Each worker quantizes its update onto a fixed-point grid (``clip_range``,
    ``quantization_bits``), scales it by its capped integer weight and masks it with
    pseudorandom vectors that cancel in the sum; the PS learns only the survivors'
    weighted sum and total weight. Masks of workers that drop after sharing their
    keys are removed from Shamir shares held by ``neighbours`` other workers, any
    ``threshold`` of which suffice; below the threshold the round is retried and
    nothing is unmasked.
    """

    enabled: bool = False
    threshold: int | float = Field(
        default=0.67,
        description="shares that rebuild a worker's secrets: a fraction of its holders (0.5 < t <= 1, "
                    "with a decimal point) or a count (>= 2); must exceed half the holders")
    neighbours: int | None = Field(default=None, ge=2, le=1024,
                                   description="share holders per worker (SecAgg+); none: 3 log2 n, complete when small")
    quantization_bits: int = Field(default=16, ge=2, le=31, description="fixed-point bits per value, sign included")
    clip_range: float = Field(default=8.0, gt=0, le=1e6, description="values are clipped to [-clip_range, clip_range]")
    rounding: Literal["stochastic", "deterministic"] = Field(
        default="stochastic", description="stochastic: unbiased, error < step; deterministic: error <= step / 2")
    weight_cap: int = Field(default=256, ge=1, description="a worker's integer weight is min(num_samples, weight_cap)")
    min_share_ratio: float = Field(default=0.0, ge=0, le=1,
                                   description="fewer of the round's workers sharing keys: the attempt fails")
    stage_timeout_s: float = Field(default=30.0, gt=0, le=86_400,
                                   description="each key stage (advertise, share, unmask) waits at most this long")
    dense_fallback: bool = Field(default=False,
                                 description="send row-sparse updates densely (masks destroy sparsity)")

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, value: int | float) -> int | float:
        if isinstance(value, int) and value < 2:
            raise ValueError("a count of share holders must be at least 2 (a fraction is written like 0.67)")
        if isinstance(value, float) and not 0.5 < value <= 1.0:
            raise ValueError("a fraction of share holders must be in (0.5, 1.0]")
        return value


class PrivacyConfig(_Section):
    """Privacy mechanisms beyond attestation (docs/privacy.md)."""

    dp: DpConfig = Field(default_factory=DpConfig)
    local_dp: LocalDpConfig = Field(default_factory=LocalDpConfig)
    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    secure_aggregation: SecureAggregationConfig = Field(default_factory=SecureAggregationConfig)


class JobConfig(_Section):
    """A whole job file."""

    job: JobSection = Field(default_factory=JobSection)
    round: RoundConfig = Field(default_factory=RoundConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    client: ClientConfig = Field(default_factory=ClientConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    transport: TransportConfig = Field(default_factory=TransportConfig)
    attestation: AttestationConfig = Field(default_factory=AttestationConfig)
    summary: SummaryConfig = Field(default_factory=SummaryConfig)
    management: ManagementConfig = Field(default_factory=ManagementConfig)
    faults: FaultsConfig = Field(default_factory=FaultsConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @model_validator(mode="after")
    def _compatible(self) -> JobConfig:
        problem = _worker_count_problem(self.round, self.job.workers, "job.workers")
        if problem is not None:
            raise ValueError(problem)
        heartbeat_s, timeout_s = self.round.heartbeat_s, self.round.worker_timeout_s
        if timeout_s < 2 * heartbeat_s:
            # A live worker is heard every heartbeat_s plus a round trip: a shorter timeout drops live workers.
            raise ValueError(f"round.worker_timeout_s={timeout_s:g} must be at least twice round.heartbeat_s={heartbeat_s:g}")
        strategy, aggregator = self.server.strategy.name, self.server.aggregator.name
        if strategy == "scaffold" and aggregator != "mean":
            raise ValueError(
                f"server.strategy scaffold needs server.aggregator mean, got {aggregator}: control variates are "
                "averaged with the model delta, which a robust aggregator would not do"
            )
        if self.round.mode == "async":
            if aggregator in BUFFERING_AGGREGATORS:
                raise ValueError(f"round.mode async needs a streaming server.aggregator (mean or norm_bounded), got {aggregator}")
            if strategy == "scaffold":
                raise ValueError("round.mode async does not support server.strategy scaffold (its control variates assume rounds)")
        if self.privacy.dp.enabled:
            _check_dp(self)
        _check_downloads(self)
        if self.privacy.compression.upload.type != "none":
            _check_upload_compression(self)
        if self.privacy.secure_aggregation.enabled:
            _check_secure_aggregation(self)
        if self.privacy.local_dp.enabled:
            _check_local_dp(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain data, suitable for YAML or JSON (the resolved configuration)."""
        return self.model_dump(mode="json")


def _check_dp(config: JobConfig) -> None:
    """Refuses settings DP-FedAvg's sensitivity argument does not hold under; each message names both keys."""
    aggregator, strategy = config.server.aggregator.name, config.server.strategy.name
    if aggregator != "mean":
        raise ValueError(
            f"privacy.dp.enabled needs server.aggregator mean, got {aggregator}: the noise is calibrated to one "
            "clipped update's share of a mean, and a robust aggregator selects or reweighs individual updates"
        )
    if config.round.mode == "async":
        raise ValueError(
            "privacy.dp.enabled is not supported with round.mode async yet: the accountant composes sampled "
            "rounds, and an async step's participants are not a sample of the joined workers"
        )
    if strategy == "scaffold":
        raise ValueError(
            "privacy.dp.enabled does not support server.strategy scaffold: the control-variate change would be "
            "clipped with the model delta, which breaks SCAFFOLD's correction"
        )
    dp = config.privacy.dp
    adaptive = dp.adaptive_clipping
    if dp.mode == "distributed":
        if config.round.min_updates < 2:
            raise ValueError(
                "privacy.dp.mode distributed needs round.min_updates of at least 2, got "
                f"{config.round.min_updates}: each worker adds the noise share z*C/sqrt(round.min_updates), so that "
                "the fewest updates a round accepts still carry the whole noise; with 1 every worker adds all of it"
            )
        if adaptive.enabled:
            raise ValueError(
                "privacy.dp.adaptive_clipping.enabled needs privacy.dp.mode central, got distributed: the PS adds "
                "the noise on the count of unclipped updates, and no worker could add its share of it"
            )
    if adaptive.enabled and dp.noise_multiplier > 0:
        stddev = adaptive.clipped_count_stddev
        if stddev is None:
            raise ValueError(
                "privacy.dp.adaptive_clipping.enabled needs privacy.dp.adaptive_clipping.clipped_count_stddev when "
                f"privacy.dp.noise_multiplier = {dp.noise_multiplier:g} > 0 (Andrew et al. 2021 suggest the "
                "number of workers sampled per round / 20)"
            )
        if 2 * stddev <= dp.noise_multiplier:
            raise ValueError(
                f"privacy.dp.adaptive_clipping.clipped_count_stddev = {stddev:g} must exceed half of "
                f"privacy.dp.noise_multiplier = {dp.noise_multiplier:g}: the update's noise multiplier "
                "(z^-2 - (2 sigma_b)^-2)^(-1/2) exists only for 2 sigma_b > z"
            )


def _check_local_dp(config: JobConfig) -> None:
    """Refuses what local DP (Gaussian or SignDS) does not compose with; each message names both keys."""
    local = config.privacy.local_dp
    if config.privacy.dp.enabled:
        raise ValueError(
            "privacy.local_dp.enabled and privacy.dp.enabled are exclusive: local DP privatises each upload for an "
            "untrusted aggregator, DP-FedAvg clips to another bound and accounts for the released models; "
            "choose one"
        )
    if config.server.strategy.name == "scaffold":
        raise ValueError(
            "privacy.local_dp.enabled does not support server.strategy scaffold: the control-variate change "
            "would have to be privatised with the model delta, which breaks SCAFFOLD's correction"
        )
    if config.round.mode == "async":
        raise ValueError(
            "privacy.local_dp.enabled is not supported with round.mode async: the composed epsilon counts one "
            "upload per round, and an async worker may upload several times per server step"
        )
    upload = config.privacy.compression.upload.type
    if local.mechanism == "signds" and upload != "none":
        raise ValueError(
            f"privacy.local_dp.mechanism signds with privacy.compression.upload.type {upload}: SignDS is itself "
            "the upload's encoding (a few selected indices and one sign), so there is nothing left to compress; "
            "set the upload type to none"
        )
    aggregator = config.server.aggregator.name
    if local.mechanism == "signds" and aggregator != "mean":
        raise ValueError(
            f"privacy.local_dp.mechanism signds needs server.aggregator mean, got {aggregator}: the PS rebuilds "
            "the update as the sum of the workers' signed selections, which is itself the aggregation"
        )


def _check_downloads(config: JobConfig) -> None:
    """Refuses download settings that cannot work together; each message names both keys."""
    if config.privacy.compression.download.type != "none" and config.transport.sparse_downloads.enabled:
        raise ValueError(
            "privacy.compression.download.type quantize cannot be combined with transport.sparse_downloads.enabled: "
            "a worker applies changed rows to its cached copy, which would then mix full-precision rows with "
            "dequantized ones and no longer equal any model version of the PS; choose one"
        )


def _check_upload_compression(config: JobConfig) -> None:
    """Refuses what upload compression cannot be combined with; each message names both keys.

    Allowed, and why: robust aggregators and async rounds see decoded, plain
    updates; DP clips before compressing and the worker bounds the decoded upload
    by ``clip_norm`` again (docs/privacy.md); sparse embedding rows travel as
    they are (already sparse) while the dense tensors are compressed.
    """
    kind = config.privacy.compression.upload.type
    if config.server.strategy.name == "scaffold" and kind in ("topk", "topk_quantize"):
        raise ValueError(
            f"privacy.compression.upload.type {kind} does not support server.strategy scaffold: error feedback "
            "sends parts of a model delta rounds later, while the control variates are updated with the whole "
            "delta at once, so SCAFFOLD's drift correction no longer matches the model (quantize is unbiased "
            "and allowed)"
        )


def _check_secure_aggregation(config: JobConfig) -> None:
    """Refuses settings secure aggregation cannot serve; each message names both keys and why.

    Allowed on purpose: ``privacy.dp`` (central noise is added after unmasking, inside
    the attested PS) and every server optimizer (they act on the unmasked mean).
    """
    key = "privacy.secure_aggregation.enabled"
    secagg = config.privacy.secure_aggregation
    aggregator, strategy = config.server.aggregator.name, config.server.strategy.name
    if aggregator != "mean":
        raise ValueError(
            f"{key} needs server.aggregator mean, got {aggregator}: the PS sees only the masked sum, so it cannot "
            "select, buffer, reweigh or clip individual updates"
        )
    if config.round.mode == "async":
        raise ValueError(
            f"{key} is not supported with round.mode async: masks cancel only within one round's set of workers, "
            "and an async step folds updates from different model versions as they arrive"
        )
    if strategy == "scaffold":
        raise ValueError(
            f"{key} does not support server.strategy scaffold yet: its control variates travel beside the masked "
            "update and would be revealed"
        )
    if config.round.min_workers < 3:
        raise ValueError(
            f"{key} needs round.min_workers >= 3, got {config.round.min_workers}: with two workers the sum minus "
            "one's own update is the other's update"
        )
    if config.task.name == "criteo-dlrm" and config.task.params.get("sparse_gradients", True) \
            and not secagg.dense_fallback:
        raise ValueError(
            f"{key} with task.params.sparse_gradients (criteo-dlrm uploads row-sparse embedding updates) needs "
            "privacy.secure_aggregation.dense_fallback true: masks destroy sparsity, so rows must travel densely "
            "(or set task.params.sparse_gradients false)"
        )
    local = config.privacy.local_dp
    if local.enabled and local.mechanism == "signds":
        raise ValueError(
            f"{key} with privacy.local_dp.mechanism signds: a SignDS upload is a list of selected indices and a "
            "sign, which the PS must see to rebuild the update; masks only cancel in a sum of dense fixed-point "
            "vectors (Gaussian local DP composes: its noise is added before masking)"
        )
    if config.privacy.dp.enabled and config.privacy.dp.adaptive_clipping.enabled:
        raise ValueError(
            f"{key} does not support privacy.dp.adaptive_clipping.enabled yet: the clipped-or-not bits would be "
            "masked with the update and summed with its weights, and the noisy count adaptive clipping needs is "
            "not built into the masked sum; use a fixed privacy.dp.clip_norm"
        )
    upload = config.privacy.compression.upload.type
    if upload == "quantize":
        raise ValueError(
            f"{key} with privacy.compression.upload.type quantize: secure aggregation already sends every value "
            "as fixed point of privacy.secure_aggregation.quantization_bits, and per-block quantization scales "
            "differ between workers, so masked codes could not be summed; set the upload type to none and choose "
            "quantization_bits"
        )
    if upload in ("topk", "topk_quantize") and not secagg.dense_fallback:
        raise ValueError(
            f"{key} with privacy.compression.upload.type {upload}: masks destroy sparsity (every masked value is "
            "uniformly random, so the upload is dense whatever top-k keeps); set privacy.secure_aggregation."
            "dense_fallback true to send dense masked updates with top-k off, or turn one of them off"
        )
    levels = 2 ** (secagg.quantization_bits - 1) - 1
    capacity = (2**31 - 1) // levels
    if config.job.workers * secagg.weight_cap > capacity:
        raise ValueError(
            f"{key}: job.workers = {config.job.workers} times privacy.secure_aggregation.weight_cap = "
            f"{secagg.weight_cap} exceeds {capacity}, the total weight privacy.secure_aggregation.quantization_bits "
            f"= {secagg.quantization_bits} can sum without overflowing 32 bits; lower one of them"
        )
    if isinstance(secagg.threshold, int) and secagg.threshold > config.round.min_workers:
        raise ValueError(
            f"privacy.secure_aggregation.threshold = {secagg.threshold} exceeds round.min_workers = "
            f"{config.round.min_workers}: a round of that many workers could never be unmasked"
        )
    holders = None if secagg.neighbours is None else secagg.neighbours + secagg.neighbours % 2 + 1
    if isinstance(secagg.threshold, int) and holders is not None and secagg.threshold > holders:
        raise ValueError(
            f"privacy.secure_aggregation.threshold = {secagg.threshold} exceeds the {holders} holders of each "
            f"worker's shares (privacy.secure_aggregation.neighbours = {secagg.neighbours}, made even, plus itself)"
        )


def _worker_count_problem(rounds: RoundConfig, workers: int, key: str) -> str | None:
    """Why ``workers`` workers can never complete a round of ``rounds``, or None if they can."""
    given = f"{key} {workers}" if key.startswith("--") else f"{key} = {workers}"
    if workers < rounds.min_workers:
        return (f"{given} is below round.min_workers = {rounds.min_workers}: no round could ever open; "
                f"lower round.min_workers or raise {key}")
    if rounds.mode == "sync" and workers < rounds.min_updates:
        return (f"{given} is below round.min_updates = {rounds.min_updates}: every round would be retried "
                f"until the job fails; lower round.min_updates or raise {key}")
    return None


def check_worker_count(config: JobConfig, workers: int, key: str) -> None:
    """Refuses a number of workers the job's rounds can never be completed with.

    ``job.workers`` is checked when the job is parsed; this is for a count given
    elsewhere, such as ``enclavefl worker --of``.

    Args:
        key: how the count was given, for the message (``--of``).

    Raises:
        ConfigError: fewer workers than ``round.min_workers``, or (sync rounds) than
            ``round.min_updates``; the message names both settings.
    """
    problem = _worker_count_problem(config.round, workers, key)
    if problem is not None:
        raise ConfigError(problem)


# Cloud FL cluster key -> (our dotted key, factor applied to the value).
# Its time windows are in milliseconds; ours are in seconds.
CLOUD_KEY_ALIASES: Mapping[str, tuple[str, float | None]] = {
    "fl_iteration_num": ("job.rounds", None),
    "start_fl_job_threshold": ("round.min_workers", None),
    "start_fl_job_time_window": ("round.start_window_s", 0.001),
    "update_model_ratio": ("round.update_ratio", None),
    "update_model_time_window": ("round.update_window_s", 0.001),
    "client_epoch_num": ("client.epochs", None),
    "client_batch_size": ("client.batch_size", None),
    "client_learning_rate": ("client.lr", None),
    "share_secrets_ratio": ("privacy.secure_aggregation.min_share_ratio", None),
    "reconstruct_secrets_threshold": ("privacy.secure_aggregation.threshold", None),
    "cipher_time_window": ("privacy.secure_aggregation.stage_timeout_s", 0.001),
}


# Keys the cloud FL cluster nests in its own sections ("compression.upload_compress_type") -> (our
# dotted key, the cloud's value -> ours, or None to keep the value).
CLOUD_SECTION_ALIASES: Mapping[str, tuple[str, Mapping[str, Any] | None]] = {
    "compression.upload_compress_type": (
        "privacy.compression.upload.type", {"NO_COMPRESS": "none", "DIFF_SPARSE_QUANT": "topk_quantize"}),
    "compression.upload_sparse_rate": ("privacy.compression.upload.sparse_rate", None),
    "compression.download_compress_type": (
        "privacy.compression.download.type", {"NO_COMPRESS": "none", "QUANT": "quantize"}),
}
_CLOUD_SECTIONS = frozenset(key.split(".", 1)[0] for key in CLOUD_SECTION_ALIASES)


CLOUD_ENCRYPT_TYPES: Mapping[str, tuple[Mapping[str, Any], str]] = {
    # encrypt type -> (the settings it means here, the sub-section of its parameters)
    "PW_ENCRYPT": ({"privacy.secure_aggregation.enabled": True}, "pw_encrypt"),
    # The cloud cluster's variant for clients that never drop; our dropout-tolerant protocol covers it.
    "STABLE_PW_ENCRYPT": ({"privacy.secure_aggregation.enabled": True}, "pw_encrypt"),
    "DP_ENCRYPT": ({"privacy.local_dp.enabled": True, "privacy.local_dp.mechanism": "gaussian"}, "dp_encrypt"),
    "SIGNDS": ({"privacy.local_dp.enabled": True, "privacy.local_dp.mechanism": "signds"}, "signds"),
}
"""The cloud FL cluster's ``encrypt`` section: each ``encrypt_type`` (or ``encrypt_train_type``) it
accepts, the settings that type means here and where its parameters live (CLOUD_ENCRYPT_PARAMS)."""

CLOUD_ENCRYPT_PARAMS: Mapping[str, Mapping[str, tuple[str, float | None]]] = {
    # sub-section -> its cloud key -> (our dotted key, factor applied to the value); the keys may
    # also stand flat in ``encrypt``.
    "pw_encrypt": {
        "share_secrets_ratio": ("privacy.secure_aggregation.min_share_ratio", None),
        "reconstruct_secrets_threshold": ("privacy.secure_aggregation.threshold", None),
        "cipher_time_window": ("privacy.secure_aggregation.stage_timeout_s", 0.001),  # ms there, s here
    },
    "dp_encrypt": {
        "dp_eps": ("privacy.local_dp.epsilon", None),
        "dp_delta": ("privacy.local_dp.delta", None),
        "dp_norm_clip": ("privacy.local_dp.clip_norm", None),
    },
    "signds": {
        "sign_k": ("privacy.local_dp.sparse_rate", None),
        "sign_eps": ("privacy.local_dp.epsilon", None),
        "sign_thr_ratio": ("privacy.local_dp.threshold_ratio", None),
        "sign_global_lr": ("privacy.local_dp.global_lr", None),
        "sign_dim_out": ("privacy.local_dp.dims_out", None),
    },
}

_ENCRYPT_TYPE_KEYS = ("encrypt_type", "encrypt_train_type")


def _scaled(value: Any, factor: float | None, where: str) -> Any:
    if factor is None:
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where} = {value!r}: expected a number of milliseconds")
    return value * factor


def _resolve_encrypt(doc: dict[str, Any], source: str) -> dict[str, Any]:
    """Translates the cloud cluster's ``encrypt`` section into ``privacy`` keys (CLOUD_ENCRYPT_TYPES).

    Raises:
        ConfigError: an unknown encrypt type, a parameter of another type than the one
            chosen, or a key the section does not have; the message names it.
    """
    section = doc.get("encrypt")
    if section is None:
        return doc
    where = f"{source}: encrypt"
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: expected a mapping (the cloud FL cluster's encrypt section), "
                          f"got {type(section).__name__}")
    section = dict(section)
    given = [key for key in _ENCRYPT_TYPE_KEYS if key in section]
    kind = section.pop(given[0], "NOT_ENCRYPT") if given else "NOT_ENCRYPT"
    for key in given[1:]:
        if section.pop(key) != kind:
            raise ConfigError(f"{where}: encrypt_type and encrypt_train_type differ; give one")
    known = ("NOT_ENCRYPT", *CLOUD_ENCRYPT_TYPES)
    if kind not in known:
        raise ConfigError(f"{where}.{given[0] if given else 'encrypt_type'} = {kind!r}: not supported here "
                          f"(accepted: {', '.join(known)})")
    chosen = CLOUD_ENCRYPT_TYPES[kind][1] if kind != "NOT_ENCRYPT" else None
    params: dict[str, Any] = {}
    for sub, mapping in CLOUD_ENCRYPT_PARAMS.items():
        nested = section.pop(sub, None)
        if nested is not None and not isinstance(nested, dict):
            raise ConfigError(f"{where}.{sub}: expected a mapping, got {type(nested).__name__}")
        entries = {**(nested or {}), **{k: section.pop(k) for k in list(section) if k in mapping}}
        unknown = sorted(set(entries) - set(mapping))
        if unknown:
            raise ConfigError(f"{where}.{sub}.{unknown[0]}: unknown key (known: {', '.join(mapping)})")
        if entries and sub != chosen:
            owners = " or ".join(name for name, (_, s) in CLOUD_ENCRYPT_TYPES.items() if s == sub)
            raise ConfigError(f"{where}: {', '.join(sorted(entries))} apply to encrypt_type {owners}, "
                              f"but the encrypt_type is {kind}")
        for key, value in entries.items():
            dotted, factor = mapping[key]
            params[dotted] = _scaled(value, factor, f"{where}.{sub}.{key}")
    if section:
        raise ConfigError(f"{where}.{sorted(section)[0]}: unknown key (known: {', '.join(_ENCRYPT_TYPE_KEYS)}, "
                          f"{', '.join(CLOUD_ENCRYPT_PARAMS)} and their parameters)")
    out = {k: v for k, v in doc.items() if k != "encrypt"}
    if kind != "NOT_ENCRYPT":
        for dotted, value in {**CLOUD_ENCRYPT_TYPES[kind][0], **params}.items():
            _set_dotted(out, dotted, value, source)
    return out


def _set_dotted(doc: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    if any(not p for p in parts) or len(parts) < 2:
        raise ConfigError(f"{source}: '{dotted}' is not a key path; write section.key=value")
    node = doc
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: '{part}' in '{dotted}' is not a section")
        node = child
    node[parts[-1]] = value


def _resolve_section_aliases(doc: dict[str, Any], out: dict[str, Any], source: str) -> None:
    """Moves the cloud cluster's nested keys (CLOUD_SECTION_ALIASES) from ``doc`` to our keys in ``out``."""
    for section in sorted(_CLOUD_SECTIONS & set(doc)):
        entries = doc[section]
        known = sorted(k.split(".", 1)[1] for k in CLOUD_SECTION_ALIASES if k.startswith(section + "."))
        if not isinstance(entries, dict):
            raise ConfigError(f"{source}: {section} is the cloud cluster's section: expected a mapping of {known}")
        for key, value in entries.items():
            alias = f"{section}.{key}"
            if alias not in CLOUD_SECTION_ALIASES:
                raise ConfigError(f"{source}: {alias} is not a cloud cluster key enclavefl knows (known: {known})")
            dotted, values = CLOUD_SECTION_ALIASES[alias]
            if values is not None:
                if not isinstance(value, str) or value not in values:
                    raise ConfigError(f"{source}: {alias} = {value!r}: expected one of {sorted(values)}")
                value = values[value]
            _set_dotted(out, dotted, value, source)


def _resolve_aliases(doc: dict[str, Any], source: str) -> dict[str, Any]:
    doc = _resolve_encrypt(doc, source)
    out = {k: v for k, v in doc.items() if k not in CLOUD_KEY_ALIASES and k not in _CLOUD_SECTIONS}
    _resolve_section_aliases(doc, out, source)
    for alias, (dotted, factor) in CLOUD_KEY_ALIASES.items():
        if alias not in doc:
            continue
        value = doc[alias]
        if factor is not None:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{source}: {alias} = {value!r}: expected a number of milliseconds")
            value = value * factor
        _set_dotted(out, dotted, value, source)
    return out


def apply_overrides(doc: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Returns a copy of a raw job document with ``section.key=value`` overrides applied.

    Values are read as YAML scalars (``3`` is an int, ``true`` a bool, ``a,b`` a string).
    A cloud FL cluster key may be used in place of the dotted path.

    Raises:
        ConfigError: an override is not of the form ``key=value``.
    """
    out = copy.deepcopy(dict(doc))
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: value {raw!r} is not a YAML scalar: {exc}") from exc
        if key in CLOUD_KEY_ALIASES:
            out[key] = value
        else:
            _set_dotted(out, key, value, f"--set {item}")
    return out


def override_key(item: str) -> str:
    """The dotted key a ``--set`` item sets (a cloud FL cluster key is translated): ``job.rounds`` for ``job.rounds=4``."""
    key = item.partition("=")[0].strip()
    return CLOUD_KEY_ALIASES[key][0] if key in CLOUD_KEY_ALIASES else key


def _task_params_errors(doc: Mapping[str, Any]) -> list[str]:
    """``task.params`` checked against the params model of the built-in task the document names."""
    task = doc.get("task", {})
    if not isinstance(task, dict):
        return []  # the job's own validation reports it
    name = task.get("name", TaskConfig.model_fields["name"].default)
    params = task.get("params", {})
    model = BUILTIN_TASK_PARAMS.get(name) if isinstance(name, str) else None
    if model is None or not isinstance(params, dict):
        return []  # a user task's params are free-form
    try:
        model.model_validate(params)
    except ValidationError as exc:
        return describe_errors(exc, root=model, prefix=("task", "params"))
    return []


def _blame(line: str, overrides: Sequence[str]) -> str | None:
    """The last ``--set`` item that set the key a line is about, if any did."""
    path = line.split(" ", 1)[0].rstrip(":")
    for item in reversed(overrides):
        key = override_key(item)
        if path == key or path.startswith(key + ".") or key.startswith(path + "."):
            return item
        if re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", line):  # a rule over several keys names them
            return item
    return None


def parse_job(doc: Any, *, source: str = "<job>", overrides: Iterable[str] = ()) -> JobConfig:
    """Validates a raw job document (already parsed YAML) into a :class:`JobConfig`.

    ``None`` stands for an empty document, which gives the defaults (here, from
    Python; :func:`load_job` refuses an empty file). A built-in task's
    ``task.params`` are checked against its model in :mod:`enclavefl.task_params`.

    Raises:
        ConfigError: naming every bad key path, the value and what is allowed, each
            blamed on the ``--set`` item that gave it or else on ``source``.
    """
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: a job file is a mapping of sections, got {type(doc).__name__}")
    overrides = list(overrides)
    # Aliases in the file first, so a --set in our spelling overrides them; then
    # aliases given with --set.
    doc = _resolve_aliases(copy.deepcopy(doc), source)
    doc = _resolve_aliases(apply_overrides(doc, overrides), "--set")
    lines = _task_params_errors(doc)
    config = None
    try:
        config = JobConfig.model_validate(doc)
    except ValidationError as exc:
        lines = describe_errors(exc, root=JobConfig, aliases=list(CLOUD_KEY_ALIASES)) + lines
    if config is not None and not lines:
        return config
    blamed = [(_blame(line, overrides), line) for line in lines]
    if len(blamed) == 1:
        item, line = blamed[0]
        raise ConfigError(f"--set {item}: {line}" if item else f"{source}: {line}")
    header = "invalid --set overrides" if all(item for item, _ in blamed) else f"{source}: invalid job configuration"
    body = [f"--set {item}: {line}" if item else line for item, line in blamed]
    raise ConfigError(header + ":\n  " + "\n  ".join(body))


def load_job(path: str | Path, overrides: Iterable[str] = ()) -> JobConfig:
    """Loads and validates a job file (YAML, safe loader only).

    Raises:
        ConfigError: the file is missing, empty (or only comments), not YAML, or invalid.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read job file: {exc.strerror or exc}") from exc
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if doc is None or doc == {}:
        # Defaults would train the digits demo: surely not what an empty file meant.
        raise ConfigError(f"{path}: the job file is empty; write at least its job and task sections")
    return parse_job(doc, source=str(path), overrides=overrides)
