"""Compressed update encodings: stochastic quantization, top-k sparsification, and their decoder.

How this works: a worker turns each floating-point tensor of its update into an
:class:`~enclavefl.tensors.EncodedTensor` (:func:`encode_tensor`); the header
declares the encoding per tensor (``q8``, ``q4``, ``topk``, ``topk_q8``,
``topk_q4``), so the payload's size follows from the header alone and is
checked before anything is allocated. The PS reads such an update with
:class:`CompressedDecoder`, which decodes every chunk as it arrives straight
into the dense tensors of the staging buffer: besides those it holds only the
current tensor's indices and scales and less than one value of carry-over, so
an upload costs no more PS memory than a dense one. Every index, count and
scale from the wire is checked and a bad one refused with
:class:`~enclavefl.errors.UpdateRejected` naming the tensor and the field.

Stochastic quantization (Alistarh et al. 2017, "QSGD"; Suresh et al. 2017,
"Distributed Mean Estimation with Limited Communication"): the values of a
block of :data:`~enclavefl.tensors.QUANT_BLOCK` share a grid
``low + c * step``, ``c = 0 .. 2^bits - 1``, spanning the block's range; a value
``x`` becomes the grid point below it with probability ``1 - r`` and the one
above with probability ``r``, where ``r`` is its fractional position. So
``E[decode(encode(x))] = x`` exactly (the grid's bounds are rounded outwards to
float32) and each value is off by less than one ``step``. As QSGD does with
Elias codes, the codes are then coded losslessly: deflated (zlib, RFC 1950)
whenever that makes them shorter, which ``TensorSpec.coded_bytes`` announces.
Stochastically rounded updates concentrate near the middle of their range, so
8-bit codes of a trained model's delta deflate to about 0.83 bytes a value.

Top-k sparsification keeps the ``k`` values of largest magnitude
(Aji & Heafield 2017; Lin et al. 2018, "Deep Gradient Compression"), with their
row-major indices; the worker keeps what it did not send as a residual added to
the next round's update (error feedback, Stich et al. 2018, "Sparsified SGD with
Memory"), see :mod:`enclavefl.worker.compression`. ``topk_q8``/``topk_q4``
quantize the kept values as above (the cloud cluster's ``DIFF_SPARSE_QUANT``).
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias, final

import numpy as np
import numpy.typing as npt

from enclavefl.errors import ClosedError, ProtocolError, UpdateRejected
from enclavefl.tensors import (
    COMPRESSED_ENCODINGS,
    DTYPES,
    QUANT_BLOCK,
    CodecLimits,
    EncodedTensor,
    ParamSet,
    SparseRows,
    StreamHeader,
    Tensor,
    encoded_parts,
)

__all__ = [
    "CompressedDecoder",
    "CompressionType",
    "decode_tensor",
    "dequantize",
    "encode_tensor",
    "encoding_for",
    "quantize",
    "top_k",
]

log = logging.getLogger(__name__)

Array: TypeAlias = npt.NDArray[Any]
CompressionType = Literal["none", "quantize", "topk", "topk_quantize"]
"""``privacy.compression.upload.type``: what the worker does to its update's floating-point tensors."""

_F32: Final = np.dtype("<f4")
_DEFLATE_LEVEL: Final = 6
_INFLATE_STEP: Final = 1 << 22  # bytes of codes inflated per call: bounds the decoder's temporaries


def encoding_for(kind: CompressionType, bits: int) -> str | None:
    """The wire encoding of a compression type and bit width; None for ``none``.

    Raises:
        ValueError: an unknown type, or bits other than 8 and 4.
    """
    if bits not in (8, 4):
        raise ValueError(f"quantization bits must be 8 or 4, got {bits!r}")
    names = {"none": None, "quantize": f"q{bits}", "topk": "topk", "topk_quantize": f"topk_q{bits}"}
    if kind not in names:
        raise ValueError(f"unknown compression type {kind!r}: expected one of {list(names)}")
    return names[kind]


