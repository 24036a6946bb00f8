"""Translation between protobuf envelopes, the seam types and our errors.

This is the only place that knows both the generated stubs and the plain types
of :mod:`enclavefl.tensors` and :mod:`enclavefl.messages`, and the only place
where ``grpc.RpcError`` becomes one of our exceptions.

How this works: each ``*_to_proto`` function builds an envelope from values
this process made and trusts them; each ``*_from_proto`` function reads an
envelope a peer sent, trusts nothing, and raises :class:`ProtocolError` naming
the field that broke the format or a limit. The protocol version is checked
by the callers (they know which call the envelope belongs to).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Literal, NoReturn

import grpc

from enclavefl.errors import (
    ConfigError,
    DeadlineExceeded,
    EnclaveFLError,
    ProtocolError,
    StaleSession,
    TransportError,
    Unavailable,
    VerificationError,
    VersionMismatch,
)
from enclavefl.messages import ClientSettings, ConfigValue, TaskInfo, TaskKind, UpdateKind, UpdateMeta
from enclavefl.proto import PROTOCOL_VERSION
from enclavefl.proto import federation_pb2 as pb
from enclavefl.tensors import StreamHeader, TensorSpec

__all__ = [
    "ALGORITHMS",
    "MAX_CONFIG_ENTRIES",
    "MAX_CONFIG_KEY_BYTES",
    "MAX_CONFIG_TEXT_BYTES",
    "MAX_EXTENSIONS",
    "MAX_EXTENSIONS_TOTAL_BYTES",
    "MAX_EXTENSION_BYTES",
    "MAX_EXTENSION_KEY_BYTES",
    "OPTIMIZERS",
    "SETTINGS_MISMATCH",
    "STATUS_ERRORS",
    "check_version",
    "config_from_proto",
    "config_to_proto",
    "error_from_rpc",
    "extensions_from_proto",
    "header_from_proto",
    "header_to_proto",
    "settings_from_proto",
    "settings_to_proto",
    "task_from_proto",
    "task_to_proto",
    "tls_failure",
    "update_meta_from_proto",
    "update_meta_to_proto",
]

MAX_CONFIG_ENTRIES = 256
"""Entries in one ``Task.config`` map."""
MAX_CONFIG_KEY_BYTES = 128
"""UTF-8 bytes of one ``Task.config`` key."""
MAX_CONFIG_TEXT_BYTES = 4096
"""UTF-8 bytes of one ``Task.config`` text value."""
MAX_EXTENSIONS = 64
"""Entries in one ``UpdateHeader.extensions`` map."""
MAX_EXTENSION_KEY_BYTES = 128
"""UTF-8 bytes of one ``UpdateHeader.extensions`` key."""
MAX_EXTENSION_BYTES = 1024 * 1024
"""Bytes of one ``UpdateHeader.extensions`` value."""
MAX_EXTENSIONS_TOTAL_BYTES = 8 * 1024 * 1024
"""Bytes of all ``UpdateHeader.extensions`` values together (the header is one gRPC message)."""

OPTIMIZERS = frozenset({"sgd", "adam"})
"""The worker's local optimizers, as ``ClientSettings.optimizer`` names them."""
ALGORITHMS = frozenset({"fedavg", "fedprox", "scaffold"})
"""What a worker runs around local training, as ``ClientSettings.algorithm`` names it."""

SETTINGS_MISMATCH = "job settings differ"
"""Words of the PS's refusal of a join whose job settings differ (FAILED_PRECONDITION): the worker's
:func:`error_from_rpc` recognises them and raises :class:`ConfigError`, a mistake in the job file."""

_ENCODINGS = {pb.DENSE: "dense", pb.SPARSE_ROWS: "sparse_rows", pb.Q8: "q8", pb.Q4: "q4", pb.TOPK: "topk",
              pb.TOPK_Q8: "topk_q8", pb.TOPK_Q4: "topk_q4"}
