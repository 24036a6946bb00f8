"""Plain value types that cross the seam between the transport and the PS and worker logic.

They live outside :mod:`enclavefl.transport` so that the server's parts (round,
aggregators, metrics, engines) and the worker runtime load without grpc,
cryptography or the attestation stack: the gRPC service translates envelopes
into these types, and an in-memory transport hands them over directly.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeAlias

from enclavefl.tensors import EncodedUpdate, ParamSet, StreamHeader

__all__ = [
    "CONTROL_DELTA_PREFIX",
    "COMPRESSION_BITS_KEY",
    "COMPRESSION_SPARSE_RATE_KEY",
    "COMPRESSION_TYPE_KEY",
    "COMPRESSION_WARMUP_KEY",
    "CLUSTER_SERVERS_KEY",
    "CONTROL_PREFIX",
    "DP_ADAPTIVE_KEY",
    "DP_CLIP_NORM_KEY",
    "DP_NOISE_STD_KEY",
    "DP_UNCLIPPED_TENSOR",
    "LOCAL_DP_CLIP_NORM_KEY",
    "LOCAL_DP_DELTA_KEY",
    "LOCAL_DP_DIMS_OUT_KEY",
    "LOCAL_DP_EPSILON_KEY",
    "LOCAL_DP_MECHANISM_KEY",
    "LOCAL_DP_THRESHOLD_RATIO_KEY",
    "LOCAL_DP_TOP_K_KEY",
    "SIGNDS_INDICES_TENSOR",
    "SIGNDS_SIGN_TENSOR",
    "ClientSettings",
    "ConfigValue",
    "FederationHandler",
    "JoinInfo",
    "PeerIdentity",
    "PushResult",
    "TaskInfo",
    "TaskKind",
    "UpdateKind",
    "UpdateMeta",
    "UpdateSink",
    "WorkerClient",
]

CONTROL_PREFIX = "scaffold.c/"
"""SCAFFOLD: the server control variate travels with the model as tensors named ``scaffold.c/<param>``."""

CONTROL_DELTA_PREFIX = "scaffold.dc/"
"""SCAFFOLD: a worker's control-variate change travels with its delta as ``scaffold.dc/<param>``."""

DP_CLIP_NORM_KEY = "privacy.dp.clip_norm"
"""Differential privacy: the L2 bound a worker clips its whole update to, in a train task's config map."""

COMPRESSION_TYPE_KEY = "privacy.compression.upload.type"
"""Upload compression: ``quantize``, ``topk`` or ``topk_quantize`` in a train task's config map (absent: none)."""

COMPRESSION_BITS_KEY = "privacy.compression.upload.bits"
"""Upload compression: bits per quantized value (8 or 4), in a train task's config map."""

COMPRESSION_SPARSE_RATE_KEY = "privacy.compression.upload.sparse_rate"
"""Upload compression: the fraction of each tensor's values a top-k keeps, in a train task's config map."""

COMPRESSION_WARMUP_KEY = "privacy.compression.upload.warmup_rounds"
"""Upload compression: rounds over which top-k's kept fraction falls from 1 to the sparse rate (0: none)."""

DP_ADAPTIVE_KEY = "privacy.dp.adaptive_clipping"
"""Adaptive clipping (True): the worker also uploads whether its update was within the bound, as
the float32 scalar tensor :data:`DP_UNCLIPPED_TENSOR` (1.0 within, 0.0 clipped) after the model's."""

DP_UNCLIPPED_TENSOR = "dp/unclipped"
"""Adaptive clipping: the name of the uploaded bit ``[||delta|| <= clip_norm]``, measured before clipping."""

DP_NOISE_STD_KEY = "privacy.dp.noise_std"
"""Distributed DP: the standard deviation of the Gaussian noise each worker adds per coordinate after clipping."""

LOCAL_DP_MECHANISM_KEY = "privacy.local_dp.mechanism"
"""Local DP: ``gaussian`` or ``signds``; the task's other ``privacy.local_dp.*`` keys are its parameters."""