def _levels(bits: int) -> int:
    return (1 << bits) - 1


def quantize(values: Array, bits: int, rng: np.random.Generator) -> tuple[Array, Array]:
    """Unbiased stochastic quantization of a 1-D float array, block by block.

    Args:
        values: finite values, any float dtype (computed in float64).
        bits: 8 or 4.
        rng: the source of the rounding's randomness.

    Returns:
        (scales, codes): float32 ``[low0, step0, low1, step1, ...]``, one pair per
        :data:`QUANT_BLOCK` values; uint8 codes, two per byte for 4 bits (first
        value in the low nibble, an odd count's last high nibble 0).

    Raises:
        ValueError: a value is not finite.
    """
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.isfinite(x).all():
        raise ValueError("cannot quantize NaN or Inf values")
    n, levels = x.size, _levels(bits)
    blocks = -(-n // QUANT_BLOCK)
    scales = np.empty(2 * blocks, dtype=_F32)
    codes = np.empty(n, dtype=np.uint8)
    for b in range(blocks):
        block = x[b * QUANT_BLOCK:(b + 1) * QUANT_BLOCK]
        low, step = _grid(float(block.min()), float(block.max()), levels)
        scales[2 * b], scales[2 * b + 1] = low, step
        if step == 0.0:
            codes[b * QUANT_BLOCK:b * QUANT_BLOCK + block.size] = 0  # a constant block is its low, exactly
            continue
        position = np.clip((block - float(low)) / float(step), 0.0, levels)
        below = np.floor(position)
        up = rng.random(block.size) < (position - below)
        codes[b * QUANT_BLOCK:b * QUANT_BLOCK + block.size] = np.minimum(below + up, levels).astype(np.uint8)
    if bits == 4:
        codes = _pack4(codes)
    return scales, codes


def _grid(lo: float, hi: float, levels: int) -> tuple[np.float32, np.float32]:
    """float32 (low, step) with ``low <= lo`` and ``low + levels * step >= hi`` in float64."""
    low = np.float32(lo)
    if float(low) > lo:
        low = np.nextafter(low, np.float32(-np.inf))
    if hi == lo and float(low) == lo:
        return low, np.float32(0.0)
    step = np.float32((hi - float(low)) / levels)
    while float(low) + levels * float(step) < hi:
        step = np.nextafter(step, np.float32(np.inf))
    return low, step


def _pack4(codes: Array) -> Array:
    padded = codes if codes.size % 2 == 0 else np.append(codes, np.uint8(0))
    packed: Array = (padded[0::2] | (padded[1::2] << 4)).astype(np.uint8)
    return packed


def _unpack4(packed: Array, count: int) -> Array:
    out = np.empty(2 * packed.size, dtype=np.uint8)
    out[0::2] = packed & 0x0F
    out[1::2] = packed >> 4
    return out[:count]


def dequantize(scales: Array, codes: Array, first: int = 0) -> Array:
    """Values ``first .. first + codes.size`` of a quantized vector, as float64.

    Args:
        scales: the vector's float32 (low, step) pairs.
        codes: unpacked codes (one per value) of values ``first, first+1, ...``.
        first: the position of ``codes[0]`` in the vector.
    """
    blocks = (first + np.arange(codes.size)) // QUANT_BLOCK
    low = scales[0::2].astype(np.float64)[blocks]
    step = scales[1::2].astype(np.float64)[blocks]
    out: Array = low + codes.astype(np.float64) * step
    return out


def top_k(values: Array, k: int) -> Array:
    """Row-major indices of the ``k`` values of largest magnitude, increasing, as uint32.

    Raises:
        ValueError: ``k`` is not in ``[0, values.size]``.
    """
    flat = np.asarray(values).reshape(-1)
    if not 0 <= k <= flat.size:
        raise ValueError(f"top_k: k={k} for {flat.size} values")
    if k == flat.size:
        return np.arange(k, dtype=np.uint32)
    picked = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k:]
    return np.sort(picked).astype(np.uint32)


