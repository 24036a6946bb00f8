"""Tests for enclavefl.tensors: ParamSet, the wire codec and tensor files."""

from __future__ import annotations

import io
import json
import os
import struct
import threading
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from enclavefl.errors import ClosedError, ProtocolError
from enclavefl.tensors import (
    DTYPES,
    CodecLimits,
    ParamSet,
    SparseRows,
    StreamDecoder,
    StreamHeader,
    Tensor,
    TensorSpec,
    decode,
    iter_chunks,
    read_params,
    write_params,
)

Array = npt.NDArray[Any]


def random_array(rng: np.random.Generator, dtype: str, shape: tuple[int, ...]) -> Array:
    """Random bits of `dtype` (any pattern, NaNs included), 0/1 for bool."""
    wire = DTYPES[dtype]
    count = int(np.prod(shape))
    if dtype == "bool":
        return rng.integers(0, 2, size=shape).astype(bool)
    raw = rng.integers(0, 256, size=count * wire.itemsize, dtype=np.uint8)
    return raw.view(wire).reshape(shape)


def every_dtype_params() -> ParamSet:
    rng = np.random.default_rng(1)
    items: list[tuple[str, Array]] = []
    for dtype in DTYPES:
        items.append((f"{dtype}.matrix", random_array(rng, dtype, (3, 5))))
        items.append((f"{dtype}.scalar", random_array(rng, dtype, ())))
        items.append((f"{dtype}.empty", random_array(rng, dtype, (0,))))
        items.append((f"{dtype}.empty2d", random_array(rng, dtype, (4, 0))))
    return ParamSet(items)


def encode_decode(params: ParamSet, chunk_bytes: int = 4096, **kwargs: Any) -> ParamSet:
    return decode(StreamHeader.of(params), iter_chunks(params, chunk_bytes), **kwargs)


def header_json(*tensors: dict[str, Any]) -> bytes:
    return json.dumps({"tensors": list(tensors)}).encode()


def raw_stream(header: StreamHeader, payload: bytes) -> ParamSet:
    return decode(header, [payload])


# --- round trips -------------------------------------------------------------------


@pytest.mark.parametrize("chunk_bytes", [1, 7, 4096])
def test_round_trip_every_dtype_is_bit_identical_in_order(chunk_bytes: int) -> None:
    params = every_dtype_params()

    decoded = encode_decode(params, chunk_bytes)

    assert list(decoded) == list(params)
    assert decoded.equal(params)
    for name in params:
        got, want = decoded[name], params[name]
        assert isinstance(got, np.ndarray) and isinstance(want, np.ndarray)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes()


def test_big_endian_input_is_stored_little_endian_with_same_values() -> None:
    values = np.arange(6, dtype=np.float64).reshape(2, 3) / 7
    params = ParamSet({"w": values.astype(">f8"), "i": np.arange(4, dtype=">i4")})

    w, i = params["w"], params["i"]

    assert isinstance(w, np.ndarray) and isinstance(i, np.ndarray)
    assert w.dtype == np.dtype("<f8") and i.dtype == np.dtype("<i4")
    np.testing.assert_array_equal(w, values)
    assert encode_decode(params)["w"].tobytes() == values.astype("<f8").tobytes()  # type: ignore[union-attr]


def test_float64_stays_float64_and_unsupported_dtypes_are_refused() -> None:
    assert ParamSet({"x": np.zeros(2, np.float64)}).specs()[0].dtype == "float64"
    for bad in (np.zeros(2, np.int8), np.zeros(2, np.complex64), np.zeros(2, "U3")):
        with pytest.raises(TypeError, match="not supported"):
            ParamSet({"x": bad})


def test_non_contiguous_array_round_trips() -> None:
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    params = ParamSet({"t": base.T, "s": base[:, ::2]})

    decoded = encode_decode(params, 5)

    np.testing.assert_array_equal(decoded["t"], base.T)
    np.testing.assert_array_equal(decoded["s"], base[:, ::2])


def test_randomized_round_trip_with_fixed_seed() -> None:
    rng = np.random.default_rng(20240611)
    names = list(DTYPES)
    for trial in range(30):
        items: list[tuple[str, Any]] = []
        for k in range(int(rng.integers(1, 6))):
            dtype = names[int(rng.integers(len(names)))]
            shape = tuple(int(d) for d in rng.integers(0, 5, size=int(rng.integers(0, 4))))
            dense = random_array(rng, dtype, shape)
            if shape and rng.random() < 0.3:
                ids = np.flatnonzero(rng.random(shape[0]) < 0.5)
                items.append((f"t{k}", SparseRows.from_dense(dense, ids)))
            else:
                items.append((f"t{k}", dense))
        params = ParamSet(items)
        chunk = int(rng.integers(1, 64))

        decoded = encode_decode(params, chunk)

        assert decoded.equal(params), (trial, params)
        assert StreamHeader.of(decoded) == StreamHeader.of(params)


