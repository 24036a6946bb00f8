"""Compressed encodings: unbiased stochastic quantization, top-k, sizes, and the PS's chunk-by-chunk decoder."""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from enclavefl.compression import (
    CompressedDecoder,
    decode_tensor,
    dequantize,
    encode_tensor,
    encoding_for,
    quantize,
    top_k,
)
from enclavefl.errors import ProtocolError, UpdateRejected
from enclavefl.tensors import (
    QUANT_BLOCK,
    CodecLimits,
    EncodedTensor,
    EncodedUpdate,
    ParamSet,
    SparseRows,
    StreamDecoder,
    StreamHeader,
    TensorSpec,
    iter_chunks,
)


def f32(values: Any) -> npt.NDArray[np.float32]:
    return np.asarray(values, dtype=np.float32)


def decode_stream(update: EncodedUpdate, chunk_bytes: int) -> ParamSet:
    decoder = CompressedDecoder(StreamHeader.of(update), CodecLimits(max_chunk_bytes=max(chunk_bytes, 1)))
    for chunk in iter_chunks(update, chunk_bytes):
        decoder.feed(chunk)
    return decoder.finish()


def test_encoding_names_follow_type_and_bits() -> None:
    assert [encoding_for(t, b) for t, b in [("none", 8), ("quantize", 8), ("quantize", 4), ("topk", 8),
                                            ("topk_quantize", 8), ("topk_quantize", 4)]] == \
        [None, "q8", "q4", "topk", "topk_q8", "topk_q4"]


def test_quantization_grid_spans_the_block_and_decodes_by_hand() -> None:
    # values [0, 1, 2.55]: low 0, step 2.55 / 255 = 0.01; 2.55 sits on the top code 255 exactly,
    # 0 on code 0; 1.0 is code 100 (1.0 / 0.01, up to float32 rounding of the step).
    scales, codes = quantize(np.array([0.0, 1.0, 2.55]), 8, np.random.default_rng(0))
    assert scales[0] == 0.0 and scales[1] == pytest.approx(0.01, rel=1e-6)
    assert codes[0] == 0 and codes[2] == 255 and codes[1] in (99, 100, 101)
    decoded = dequantize(scales, codes)
    assert decoded[0] == 0.0 and decoded[2] >= 2.55


@pytest.mark.parametrize("bits", [8, 4])
def test_stochastic_quantization_is_unbiased(bits: int) -> None:
    # Prepare: 64 values, quantized 20,000 times. Each decoded value is x + e with E[e] = 0 and
    # |e| < step, so the sample mean's standard error is at most step / (2 sqrt(20000)).
    rng = np.random.default_rng(12)
    x = rng.uniform(-1, 1, 64)
    trials = 20_000
    total = np.zeros(64)
    step = 0.0
    for _ in range(trials):
        scales, codes = quantize(x, bits, rng)
        unpacked = codes if bits == 8 else np.stack([codes & 15, codes >> 4], axis=1).ravel()[:64]
        total += dequantize(scales, unpacked)
        step = float(scales[1])
    # Assert: every mean within 5 standard errors (one value in 3.5 million fails by chance).
    assert np.abs(total / trials - x).max() < 5 * step / (2 * np.sqrt(trials))


@pytest.mark.parametrize("encoding", ["q8", "q4"])
def test_quantization_error_is_below_one_step_per_value(encoding: str) -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=3 * QUANT_BLOCK + 5).astype(np.float32)
    tensor = encode_tensor(x, encoding, rng)
    steps = np.repeat(tensor.parts[0][1::2].astype(np.float64), QUANT_BLOCK)[: x.size]
    error = np.abs(decode_tensor(tensor).astype(np.float64) - x)
    assert (error <= steps * (1 + 1e-6)).all()


def test_constant_block_decodes_exactly() -> None:
    tensor = encode_tensor(f32([0.25, 0.25, 0.25]), "q4", np.random.default_rng(0))
    np.testing.assert_array_equal(decode_tensor(tensor), f32([0.25, 0.25, 0.25]))


def test_top_k_keeps_the_largest_magnitudes_in_index_order() -> None:
    # |values| = 0.1, 5, 0.3, 4, 2: the two largest are at 1 (5) and 3 (-4).
    np.testing.assert_array_equal(top_k(f32([0.1, 5, -0.3, -4, 2]), 2), np.array([1, 3], dtype=np.uint32))


def test_topk_encoding_sends_k_values_and_zeros_elsewhere() -> None:
    # rate 0.5 of 4 values keeps 2: 3.0 (index 1) and -2.0 (index 2).
    tensor = encode_tensor(f32([[0.5, 3.0], [-2.0, 0.1]]), "topk", np.random.default_rng(0), sparse_rate=0.5)
    assert tensor.nnz == 2
    np.testing.assert_array_equal(decode_tensor(tensor), f32([[0, 3.0], [-2.0, 0]]))