LOCAL_DP_EPSILON_KEY = "privacy.local_dp.epsilon"
LOCAL_DP_DELTA_KEY = "privacy.local_dp.delta"
LOCAL_DP_CLIP_NORM_KEY = "privacy.local_dp.clip_norm"
LOCAL_DP_TOP_K_KEY = "privacy.local_dp.top_k"
"""SignDS: k, the size of the top-k set, as the PS computed it from the model and ``sparse_rate``."""
LOCAL_DP_DIMS_OUT_KEY = "privacy.local_dp.dims_out"
"""SignDS: h, the number of indices per upload, as the PS resolved it."""
LOCAL_DP_THRESHOLD_RATIO_KEY = "privacy.local_dp.threshold_ratio"

CLUSTER_SERVERS_KEY = "cluster.servers"
"""Cluster mode: the worker's servers as ``HOST:PORT`` separated by commas, in the order it should use them
(its server first), in a WAIT answer's config map. A worker whose server is not first moves to the first."""

SIGNDS_INDICES_TENSOR = "signds/indices"
"""SignDS upload: the selected coordinates (int64, shape (h,), sorted, distinct) of the flattened update."""
SIGNDS_SIGN_TENSOR = "signds/sign"
"""SignDS upload: the sign (int64, shape (1,), -1 or +1) the worker drew."""

ConfigValue: TypeAlias = bool | int | float | str
"""A value of a task's per-round configuration map (what later stages add travels here)."""


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """Who is calling: the fingerprint of its TLS certificate, a short label for logs, and what it proved.

    The fields after ``measurement`` are what the peer's attestation proved at its
    join (shown by the management plane); their defaults say "no evidence", so a
    peer known only by its certificate (plain mTLS, an in-memory worker) needs none.
    """

    fingerprint: str
    label: str
    measurement: str = ""
    """MRENCLAVE (SGX) or MRTD (TDX), hex; "" without attestation."""
    evidence: Literal["sgx", "tdx", "simulated", "none"] = "none"
    mr_signer: str = ""
    isv_prod_id: int | None = None
    isv_svn: int | None = None
    tcb_status: str | None = None
    """Intel's TCB status from collateral; None when it was not evaluated."""
    advisories: tuple[str, ...] = ()
    weaker: tuple[str, ...] = ()
    """The policy allowances the acceptance relied on (``missing_collateral``, ...)."""


class TaskKind(enum.Enum):
    WAIT = "wait"
    TRAIN = "train"
    FINISH = "finish"


class UpdateKind(enum.Enum):
    """What a pushed update holds; the update header says it, the PS checks it."""

    DELTA = "delta"          # new weights minus the model version trained on
    WEIGHTS = "weights"      # the new weights themselves
    MASKED = "masked"        # secure aggregation: masked fixed-point values
    QUANTIZED = "quantized"  # compressed encoding of a delta


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """Everything the PS controls about local training, sent with every train task.

    The PS is the single source of these: a worker never reads them from its own
    job file, so a worker with a stale file cannot train with other settings.
    """

    epochs: int
    batch_size: int
    lr: float
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    algorithm: str = "fedavg"
    """``fedavg``, ``fedprox`` or ``scaffold``: what the worker runs around local training."""
    proximal_mu: float = 0.0


@dataclass(frozen=True, slots=True)
class JoinInfo:
    worker_id: str
    job_name: str
    ps_instance: str
    rounds: int
    heartbeat_s: float = 0.0
    """How often the PS must hear from this worker (its ``round.heartbeat_s``); 0: the PS does not ask."""


@dataclass(frozen=True, slots=True)
class TaskInfo:
    kind: TaskKind
    ps_instance: str
    round: int = 0
    model_version: int = 0
    retry_after_s: float = 0.0
    client: ClientSettings | None = None
    message: str = ""
    config: Mapping[str, ConfigValue] = field(default_factory=dict)
    """Per-round settings of later stages (secure aggregation, privacy, ...), by name."""


