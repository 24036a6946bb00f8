"""A fast path for the tensor chunks of PullModel and PushUpdate.

A chunk message (``ModelChunk`` or ``UpdateChunk``) that carries only its
``data`` field (field 2, length-delimited) is, on the wire, the tag byte 0x12,
a varint length and the payload. Encoding such a message with the protobuf
runtime copies the payload twice (into the message, then into the wire
bytes), and decoding copies it twice more; for a model of gigabytes streamed to
dozens of workers those copies are most of the PS's work. Here a data chunk is
framed with one copy and decoded with none (a memoryview into the bytes gRPC
handed us). Any other message (the header, or anything unexpected) goes through
the protobuf runtime unchanged, so the bytes on the wire are exactly protobuf's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from google.protobuf.message import DecodeError, Message

from enclavefl.errors import ProtocolError

__all__ = ["DataChunk", "chunk_decoder", "encode_data", "encode_message"]

DATA_TAG = 0x12  # field number 2, wire type 2 (length-delimited)
_MAX_VARINT_BYTES = 10

M = TypeVar("M", bound=Message)


@dataclass(frozen=True, slots=True)
class DataChunk:
    """A received data chunk, not copied: a view into the message bytes."""

    payload: memoryview


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_data(payload: bytes | memoryview) -> bytes:
    """The wire bytes of a chunk message holding only ``data = payload`` (one copy)."""
    return b"".join((bytes((DATA_TAG,)), _varint(len(payload)), payload))


def encode_message(message: Message | bytes) -> bytes:
    """Serializer for gRPC: framed bytes pass through, messages go through protobuf."""
    if isinstance(message, bytes):
        return message
    return message.SerializeToString()


def _data_view(raw: bytes) -> memoryview | None:
    if not raw or raw[0] != DATA_TAG:
        return None
    length, shift, pos = 0, 0, 1
    while pos < len(raw) and pos <= _MAX_VARINT_BYTES:
        byte = raw[pos]
        length |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            # Only a message that is exactly this one field takes the fast path.
            return memoryview(raw)[pos:] if length == len(raw) - pos else None
        shift += 7
    return None


def chunk_decoder(message_type: type[M]) -> Callable[[bytes], DataChunk | M]:
    """Deserializer for gRPC: a data-only chunk becomes a DataChunk, anything else a message.

    Raises:
        ProtocolError: the bytes are not a valid message of ``message_type``.
    """

    def decode(raw: bytes) -> DataChunk | M:
        view = _data_view(raw)
        if view is not None:
            return DataChunk(view)
        try:
            return message_type.FromString(raw)
        except DecodeError as exc:
            raise ProtocolError(f"malformed {message_type.__name__}: {exc}") from exc

    return decode


def chunk_payload(message: Any) -> memoryview | bytes | None:
    """The data of a decoded chunk (fast path or protobuf), or None if it is not a data chunk."""
    if isinstance(message, DataChunk):
        return message.payload
    if message.WhichOneof("part") == "data":
        data: bytes = message.data
        return data
    return None