@pytest.mark.parametrize(("encoding", "nnz", "expected"), [
    # 5000 values: 3 blocks of 2048 -> 3 (low, step) float32 pairs = 24 bytes, then the codes.
    ("q8", 0, 24 + 5000),
    ("q4", 0, 24 + 2500),
    # 50 kept values: 50 uint32 indices, then 50 float32 values, or 1 scale pair and the codes.
    ("topk", 50, 200 + 200),
    ("topk_q8", 50, 200 + 8 + 50),
    ("topk_q4", 50, 200 + 8 + 25),
])
def test_payload_size_follows_from_the_header(encoding: str, nnz: int, expected: int) -> None:
    assert TensorSpec("w", "float32", (50, 100), encoding, nnz).nbytes == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("encoding", ["q8", "q4", "topk", "topk_q8", "topk_q4"])
@pytest.mark.parametrize("chunk_bytes", [1, 7, 1 << 20])
def test_decoder_fed_in_any_chunks_gives_what_the_worker_encoded(encoding: str, chunk_bytes: int) -> None:
    rng = np.random.default_rng(5)
    w = rng.normal(size=(33, 71)).astype(np.float32)
    tensor = encode_tensor(w, encoding, rng, sparse_rate=0.1)
    table = SparseRows(np.array([1, 3]), f32([[1, 2], [3, 4]]), (5, 2))
    update = EncodedUpdate([("w", tensor), ("steps", np.array([7], dtype=np.int64)), ("table", table),
                            ("b", f32([1.5, -2.5]))])
    decoded = decode_stream(update, chunk_bytes)
    np.testing.assert_array_equal(decoded["w"], decode_tensor(tensor))
    np.testing.assert_array_equal(decoded["steps"], [7])
    assert isinstance(decoded["table"], SparseRows) and decoded["table"].to_dense()[3, 1] == 4
    np.testing.assert_array_equal(decoded["b"], f32([1.5, -2.5]))


def test_codes_that_do_not_deflate_travel_raw() -> None:
    # Uniform values give uniform codes, which deflate cannot shorten: 100,000 codes + 49 scale pairs.
    rng = np.random.default_rng(0)
    tensor = encode_tensor(rng.uniform(-1, 1, 100_000).astype(np.float32), "q8", rng)
    assert (tensor.coded_bytes, tensor.spec("w").nbytes) == (0, 100_000 + 8 * 49)


def test_codes_of_bell_shaped_values_are_deflated_and_decode_the_same() -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=100_000).astype(np.float32)
    tensor = encode_tensor(w, "q8", np.random.default_rng(1))
    assert 0 < tensor.coded_bytes < 100_000
    raw = encode_tensor(w, "q8", np.random.default_rng(1))  # same rounding draws
    np.testing.assert_array_equal(decode_tensor(tensor), decode_tensor(raw))
    decoded = decode_stream(EncodedUpdate([("w", tensor)]), 1000)
    np.testing.assert_array_equal(decoded["w"], decode_tensor(tensor))


def test_topk_q8_payload_is_indices_scales_and_codes() -> None:
    rng = np.random.default_rng(0)
    w = rng.uniform(-1, 1, 100_000).astype(np.float32)  # 400,000 dense bytes
    tensor = encode_tensor(w, "topk_q8", rng, sparse_rate=0.01)
    assert tensor.spec("w").nbytes == 1000 * 4 + 8 + (tensor.coded_bytes or 1000)  # 1 block of scales


def tampered(encoding: str, part: int, edit: Any) -> EncodedUpdate:
    """An update whose ``part`` was changed after encoding (what a hostile worker could send)."""
    tensor = encode_tensor(np.linspace(-1, 1, 10, dtype=np.float32), encoding, np.random.default_rng(0),
                           sparse_rate=0.5)
    parts = [p.copy() for p in tensor.parts]
    edit(parts[part])
    forged = object.__new__(EncodedTensor)  # skips the checks an honest encoder passes
    for field, value in [("dtype", tensor.dtype), ("shape", tensor.shape), ("encoding", tensor.encoding),
                         ("nnz", tensor.nnz), ("parts", tuple(parts)), ("coded_bytes", tensor.coded_bytes)]:
        object.__setattr__(forged, field, value)
    return EncodedUpdate([("w", forged)])


def deflated(codes: bytes, coded: bytes) -> EncodedUpdate:
    """A q8 tensor of len(codes) values whose deflated codes are ``coded`` (forged, unchecked)."""
    scales = np.array([0.0, 1.0], dtype=np.float32)
    forged = object.__new__(EncodedTensor)
    for field, value in [("dtype", "float32"), ("shape", (len(codes),)), ("encoding", "q8"), ("nnz", 0),
                         ("coded_bytes", len(coded)), ("parts", (scales, np.frombuffer(coded, dtype=np.uint8)))]:
        object.__setattr__(forged, field, value)
    return EncodedUpdate([("w", forged)])


def test_decoder_rejects_deflated_codes_that_expand_past_the_announced_size() -> None:
    # A 2000-byte run deflates to a few bytes; the header says the tensor has 100 values.
    bomb = zlib.compress(b"\1" * 2000)
    update = deflated(b"\1" * 100, bomb)
    with pytest.raises(UpdateRejected, match=r"tensor 'w' \(q8\): the deflated codes expand past the 100 bytes"):
        decode_stream(update, 3)


