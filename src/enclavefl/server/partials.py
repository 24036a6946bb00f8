"""The byte format of an aggregator's partial state, so several servers can fold one round between them.

How this works: a partial is ``EFLPART1``, the length of a JSON metadata block
(u64, little-endian), the metadata, then the partial's arrays in the tensor
file format of :mod:`enclavefl.tensors` (a header naming every array's dtype
and shape, then raw little-endian bytes). Nothing is unpickled: the metadata is
JSON read with NaN and Infinity refused, and every array length is checked
against its header, and the header against the limits, before memory is
allocated. What the metadata and arrays mean is the aggregator's business
(:meth:`~enclavefl.server.aggregator.WeightedMean.partial`); this module only
packs and unpacks them.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Mapping
from typing import Any, Final

from enclavefl.errors import ProtocolError, UpdateRejected
from enclavefl.tensors import CodecLimits, ParamSet, read_params, write_params

__all__ = ["MAGIC", "MAX_META_BYTES", "decode_partial", "encode_partial", "partial_count"]

MAGIC: Final = b"EFLPART1"
MAX_META_BYTES: Final = 16 * 2**20
"""The metadata holds a few numbers per tensor; more than this is not a partial."""

_LEN: Final = struct.Struct("<Q")


def encode_partial(meta: Mapping[str, Any], arrays: ParamSet, *, magic: bytes = MAGIC) -> bytes:
    """``meta`` (JSON-able, finite numbers only) and ``arrays`` as one blob.

    ``magic`` (8 bytes) names what the blob holds; other state that is JSON plus
    arrays (a cluster's strategy state) uses the same format under its own.

    Raises:
        ValueError: ``meta`` holds a value JSON cannot carry exactly (NaN, Infinity, an object).
    """
    head = json.dumps(meta, separators=(",", ":"), allow_nan=False, sort_keys=True).encode()
    out = io.BytesIO()
    if len(magic) != len(MAGIC):
        raise ValueError(f"magic must be {len(MAGIC)} bytes, got {len(magic)}")
    out.write(magic)
    out.write(_LEN.pack(len(head)))
    out.write(head)
    write_params(out, arrays)
    return out.getvalue()


def _refuse_constant(token: str) -> Any:
    raise ValueError(f"{token} is not a finite number")


def decode_partial(blob: bytes, limits: CodecLimits = CodecLimits(), *,
                   magic: bytes = MAGIC) -> tuple[dict[str, Any], ParamSet]:
    """The metadata and arrays of a blob made by :func:`encode_partial` with the same ``magic``.

    Raises:
        UpdateRejected: the blob is not a partial, is truncated, has trailing bytes, or its
            metadata or arrays break the format or ``limits``.
    """
    view = memoryview(blob)
    fixed = len(magic) + _LEN.size
    if len(view) < fixed or bytes(view[: len(magic)]) != magic:
        raise UpdateRejected(f"not an aggregator partial: expected magic {magic!r} and a length, got "
                             f"{bytes(view[: len(magic)])!r} in a blob of {len(view)} bytes")
    (meta_len,) = _LEN.unpack(view[len(magic):fixed])
    if meta_len > min(MAX_META_BYTES, len(view) - fixed):
        raise UpdateRejected(f"aggregator partial: metadata of {meta_len} bytes announced, at most "
                             f"{min(MAX_META_BYTES, len(view) - fixed)} possible")
    try:
        meta = json.loads(bytes(view[fixed: fixed + meta_len]), parse_constant=_refuse_constant)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UpdateRejected(f"aggregator partial: metadata is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise UpdateRejected(f"aggregator partial: metadata must be a JSON object, got {type(meta).__name__}")
    try:
        arrays = read_params(io.BytesIO(view[fixed + meta_len:]), limits)
    except ProtocolError as exc:
        raise UpdateRejected(f"aggregator partial: arrays: {exc}") from exc
    return meta, arrays


def partial_count(meta: Mapping[str, Any], expected: Mapping[str, Any], where: str) -> int:
    """How many updates a partial holds, once its identifying keys equal ``expected`` (kind, format, settings).

    Raises:
        UpdateRejected: a key differs (another kind of aggregator, setting or model), or the
            count is not an int >= 0.
    """
    for key, want in expected.items():
        if meta.get(key) != want:
            raise UpdateRejected(f"{where}: {key} is {str(meta.get(key))[:200]!r}, this aggregator's is "
                                 f"{str(want)[:200]!r}")
    count = meta.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise UpdateRejected(f"{where}: count must be an int >= 0, got {count!r}")
    return count
