"""ParamSet (ordered name -> numpy array) and the raw tensor wire codec.

How this works: a stream is a :class:`StreamHeader` (names, dtypes, dense shapes,
encodings) followed by the tensors' raw little-endian bytes, concatenated in
header order; a ``sparse_rows`` tensor contributes its int64 row ids, then its
rows. A compressed tensor (``q8``, ``q4``, ``topk``, ``topk_q8``, ``topk_q4``,
see :mod:`enclavefl.compression`) contributes the parts :func:`encoded_parts`
lists (row-major indices, per-block scales, codes or values), and travels in an
:class:`EncodedUpdate` rather than a ParamSet. :func:`iter_chunks` yields memoryviews over the arrays' own buffers, so
sending copies nothing. :class:`StreamDecoder` checks the header against
:class:`CodecLimits` *before* it allocates one buffer for the whole payload,
copies each chunk into place, and hands out ``np.frombuffer`` views of that
buffer (only a tensor whose offset is not aligned to its itemsize is copied).
Checkpoint files are the same header as JSON followed by the same payload.

Nothing here unpickles or evaluates input: a header is ``json.loads`` plus
field-by-field checks, a payload is raw bytes. Sizes are Python ints, so a
hostile header cannot overflow them.
"""

from __future__ import annotations

import io
import json
import logging
import math
import operator
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any, BinaryIO, Final, Literal, TypeAlias, final

import numpy as np
import numpy.typing as npt

from enclavefl.errors import ClosedError, ProtocolError

__all__ = [
    "COMPRESSED_ENCODINGS",
    "DTYPES",
    "QUANT_BLOCK",
    "CodecLimits",
    "EncodedTensor",
    "EncodedUpdate",
    "Encoding",
    "ParamSet",
    "SparseRows",
    "StreamDecoder",
    "StreamHeader",
    "Tensor",
    "TensorSpec",
    "decode",
    "encoded_parts",
    "iter_chunks",
    "read_params",
    "write_params",
]

logger = logging.getLogger(__name__)

Array: TypeAlias = npt.NDArray[Any]
Encoding: TypeAlias = Literal["dense", "sparse_rows", "q8", "q4", "topk", "topk_q8", "topk_q4"]

#: Wire dtype names and their little-endian numpy dtypes.
DTYPES: Final[Mapping[str, np.dtype[Any]]] = MappingProxyType(
    {
        "float16": np.dtype("<f2"),
        "float32": np.dtype("<f4"),
        "float64": np.dtype("<f8"),
        "int32": np.dtype("<i4"),
        "int64": np.dtype("<i8"),
        "uint8": np.dtype("u1"),
        "uint32": np.dtype("<u4"),
        "bool": np.dtype("?"),
    }
)
# (kind, itemsize) identifies a wire dtype whatever the byte order of the input.
_WIRE_NAMES: Final[Mapping[tuple[str, int], str]] = MappingProxyType(
    {(dt.kind, dt.itemsize): name for name, dt in DTYPES.items()}
)
_ENCODINGS: Final[tuple[str, ...]] = ("dense", "sparse_rows", "q8", "q4", "topk", "topk_q8", "topk_q4")
#: Encodings of a floating-point tensor in compressed form (:mod:`enclavefl.compression`).
COMPRESSED_ENCODINGS: Final = frozenset({"q8", "q4", "topk", "topk_q8", "topk_q4"})
#: Elements that share one (low, step) scale pair in a quantized encoding.
QUANT_BLOCK: Final = 2048
_SCALE_DTYPE: Final[np.dtype[Any]] = np.dtype("<f4")
_INDEX_DTYPE: Final[np.dtype[Any]] = np.dtype("<u4")
_MAX_TOPK_ELEMENTS: Final = 2**32  # indices travel as uint32
_IDS_DTYPE: Final[np.dtype[Any]] = np.dtype("<i8")
_FILE_MAGIC: Final = b"EFLTENS1"
_MAX_FILE_HEADER_BYTES: Final = 64 * 2**20
_FILE_CHUNK_BYTES: Final = 4 * 2**20
_FLOAT_NAMES: Final = frozenset({"float16", "float32", "float64"})
_SPEC_KEYS: Final = frozenset({"name", "dtype", "shape", "encoding", "nnz_rows", "coded_bytes"})
_REPR_MAX_TENSORS: Final = 20
_COMPARE_BLOCK_BYTES: Final = 2**20


