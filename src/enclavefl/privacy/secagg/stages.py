"""What crosses the PS's transport in a secure-aggregation round, and the task settings that start one.

How this works: the PS is the only source of settings, so a train task of a
round with secure aggregation carries them in its config map (keys under
``secagg.``, see :func:`task_config` and :func:`params_from_task`), together with
the attempt's nonce. The worker then makes one call per stage,
:class:`SecAggCall`, posting its message for that stage and long-polling for its
input of the next one, :class:`SecAggAnswer`:

==========  ===========================  ===========================
stage       the worker posts             the worker receives
==========  ===========================  ===========================
advertise   its signed keys              the roster (signed keys of all)
share       one sealed share per holder  the shares sent to it
ready       nothing (after its upload)   the unmask request
unmask      its shares of secrets        nothing
==========  ===========================  ===========================

A call with ``poll`` set posts nothing and asks again (an answer may be
``pending`` when the stage has not closed within the long-poll). The masked
upload itself travels as an ordinary update of kind ``masked``: one uint32
tensor named :data:`MASKED_TENSOR`. The flat layout of an update is its dense
tensors in header order (:func:`flatten_update`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import numpy as np

from enclavefl.errors import ProtocolError
from enclavefl.messages import ConfigValue, PeerIdentity
from enclavefl.privacy.secagg.messages import KeyAdvert, RoundTag, ShareCiphertext, UnmaskReply, UnmaskRequest
from enclavefl.privacy.secagg.params import SecAggParams
from enclavefl.tensors import DTYPES, ParamSet, SparseRows, StreamHeader, TensorSpec

__all__ = [
    "MASKED_TENSOR",
    "NONCE_KEY",
    "PREFIX",
    "STAGES",
    "SecAggAnswer",
    "SecAggCall",
    "SecAggChannel",
    "SecAggHandler",
    "Stage",
    "flatten_update",
    "masked_template",
    "params_from_task",
    "tag_from_task",
    "task_config",
    "unflatten_mean",
]

PREFIX = "secagg."
NONCE_KEY = "secagg.nonce"
MASKED_TENSOR = "secagg.masked"
"""The one tensor of a masked upload: uint32 words, the update's values then its weight."""

Stage = Literal["advertise", "share", "ready", "unmask"]
STAGES: tuple[Stage, ...] = ("advertise", "share", "ready", "unmask")


@dataclass(frozen=True, slots=True)
class SecAggCall:
    """A worker's message for one stage of a round attempt (what the transport hands the PS)."""

    worker_id: str
    round: int
    nonce: bytes
    stage: Stage
    poll: bool = False
    advert: KeyAdvert | None = None
    certificate: bytes = b""
    """advertise: the PEM certificate whose key signed the advert (the one bound at join)."""
    shares: tuple[ShareCiphertext, ...] = ()
    reply: UnmaskReply | None = None
    max_wait_s: float = 30.0

    @property
    def tag(self) -> RoundTag:
        """The round attempt this call is for."""
        return RoundTag(self.round, self.nonce)


@dataclass(frozen=True, slots=True)
class SecAggAnswer:
    """The PS's answer: the worker's input for its next stage, or ``pending`` (ask again)."""

    status: Literal["ready", "pending"]
    roster: tuple[KeyAdvert, ...] = ()
    certificates: Mapping[str, bytes] = field(default_factory=dict)
    """advertise: the certificates of the asking worker's neighbours, the only signatures it checks
    (Bell et al.: O(k) per worker, not O(n); every advert still travels, for the graph seed)."""
    inbox: tuple[ShareCiphertext, ...] = ()
    request: UnmaskRequest | None = None


@runtime_checkable
class SecAggHandler(Protocol):
    """The PS side of the stage calls (the parameter server implements it next to its handler methods)."""

    def secagg_exchange(self, peer: PeerIdentity, call: SecAggCall) -> SecAggAnswer:
        """Takes one stage message and waits (at most ``call.max_wait_s``) for the next stage's input.

        Raises:
            ProtocolError: the message is refused (forged, replayed, out of stage); audited by the caller.
            RoundError: no secure-aggregation round attempt with this nonce is open (it ended or failed).
        """
        ...


@runtime_checkable
class SecAggChannel(Protocol):
    """The worker side: a client that can make stage calls (the gRPC and in-memory clients)."""

    def secagg_exchange(self, call: SecAggCall) -> SecAggAnswer: ...

    def sign_for_secagg(self, payload: bytes) -> tuple[bytes, bytes]:
        """(certificate PEM, signature) with the key this worker's join bound.

        Raises:
            ConfigError: this connection holds no such key (the worker cannot take part).
        """
        ...

    def verify_for_secagg(self, certificate: bytes, payload: bytes, signature: bytes) -> bool:
        """Whether ``certificate`` is one this worker trusts and its key signed ``payload``."""
        ...

    def record_secagg_refusal(self, stage: str, reason: str) -> None:
        """Audits a message this worker refused (a forged share, a greedy unmask request)."""
        ...


