"""A minimal, bounded DER reader and writer for the few structures DCAP needs.

``cryptography`` parses certificates, but Intel's PCK SGX extension is a private
structure it leaves as raw bytes, and it tolerates a few non-canonical encodings
that we refuse. Every read here checks lengths against its container before slicing.
"""

from __future__ import annotations

__all__ = [
    "DerError",
    "TAG_BIT_STRING",
    "TAG_BOOLEAN",
    "TAG_ENUMERATED",
    "TAG_INTEGER",
    "TAG_OCTET_STRING",
    "TAG_OID",
    "TAG_SEQUENCE",
    "decode_oid",
    "decode_uint",
    "encode_oid",
    "encode_tlv",
    "encode_uint",
    "read_children",
    "read_tlv",
]

TAG_BOOLEAN = 0x01
TAG_INTEGER = 0x02
TAG_BIT_STRING = 0x03
TAG_OCTET_STRING = 0x04
TAG_OID = 0x06
TAG_ENUMERATED = 0x0A
TAG_SEQUENCE = 0x30


class DerError(ValueError):
    """Bytes that are not the DER structure expected."""


def read_tlv(data: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """Return (tag, content start, content end) of the element at ``pos`` (single-byte tags)."""
    if end - pos < 2:
        raise DerError(f"truncated element at {pos}")
    tag, first = data[pos], data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or end - pos < count:
            raise DerError(f"bad length at {pos - 1}")
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    if length > end - pos:
        raise DerError(f"element at {pos} overruns its container")
    return tag, pos, pos + length


def read_children(data: bytes, start: int, end: int) -> list[tuple[int, bytes]]:
    """Read consecutive elements in ``data[start:end]`` as (tag, content) pairs."""
    items = []
    while start < end:
        tag, content_start, content_end = read_tlv(data, start, end)
        items.append((tag, data[content_start:content_end]))
        start = content_end
    return items


def decode_oid(content: bytes) -> str:
    if not content or content[-1] & 0x80:
        raise DerError("bad OID")
    parts: list[int] = []
    value = 0
    for byte in content:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            parts.append(value)
            value = 0
    first = min(parts[0] // 40, 2)
    return ".".join(str(p) for p in [first, parts[0] - 40 * first, *parts[1:]])


def decode_uint(tag: int, content: bytes, expected_tag: int) -> int:
    """A non-negative INTEGER/ENUMERATED with the expected tag."""
    if tag != expected_tag or not content or content[0] & 0x80:
        raise DerError("expected a non-negative INTEGER/ENUMERATED")
    return int.from_bytes(content, "big")


def encode_tlv(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content


def encode_oid(dotted: str) -> bytes:
    numbers = [int(p) for p in dotted.split(".")]
    out = bytearray()
    for number in [40 * numbers[0] + numbers[1], *numbers[2:]]:
        chunk = [number & 0x7F]
        number >>= 7
        while number:
            chunk.append(0x80 | (number & 0x7F))
            number >>= 7
        out += bytes(reversed(chunk))
    return encode_tlv(TAG_OID, bytes(out))


def encode_uint(tag: int, value: int) -> bytes:
    return encode_tlv(tag, value.to_bytes(value.bit_length() // 8 + 1, "big"))
