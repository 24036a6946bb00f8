"""The chunk fast path must produce and accept exactly protobuf's bytes."""

from __future__ import annotations

import os

import pytest

from enclavefl.errors import ProtocolError
from enclavefl.proto import federation_pb2 as pb
from enclavefl.transport.framing import DataChunk, chunk_decoder, chunk_payload, encode_data, encode_message


@pytest.mark.parametrize("size", [0, 1, 127, 128, 16_383, 16_384, 2**21 + 3])
def test_encode_data_matches_protobuf(size: int) -> None:
    payload = os.urandom(size)
    assert encode_data(payload) == pb.UpdateChunk(data=payload).SerializeToString()
    assert encode_data(memoryview(payload)) == pb.ModelChunk(data=payload).SerializeToString()


@pytest.mark.parametrize("size", [0, 5, 300, 70_000])
def test_data_chunk_decodes_without_protobuf(size: int) -> None:
    payload = os.urandom(size)
    decoded = chunk_decoder(pb.UpdateChunk)(pb.UpdateChunk(data=payload).SerializeToString())
    assert isinstance(decoded, DataChunk)
    assert bytes(decoded.payload) == payload
    assert chunk_payload(decoded) == payload


def test_header_goes_through_protobuf() -> None:
    raw = pb.UpdateChunk(header=pb.UpdateHeader(worker_id="w-1", round=3)).SerializeToString()
    decoded = chunk_decoder(pb.UpdateChunk)(raw)
    assert isinstance(decoded, pb.UpdateChunk)
    assert decoded.header.round == 3
    assert chunk_payload(decoded) is None
    assert encode_message(decoded) == raw


def test_data_followed_by_another_field_is_not_taken_as_data_only() -> None:
    # A data field whose length does not cover the whole message falls back to protobuf,
    # which sees both fields (the later one wins in a oneof).
    raw = pb.UpdateChunk(data=b"abc").SerializeToString() + pb.UpdateChunk(header=pb.UpdateHeader(round=9)).SerializeToString()
    decoded = chunk_decoder(pb.UpdateChunk)(raw)
    assert isinstance(decoded, pb.UpdateChunk)
    assert decoded.WhichOneof("part") == "header"


@pytest.mark.parametrize("raw", [b"\x12\x05abc", b"\x12", b"\x12\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", b"\xff\xff"])
def test_malformed_chunk_is_a_protocol_error(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        chunk_decoder(pb.UpdateChunk)(raw)