@dataclass(frozen=True, slots=True)
class UpdateMeta:
    """The header of a pushed update, as the worker announced it (not yet trusted)."""

    worker_id: str
    round: int
    model_version: int
    num_samples: int
    tensors: StreamHeader
    metrics: Mapping[str, float] = field(default_factory=dict)
    kind: UpdateKind = UpdateKind.DELTA
    extensions: Mapping[str, bytes] = field(default_factory=dict)
    """Opaque per-stage data (e.g. a secure-aggregation share); checked by the part that reads it."""


class UpdateSink(ABC):
    """Receives one update's chunks; either commit() or abort() ends it."""

    @abstractmethod
    def feed(self, chunk: bytes | memoryview) -> None:
        """Stages one chunk. Raises ProtocolError on a chunk the header did not announce."""

    @abstractmethod
    def commit(self) -> None:
        """Validates the whole update and folds it into the aggregate.

        Raises:
            UpdateRejected: the update is invalid or late; the aggregate is unchanged.
        """

    @abstractmethod
    def abort(self, reason: str) -> None:
        """Drops the staged update (broken stream); the aggregate is unchanged. Idempotent."""


class FederationHandler(Protocol):
    """What the transport asks of the parameter server. Methods may block."""

    def join(self, peer: PeerIdentity, worker_name: str, num_samples: int) -> JoinInfo: ...

    def wait_task(self, peer: PeerIdentity, worker_id: str, max_wait_s: float) -> TaskInfo: ...

    def model_for(self, peer: PeerIdentity, worker_id: str, model_version: int) -> tuple[int, ParamSet]: ...

    def open_update(self, peer: PeerIdentity, meta: UpdateMeta) -> UpdateSink: ...

    def leave(self, peer: PeerIdentity, worker_id: str, reason: str) -> None: ...

    def heartbeat(self, peer: PeerIdentity, worker_id: str) -> None:
        """The worker is alive (it is training, pulling or pushing). Raises StaleSession if it was dropped."""
        ...


@dataclass(frozen=True, slots=True)
class PushResult:
    accepted: bool
    reason: str
    bytes_sent: int


class WorkerClient(Protocol):
    """The worker's end of the federation: the gRPC client, or an in-memory one in simulation.

    Errors are the project's own (TransportError and its kinds, StaleSession,
    VerificationError, ProtocolError); nothing transport-specific reaches the worker.
    """

    def join(self, worker_name: str, num_samples: int, *, job_settings: Mapping[str, str] | None = None) -> JoinInfo:
        """Joins the job.

        Args:
            job_settings: digests of the settings every node must share, for the PS to
                compare (:mod:`enclavefl.job_digest`); None: nothing to compare.

        Raises:
            ConfigError: the PS refused the join because the settings differ.
        """
        ...

    def wait_task(self, worker_id: str, max_wait_s: float) -> TaskInfo: ...

    def pull_model(self, worker_id: str, model_version: int) -> tuple[int, ParamSet, int]:
        """Returns (model version, parameters, bytes received).

        ``model_version`` is the version the worker holds in full (-1: none); the parameters
        may be relative to it (:func:`enclavefl.download_codec.resolve_download`).
        """
        ...

    def push_update(self, worker_id: str, round_: int, model_version: int, update: ParamSet | EncodedUpdate,
                    num_samples: int, metrics: Mapping[str, float], *, kind: UpdateKind = UpdateKind.DELTA,
                    extensions: Mapping[str, bytes] | None = None) -> PushResult:
        """Streams an update (an EncodedUpdate when its kind is QUANTIZED) and returns the PS's verdict."""
        ...

    def leave(self, worker_id: str, reason: str) -> None: ...

    def heartbeat(self, worker_id: str) -> None:
        """Tells the PS this worker is alive; may be called from another thread than the other calls."""
        ...

    def close(self) -> None:
        """Idempotent."""
        ...