_ENCODING_IDS = {v: k for k, v in _ENCODINGS.items()}

# Every gRPC status maps to the most specific error we have.
STATUS_ERRORS: Mapping[grpc.StatusCode, type[EnclaveFLError]] = {
    grpc.StatusCode.OK: TransportError,
    grpc.StatusCode.CANCELLED: TransportError,
    grpc.StatusCode.UNKNOWN: TransportError,
    grpc.StatusCode.INVALID_ARGUMENT: ProtocolError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.NOT_FOUND: StaleSession,
    grpc.StatusCode.ALREADY_EXISTS: ProtocolError,
    grpc.StatusCode.PERMISSION_DENIED: VerificationError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ProtocolError,
    grpc.StatusCode.FAILED_PRECONDITION: ProtocolError,
    grpc.StatusCode.ABORTED: TransportError,
    grpc.StatusCode.OUT_OF_RANGE: ProtocolError,
    grpc.StatusCode.UNIMPLEMENTED: VersionMismatch,
    grpc.StatusCode.INTERNAL: TransportError,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DATA_LOSS: ProtocolError,
    grpc.StatusCode.UNAUTHENTICATED: VerificationError,
}


def error_from_rpc(exc: grpc.RpcError, what: str) -> EnclaveFLError:
    """Our exception for a failed call of the worker's client; ``what`` names the call for the message.

    A refusal for another protocol version becomes :class:`VersionMismatch`, a
    join refused for differing job settings :class:`ConfigError`.
    """
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else None) or str(code)
    message = f"{what}: {details}"
    kind = STATUS_ERRORS.get(code, TransportError)
    if code == grpc.StatusCode.FAILED_PRECONDITION and "protocol version" in details:
        kind = VersionMismatch
    if code == grpc.StatusCode.FAILED_PRECONDITION and SETTINGS_MISMATCH in details:
        return ConfigError(message)
    if kind is VersionMismatch and "speaks protocol" not in details:
        # A protocol-1 PS's refusal ("this build speaks 1") does not say which side it is on: say ours.
        message += f" (this worker speaks protocol {PROTOCOL_VERSION}: run the PS and the workers of one release)"
    if kind is VerificationError:
        return VerificationError("peer", "accepted by the peer", "refused", message)
    return kind(message)


_SSL_REASON = re.compile(r"SSL_ERROR_SSL: error:[0-9a-fA-F]+:SSL routines:OPENSSL_internal:([A-Z0-9_]+)(?:: ([^:]+))?")


def tls_failure(details: str) -> str | None:
    """Why a call's TLS handshake failed, from gRPC's details; None when it was not the handshake.

    A handshake the peer's certificate fails (another CA, expired, another
    name) is a deployment mistake that retrying cannot mend; a refused or
    closed connection is not recognised here (the PS may just be down).
    """
    if "Hostname Verification Check failed" in details:
        return "the PS certificate does not hold the name this node checks (transport.tls.server_name)"
    match = _SSL_REASON.search(details)
    if match is not None:
        code, reason = match.group(1), (match.group(2) or "").strip()
        if code == "CERTIFICATE_VERIFY_FAILED":
            return f"the PS certificate failed verification ({reason or code}): it is not from this node's CA"
        return f"the TLS handshake failed ({code}{': ' + reason if reason else ''})"
    if "handshake failed" in details.lower():
        return "the TLS handshake failed"
    return None


def check_version(version: int, what: str, *, sender: Literal["PS", "worker"]) -> None:
    """Refuses an envelope of another protocol version, saying which side to upgrade.

    Args:
        version: the ``protocol_version`` the envelope carries.
        what: the call or envelope, for the message.
        sender: who sent the envelope; this process is the other side.

    Raises:
        VersionMismatch: ``version`` is not :data:`PROTOCOL_VERSION`. The message
            keeps the words "protocol version", which is how a peer's
            ``error_from_rpc`` (of this or an older release) recognises it.
    """
    if version == PROTOCOL_VERSION:
        return
    receiver = "worker" if sender == "PS" else "PS"
    outdated = sender if version < PROTOCOL_VERSION else receiver
    raise VersionMismatch(
        f"{what}: protocol version mismatch: upgrade the {outdated}: "
        f"this {receiver} speaks protocol {PROTOCOL_VERSION}, the {sender} {version}"
    )