def task_config(params: SecAggParams, stage_timeout_s: float, *, equal_weights: bool) -> dict[str, ConfigValue]:
    """The job-wide settings every secure-aggregation train task carries."""
    return {
        "secagg.threshold": params.threshold,
        "secagg.neighbours": params.neighbours or 0,
        "secagg.quantization_bits": params.quantization_bits,
        "secagg.clip_range": params.clip_range,
        "secagg.rounding": params.rounding,
        "secagg.weight_cap": 1 if equal_weights else params.weight_cap,
        "secagg.stage_timeout_s": stage_timeout_s,
    }


def _get(config: Mapping[str, ConfigValue], key: str, kind: type | tuple[type, ...]) -> ConfigValue:
    value = config.get(key)
    if value is None or isinstance(value, bool) or not isinstance(value, kind):
        raise ProtocolError(f"the train task's {key} is {value!r}, expected a {kind}")
    return value


def params_from_task(config: Mapping[str, ConfigValue]) -> tuple[SecAggParams, float] | None:
    """The round's parameters and stage timeout from a train task, or None if it has no secure aggregation.

    Raises:
        ProtocolError: a setting is missing or of the wrong type.
    """
    if NONCE_KEY not in config:
        return None
    threshold = _get(config, "secagg.threshold", (int, float))
    neighbours = int(_get(config, "secagg.neighbours", int))
    rounding = _get(config, "secagg.rounding", str)
    if rounding not in ("stochastic", "deterministic"):
        raise ProtocolError(f"the train task's secagg.rounding is {rounding!r}")
    try:
        params = SecAggParams(
            threshold=threshold,  # type: ignore[arg-type]
            neighbours=neighbours or None,
            quantization_bits=int(_get(config, "secagg.quantization_bits", int)),
            clip_range=float(_get(config, "secagg.clip_range", (int, float))),
            rounding=rounding,  # type: ignore[arg-type]
            weight_cap=int(_get(config, "secagg.weight_cap", int)),
        )
        params.fixed_point()
    except ValueError as exc:
        raise ProtocolError(f"the train task's secure-aggregation settings are unusable: {exc}") from exc
    return params, float(_get(config, "secagg.stage_timeout_s", (int, float)))


def tag_from_task(round_: int, config: Mapping[str, ConfigValue]) -> RoundTag:
    """The attempt's round tag from a train task.

    Raises:
        ProtocolError: the nonce is not 32 hex digits.
    """
    text = config.get(NONCE_KEY)
    try:
        nonce = bytes.fromhex(str(text))
    except ValueError as exc:
        raise ProtocolError(f"the train task's {NONCE_KEY} is not hex") from exc
    if len(nonce) != 16:
        raise ProtocolError(f"the train task's {NONCE_KEY} must be 16 bytes, got {len(nonce)}")
    return RoundTag(round_, nonce)


def _value_count(template: StreamHeader) -> int:
    return sum(int(np.prod(spec.shape, dtype=np.int64)) for spec in template.tensors)


def masked_template(template: StreamHeader) -> StreamHeader:
    """The header of a masked upload for updates shaped like ``template``."""
    return StreamHeader((TensorSpec(MASKED_TENSOR, "uint32", (_value_count(template) + 1,)),))


def flatten_update(update: ParamSet, template: StreamHeader) -> np.ndarray:
    """The update's values as one flat float vector, in ``template`` order (row-sparse tensors made dense).

    Float32 tensors stay float32 (every float32 is exact in float64, so the encoding
    that follows gets the same values) and one dense tensor comes back as a view:
    no model-sized float64 copy.

    Raises:
        ValueError: the update's tensors are not the template's.
    """
    names = [spec.name for spec in template.tensors]
    if list(update.keys()) != names:
        raise ValueError(f"update tensors {list(update.keys())[:5]} are not the upload template's {names[:5]}")
    parts = []
    for spec in template.tensors:
        value = update[spec.name]
        dense = value.to_dense() if isinstance(value, SparseRows) else value
        if tuple(dense.shape) != tuple(spec.shape):
            raise ValueError(f"tensor {spec.name}: shape {dense.shape}, template {spec.shape}")
        kind = np.float32 if dense.dtype in (np.float32, np.float16) else np.float64
        parts.append(np.asarray(dense, dtype=kind).reshape(-1))
    if len(parts) == 1:
        return parts[0]
    return np.concatenate(parts, dtype=np.result_type(*parts)) if parts else np.zeros(0)


def unflatten_mean(mean: np.ndarray, template: StreamHeader) -> ParamSet:
    """The inverse of :func:`flatten_update` for an aggregate, in the template's dtypes (integers rounded)."""
    out = []
    offset = 0
    for spec in template.tensors:
        count = int(np.prod(spec.shape, dtype=np.int64))
        values = mean[offset:offset + count].reshape(spec.shape)
        offset += count
        dtype = DTYPES[spec.dtype]
        if dtype.kind in "iub":
            values = np.rint(values)
        out.append((spec.name, np.asarray(values, dtype=dtype)))
    return ParamSet(out)