def encode_tensor(values: Array, encoding: str, rng: np.random.Generator, *, sparse_rate: float = 1.0) -> EncodedTensor:
    """One floating-point tensor in ``encoding``.

    Args:
        values: the dense tensor (float16, float32 or float64, finite).
        encoding: one of :data:`~enclavefl.tensors.COMPRESSED_ENCODINGS`.
        rng: randomness of the stochastic rounding.
        sparse_rate: ``topk*``: the fraction of values kept, ``k = max(1, ceil(rate * n))``.

    Raises:
        ValueError: an unknown encoding, a non-float dtype, or non-finite values.
    """
    arr = np.asarray(values)
    if encoding not in COMPRESSED_ENCODINGS:
        raise ValueError(f"encode_tensor: {encoding!r} is not one of {sorted(COMPRESSED_ENCODINGS)}")
    if arr.dtype.kind != "f":
        raise ValueError(f"encode_tensor: {encoding} needs a floating-point tensor, got {arr.dtype}")
    dtype_name = {2: "float16", 4: "float32", 8: "float64"}[arr.dtype.itemsize]
    flat = arr.reshape(-1)
    parts: list[Array] = []
    nnz = 0
    if encoding.startswith("topk"):
        nnz = min(flat.size, max(1, math.ceil(sparse_rate * flat.size))) if flat.size else 0
        indices = top_k(flat, nnz)
        parts.append(indices)
        flat = flat[indices]
    coded_bytes = 0
    if encoding == "topk":
        parts.append(np.ascontiguousarray(flat, dtype=DTYPES[dtype_name]))
    else:
        scales, codes = quantize(flat, 4 if encoding.endswith("q4") else 8, rng)
        deflated = zlib.compress(codes.tobytes(), _DEFLATE_LEVEL) if codes.size else b""
        if len(deflated) < codes.size:
            codes, coded_bytes = np.frombuffer(deflated, dtype=np.uint8).copy(), len(deflated)
        parts += [scales, codes]
    return EncodedTensor(dtype_name, tuple(arr.shape), encoding, nnz, tuple(parts),  # type: ignore[arg-type]
                         coded_bytes)


def decode_tensor(tensor: EncodedTensor) -> Array:
    """The dense tensor an :class:`EncodedTensor` stands for, in its dtype (what the PS decodes)."""
    dtype = DTYPES[tensor.dtype]
    out = np.zeros(math.prod(tensor.shape), dtype=dtype)
    parts = list(tensor.parts)
    positions: Array | None = parts.pop(0).astype(np.int64) if tensor.encoding.startswith("topk") else None
    count = tensor.nnz if positions is not None else out.size
    if tensor.encoding == "topk":
        values: Array = parts[0]
    else:
        scales, codes = parts
        if tensor.coded_bytes:
            codes = np.frombuffer(zlib.decompress(codes.tobytes()), dtype=np.uint8)
        if tensor.encoding.endswith("q4"):
            codes = _unpack4(codes, count)
        values = dequantize(scales, codes)
    if positions is None:
        out[:] = values
    else:
        out[positions] = values
    return out.reshape(tensor.shape)


# -- the PS's decoder ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Segment:
    """A run of payload bytes and what to do with each piece of it (``consume(piece, offset)``)."""

    nbytes: int
    consume: Callable[[Array, int], None]
    done: Callable[[], None] | None = None


def _raw_into(target: Array) -> Callable[[Array, int], None]:
    view = target.reshape(-1).view(np.uint8)

    def consume(piece: Array, offset: int) -> None:
        view[offset:offset + piece.size] = piece

    return consume


