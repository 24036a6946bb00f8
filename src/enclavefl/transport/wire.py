"""Translation between protobuf envelopes, codec types and our errors.

This is the only place that knows both the generated stubs and
:mod:`enclavefl.tensors`, and the only place where ``grpc.RpcError`` becomes
one of our exceptions.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc

from enclavefl.errors import (
    EnclaveFLError,
    ProtocolError,
    StaleSession,
    TransportError,
    DeadlineExceeded,
    Unavailable,
    VerificationError,
    VersionMismatch,
)
from enclavefl.proto import PROTOCOL_VERSION
from enclavefl.proto import federation_pb2 as pb
from enclavefl.tensors import StreamHeader, TensorSpec

__all__ = [
    "STATUS_ERRORS",
    "check_version",
    "error_from_rpc",
    "header_from_proto",
    "header_to_proto",
]

_ENCODINGS = {pb.DENSE: "dense", pb.SPARSE_ROWS: "sparse_rows"}
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
    """Our exception for a failed call; ``what`` names the call for the message."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else None) or str(code)
    message = f"{what}: {details}"
    kind = STATUS_ERRORS.get(code, TransportError)
    if code == grpc.StatusCode.FAILED_PRECONDITION and "protocol version" in details:
        kind = VersionMismatch
    if kind is VerificationError:
        return VerificationError("peer", "accepted by the peer", "refused", message)
    return kind(message)


def check_version(version: int, what: str) -> None:
    """Raises VersionMismatch unless ``version`` is ours."""
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(f"{what}: protocol version {version}, this build speaks {PROTOCOL_VERSION}")


def header_to_proto(header: StreamHeader) -> pb.TensorHeader:
    return pb.TensorHeader(
        tensors=[
            pb.TensorSpec(
                name=t.name,
                dtype=t.dtype,
                shape=list(t.shape),
                encoding=_ENCODING_IDS[t.encoding],
                nnz_rows=t.nnz_rows,
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
                       encoding=encoding, nnz_rows=int(t.nnz_rows))  # type: ignore[arg-type]
        )
    return StreamHeader(tuple(specs))