def header_to_proto(header: StreamHeader) -> pb.TensorHeader:
    """The envelope of a tensor stream's header."""
    return pb.TensorHeader(
        tensors=[
            pb.TensorSpec(
                name=t.name,
                dtype=t.dtype,
                shape=list(t.shape),
                encoding=_ENCODING_IDS[t.encoding],
                nnz_rows=t.nnz_rows,
                coded_bytes=t.coded_bytes,
            )
            for t in header.tensors
        ]
    )


def header_from_proto(msg: pb.TensorHeader) -> StreamHeader:
    """Converts without trusting anything: limits are checked by the decoder."""
    specs = []
    for t in msg.tensors:
        encoding = _ENCODINGS.get(t.encoding)
        if encoding is None:
            raise ProtocolError(f"tensor {t.name!r}: unknown encoding {t.encoding}")
        specs.append(
            TensorSpec(name=t.name, dtype=t.dtype, shape=tuple(int(d) for d in t.shape),
                       encoding=encoding, nnz_rows=int(t.nnz_rows),  # type: ignore[arg-type]
                       coded_bytes=int(t.coded_bytes))
        )
    return StreamHeader(tuple(specs))


# -- ClientSettings -----------------------------------------------------------------------------------------


def settings_to_proto(settings: ClientSettings) -> pb.ClientSettings:
    """The envelope of a train task's settings (the PS made them from its validated job file)."""
    return pb.ClientSettings(
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        lr=settings.lr,
        optimizer=settings.optimizer,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
        algorithm=settings.algorithm,
        proximal_mu=settings.proximal_mu,
    )


def _bad_setting(name: str, found: object, expected: str) -> NoReturn:
    raise ProtocolError(f"ClientSettings.{name}: {found!r}, expected {expected}")


def settings_from_proto(msg: pb.ClientSettings) -> ClientSettings:
    """The settings a PS sent, checked the way the PS's job file is, since the worker trains with them.

    Raises:
        ProtocolError: a value is out of range; the message names the field.
    """
    if msg.epochs < 1:
        _bad_setting("epochs", msg.epochs, ">= 1")
    if msg.batch_size < 1:
        _bad_setting("batch_size", msg.batch_size, ">= 1")
    if not (math.isfinite(msg.lr) and msg.lr > 0):
        _bad_setting("lr", msg.lr, "a finite number > 0")
    if msg.optimizer not in OPTIMIZERS:
        _bad_setting("optimizer", msg.optimizer, "one of " + ", ".join(sorted(OPTIMIZERS)))
    if not 0.0 <= msg.momentum < 1.0:  # false for NaN too
        _bad_setting("momentum", msg.momentum, "a number in [0, 1)")
    if not (math.isfinite(msg.weight_decay) and msg.weight_decay >= 0):
        _bad_setting("weight_decay", msg.weight_decay, "a finite number >= 0")
    if msg.algorithm not in ALGORITHMS:
        _bad_setting("algorithm", msg.algorithm, "one of " + ", ".join(sorted(ALGORITHMS)))
    if not (math.isfinite(msg.proximal_mu) and msg.proximal_mu >= 0):
        _bad_setting("proximal_mu", msg.proximal_mu, "a finite number >= 0")
    return ClientSettings(
        epochs=int(msg.epochs),
        batch_size=int(msg.batch_size),
        lr=float(msg.lr),
        optimizer=msg.optimizer,
        momentum=float(msg.momentum),
        weight_decay=float(msg.weight_decay),
        algorithm=msg.algorithm,
        proximal_mu=float(msg.proximal_mu),
    )