def _short(value: object, limit: int = 80) -> str:
    """repr() cut to `limit` characters, so hostile names cannot flood messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _to_wire_array(value: object, where: str) -> Array:
    """Return `value` as an ndarray in its little-endian wire dtype.

    Only the byte order may change; a dtype of another kind or size is refused
    rather than cast, so float64 stays float64 and int8 is an error.
    """
    if not isinstance(value, np.ndarray) or isinstance(value, np.ma.MaskedArray):
        raise TypeError(f"{where}: expected a numpy ndarray, got {type(value).__name__}")
    wire = _WIRE_NAMES.get((value.dtype.kind, value.dtype.itemsize))
    if wire is None:
        raise TypeError(
            f"{where}: dtype {value.dtype} is not supported (supported: {', '.join(DTYPES)})"
        )
    arr: Array = np.asarray(value)  # drops ndarray subclasses such as np.matrix
    if arr.dtype != DTYPES[wire]:
        arr = arr.astype(DTYPES[wire])  # byte swap only
    return arr


def _wire_name(arr: Array) -> str:
    return _WIRE_NAMES[(arr.dtype.kind, arr.dtype.itemsize)]


def _normalize_ids(ids: object, n_rows: int, where: str) -> Array:
    """Return row ids as a 1-D int64 array, strictly increasing and in [0, n_rows)."""
    arr = np.asarray(ids)
    if arr.size == 0:
        return np.empty(0, dtype=_IDS_DTYPE)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{where}: row ids must be integers, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{where}: row ids must be 1-D, got shape {arr.shape}")
    arr = arr.astype(_IDS_DTYPE, copy=False)  # a wrapped uint64 turns negative: refused below
    bad = np.flatnonzero(arr[1:] <= arr[:-1])
    if bad.size:
        i = int(bad[0]) + 1
        raise ValueError(
            f"{where}: row ids must be strictly increasing, id {int(arr[i])} at position {i} "
            f"follows {int(arr[i - 1])}"
        )
    if arr[0] < 0 or arr[-1] >= n_rows:
        raise ValueError(f"{where}: row ids must be in [0, {n_rows}), got {int(arr[0])}..{int(arr[-1])}")
    return arr


@final
@dataclass(frozen=True, slots=True, eq=False, repr=False)
class SparseRows:
    """Row-sparse view of a tensor: only rows `ids` of a dense `shape` tensor are present.

    Embedding tables touch few rows per round; sending (ids, rows) instead of the
    table keeps such updates small.

    Attributes:
        ids: int64, 1-D, strictly increasing, each in ``[0, shape[0])``.
        rows: shape ``(len(ids), *shape[1:])``, any supported dtype.
        shape: the dense shape (rank >= 1).
    """

    ids: Array
    rows: Array
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        try:
            shape = tuple(operator.index(d) for d in self.shape)
        except TypeError:
            raise TypeError(f"SparseRows: shape must be a tuple of ints, got {_short(self.shape)}") from None
        if not shape or min(shape) < 0:
            raise ValueError(f"SparseRows: shape must have rank >= 1 and dims >= 0, got {shape}")
        rows = _to_wire_array(self.rows, "SparseRows.rows")
        ids = _normalize_ids(self.ids, shape[0], "SparseRows.ids")
        if rows.shape != (len(ids), *shape[1:]):
            raise ValueError(
                f"SparseRows: rows shape {rows.shape} != expected {(len(ids), *shape[1:])} "
                f"for {len(ids)} ids of dense shape {shape}"
            )
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "ids", ids)

    def __repr__(self) -> str:
        return f"SparseRows(nnz_rows={len(self.ids)}, shape={self.shape}, dtype={_wire_name(self.rows)})"

    def to_dense(self) -> Array:
        """Return the dense tensor, zero where no row is present."""
        out: Array = np.zeros(self.shape, dtype=self.rows.dtype)
        out[self.ids] = self.rows
        return out

    @classmethod
    def from_dense(cls, dense: Array, ids: Array | None = None) -> SparseRows:
        """Keep rows `ids` of `dense`; with ``ids=None``, the rows that are not all zero.

        A row of only ``-0.0`` counts as zero (and comes back as ``+0.0``); NaN counts
        as non-zero.
        """
        arr = _to_wire_array(dense, "SparseRows.from_dense")
        if arr.ndim < 1:
            raise ValueError("SparseRows.from_dense: needs an array of rank >= 1, got a 0-d array")
        if ids is None:
            flat = arr.reshape(arr.shape[0], math.prod(arr.shape[1:]))
            row_ids: Array = np.flatnonzero(flat.any(axis=1))
        else:
            row_ids = _normalize_ids(ids, arr.shape[0], "SparseRows.from_dense ids")
        return cls(row_ids, arr[row_ids], arr.shape)


Tensor: TypeAlias = Array | SparseRows


def encoded_parts(encoding: str, shape: tuple[int, ...], nnz: int, dtype: np.dtype[Any],
                  coded_bytes: int = 0) -> tuple[tuple[str, np.dtype[Any], int], ...]:
    """The payload parts of a compressed tensor, in wire order: (part, dtype, element count).

    ``q8``/``q4`` quantize all ``prod(shape)`` values; ``topk*`` keep ``nnz`` of
    them: their ``indices`` (uint32, row-major, strictly increasing) come first.
    ``scales`` holds a (low, step) float32 pair per :data:`QUANT_BLOCK` quantized
    values; 4-bit ``codes`` pack two values per byte, the first in the low nibble.
    ``values`` (plain ``topk``) are the kept values in the tensor's own dtype.
    With ``coded_bytes`` > 0 the codes are deflated (zlib) to that many bytes.

    Raises:
        ValueError: ``encoding`` is not a compressed encoding.
    """
    if encoding not in COMPRESSED_ENCODINGS:
        raise ValueError(f"encoding {_short(encoding)} is not compressed (expected one of {sorted(COMPRESSED_ENCODINGS)})")
    count = nnz if encoding.startswith("topk") else math.prod(shape)
    parts: list[tuple[str, np.dtype[Any], int]] = []
    if encoding.startswith("topk"):
        parts.append(("indices", _INDEX_DTYPE, count))
    if encoding == "topk":
        parts.append(("values", dtype, count))
        return tuple(parts)
    parts.append(("scales", _SCALE_DTYPE, 2 * -(-count // QUANT_BLOCK)))
    raw = count if encoding.endswith("q8") else -(-count // 2)
    parts.append(("codes", np.dtype("u1"), coded_bytes if coded_bytes > 0 else raw))
    return tuple(parts)


@final
@dataclass(frozen=True, slots=True)
class TensorSpec:
    """What the header says about one tensor; sizes follow from it alone.

    Built from wire input as-is: :meth:`StreamHeader.check` validates it.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    encoding: Encoding = "dense"
    nnz_rows: int = 0
    coded_bytes: int = 0
    """Quantized encodings: bytes of the deflated codes (0: raw codes)."""

    @property
    def nbytes(self) -> int:
        """Payload bytes: dense ``prod(shape)*itemsize``; sparse ids (int64) plus rows; compressed: its parts."""
        dtype = DTYPES.get(self.dtype) if isinstance(self.dtype, str) else None
        if dtype is None:
            raise ValueError(f"tensor {_short(self.name)}: unknown dtype {_short(self.dtype)}")
        if self.encoding in COMPRESSED_ENCODINGS:
            return sum(part.itemsize * count for _, part, count in encoded_parts(
                self.encoding, self.shape, self.nnz_rows, dtype, self.coded_bytes))
        if self.encoding == "sparse_rows":
            row_bytes = math.prod(self.shape[1:]) * dtype.itemsize
            return self.nnz_rows * (_IDS_DTYPE.itemsize + row_bytes)
        return math.prod(self.shape) * dtype.itemsize


