"""Tests for enclavefl.transport.wire: status mapping and header envelopes."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from enclavefl.errors import (
    DeadlineExceeded,
    EnclaveFLError,
    ProtocolError,
    StaleSession,
    TransportError,
    Unavailable,
    VerificationError,
    VersionMismatch,
)
from enclavefl.proto import PROTOCOL_VERSION
from enclavefl.proto import federation_pb2 as pb
from enclavefl.tensors import CodecLimits, ParamSet, SparseRows, StreamHeader, Tensor, TensorSpec
from enclavefl.transport.wire import (
    STATUS_ERRORS,
    check_version,
    error_from_rpc,
    header_from_proto,
    header_to_proto,
)


class FailedCall(grpc.RpcError):  # type: ignore[misc]  # grpc ships no types
    """A finished call's error as grpc raises it: a status code and details."""

    def __init__(self, code: grpc.StatusCode, details: str | None) -> None:
        super().__init__(details)
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str | None:
        return self._details


@pytest.mark.parametrize("code", list(grpc.StatusCode), ids=lambda c: c.name)
def test_every_status_code_is_mapped_to_one_of_our_errors(code: grpc.StatusCode) -> None:
    assert code in STATUS_ERRORS
    assert issubclass(STATUS_ERRORS[code], EnclaveFLError)


@pytest.mark.parametrize("code", list(grpc.StatusCode), ids=lambda c: c.name)
def test_error_from_rpc_names_the_call_and_details(code: grpc.StatusCode) -> None:
    error = error_from_rpc(FailedCall(code, "peer said no"), "PushUpdate")

    assert isinstance(error, STATUS_ERRORS[code])
    assert "PushUpdate" in str(error)
    assert "peer said no" in str(error)


@pytest.mark.parametrize(
    ("code", "kind", "builtin"),
    [
        (grpc.StatusCode.UNAVAILABLE, Unavailable, ConnectionError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded, TimeoutError),
        (grpc.StatusCode.NOT_FOUND, StaleSession, TransportError),
        (grpc.StatusCode.INVALID_ARGUMENT, ProtocolError, EnclaveFLError),
        (grpc.StatusCode.UNIMPLEMENTED, VersionMismatch, ProtocolError),
    ],
)
def test_specific_codes_map_to_specific_errors(
    code: grpc.StatusCode, kind: type[EnclaveFLError], builtin: type[Exception]
) -> None:
    error = error_from_rpc(FailedCall(code, "x"), "Join")

    assert type(error) is kind
    assert isinstance(error, builtin)


@pytest.mark.parametrize("code", [grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED])
def test_refusal_by_the_peer_is_a_verification_error(code: grpc.StatusCode) -> None:
    error = error_from_rpc(FailedCall(code, "measurement not allowed"), "Join")

    assert isinstance(error, VerificationError)
    assert error.field == "peer"
    assert "measurement not allowed" in str(error)


def test_version_refusal_is_a_version_mismatch() -> None:
    details = "Join: protocol version 9, this build speaks 1"

    error = error_from_rpc(FailedCall(grpc.StatusCode.FAILED_PRECONDITION, details), "Join")

    assert isinstance(error, VersionMismatch)


def test_missing_details_fall_back_to_the_code() -> None:
    error = error_from_rpc(FailedCall(grpc.StatusCode.UNAVAILABLE, None), "WaitTask")

    assert isinstance(error, Unavailable)
    assert "UNAVAILABLE" in str(error)


def test_check_version_accepts_ours_and_refuses_others() -> None:
    check_version(PROTOCOL_VERSION, "Join")

    with pytest.raises(VersionMismatch, match=f"Join: protocol version {PROTOCOL_VERSION + 1}"):
        check_version(PROTOCOL_VERSION + 1, "Join")


def sample_header() -> StreamHeader:
    tensors: dict[str, Tensor] = {
        "conv.weight": np.zeros((8, 3, 3, 3), np.float32),
        "bn.steps": np.array(3, np.int64),
        "emb": SparseRows(np.array([1, 4]), np.zeros((2, 16), np.float16), (1000, 16)),
        "mask": np.zeros((2, 0), np.bool_),
        "ünïcode/name": np.zeros(1, np.uint8),
    }
    return StreamHeader.of(ParamSet(tensors))


def test_header_round_trips_through_protobuf_bytes() -> None:
    # Prepare
    header = sample_header()

    # Execute
    data = header_to_proto(header).SerializeToString()
    back = header_from_proto(pb.TensorHeader.FromString(data))

    # Assert
    assert back == header
    assert back.tensors[2] == TensorSpec("emb", "float16", (1000, 16), "sparse_rows", 2)
    assert back.tensors[1].shape == ()


def test_header_from_proto_refuses_an_unknown_encoding() -> None:
    msg = header_to_proto(sample_header())
    msg.tensors[0].encoding = 7  # type: ignore[assignment]  # as a newer peer might send

    with pytest.raises(ProtocolError, match="conv.weight.*unknown encoding 7"):
        header_from_proto(msg)


def test_hostile_header_is_converted_but_refused_by_the_limits_check() -> None:
    # Conversion trusts nothing and checks nothing; StreamHeader.check does.
    msg = pb.TensorHeader(tensors=[pb.TensorSpec(name="w", dtype="float32", shape=[-1, 4])])
    header = header_from_proto(msg)

    with pytest.raises(ProtocolError, match="invalid dimension"):
        header.check(CodecLimits())

    huge = header_from_proto(pb.TensorHeader(tensors=[pb.TensorSpec(name="w", dtype="float32", shape=[2**40, 2**20])]))
    with pytest.raises(ProtocolError, match="max_tensor_bytes"):
        huge.check(CodecLimits())