# -- Task and its config map --------------------------------------------------------------------------------

_TASK_KINDS = {TaskKind.WAIT: pb.Task.WAIT, TaskKind.TRAIN: pb.Task.TRAIN, TaskKind.FINISH: pb.Task.FINISH}
_TASK_KIND_IDS = {v: k for k, v in _TASK_KINDS.items()}


def _shown(key: str) -> str:
    """A key for an error message: a hostile key may be long, the message stays short."""
    return repr(key if len(key) <= 40 else key[:40] + "...")


def config_to_proto(config: Mapping[str, ConfigValue]) -> dict[str, pb.ConfigValue]:
    """The envelope entries of a task's config map (limits are the receiver's to check).

    Raises:
        TypeError: a value is not a bool, int, float or str.
    """
    out: dict[str, pb.ConfigValue] = {}
    for key, value in config.items():
        # bool before int: True is an int too, and must come back as a flag.
        if isinstance(value, bool):
            out[key] = pb.ConfigValue(flag=value)
        elif isinstance(value, int):
            out[key] = pb.ConfigValue(integer=value)
        elif isinstance(value, float):
            out[key] = pb.ConfigValue(number=value)
        elif isinstance(value, str):
            out[key] = pb.ConfigValue(text=value)
        else:
            raise TypeError(f"Task.config[{key!r}]: {type(value).__name__}, expected bool, int, float or str")
    return out


def config_from_proto(entries: Mapping[str, pb.ConfigValue]) -> dict[str, ConfigValue]:
    """A task's config map as a peer sent it, within the map's limits.

    Raises:
        ProtocolError: too many entries, a key or text value too long, or an
            entry with no value; the message names the limit or the key.
    """
    if len(entries) > MAX_CONFIG_ENTRIES:
        raise ProtocolError(f"Task.config: {len(entries)} entries, at most {MAX_CONFIG_ENTRIES}")
    out: dict[str, ConfigValue] = {}
    for key, entry in entries.items():
        key_bytes = len(key.encode())
        if key_bytes > MAX_CONFIG_KEY_BYTES:
            raise ProtocolError(
                f"Task.config: key {_shown(key)} has {key_bytes} bytes, at most {MAX_CONFIG_KEY_BYTES}"
            )
        which = entry.WhichOneof("value")
        if which == "flag":
            out[key] = bool(entry.flag)
        elif which == "integer":
            out[key] = int(entry.integer)
        elif which == "number":
            out[key] = float(entry.number)
        elif which == "text":
            text_bytes = len(entry.text.encode())
            if text_bytes > MAX_CONFIG_TEXT_BYTES:
                raise ProtocolError(
                    f"Task.config[{_shown(key)}]: text of {text_bytes} bytes, at most {MAX_CONFIG_TEXT_BYTES}"
                )
            out[key] = entry.text
        else:
            raise ProtocolError(f"Task.config[{_shown(key)}]: no value set")
    return out


def task_to_proto(task: TaskInfo) -> pb.Task:
    """The envelope of a task the PS hands out, with this build's protocol version."""
    msg = pb.Task(
        protocol_version=PROTOCOL_VERSION,
        kind=_TASK_KINDS[task.kind],
        round=task.round,
        model_version=task.model_version,
        ps_instance=task.ps_instance,
        retry_after_s=task.retry_after_s,
        message=task.message,
        config=config_to_proto(task.config),
    )
    if task.client is not None:
        msg.client.CopyFrom(settings_to_proto(task.client))
    return msg


def task_from_proto(msg: pb.Task) -> TaskInfo:
    """A task as the PS sent it (the caller checks ``protocol_version``).

    Raises:
        ProtocolError: an unknown kind, bad client settings or a config map out
            of its limits; the message names the field.
    """
    kind = _TASK_KIND_IDS.get(msg.kind)
    if kind is None:
        raise ProtocolError(f"Task.kind: unknown value {msg.kind}, expected WAIT, TRAIN or FINISH")
    return TaskInfo(
        kind=kind,
        ps_instance=msg.ps_instance,
        round=int(msg.round),
        model_version=int(msg.model_version),
        retry_after_s=float(msg.retry_after_s),
        client=settings_from_proto(msg.client) if msg.HasField("client") else None,
        message=msg.message,
        config=config_from_proto(msg.config),
    )