@final
@dataclass(frozen=True, slots=True)
class CodecLimits:
    """Limits applied to anything decoded from the wire or a file, before allocating."""

    max_tensors: int = 100_000
    max_total_bytes: int = 64 * 2**30
    max_tensor_bytes: int = 16 * 2**30
    max_rank: int = 8
    max_name_bytes: int = 1024
    max_chunk_bytes: int = 16 * 2**20

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            least = 1 if item.name == "max_chunk_bytes" else 0
            if not _is_int(value) or value < least:
                raise ValueError(f"CodecLimits.{item.name} must be an int >= {least}, got {value!r}")


def _check_spec(spec: object, index: int, limits: CodecLimits) -> int:
    """Validate one header entry against `limits`; return its payload bytes."""
    if not isinstance(spec, TensorSpec):
        raise ProtocolError(f"tensor #{index}: expected a TensorSpec, got {type(spec).__name__}")
    name = spec.name
    if not isinstance(name, str) or not name:
        raise ProtocolError(f"tensor #{index}: name must be a non-empty string, got {_short(name)}")
    try:
        name_bytes = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise ProtocolError(f"tensor #{index}: name {_short(name)} is not valid UTF-8") from None
    if name_bytes > limits.max_name_bytes:
        raise ProtocolError(
            f"tensor #{index}: name is {name_bytes} bytes, over max_name_bytes={limits.max_name_bytes}"
        )
    where = f"tensor {_short(name)}"
    if not isinstance(spec.dtype, str) or spec.dtype not in DTYPES:
        raise ProtocolError(
            f"{where}: unknown dtype {_short(spec.dtype)} (expected one of {', '.join(DTYPES)})"
        )
    shape = spec.shape
    if not isinstance(shape, tuple):
        raise ProtocolError(f"{where}: shape must be a tuple of ints, got {type(shape).__name__}")
    if len(shape) > limits.max_rank:
        raise ProtocolError(f"{where}: rank {len(shape)} is over max_rank={limits.max_rank}")
    for dim in shape:
        if not _is_int(dim) or dim < 0:
            raise ProtocolError(f"{where}: shape {_short(shape)} has an invalid dimension {_short(dim)}")
    if spec.encoding not in _ENCODINGS:
        raise ProtocolError(
            f"{where}: unknown encoding {_short(spec.encoding)} (expected one of {_ENCODINGS})"
        )
    nnz = spec.nnz_rows
    if not _is_int(nnz) or nnz < 0:
        raise ProtocolError(f"{where}: nnz_rows must be a non-negative int, got {_short(nnz)}")
    if spec.encoding == "dense" and nnz != 0:
        raise ProtocolError(f"{where}: nnz_rows={nnz} on a dense tensor (must be 0)")
    if spec.encoding in COMPRESSED_ENCODINGS:
        if spec.dtype not in _FLOAT_NAMES:
            raise ProtocolError(f"{where}: encoding {spec.encoding} needs a floating-point dtype, got {spec.dtype}")
        numel = math.prod(shape)
        if spec.encoding.startswith("topk"):
            if nnz > numel:
                raise ProtocolError(f"{where}: {spec.encoding} keeps nnz_rows={nnz} values of a {numel}-value tensor")
            if numel > _MAX_TOPK_ELEMENTS:
                raise ProtocolError(f"{where}: {numel} values are too many for uint32 {spec.encoding} indices")
        elif nnz != 0:
            raise ProtocolError(f"{where}: nnz_rows={nnz} on a {spec.encoding} tensor (must be 0)")
    coded = spec.coded_bytes
    if not _is_int(coded) or coded < 0:
        raise ProtocolError(f"{where}: coded_bytes must be a non-negative int, got {_short(coded)}")
    if coded:
        if spec.encoding not in COMPRESSED_ENCODINGS or spec.encoding == "topk":
            raise ProtocolError(f"{where}: coded_bytes={coded} on a {spec.encoding} tensor (only quantized codes "
                                "are deflated)")
        raw = encoded_parts(spec.encoding, shape, nnz, DTYPES[spec.dtype])[-1][2]
        if coded >= raw:
            raise ProtocolError(f"{where}: coded_bytes={coded} is not below the {raw} bytes of its raw codes")
    if spec.encoding == "sparse_rows":
        if not shape:
            raise ProtocolError(f"{where}: a sparse_rows tensor needs rank >= 1, got a 0-d shape")
        if nnz > shape[0]:
            raise ProtocolError(f"{where}: nnz_rows={nnz} is more than the {shape[0]} rows of shape {shape}")
    nbytes = spec.nbytes
    if nbytes > limits.max_tensor_bytes:
        raise ProtocolError(f"{where}: {nbytes} bytes is over max_tensor_bytes={limits.max_tensor_bytes}")
    # A zero in the shape makes the payload empty whatever the other dimensions say, but numpy
    # still refuses an array whose other dimensions overflow its index type; and a sparse
    # tensor's dense shape is what to_dense() allocates. Bound the shape as if every 0 were a 1.
    spanned = math.prod(max(dim, 1) for dim in shape) * DTYPES[spec.dtype].itemsize
    if spanned > limits.max_tensor_bytes:
        raise ProtocolError(
            f"{where}: shape {_short(shape)} spans {spanned} bytes (zero dimensions counted as 1), "
            f"over max_tensor_bytes={limits.max_tensor_bytes}"
        )
    return nbytes