@final
class _CompressedTensorReader:
    """Decodes one compressed tensor's parts into its dense output as bytes arrive."""

    def __init__(self, name: str, encoding: str, shape: tuple[int, ...], nnz: int, coded_bytes: int,
                 out: Array) -> None:
        self.where = f"tensor {name[:80]!r} ({encoding})"
        self.encoding = encoding
        self.out = out.reshape(-1)  # a view: out is the staging buffer's tensor
        self.numel = self.out.size
        self.sparse = encoding.startswith("topk")
        self.count = nnz if self.sparse else self.numel
        self.bits = 4 if encoding.endswith("q4") else 8
        self.plan = encoded_parts(encoding, shape, nnz, out.dtype, coded_bytes)
        self.raw_codes = encoded_parts(encoding, shape, nnz, out.dtype)[-1][2]
        self.inflater = zlib.decompressobj() if coded_bytes else None
        self.codes_done = 0  # bytes of raw codes decoded so far
        self.indices: Array | None = None
        self.scales: Array | None = None
        self.carry = np.empty(0, dtype=np.uint8)
        self.value_dtype = out.dtype
        self.values_done = 0

    def segments(self) -> list[_Segment]:
        out: list[_Segment] = []
        for part, dtype, count in self.plan:
            nbytes = dtype.itemsize * count
            if part == "indices":
                self.indices = np.empty(count, dtype=dtype)
                out.append(_Segment(nbytes, _raw_into(self.indices), self._check_indices))
            elif part == "scales":
                self.scales = np.empty(count, dtype=dtype)
                out.append(_Segment(nbytes, _raw_into(self.scales), self._check_scales))
            elif part == "codes" and self.inflater is not None:
                out.append(_Segment(nbytes, self._deflated_codes, self._check_inflated))
            elif part == "codes":
                out.append(_Segment(nbytes, self._codes))
            else:
                out.append(_Segment(nbytes, self._values, self._check_carry))
        return out

    def _positions(self, first: int, size: int) -> Array | slice:
        if self.indices is None:
            return slice(first, first + size)
        return self.indices[first:first + size]

    def _check_indices(self) -> None:
        idx = self.indices
        if idx is None or idx.size == 0:
            return
        bad = np.flatnonzero(idx[1:] <= idx[:-1])
        if bad.size:
            i = int(bad[0]) + 1
            raise UpdateRejected(f"{self.where}: indices must be strictly increasing, index {int(idx[i])} at "
                                 f"position {i} follows {int(idx[i - 1])}")
        if int(idx[-1]) >= self.numel:
            raise UpdateRejected(f"{self.where}: index {int(idx[-1])} is out of range for {self.numel} values")

    def _check_scales(self) -> None:
        scales = self.scales
        if scales is None:
            return
        low = scales[0::2].astype(np.float64)
        step = scales[1::2].astype(np.float64)
        high = low + _levels(self.bits) * step
        limit = float(np.finfo(self.value_dtype).max)
        bad = np.flatnonzero(~(np.isfinite(low) & np.isfinite(step) & (step >= 0) & (np.abs(low) <= limit)
                               & (np.abs(high) <= limit)))
        if bad.size:
            b = int(bad[0])
            raise UpdateRejected(f"{self.where}: scale of block {b} (low {low[b]!r}, step {step[b]!r}) is not finite, "
                                 f"negative or outside {self.value_dtype} range")

    def _deflated_codes(self, piece: Array, offset: int) -> None:
        del offset
        inflater = self.inflater
        if inflater is None:  # pragma: no cover - only planned with an inflater
            raise AssertionError("no inflater")
        data = piece.tobytes()
        while data:
            left = self.raw_codes - self.codes_done
            try:
                # max_length 0 would mean "no limit": past the announced size ask for 1 byte, which must not come.
                raw = inflater.decompress(data, max(1, min(left, _INFLATE_STEP)))
            except zlib.error as exc:
                raise UpdateRejected(f"{self.where}: the deflated codes are corrupt ({exc})") from None
            if len(raw) > left:
                raise UpdateRejected(f"{self.where}: the deflated codes expand past the {self.raw_codes} bytes "
                                     "the header announces")
            if raw:
                self._codes(np.frombuffer(raw, dtype=np.uint8), self.codes_done)
                self.codes_done += len(raw)
            if inflater.unused_data:
                raise UpdateRejected(f"{self.where}: {len(inflater.unused_data)} bytes follow the deflated codes")
            data = inflater.unconsumed_tail

    def _check_inflated(self) -> None:
        inflater = self.inflater
        if inflater is not None and not (inflater.eof and self.codes_done == self.raw_codes):
            raise UpdateRejected(f"{self.where}: the deflated codes give {self.codes_done} bytes, the header "
                                 f"announces {self.raw_codes}")

    def _codes(self, piece: Array, offset: int) -> None:
        if self.scales is None:
            raise AssertionError("scales precede codes")  # the plan guarantees it
        if self.bits == 4:
            first = 2 * offset
            if first + 2 * piece.size > self.count and piece[-1] >> 4:
                raise UpdateRejected(f"{self.where}: the padding nibble after the last 4-bit code is "
                                     f"{int(piece[-1]) >> 4}, expected 0")
            codes = _unpack4(piece, min(2 * piece.size, self.count - first))
        else:
            first, codes = offset, piece
        self.out[self._positions(first, codes.size)] = dequantize(self.scales, codes, first)

    def _values(self, piece: Array, offset: int) -> None:
        del offset
        size = self.value_dtype.itemsize
        data = piece if self.carry.size == 0 else np.concatenate([self.carry, piece])
        whole = data.size // size
        if whole:
            values = data[:whole * size].view(self.value_dtype)
            self.out[self._positions(self.values_done, whole)] = values
            self.values_done += whole
        self.carry = data[whole * size:].copy()

    def _check_carry(self) -> None:
        if self.carry.size:  # the plan's sizes make this impossible; keep the invariant loud
            raise UpdateRejected(f"{self.where}: {self.carry.size} bytes left over after the values")