# --- zero copy ---------------------------------------------------------------------


def test_iter_chunks_are_views_of_the_arrays_and_never_span_tensors() -> None:
    a = np.arange(10, dtype=np.float32)
    b = np.arange(3, dtype=np.int64)
    items: dict[str, Tensor] = {"a": a, "b": b, "empty": np.zeros((0, 3), np.float32)}
    params = ParamSet(items)

    chunks = list(iter_chunks(params, 16))

    assert [len(c) for c in chunks] == [16, 16, 8, 16, 8]
    assert np.shares_memory(np.frombuffer(chunks[0], np.uint8), a)
    assert np.shares_memory(np.frombuffer(chunks[3], np.uint8), b)
    assert np.shares_memory(np.frombuffer(chunks[2], np.uint8), a)


def test_iter_chunks_refuses_chunk_bytes_below_one() -> None:
    with pytest.raises(ValueError, match="chunk_bytes"):
        iter_chunks(ParamSet(), 0)


def test_aligned_tensors_are_views_of_one_decoder_buffer() -> None:
    params = ParamSet({"a": np.arange(6, dtype=np.float32), "b": np.ones((2, 3), np.float32)})

    decoded = encode_decode(params)
    a, b = decoded["a"], decoded["b"]

    assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
    assert a.base is not None and b.base is not None
    assert a.base is b.base  # the decoder's single payload buffer
    assert b.ctypes.data == a.ctypes.data + a.nbytes  # laid out as on the wire
    assert a.flags.aligned and a.flags.writeable


def test_misaligned_tensor_is_copied_out_aligned() -> None:
    values = np.arange(5, dtype=np.float32) * 1.5
    params = ParamSet({"head": np.array([1, 2, 3], np.uint8), "w": values})

    w = encode_decode(params)["w"]

    assert isinstance(w, np.ndarray)
    assert w.flags.aligned and w.flags.owndata
    np.testing.assert_array_equal(w, values)


# --- sparse rows -------------------------------------------------------------------


def test_sparse_rows_round_trip_keeps_ids_rows_and_dense_shape() -> None:
    dense = np.zeros((6, 3), np.float32)
    dense[1] = [1, 2, 3]
    dense[4, 2] = -5
    items: dict[str, Tensor] = {"emb": SparseRows.from_dense(dense), "bias": np.ones(3, np.float32)}
    params = ParamSet(items)

    decoded = encode_decode(params, 7)
    emb = decoded["emb"]

    assert isinstance(emb, SparseRows)
    np.testing.assert_array_equal(emb.ids, [1, 4])
    assert emb.ids.dtype == np.dtype("<i8") and emb.shape == (6, 3)
    np.testing.assert_array_equal(emb.to_dense(), dense)
    assert decoded.specs()[0] == TensorSpec("emb", "float32", (6, 3), "sparse_rows", 2)
    assert params.nbytes == 2 * 8 + 2 * 3 * 4 + 3 * 4


def test_from_dense_with_explicit_ids_keeps_zero_rows() -> None:
    dense = np.arange(12, dtype=np.int32).reshape(4, 3)

    sparse = SparseRows.from_dense(dense, np.array([0, 2]))

    np.testing.assert_array_equal(sparse.rows, dense[[0, 2]])
    expected = dense.copy()
    expected[[1, 3]] = 0
    np.testing.assert_array_equal(sparse.to_dense(), expected)