def test_decoder_rejects_deflated_codes_that_end_early() -> None:
    update = deflated(b"\1" * 100, zlib.compress(b"\1" * 60))
    with pytest.raises(UpdateRejected, match="the deflated codes give 60 bytes, the header announces 100"):
        decode_stream(update, 5)


def test_decoder_rejects_corrupt_deflated_codes() -> None:
    coded = bytearray(zlib.compress(bytes(range(100)) * 2))
    coded[0] ^= 0xFF  # the zlib header
    with pytest.raises(UpdateRejected, match="the deflated codes are corrupt"):
        decode_stream(deflated(bytes(200), bytes(coded)), 64)


def test_header_with_coded_bytes_not_below_the_raw_codes_is_refused() -> None:
    header = StreamHeader((TensorSpec("w", "float32", (10,), "q8", 0, 10),))
    with pytest.raises(ProtocolError, match="coded_bytes=10 is not below the 10 bytes of its raw codes"):
        CompressedDecoder(header)


def test_decoder_rejects_indices_that_do_not_increase() -> None:
    def swap(idx: Any) -> None:
        idx[0], idx[1] = idx[1], idx[0]

    with pytest.raises(UpdateRejected, match=r"tensor 'w' \(topk_q8\): indices must be strictly increasing"):
        decode_stream(tampered("topk_q8", 0, swap), 64)


def test_decoder_rejects_an_index_out_of_range() -> None:
    def past_end(idx: Any) -> None:
        idx[-1] = 10

    with pytest.raises(UpdateRejected, match=r"tensor 'w' \(topk\): index 10 is out of range for 10 values"):
        decode_stream(tampered("topk", 0, past_end), 64)


@pytest.mark.parametrize("bad", [np.inf, np.nan, -1.0, 3e38])
def test_decoder_rejects_a_scale_that_is_not_finite_negative_or_out_of_range(bad: float) -> None:
    def set_step(scales: Any) -> None:
        scales[1] = bad

    with pytest.raises(UpdateRejected, match=r"tensor 'w' \(q8\): scale of block 0"):
        decode_stream(tampered("q8", 0, set_step), 64)


def test_decoder_rejects_a_nonzero_padding_nibble() -> None:
    # 10 values at rate 0.5 keep 5: 3 bytes of 4-bit codes, the last high nibble is padding.
    def pad(codes: Any) -> None:
        codes[-1] |= 0xF0

    with pytest.raises(UpdateRejected, match="padding nibble"):
        decode_stream(tampered("topk_q4", 2, pad), 64)


def test_header_with_more_kept_values_than_the_tensor_has_is_refused() -> None:
    header = StreamHeader((TensorSpec("w", "float32", (2, 2), "topk", 5),))
    with pytest.raises(ProtocolError, match=r"tensor 'w': topk keeps nnz_rows=5 values of a 4-value tensor"):
        CompressedDecoder(header)


def test_compressed_encoding_of_an_integer_tensor_is_refused() -> None:
    header = StreamHeader((TensorSpec("n", "int64", (3,), "q8"),))
    with pytest.raises(ProtocolError, match="needs a floating-point dtype"):
        CompressedDecoder(header)


def test_dense_decoder_refuses_compressed_tensors() -> None:
    header = StreamHeader((TensorSpec("w", "float32", (3,), "q8"),))
    with pytest.raises(ProtocolError, match="not declared quantized"):
        StreamDecoder(header)


def test_decoder_refuses_a_stream_longer_or_shorter_than_announced() -> None:
    update = EncodedUpdate([("w", encode_tensor(f32([1, 2, 3]), "q8", np.random.default_rng(0)))])
    decoder = CompressedDecoder(StreamHeader.of(update))
    payload = b"".join(bytes(c) for c in iter_chunks(update, 1024))
    with pytest.raises(ProtocolError, match="stream too long"):
        decoder.feed(payload + b"\0")
    decoder.feed(payload[:-1])
    with pytest.raises(ProtocolError, match=f"stream ended after {len(payload) - 1} of {len(payload)} bytes"):
        decoder.finish()


def test_decoded_size_is_checked_against_the_limits_before_allocating() -> None:
    # 1% of a 10^9-value tensor is a small payload, but its decoded form takes 4 GB.
    header = StreamHeader((TensorSpec("w", "float32", (10**9,), "topk_q8", 10**7),))
    with pytest.raises(ProtocolError, match="the decoded update takes 4000000000 bytes"):
        CompressedDecoder(header, CodecLimits(max_total_bytes=2**30, max_tensor_bytes=2**33))


def test_encoded_tensor_refuses_parts_of_the_wrong_size() -> None:
    with pytest.raises(ValueError, match=r"part codes must be uint8\[3\]"):
        EncodedTensor("float32", (3,), "q8", 0, (np.zeros(2, dtype=np.float32), np.zeros(2, dtype=np.uint8)))
