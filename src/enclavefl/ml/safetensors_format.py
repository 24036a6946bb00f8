"""The safetensors file format, written and read with numpy alone (no pickle, no extra package).

Layout of a ``.safetensors`` file:

* 8 bytes: ``N``, the length of the header, an unsigned little-endian 64-bit integer;
* ``N`` bytes: the header, a UTF-8 JSON object that maps each tensor's name to
  ``{"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}`` and may hold
  ``"__metadata__"``, a map of strings to strings. It may end with spaces (0x20),
  which writers use to align the data;
* the data: every tensor's bytes, little-endian and row-major, at
  ``[begin, end)`` counted from the first byte after the header. The tensors
  cover the data exactly: no gap, no overlap, nothing after the last one.

How this reads a file safely: the header length is checked against a limit and
against the file's size before the header is read; every entry's byte range is
checked against its dtype and shape, and the ranges against each other and the
file's size, before any tensor byte is read.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from enclavefl.errors import DataError

__all__ = ["DTYPES", "MAX_HEADER_BYTES", "SafetensorsFile", "read_safetensors", "write_safetensors"]

MAX_HEADER_BYTES = 100 * 2**20
"""Largest header accepted (the limit the format's reference reader applies too)."""

DTYPES: Mapping[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype("<u1"),
    "I8": np.dtype("<i1"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "F16": np.dtype("<f2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "F32": np.dtype("<f4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F64": np.dtype("<f8"),
}
"""The format's dtype names that numpy can hold, with their little-endian numpy dtypes."""

_METADATA = "__metadata__"
_ALIGN = 8


@dataclass(frozen=True, slots=True)
class SafetensorsFile:
    """What a file holds: its tensors in the order of their data and its ``__metadata__``."""

    tensors: dict[str, npt.NDArray[Any]]
    metadata: dict[str, str]


def _code(name: str, array: npt.NDArray[Any]) -> str:
    for code, dtype in DTYPES.items():
        if array.dtype.kind == dtype.kind and array.dtype.itemsize == dtype.itemsize:
            return code
    raise DataError(f"tensor {name!r}: dtype {array.dtype} has no safetensors equivalent here")


def write_safetensors(f: IO[bytes], tensors: Mapping[str, npt.NDArray[Any]], metadata: Mapping[str, str]) -> int:
    """Writes ``tensors`` (in the mapping's order) and ``metadata`` to an open binary file.

    The header is padded with spaces to a multiple of 8 bytes, so every tensor
    starts 8-byte aligned when the file is mapped into memory.

    Returns:
        The number of bytes written.

    Raises:
        DataError: a name is empty or ``__metadata__``, a metadata value is not a
            string, or a tensor has a dtype the format lacks (complex, objects).
    """
    header: dict[str, Any] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise DataError(f"safetensors metadata must map strings to strings; {bad[0]!r} does not")
        header[_METADATA] = dict(metadata)
    offset = 0
    arrays: list[npt.NDArray[Any]] = []
    for name, value in tensors.items():
        if not name or name == _METADATA:
            raise DataError(f"tensor name {name!r} cannot be stored in a safetensors file")
        array = np.asarray(value)
        code = _code(name, array)
        # (any shape, scalars kept 0-d) in the file's byte order: little-endian, row-major
        array = np.asarray(array, dtype=DTYPES[code], order="C")
        header[name] = {"dtype": code, "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays.append(array)
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % _ALIGN)
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for array in arrays:
        f.write(array.tobytes(order="C"))
    return 8 + len(raw) + offset


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DataError(f"key {key!r} appears twice")
        out[key] = value
    return out


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry(path: Path, name: str, entry: Any) -> tuple[int, int, np.dtype[Any], tuple[int, ...]]:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise DataError(f"{where}: expected exactly dtype, shape and data_offsets, found {entry!r:.200}")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if code not in DTYPES:
        raise DataError(f"{where}: dtype {code!r} is not one of {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise DataError(f"{where}: shape {shape!r:.200} is not a list of sizes >= 0")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise DataError(f"{where}: data_offsets {offsets!r:.200} is not [begin, end]")
    begin, end = offsets
    dtype = DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected:
        raise DataError(f"{where}: data_offsets [{begin}, {end}] hold {end - begin} bytes; "
                        f"{code} {shape} needs {expected}")
    return begin, end, dtype, tuple(shape)


def read_safetensors(path: str | os.PathLike[str], *, max_header_bytes: int = MAX_HEADER_BYTES) -> SafetensorsFile:
    """Reads a whole safetensors file, checking its header before any tensor.

    Raises:
        DataError: the file is missing or unreadable, the header is too long,
            longer than the file, not a JSON object or malformed, or the tensors'
            byte ranges do not cover the data exactly (a gap, an overlap, a
            truncated file or trailing bytes).
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) != 8:
                raise DataError(f"{path}: {size} bytes, too short for a safetensors header length (8 bytes)")
            (length,) = struct.unpack("<Q", head)
            if length > max_header_bytes:
                raise DataError(f"{path}: header of {length} bytes exceeds the limit of {max_header_bytes}")
            if 8 + length > size:
                raise DataError(f"{path}: header of {length} bytes is longer than the file ({size} bytes)")
            raw = f.read(length)
            header = _parse_header(path, raw)
            metadata = _metadata(path, header.pop(_METADATA, None))
            entries = sorted((_entry(path, name, e) + (name,) for name, e in header.items()), key=lambda t: t[:2])
            data_size = size - 8 - length
            cursor = 0
            for begin, end, _, _, name in entries:
                if begin != cursor:
                    kind = "overlaps the tensor before it" if begin < cursor else f"leaves a gap at byte {cursor}"
                    raise DataError(f"{path}: tensor {name!r} at [{begin}, {end}) {kind}")
                cursor = end
            if cursor != data_size:
                kind = "truncated" if cursor > data_size else "trailing bytes"
                raise DataError(f"{path}: the tensors cover {cursor} data bytes but the file holds {data_size} ({kind})")
            data = bytearray(f.read(data_size))
            if len(data) != data_size:
                raise DataError(f"{path}: truncated while reading ({len(data)} of {data_size} data bytes)")
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file not found") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    tensors: dict[str, npt.NDArray[Any]] = {}
    for begin, end, dtype, shape, name in entries:
        # (shape) in native byte order; a copy, so no tensor shares memory with another
        tensors[name] = np.frombuffer(data, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                      offset=begin).reshape(shape).astype(dtype.newbyteorder("="))
    return SafetensorsFile(tensors=tensors, metadata=metadata)


def _parse_header(path: Path, raw: bytes) -> dict[str, Any]:
    if not raw.startswith(b"{"):
        raise DataError(f"{path}: the header does not start with '{{' (not a safetensors file)")
    try:
        header = json.loads(raw.decode("utf-8").rstrip(" "), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: the header is not UTF-8 JSON ({exc})") from exc
    except DataError as exc:
        raise DataError(f"{path}: header: {exc}") from exc
    if not isinstance(header, dict):
        raise DataError(f"{path}: the header is not a JSON object")
    return header


def _metadata(path: Path, value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise DataError(f"{path}: __metadata__ must map strings to strings")
    return dict(value)