@pytest.mark.parametrize(
    "ids, match",
    [
        ([2, 1], "strictly increasing"),
        ([1, 1], "strictly increasing"),
        ([0, 4], r"in \[0, 4\)"),
        ([-1], r"in \[0, 4\)"),
    ],
)
def test_sparse_rows_refuses_bad_ids(ids: list[int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SparseRows(np.array(ids), np.zeros((len(ids), 2), np.float32), (4, 2))


def test_sparse_rows_refuses_rows_of_wrong_shape() -> None:
    with pytest.raises(ValueError, match="rows shape"):
        SparseRows(np.array([0, 1]), np.zeros((2, 3), np.float32), (4, 2))


# --- headers -----------------------------------------------------------------------


def test_header_json_round_trip() -> None:
    header = StreamHeader(
        (TensorSpec("a", "float16", (2, 3)), TensorSpec("é", "int64", (5, 1), "sparse_rows", 3))
    )

    assert StreamHeader.from_json(header.to_json()) == header
    assert b" " not in header.to_json()


@pytest.mark.parametrize(
    "data, match",
    [
        (header_json({"name": "a", "dtype": "float128", "shape": [2]}), "unknown dtype"),
        (header_json({"name": "a", "dtype": "float32", "shape": [2, -1]}), "invalid dimension"),
        (header_json({"name": "a", "dtype": "float32", "shape": [2.0]}), "invalid dimension"),
        (header_json({"name": "a", "dtype": "float32", "shape": [True]}), "invalid dimension"),
        (
            header_json(
                {"name": "a", "dtype": "float32", "shape": [1]}, {"name": "a", "dtype": "int32", "shape": []}
            ),
            "duplicate name",
        ),
        (header_json({"name": "a", "dtype": "float32", "shape": [1] * 9}), "max_rank"),
        (
            header_json(
                {"name": "e", "dtype": "float32", "shape": [3, 2], "encoding": "sparse_rows", "nnz_rows": 4}
            ),
            "more than the 3 rows",
        ),
        (header_json({"name": "e", "dtype": "float32", "shape": [], "encoding": "sparse_rows"}), "rank >= 1"),
        (header_json({"name": "a", "dtype": "float32", "shape": [2], "nnz_rows": 1}), "dense"),
        (header_json({"name": "a", "dtype": "float32", "shape": [2], "encoding": "zip"}), "unknown encoding"),
        (header_json({"name": "", "dtype": "float32", "shape": [2]}), "non-empty"),
        (header_json({"name": "a", "dtype": "float32"}), "missing keys"),
        (header_json({"name": "a", "dtype": "float32", "shape": [2], "extra": 1}), "unknown keys"),
        (b'{"tensors": [{"name": "a", "name": "b", "dtype": "bool", "shape": []}]}', "duplicate key"),
        (b'{"tensors": [{"name": "a", "dtype": "bool", "shape": [NaN]}]}', "NaN"),
        (b'{"tensors": [', "not valid JSON"),
        (b"\xff\xfe\x00", "not valid JSON"),
        (b"[" * 100_000, "not valid JSON"),
        (b'{"tensors": {}}', "one key"),
        (header_json({"name": "x" * 1025, "dtype": "float32", "shape": [2]}), "max_name_bytes"),
    ],
)
def test_from_json_refuses_corrupt_header(data: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        StreamHeader.from_json(data)


def test_decoder_refuses_corrupt_header_built_in_code() -> None:
    bad = StreamHeader((TensorSpec("a", "float32", (2,)), TensorSpec("b", "float32", (-3,))))

    with pytest.raises(ProtocolError, match="tensor 'b'.*invalid dimension"):
        StreamDecoder(bad)


def test_header_announcing_2_pow_60_bytes_is_refused_before_allocation() -> None:
    huge = StreamHeader((TensorSpec("huge", "uint8", (2**30, 2**30)),))

    with pytest.raises(ProtocolError, match="max_tensor_bytes"):
        StreamDecoder(huge)
    with pytest.raises(ProtocolError, match="max_tensor_bytes"):
        StreamHeader.from_json(huge.to_json())


def test_header_over_max_total_bytes_is_refused_before_allocation() -> None:
    each = TensorSpec("t", "float32", (2**32,))  # exactly 16 GiB: allowed per tensor
    header = StreamHeader(tuple(TensorSpec(f"t{i}", each.dtype, each.shape) for i in range(5)))

    with pytest.raises(ProtocolError, match="tensor 't4'.*max_total_bytes"):
        StreamDecoder(header)


def test_header_over_max_tensors_is_refused() -> None:
    header = StreamHeader(tuple(TensorSpec(f"t{i}", "bool", ()) for i in range(4)))

    with pytest.raises(ProtocolError, match="max_tensors=3"):
        StreamDecoder(header, CodecLimits(max_tensors=3))


def test_matches_explains_shape_difference() -> None:
    got = StreamHeader((TensorSpec("fc.weight", "float32", (10, 5)),))
    want = StreamHeader((TensorSpec("fc.weight", "float32", (10, 4)),))

    assert got.matches(want) == "tensor 'fc.weight': shape (10, 5) != expected (10, 4)"
    assert want.matches(want) is None


@pytest.mark.parametrize(
    "sent, match",
    [
        ({"w": np.zeros((2, 2), np.float32), "b": np.zeros(2, np.float32)}, "shape"),
        ({"w": np.zeros(3, np.float64), "b": np.zeros(2, np.float32)}, "dtype float64 != expected float32"),
        ({"w": np.zeros(3, np.float32), "c": np.zeros(2, np.float32)}, "missing 'b'; unexpected 'c'"),
        ({"b": np.zeros(2, np.float32), "w": np.zeros(3, np.float32)}, "order differs"),
    ],
)
def test_decoder_refuses_header_that_does_not_match_expected(sent: dict[str, Array], match: str) -> None:
    expected = StreamHeader.of(ParamSet({"w": np.zeros(3, np.float32), "b": np.zeros(2, np.float32)}))
    params = ParamSet(sent)

    with pytest.raises(ProtocolError, match=match):
        StreamDecoder(StreamHeader.of(params), expected=expected)


def test_sparse_update_matches_dense_expected_header() -> None:
    dense = np.zeros((5, 2), np.float32)
    dense[3] = 1
    expected = StreamHeader.of(ParamSet({"emb": dense}))
    update = ParamSet({"emb": SparseRows.from_dense(dense)})

    decoded = encode_decode(update, expected=expected)

    np.testing.assert_array_equal(decoded["emb"].to_dense(), dense)  # type: ignore[union-attr]


# --- stream rejections -------------------------------------------------------------


def test_truncated_stream_is_refused() -> None:
    header = StreamHeader((TensorSpec("a", "float32", (4,)),))
    decoder = StreamDecoder(header)
    decoder.feed(b"\x00" * 10)

    with pytest.raises(ProtocolError, match="stream ended after 10 of 16 bytes"):
        decoder.finish()


def test_extra_bytes_are_refused_and_leave_decoder_unchanged() -> None:
    header = StreamHeader((TensorSpec("a", "uint8", (4,)),))
    decoder = StreamDecoder(header)
    decoder.feed(b"\x01\x02\x03")

    with pytest.raises(ProtocolError, match="received 5 bytes, header announced 4"):
        decoder.feed(b"\x04\x05")
    assert decoder.bytes_received == 3
    decoder.feed(b"\x04")
    np.testing.assert_array_equal(decoder.finish()["a"], [1, 2, 3, 4])


def test_chunk_over_max_chunk_bytes_is_refused() -> None:
    header = StreamHeader((TensorSpec("a", "uint8", (100,)),))
    decoder = StreamDecoder(header, CodecLimits(max_chunk_bytes=64))

    with pytest.raises(ProtocolError, match="max_chunk_bytes=64"):
        decoder.feed(bytes(65))


@pytest.mark.parametrize(
    "ids, match", [([3, 1], "strictly increasing"), ([2, 2], "strictly increasing"), ([1, 5], r"in \[0, 5\)")]
)
def test_stream_with_bad_sparse_ids_is_refused(ids: list[int], match: str) -> None:
    header = StreamHeader((TensorSpec("emb", "float32", (5, 2), "sparse_rows", 2),))
    payload = np.array(ids, "<i8").tobytes() + np.zeros(4, "<f4").tobytes()

    with pytest.raises(ProtocolError, match=f"tensor 'emb'.*{match}"):
        raw_stream(header, payload)


def test_stream_with_bool_byte_2_is_refused() -> None:
    header = StreamHeader((TensorSpec("mask", "bool", (3,)),))

    with pytest.raises(ProtocolError, match="tensor 'mask'.*0 or 1"):
        raw_stream(header, b"\x00\x01\x02")


def test_decoder_is_closed_after_finish() -> None:
    decoder = StreamDecoder(StreamHeader((TensorSpec("a", "uint8", (1,)),)))
    decoder.feed(b"\x07")
    decoder.finish()

    with pytest.raises(ClosedError):
        decoder.feed(b"")
    with pytest.raises(ClosedError):
        decoder.finish()


# --- ParamSet ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "items, error, match",
    [
        ([("", np.zeros(1, np.float32))], ValueError, "non-empty"),
        ([("a", np.zeros(1, np.float32)), ("a", np.zeros(1, np.float32))], ValueError, "duplicate"),
        ([(1, np.zeros(1, np.float32))], TypeError, "must be str"),
        ([("a", [1.0, 2.0])], TypeError, "expected a numpy ndarray"),
        ([("a",)], TypeError, "pairs"),
        ([("\ud800", np.zeros(1, np.float32))], ValueError, "UTF-8"),
    ],
)
def test_paramset_refuses_bad_items(items: list[Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        ParamSet(items)


def test_paramset_repr_shows_names_shapes_dtypes_and_bytes_not_values() -> None:
    params = ParamSet({"fc.weight": np.full((2, 3), 123.456, np.float32)})

    text = repr(params)

    assert "fc.weight" in text and "float32(2, 3)" in text and "24 bytes" in text
    assert "123" not in text


def test_copy_shares_no_memory_and_is_equal() -> None:
    params = encode_decode(ParamSet({"a": np.arange(4, dtype=np.float32), "b": np.ones(2, np.float32)}))

    copied = params.copy()

    assert copied.equal(params)
    assert not np.shares_memory(copied["a"], params["a"])


def test_equal_compares_bits_not_float_values() -> None:
    nan = ParamSet({"a": np.array([np.nan], np.float32)})
    zero, negative_zero = ParamSet({"a": np.zeros(1, np.float32)}), ParamSet({"a": -np.zeros(1, np.float32)})

    assert nan.equal(nan.copy()) and nan == nan.copy()
    assert not zero.equal(negative_zero)
    assert not zero.equal(ParamSet({"a": np.zeros(1, np.float64)}))
    assert not zero.equal(ParamSet({"a": np.zeros((1, 1), np.float32)}))
    assert not zero.equal(ParamSet({"b": np.zeros(1, np.float32)}))


def test_map_applies_to_dense_and_refuses_sparse() -> None:
    params = ParamSet([("a", np.ones(3, np.float32)), ("b", np.arange(2, dtype=np.int64))])

    doubled = params.map(lambda x: x * 2)

    np.testing.assert_array_equal(doubled["a"], [2, 2, 2])
    np.testing.assert_array_equal(doubled["b"], [0, 2])
    sparse = ParamSet({"e": SparseRows.from_dense(np.eye(3, dtype=np.float32))})
    with pytest.raises(TypeError, match="sparse_rows"):
        sparse.map(lambda x: x)


# --- files -------------------------------------------------------------------------


def test_file_round_trip(tmp_path: Path) -> None:
    params = every_dtype_params()
    path = tmp_path / "model.eflt"

    with path.open("wb") as f:
        written = write_params(f, params)
    with path.open("rb") as f:
        loaded = read_params(f, CodecLimits(max_chunk_bytes=16))

    assert written == path.stat().st_size
    assert loaded.equal(params)


def file_bytes(params: ParamSet) -> bytes:
    buffer = io.BytesIO()
    write_params(buffer, params)
    return buffer.getvalue()


SMALL = ParamSet({"w": np.arange(8, dtype=np.float32)})


@pytest.mark.parametrize(
    "data, match",
    [
        (file_bytes(SMALL)[:-3], "truncated"),
        (file_bytes(SMALL) + b"\x00", "trailing bytes"),
        (b"NOTTENS1" + file_bytes(SMALL)[8:], "not an enclavefl tensor file"),
        (file_bytes(SMALL)[:5], "truncated in the magic"),
        (file_bytes(SMALL)[:20], "truncated in the header"),
        (b"EFLTENS1" + struct.pack("<Q", 2**40), "header length"),
        (b"EFLTENS1" + struct.pack("<Q", 3) + b"{}x", "not valid JSON"),
    ],
)
def test_read_params_refuses_bad_file(data: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        read_params(io.BytesIO(data))


def read_through_pipe(data: bytes) -> ParamSet:
    """read_params on a real non-seekable file: the end is found only by reading."""
    read_fd, write_fd = os.pipe()

    def writer() -> None:
        with open(write_fd, "wb") as w:
            w.write(data)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        with open(read_fd, "rb") as r:
            assert not r.seekable()
            return read_params(r)
    finally:
        thread.join(timeout=10)


@pytest.mark.parametrize(
    "data, match",
    [(file_bytes(SMALL)[:-3], "payload ended after 29 of 32"), (file_bytes(SMALL) + b"!", "trailing")],
)
def test_read_params_refuses_bad_non_seekable_stream(data: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        read_through_pipe(data)


def test_read_params_reads_non_seekable_stream() -> None:
    assert read_through_pipe(file_bytes(SMALL)).equal(SMALL)


@pytest.mark.parametrize(
    "spec",
    [
        TensorSpec("w", "float32", (0, 2**40, 2**40)),  # zero bytes, yet no array of that shape can exist
        TensorSpec("w", "float32", (0, 2**63)),  # a dimension over numpy's index type
        TensorSpec("w", "float32", (2**40, 2**40), "sparse_rows", 0),  # no rows, a dense shape just as absurd
    ],
)
def test_decoder_refuses_a_zero_size_tensor_with_huge_dimensions(spec: TensorSpec) -> None:
    with pytest.raises(ProtocolError, match="max_tensor_bytes"):
        decode(StreamHeader((spec,)), [])