def _name_list(names: list[str]) -> str:
    shown = ", ".join(_short(n, 40) for n in names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {_short(key)}")
        out[key] = value
    return out


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not allowed")


def _spec_from_json(entry: object, index: int) -> TensorSpec:
    """Turn one decoded JSON entry into a TensorSpec, checking field types only."""
    if not isinstance(entry, dict):
        raise ProtocolError(f"tensor #{index}: expected a JSON object, got {type(entry).__name__}")
    unknown = set(entry) - _SPEC_KEYS
    missing = {"name", "dtype", "shape"} - set(entry)
    if unknown or missing:
        raise ProtocolError(
            f"tensor #{index}: unknown keys {sorted(unknown)[:5]}, missing keys {sorted(missing)}"
        )
    shape = entry["shape"]
    if not isinstance(shape, list):
        raise ProtocolError(f"tensor #{index}: shape must be a list of ints, got {type(shape).__name__}")
    return TensorSpec(
        name=entry["name"],
        dtype=entry["dtype"],
        shape=tuple(shape),
        encoding=entry.get("encoding", "dense"),
        nnz_rows=entry.get("nnz_rows", 0),
        coded_bytes=entry.get("coded_bytes", 0),
    )


@final
@dataclass(frozen=True, slots=True)
class StreamHeader:
    """The tensors a stream or file carries, in payload order."""

    tensors: tuple[TensorSpec, ...]

    @property
    def total_bytes(self) -> int:
        """Payload bytes of the whole stream."""
        return sum(spec.nbytes for spec in self.tensors)

    def check(self, limits: CodecLimits) -> None:
        """Validate every field against `limits`, before anyone allocates for it.

        Raises:
            ProtocolError: naming the tensor and the field or limit broken.
        """
        if not isinstance(self.tensors, tuple):
            raise ProtocolError(f"header tensors must be a tuple, got {type(self.tensors).__name__}")
        if len(self.tensors) > limits.max_tensors:
            raise ProtocolError(
                f"header announces {len(self.tensors)} tensors, over max_tensors={limits.max_tensors}"
            )
        seen: set[str] = set()
        total = 0
        for index, spec in enumerate(self.tensors):
            total += _check_spec(spec, index, limits)
            if spec.name in seen:
                raise ProtocolError(f"tensor {_short(spec.name)}: duplicate name (tensor #{index})")
            seen.add(spec.name)
            if total > limits.max_total_bytes:
                raise ProtocolError(
                    f"tensor {_short(spec.name)}: payload reaches {total} bytes, "
                    f"over max_total_bytes={limits.max_total_bytes}"
                )

    def matches(self, other: StreamHeader) -> str | None:
        """Return None if names, order, dtypes and dense shapes equal `other`'s, else why not.

        Encodings may differ: a sparse_rows update of a dense model tensor is fine.
        """
        names = [s.name for s in self.tensors]
        expected = [s.name for s in other.tensors]
        if names != expected:
            have, want = set(names), set(expected)
            missing = [n for n in expected if n not in have]
            extra = [n for n in names if n not in want]
            if missing or extra:
                parts = ([f"missing {_name_list(missing)}"] if missing else []) + (
                    [f"unexpected {_name_list(extra)}"] if extra else []
                )
                return "tensor names differ: " + "; ".join(parts)
            if len(names) != len(expected):
                return f"{len(names)} tensors != expected {len(expected)}"
            i = next(i for i, (a, b) in enumerate(zip(names, expected)) if a != b)
            return (
                f"tensor order differs: position {i} holds {_short(names[i])}, "
                f"expected {_short(expected[i])}"
            )
        for mine, theirs in zip(self.tensors, other.tensors):
            if mine.dtype != theirs.dtype:
                return f"tensor {_short(mine.name)}: dtype {mine.dtype} != expected {theirs.dtype}"
            if mine.shape != theirs.shape:
                return f"tensor {_short(mine.name)}: shape {mine.shape} != expected {theirs.shape}"
        return None

    def to_json(self) -> bytes:
        """Compact ASCII JSON; dense defaults (encoding, nnz_rows) are left out."""
        entries: list[dict[str, Any]] = []
        for spec in self.tensors:
            entry: dict[str, Any] = {"name": spec.name, "dtype": spec.dtype, "shape": list(spec.shape)}
            if spec.encoding != "dense":
                entry["encoding"] = spec.encoding
                entry["nnz_rows"] = spec.nnz_rows
            if spec.coded_bytes:
                entry["coded_bytes"] = spec.coded_bytes
            entries.append(entry)
        return json.dumps({"tensors": entries}, separators=(",", ":"), allow_nan=False).encode("ascii")

    @classmethod
    def from_json(cls, data: bytes, limits: CodecLimits = CodecLimits()) -> StreamHeader:
        """Parse and validate a header written by :meth:`to_json`.

        Raises:
            ProtocolError: the JSON is malformed, has a field of the wrong type or
                value, or breaks `limits`.
        """
        try:
            doc = json.loads(data, object_pairs_hook=_reject_duplicate_keys, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, our hooks
            raise ProtocolError(f"header is not valid JSON: {exc}") from exc
        if not isinstance(doc, dict) or set(doc) != {"tensors"} or not isinstance(doc["tensors"], list):
            raise ProtocolError("header must be a JSON object with one key, 'tensors', holding a list")
        entries = doc["tensors"]
        if len(entries) > limits.max_tensors:
            raise ProtocolError(
                f"header announces {len(entries)} tensors, over max_tensors={limits.max_tensors}"
            )
        header = cls(tuple(_spec_from_json(entry, i) for i, entry in enumerate(entries)))
        header.check(limits)
        return header

    @classmethod
    def of(cls, params: ParamSet | EncodedUpdate) -> StreamHeader:
        """The header describing `params`."""
        return cls(params.specs())


def _bytes_view(arr: Array) -> memoryview:
    """A flat byte memoryview over `arr`'s data (copies only a non C-contiguous array)."""
    return np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data


def _same_bits(a: Array, b: Array) -> bool:
    """True if dtype, shape and every bit agree (NaN equals itself, -0.0 differs from 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_uint = np.dtype(f"u{a.dtype.itemsize}")  # compare bit patterns, not float values
    flat_a = np.ascontiguousarray(a).reshape(-1).view(as_uint)
    flat_b = np.ascontiguousarray(b).reshape(-1).view(as_uint)
    step = _COMPARE_BLOCK_BYTES // a.dtype.itemsize  # bounds the temporary bool array
    return all(
        np.array_equal(flat_a[i : i + step], flat_b[i : i + step]) for i in range(0, flat_a.size, step)
    )


def _copy_tensor(value: Tensor) -> Tensor:
    if isinstance(value, SparseRows):
        return SparseRows(value.ids.copy(), value.rows.copy(), value.shape)
    return value.copy()


@final
class ParamSet(Mapping[str, Tensor]):
    """Ordered name -> tensor mapping (insertion order is wire order).

    Arrays are kept by reference (byte-swapped copies only for big-endian
    input); mutate them in place only when no encoder is streaming them.
    """

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]] = ()) -> None:
        """Validate names and dtypes.

        Raises:
            TypeError: a name is not a str, a value is not an ndarray/SparseRows,
                or a dtype is not in :data:`DTYPES`.
            ValueError: a name is empty, repeated or not encodable as UTF-8.
        """
        if isinstance(items, ParamSet):
            self._items: dict[str, Tensor] = dict(items._items)
            return
        pairs: Iterable[Any] = items.items() if isinstance(items, Mapping) else items
        out: dict[str, Tensor] = {}
        for pair in pairs:
            try:
                name, value = pair
            except (TypeError, ValueError):
                raise TypeError(f"ParamSet items must be (name, tensor) pairs, got {_short(pair)}") from None
            if not isinstance(name, str):
                raise TypeError(f"ParamSet: tensor names must be str, got {type(name).__name__}")
            if not name:
                raise ValueError("ParamSet: tensor names must be non-empty")
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"ParamSet: tensor name {_short(name)} is not encodable as UTF-8") from None
            if name in out:
                raise ValueError(f"ParamSet: duplicate tensor name {_short(name)}")
            if not isinstance(value, SparseRows):
                value = _to_wire_array(value, f"tensor {_short(name)}")
            out[name] = value
        self._items = out

    def __getitem__(self, name: str) -> Tensor:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ParamSet):
            return NotImplemented
        return self.equal(other)

    __hash__ = None  # type: ignore[assignment]  # arrays are mutable

    def __repr__(self) -> str:
        specs = self.specs()
        parts = [
            f"{_short(s.name, 60)}: {s.dtype}{s.shape}"
            + (f" sparse_rows[{s.nnz_rows}]" if s.encoding == "sparse_rows" else "")
            for s in specs[:_REPR_MAX_TENSORS]
        ]
        if len(specs) > _REPR_MAX_TENSORS:
            parts.append(f"... {len(specs) - _REPR_MAX_TENSORS} more")
        total = sum(s.nbytes for s in specs)
        return f"ParamSet({len(specs)} tensors, {total} bytes: {', '.join(parts)})"

    def specs(self) -> tuple[TensorSpec, ...]:
        """One TensorSpec per tensor, in order."""
        out: list[TensorSpec] = []
        for name, value in self._items.items():
            if isinstance(value, SparseRows):
                dtype = _wire_name(value.rows)
                out.append(TensorSpec(name, dtype, value.shape, "sparse_rows", len(value.ids)))
            else:
                out.append(TensorSpec(name, _wire_name(value), value.shape))
        return tuple(out)

    @property
    def nbytes(self) -> int:
        """Payload bytes on the wire."""
        return sum(spec.nbytes for spec in self.specs())

    def copy(self) -> ParamSet:
        """Deep copy: the result shares no memory with this set (or a decoder's buffer)."""
        return ParamSet((name, _copy_tensor(value)) for name, value in self._items.items())

    def map(self, fn: Callable[[Array], Array]) -> ParamSet:
        """Apply `fn` to every array and return the results, same names and order.

        Raises:
            TypeError: a tensor is sparse_rows (call ``to_dense()`` first), or `fn`
                returned something that is not a supported array.
        """
        for name, value in self._items.items():
            if isinstance(value, SparseRows):
                raise TypeError(
                    f"ParamSet.map: tensor {_short(name)} is sparse_rows; map takes dense arrays only"
                )
        return ParamSet(
            (name, fn(value)) for name, value in self._items.items() if not isinstance(value, SparseRows)
        )

    def equal(self, other: ParamSet) -> bool:
        """True if names, order, encodings, dtypes, shapes and every value's bits are the same."""
        if not isinstance(other, ParamSet) or list(self._items) != list(other._items):
            return False
        for name, a in self._items.items():
            b = other._items[name]
            if isinstance(a, SparseRows) and isinstance(b, SparseRows):
                if a.shape != b.shape or not _same_bits(a.ids, b.ids) or not _same_bits(a.rows, b.rows):
                    return False
            elif isinstance(a, SparseRows) or isinstance(b, SparseRows):
                return False
            elif not _same_bits(a, b):
                return False
        return True


@final
@dataclass(frozen=True, slots=True, eq=False, repr=False)
class EncodedTensor:
    """A floating-point tensor in a compressed wire encoding: the raw parts :func:`encoded_parts` lists.

    :mod:`enclavefl.compression` makes and reads them; this type only checks that
    the parts have the sizes and dtypes the encoding announces, so the header
    built from it is honest.

    Attributes:
        dtype: the dense tensor's wire dtype name (float16, float32 or float64).
        shape: the dense shape.
        encoding: one of :data:`COMPRESSED_ENCODINGS`.
        nnz: values kept by a ``topk*`` encoding (0 otherwise).
        parts: one C-contiguous array per part, in wire order.
        coded_bytes: the deflated size of the codes, 0 for raw codes.
    """

    dtype: str
    shape: tuple[int, ...]
    encoding: Encoding
    nnz: int
    parts: tuple[Array, ...]
    coded_bytes: int = 0

    def __post_init__(self) -> None:
        spec = TensorSpec("encoded", self.dtype, tuple(self.shape), self.encoding, self.nnz, self.coded_bytes)
        try:
            _check_spec(spec, 0, CodecLimits())
        except ProtocolError as exc:
            raise ValueError(f"EncodedTensor: {exc}") from None
        if self.encoding not in COMPRESSED_ENCODINGS:
            raise ValueError(f"EncodedTensor: encoding {self.encoding} is not a compressed encoding")
        plan = encoded_parts(self.encoding, spec.shape, self.nnz, DTYPES[self.dtype], self.coded_bytes)
        if len(self.parts) != len(plan):
            raise ValueError(f"EncodedTensor: {self.encoding} has {len(plan)} parts, got {len(self.parts)}")
        for arr, (part, dtype, count) in zip(self.parts, plan):
            if not isinstance(arr, np.ndarray) or arr.dtype != dtype or arr.size != count:
                found = f"{arr.dtype}[{arr.size}]" if isinstance(arr, np.ndarray) else type(arr).__name__
                raise ValueError(f"EncodedTensor: {self.encoding} part {part} must be {dtype}[{count}], got {found}")
        object.__setattr__(self, "shape", spec.shape)
        object.__setattr__(self, "parts", tuple(np.ascontiguousarray(p).reshape(-1) for p in self.parts))

    def __repr__(self) -> str:
        return f"EncodedTensor({self.encoding}, nnz={self.nnz}, shape={self.shape}, dtype={self.dtype})"

    def spec(self, name: str) -> TensorSpec:
        """The header entry of this tensor under ``name``."""
        return TensorSpec(name, self.dtype, self.shape, self.encoding, self.nnz, self.coded_bytes)


@final
class EncodedUpdate(Mapping[str, "Tensor | EncodedTensor"]):
    """An update on its way out with some tensors compressed: what a worker pushes as kind QUANTIZED.

    Ordered like the ParamSet it was encoded from; tensors that were not
    compressed (integers, SparseRows, empty ones) stay as they were.
    """

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[tuple[str, Tensor | EncodedTensor]]) -> None:
        """Raises ValueError on a repeated or empty name, TypeError on a value of another type."""
        out: dict[str, Tensor | EncodedTensor] = {}
        for name, value in items:
            if not isinstance(name, str) or not name or name in out:
                raise ValueError(f"EncodedUpdate: tensor name {_short(name)} is empty, not a str or repeated")
            if not isinstance(value, EncodedTensor | SparseRows):
                value = _to_wire_array(value, f"tensor {_short(name)}")
            out[name] = value
        self._items = out

    def __getitem__(self, name: str) -> Tensor | EncodedTensor:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        encoded = sum(isinstance(v, EncodedTensor) for v in self._items.values())
        return f"EncodedUpdate({len(self._items)} tensors, {encoded} compressed, {self.nbytes} bytes)"

    def specs(self) -> tuple[TensorSpec, ...]:
        """One TensorSpec per tensor, in order."""
        out: list[TensorSpec] = []
        for name, value in self._items.items():
            if isinstance(value, EncodedTensor):
                out.append(value.spec(name))
            else:
                out.extend(ParamSet([(name, value)]).specs())
        return tuple(out)

    @property
    def nbytes(self) -> int:
        """Payload bytes on the wire."""
        return sum(spec.nbytes for spec in self.specs())


def iter_chunks(params: ParamSet | EncodedUpdate, chunk_bytes: int) -> Iterator[memoryview]:
    """Yield the payload of `params` as memoryviews of at most `chunk_bytes` bytes.

    Views point into the arrays' own buffers (only a non C-contiguous array is
    copied first). A chunk never spans two tensors; an empty tensor yields nothing;
    a sparse tensor yields its ids' bytes, then its rows' bytes.

    Raises:
        ValueError: `chunk_bytes` is not an int >= 1 (raised at call time).
    """
    if not _is_int(chunk_bytes) or chunk_bytes < 1:
        raise ValueError(f"iter_chunks: chunk_bytes must be an int >= 1, got {chunk_bytes!r}")
    return _iter_chunks(params, chunk_bytes)


def _iter_chunks(params: ParamSet | EncodedUpdate, chunk_bytes: int) -> Iterator[memoryview]:
    for value in params.values():
        parts: tuple[Array, ...]
        if isinstance(value, SparseRows):
            parts = (value.ids, value.rows)
        elif isinstance(value, EncodedTensor):
            parts = value.parts
        else:
            parts = (value,)
        for part in parts:
            if part.size == 0:
                continue
            data = _bytes_view(part)
            for start in range(0, len(data), chunk_bytes):
                yield data[start : start + chunk_bytes]


@final
class StreamDecoder:
    """Reassembles a ParamSet from a header and raw chunks, checking every length first."""

    __slots__ = ("_header", "_limits", "_total", "_buf", "_view", "_received", "_closed")

    def __init__(
        self, header: StreamHeader, limits: CodecLimits = CodecLimits(), expected: StreamHeader | None = None
    ) -> None:
        """Check `header` (and that it matches `expected`), then allocate its payload buffer.

        Raises:
            ProtocolError: the header breaks `limits` or does not match `expected`.
        """
        if not isinstance(header, StreamHeader):
            raise TypeError(f"StreamDecoder: expected a StreamHeader, got {type(header).__name__}")
        header.check(limits)
        compressed = [spec.name for spec in header.tensors if spec.encoding in COMPRESSED_ENCODINGS]
        if compressed:
            raise ProtocolError(
                f"tensor {_short(compressed[0])}: a compressed encoding in an update not declared quantized "
                "(compressed tensors are read by enclavefl.compression.CompressedDecoder)"
            )
        if expected is not None:
            reason = header.matches(expected)
            if reason is not None:
                raise ProtocolError(reason)
        self._header = header
        self._limits = limits
        self._total = header.total_bytes
        self._buf: Array = np.empty(self._total, dtype=np.uint8)
        self._view = self._buf.data  # 1-D uint8: format "B"
        self._received = 0
        self._closed = False

    @property
    def bytes_received(self) -> int:
        """Payload bytes fed so far."""
        return self._received

    def feed(self, chunk: bytes | memoryview) -> None:
        """Copy the next chunk of payload into place; a refused chunk changes nothing.

        Raises:
            ProtocolError: the chunk is over ``max_chunk_bytes`` or runs past the payload.
            ClosedError: after :meth:`finish`.
        """
        if self._closed:
            raise ClosedError("StreamDecoder.feed() called after finish()")
        data = memoryview(chunk)
        if data.format != "B" or data.ndim != 1:
            data = data.cast("B")
        size = data.nbytes
        if size > self._limits.max_chunk_bytes:
            raise ProtocolError(
                f"chunk of {size} bytes is over max_chunk_bytes={self._limits.max_chunk_bytes}"
            )
        end = self._received + size
        if end > self._total:
            raise ProtocolError(f"stream too long: received {end} bytes, header announced {self._total}")
        self._view[self._received : end] = data
        self._received = end

    def finish(self) -> ParamSet:
        """Return the decoded tensors; views of one buffer wherever alignment allows.

        Raises:
            ProtocolError: the stream was truncated, sparse row ids are not strictly
                increasing or out of range, or a bool byte is not 0 or 1.
            ClosedError: called twice.
        """
        if self._closed:
            raise ClosedError("StreamDecoder.finish() called twice")
        self._closed = True
        buf = self._buf
        self._view = memoryview(b"")
        self._buf = np.empty(0, dtype=np.uint8)
        if self._received != self._total:
            raise ProtocolError(f"stream ended after {self._received} of {self._total} bytes")
        address = buf.ctypes.data
        offset = 0
        copied = 0
        tensors: list[tuple[str, Tensor]] = []

        def take(dtype: np.dtype[Any], shape: tuple[int, ...], where: str) -> Array:
            nonlocal offset, copied
            count = math.prod(shape)
            start, offset = offset, offset + count * dtype.itemsize
            if count == 0:
                return np.empty(shape, dtype=dtype)
            if dtype.kind == "b" and int(buf[start:offset].max()) > 1:
                raise ProtocolError(f"{where}: bool payload holds a byte other than 0 or 1")
            arr: Array = np.frombuffer(buf, dtype=dtype, count=count, offset=start).reshape(shape)
            if (address + start) % dtype.itemsize:
                copied += count * dtype.itemsize
                arr = arr.copy()  # unaligned: numpy would work on it, slowly
            return arr

        for spec in self._header.tensors:
            where = f"tensor {_short(spec.name)}"
            dtype = DTYPES[spec.dtype]
            if spec.encoding == "sparse_rows":
                ids = take(_IDS_DTYPE, (spec.nnz_rows,), where)
                try:
                    _normalize_ids(ids, spec.shape[0], where)
                except ValueError as exc:
                    raise ProtocolError(str(exc)) from exc
                rows = take(dtype, (spec.nnz_rows, *spec.shape[1:]), where)
                tensors.append((spec.name, SparseRows(ids, rows, spec.shape)))
            else:
                tensors.append((spec.name, take(dtype, spec.shape, where)))
        logger.debug(
            "decoded %d tensors, %d bytes (%d copied for alignment)", len(tensors), self._total, copied
        )
        return ParamSet(tensors)


def decode(
    header: StreamHeader,
    chunks: Iterable[bytes | memoryview],
    limits: CodecLimits = CodecLimits(),
    expected: StreamHeader | None = None,
) -> ParamSet:
    """Decode a whole stream: :class:`StreamDecoder`, feed every chunk, finish."""
    decoder = StreamDecoder(header, limits, expected)
    for chunk in chunks:
        decoder.feed(chunk)
    return decoder.finish()


def _write_all(f: BinaryIO, data: bytes | memoryview) -> int:
    view = memoryview(data)
    size = view.nbytes
    while view.nbytes:
        written = f.write(view)
        if not written:
            raise OSError(f"write returned {written!r} with {view.nbytes} bytes left")
        view = view[written:]
    return size


def write_params(f: BinaryIO, params: ParamSet) -> int:
    """Write `params` as a tensor file (magic, u64 LE header length, JSON header, payload).

    Returns:
        The number of bytes written. Atomic replacement (temp file, fsync, rename)
        is the caller's job.
    """
    header = StreamHeader.of(params).to_json()
    written = _write_all(f, _FILE_MAGIC)
    written += _write_all(f, struct.pack("<Q", len(header)))
    written += _write_all(f, header)
    for chunk in iter_chunks(params, _FILE_CHUNK_BYTES):
        written += _write_all(f, chunk)
    return written


def _source_name(f: BinaryIO) -> str:
    name = getattr(f, "name", None)
    return f"tensor file {name!r}" if isinstance(name, str) else "tensor file"


def _read_exact(f: BinaryIO, size: int, source: str, what: str) -> bytes:
    parts: list[bytes] = []
    got = 0
    while got < size:
        data = f.read(size - got)
        if not data:
            raise ProtocolError(f"{source}: truncated in the {what}: got {got} of {size} bytes")
        parts.append(data)
        got += len(data)
    return b"".join(parts)


def _remaining_bytes(f: BinaryIO) -> int | None:
    """Bytes left after the current position, or None if `f` cannot tell."""
    try:
        if not f.seekable():
            return None
        position = f.tell()
        end = f.seek(0, io.SEEK_END)
        f.seek(position)
    except (OSError, ValueError):
        return None
    return end - position


def read_params(f: BinaryIO, limits: CodecLimits = CodecLimits()) -> ParamSet:
    """Read a tensor file written by :func:`write_params`, in bounded chunks.

    Raises:
        ProtocolError: wrong magic, header too long or invalid, payload truncated
            or followed by trailing bytes.
    """
    source = _source_name(f)
    magic = _read_exact(f, len(_FILE_MAGIC), source, "magic")
    if magic != _FILE_MAGIC:
        raise ProtocolError(
            f"{source}: not an enclavefl tensor file (magic {magic!r}, expected {_FILE_MAGIC!r})"
        )
    (header_len,) = struct.unpack("<Q", _read_exact(f, 8, source, "header length"))
    if header_len > _MAX_FILE_HEADER_BYTES:
        raise ProtocolError(f"{source}: header length {header_len} is over {_MAX_FILE_HEADER_BYTES} bytes")
    try:
        header = StreamHeader.from_json(_read_exact(f, header_len, source, "header"), limits)
    except ProtocolError as exc:
        raise ProtocolError(f"{source}: {exc}") from exc
    total = header.total_bytes
    remaining = _remaining_bytes(f)
    if remaining is not None and remaining != total:
        problem = "truncated" if remaining < total else "trailing bytes after the payload"
        raise ProtocolError(f"{source}: {problem}: {remaining} payload bytes, header announced {total}")
    decoder = StreamDecoder(header, limits)
    chunk_bytes = min(limits.max_chunk_bytes, _FILE_CHUNK_BYTES)
    while decoder.bytes_received < total:
        data = f.read(min(chunk_bytes, total - decoder.bytes_received))
        if not data:
            raise ProtocolError(
                f"{source}: truncated: payload ended after {decoder.bytes_received} of {total} bytes"
            )
        decoder.feed(data)
    if f.read(1):
        raise ProtocolError(f"{source}: trailing bytes after the {total}-byte payload")
    return decoder.finish()