# -- UpdateHeader -------------------------------------------------------------------------------------------

_UPDATE_KINDS = {
    UpdateKind.DELTA: pb.DELTA,
    UpdateKind.WEIGHTS: pb.WEIGHTS,
    UpdateKind.MASKED: pb.MASKED,
    UpdateKind.QUANTIZED: pb.QUANTIZED,
}
_UPDATE_KIND_IDS = {v: k for k, v in _UPDATE_KINDS.items()}


def extensions_from_proto(entries: Mapping[str, bytes]) -> dict[str, bytes]:
    """An update's extensions map as a worker sent it, within the map's limits.

    Counts are checked before anything is copied, each length before its value is kept.

    Raises:
        ProtocolError: too many entries, a key or value too long, or too many
            bytes together; the message names the limit and the key.
    """
    if len(entries) > MAX_EXTENSIONS:
        raise ProtocolError(f"UpdateHeader.extensions: {len(entries)} entries, at most {MAX_EXTENSIONS}")
    out: dict[str, bytes] = {}
    total = 0
    for key, value in entries.items():
        key_bytes = len(key.encode())
        if key_bytes > MAX_EXTENSION_KEY_BYTES:
            raise ProtocolError(
                f"UpdateHeader.extensions: key {_shown(key)} has {key_bytes} bytes, at most {MAX_EXTENSION_KEY_BYTES}"
            )
        if len(value) > MAX_EXTENSION_BYTES:
            raise ProtocolError(
                f"UpdateHeader.extensions[{_shown(key)}]: {len(value)} bytes, at most {MAX_EXTENSION_BYTES}"
            )
        total += len(value)
        if total > MAX_EXTENSIONS_TOTAL_BYTES:
            raise ProtocolError(
                f"UpdateHeader.extensions: over {MAX_EXTENSIONS_TOTAL_BYTES} bytes in total (at key {_shown(key)})"
            )
        out[key] = value
    return out


def update_meta_to_proto(meta: UpdateMeta) -> pb.UpdateHeader:
    """The header envelope of a pushed update, with this build's protocol version."""
    return pb.UpdateHeader(
        protocol_version=PROTOCOL_VERSION,
        worker_id=meta.worker_id,
        round=meta.round,
        model_version=meta.model_version,
        num_samples=meta.num_samples,
        metrics={k: float(v) for k, v in meta.metrics.items()},
        tensors=header_to_proto(meta.tensors),
        kind=_UPDATE_KINDS[meta.kind],
        extensions=dict(meta.extensions),
    )


def update_meta_from_proto(msg: pb.UpdateHeader) -> UpdateMeta:
    """An update's header as a worker sent it (the caller checks ``protocol_version``).

    Tensor shapes and sizes are not checked here: the PS checks them against
    the update template and the codec limits before it allocates.

    Raises:
        ProtocolError: an unknown kind or tensor encoding, or extensions out of
            their limits; the message names the field.
    """
    kind = _UPDATE_KIND_IDS.get(msg.kind)
    if kind is None:
        raise ProtocolError(
            f"UpdateHeader.kind: unknown value {msg.kind}, expected DELTA, WEIGHTS, MASKED or QUANTIZED"
        )
    return UpdateMeta(
        worker_id=msg.worker_id,
        round=int(msg.round),
        model_version=int(msg.model_version),
        num_samples=int(msg.num_samples),
        tensors=header_from_proto(msg.tensors),
        metrics=dict(msg.metrics),
        kind=kind,
        extensions=extensions_from_proto(msg.extensions),
    )