@final
class CompressedDecoder:
    """Reassembles an update whose header declares compressed tensors, decoding chunk by chunk.

    Same contract as :class:`~enclavefl.tensors.StreamDecoder` (``feed``,
    ``finish``, ``bytes_received``). The dense tensors are allocated once, when
    the header has been checked against the limits (payload bytes, and the dense
    bytes the decoded update will take); dense and ``sparse_rows`` tensors are
    copied into place, compressed ones decoded as their bytes arrive.
    """

    __slots__ = ("_header", "_limits", "_total", "_received", "_closed", "_tensors", "_segments", "_seg",
                 "_seg_offset", "_readers")

    def __init__(self, header: StreamHeader, limits: CodecLimits = CodecLimits(),
                 expected: StreamHeader | None = None) -> None:
        """Check ``header`` (and that it matches ``expected``), then allocate the dense tensors.

        Raises:
            ProtocolError: the header breaks ``limits``, does not match ``expected``, or
                its dense tensors would take more than ``limits.max_total_bytes``.
        """
        header.check(limits)
        if expected is not None:
            reason = header.matches(expected)
            if reason is not None:
                raise ProtocolError(reason)
        dense_bytes = sum(math.prod(s.shape) * DTYPES[s.dtype].itemsize for s in header.tensors
                          if s.encoding != "sparse_rows")
        if dense_bytes > limits.max_total_bytes:
            raise ProtocolError(f"the decoded update takes {dense_bytes} bytes, over max_total_bytes="
                                f"{limits.max_total_bytes}")
        self._header = header
        self._limits = limits
        self._total = header.total_bytes
        self._received = 0
        self._closed = False
        self._tensors: list[tuple[str, Array, Array | None]] = []  # (name, values or rows, sparse ids)
        self._segments: list[_Segment] = []
        self._readers: list[_CompressedTensorReader] = []
        for spec in header.tensors:
            dtype = DTYPES[spec.dtype]
            if spec.encoding == "sparse_rows":
                ids = np.empty(spec.nnz_rows, dtype=np.dtype("<i8"))
                rows = np.empty((spec.nnz_rows, *spec.shape[1:]), dtype=dtype)
                self._tensors.append((spec.name, rows, ids))
                self._segments += [_Segment(ids.nbytes, _raw_into(ids)), _Segment(rows.nbytes, _raw_into(rows))]
            elif spec.encoding == "dense":
                values = np.empty(spec.shape, dtype=dtype)
                self._tensors.append((spec.name, values, None))
                self._segments.append(_Segment(values.nbytes, _raw_into(values)))
            else:
                values = np.zeros(spec.shape, dtype=dtype)
                reader = _CompressedTensorReader(spec.name, spec.encoding, spec.shape, spec.nnz_rows,
                                                 spec.coded_bytes, values)
                self._readers.append(reader)
                self._tensors.append((spec.name, values, None))
                self._segments += reader.segments()
        self._segments = [s for s in self._segments if s.nbytes]
        self._seg = 0
        self._seg_offset = 0

    @property
    def bytes_received(self) -> int:
        """Payload bytes fed so far."""
        return self._received

    def feed(self, chunk: bytes | memoryview) -> None:
        """Decode the next chunk of payload into place.

        Raises:
            ProtocolError: the chunk is over ``max_chunk_bytes`` or runs past the payload.
            UpdateRejected: an index, scale or padding the chunk completes is invalid.
            ClosedError: after :meth:`finish`.
        """
        if self._closed:
            raise ClosedError("CompressedDecoder.feed() called after finish()")
        view = memoryview(chunk)
        size = view.nbytes
        if size > self._limits.max_chunk_bytes:
            raise ProtocolError(f"chunk of {size} bytes is over max_chunk_bytes={self._limits.max_chunk_bytes}")
        if self._received + size > self._total:
            raise ProtocolError(f"stream too long: received {self._received + size} bytes, "
                                f"header announced {self._total}")
        data = np.frombuffer(view.cast("B") if view.format != "B" or view.ndim != 1 else view, dtype=np.uint8)
        while data.size:
            segment = self._segments[self._seg]
            take = min(segment.nbytes - self._seg_offset, data.size)
            segment.consume(data[:take], self._seg_offset)
            self._seg_offset += take
            data = data[take:]
            if self._seg_offset == segment.nbytes:
                if segment.done is not None:
                    segment.done()
                self._seg += 1
                self._seg_offset = 0
        self._received += size

    def finish(self) -> ParamSet:
        """Return the decoded tensors.

        Raises:
            ProtocolError: the stream was truncated, or sparse row ids are invalid.
            UpdateRejected: a 4-bit tensor's padding nibble is not zero.
            ClosedError: called twice.
        """
        if self._closed:
            raise ClosedError("CompressedDecoder.finish() called twice")
        self._closed = True
        if self._received != self._total:
            raise ProtocolError(f"stream ended after {self._received} of {self._total} bytes")
        out: list[tuple[str, Tensor]] = []
        for (name, values, ids), spec in zip(self._tensors, self._header.tensors):
            if ids is not None:
                try:
                    out.append((name, SparseRows(ids, values, spec.shape)))
                except ValueError as exc:
                    raise ProtocolError(f"tensor {name[:80]!r}: {exc}") from exc
            else:
                if values.dtype.kind == "b" and values.size and int(values.view(np.uint8).max()) > 1:
                    raise ProtocolError(f"tensor {name[:80]!r}: bool payload holds a byte other than 0 or 1")
                out.append((name, values))
        log.debug("decoded %d tensors (%d compressed) from %d bytes", len(out), len(self._readers), self._total)
        return ParamSet(out)
