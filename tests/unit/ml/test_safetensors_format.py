"""The safetensors writer and reader: the documented byte layout, round trips, and every malformed file refused."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from enclavefl.errors import DataError
from enclavefl.ml.safetensors_format import read_safetensors, write_safetensors


def _file(tmp_path: Path, header: dict[str, Any], data: bytes, *, pad: bytes = b"") -> Path:
    """A hand-made file: u64 header length, the header JSON, then ``data``."""
    raw = json.dumps(header).encode() + pad
    path = tmp_path / "hand.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_writes_the_documented_layout() -> None:
    # Prepare: a (1, 2) float32 tensor and a (1,) int64 tensor.
    tensors = {"w": np.array([[1.0, 2.0]], dtype=np.float32), "n": np.array([3], dtype=np.int64)}
    out = io.BytesIO()

    # Execute
    size = write_safetensors(out, tensors, {"k": "v"})

    # Assert, by hand: w is 2 x 4 = 8 bytes at [0, 8), n is 8 bytes at [8, 16);
    # the header is padded with spaces so that 8 + len(header) is a multiple of 8.
    raw = out.getvalue()
    (length,) = struct.unpack("<Q", raw[:8])
    assert (8 + length) % 8 == 0 and size == len(raw) == 8 + length + 16
    header = json.loads(raw[8 : 8 + length])
    assert header == {
        "__metadata__": {"k": "v"},
        "w": {"dtype": "F32", "shape": [1, 2], "data_offsets": [0, 8]},
        "n": {"dtype": "I64", "shape": [1], "data_offsets": [8, 16]},
    }
    assert raw[8 + length :] == struct.pack("<2f", 1.0, 2.0) + struct.pack("<q", 3)


def test_round_trip_keeps_names_order_dtypes_values_and_metadata(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    tensors = {
        "conv.weight": rng.standard_normal((2, 1, 3, 3)).astype(np.float32),
        "half": rng.standard_normal(4).astype(np.float16),
        "double": rng.standard_normal((2, 2)),
        "steps": np.array(7, dtype=np.int64),  # a scalar: shape []
        "mask": np.array([True, False, True]),
        "pixels": np.arange(6, dtype=np.uint8).reshape(2, 3),
        "ids": np.array([-1, 2], dtype=np.int32),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "big-endian": np.array([1.5, -2.0], dtype=">f4"),  # stored little-endian, read back by value
    }
    path = tmp_path / "m.safetensors"
    with path.open("wb") as f:
        write_safetensors(f, tensors, {"round": "3", "ünïcode": "ok"})

    back = read_safetensors(path)

    assert list(back.tensors) == list(tensors)
    for name, value in tensors.items():
        assert back.tensors[name].dtype == value.dtype.newbyteorder("="), name
        assert back.tensors[name].shape == value.shape, name
        np.testing.assert_array_equal(back.tensors[name], value)
    assert back.metadata == {"round": "3", "ünïcode": "ok"}
    assert back.tensors["pixels"].flags.writeable  # copies, not views of one buffer


def test_a_file_without_metadata_reads_as_empty_metadata(tmp_path: Path) -> None:
    path = _file(tmp_path, {"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}, b"\x01\x02")

    back = read_safetensors(path)

    assert back.metadata == {} and back.tensors["a"].tolist() == [1, 2]


def test_trailing_spaces_in_the_header_are_allowed(tmp_path: Path) -> None:
    path = _file(tmp_path, {"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\x09", pad=b"     ")

    assert read_safetensors(path).tensors["a"].tolist() == [9]


def test_header_length_beyond_the_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")

    with pytest.raises(DataError, match="header of 1000 bytes is longer than the file"):
        read_safetensors(path)


def test_header_length_above_the_limit_is_refused_before_reading(tmp_path: Path) -> None:
    path = _file(tmp_path, {"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\x00")

    with pytest.raises(DataError, match="exceeds the limit of 16"):
        read_safetensors(path, max_header_bytes=16)


def test_file_shorter_than_the_length_field_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\x01\x02")

    with pytest.raises(DataError, match="too short"):
        read_safetensors(path)


def test_truncated_data_is_refused(tmp_path: Path) -> None:
    # F32 [2] needs 8 bytes; the file holds 5.
    path = _file(tmp_path, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\x00" * 5)

    with pytest.raises(DataError, match=r"cover 8 data bytes but the file holds 5 \(truncated\)"):
        read_safetensors(path)


def test_trailing_bytes_are_refused(tmp_path: Path) -> None:
    path = _file(tmp_path, {"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\x00\x00")

    with pytest.raises(DataError, match="trailing bytes"):
        read_safetensors(path)


def test_a_gap_between_tensors_is_refused(tmp_path: Path) -> None:
    header = {"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
              "b": {"dtype": "U8", "shape": [1], "data_offsets": [2, 3]}}
    path = _file(tmp_path, header, b"\x00" * 3)

    with pytest.raises(DataError, match="'b' at \\[2, 3\\) leaves a gap at byte 1"):
        read_safetensors(path)


def test_overlapping_tensors_are_refused(tmp_path: Path) -> None:
    header = {"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
              "b": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]}}
    path = _file(tmp_path, header, b"\x00" * 3)

    with pytest.raises(DataError, match="overlaps the tensor before it"):
        read_safetensors(path)


def test_offsets_that_do_not_match_the_shape_are_refused(tmp_path: Path) -> None:
    # F32 [3] is 12 bytes, the offsets hold 8.
    path = _file(tmp_path, {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\x00" * 8)

    with pytest.raises(DataError, match=r"hold 8 bytes; F32 \[3\] needs 12"):
        read_safetensors(path)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"dtype": "BF16", "shape": [1], "data_offsets": [0, 2]}, "dtype 'BF16' is not one of"),
        ({"dtype": "U8", "shape": [-1], "data_offsets": [0, 1]}, "is not a list of sizes"),
        ({"dtype": "U8", "shape": [1], "data_offsets": [0]}, "is not \\[begin, end\\]"),
        ({"dtype": "U8", "shape": [1]}, "expected exactly dtype, shape and data_offsets"),
    ],
)
def test_malformed_entries_are_refused(tmp_path: Path, entry: dict[str, Any], message: str) -> None:
    path = _file(tmp_path, {"a": entry}, b"\x00\x00")

    with pytest.raises(DataError, match=message):
        read_safetensors(path)


def test_a_header_that_is_not_a_json_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 4) + b"[1] ")

    with pytest.raises(DataError, match="does not start with '\\{'"):
        read_safetensors(path)
    path.write_bytes(struct.pack("<Q", 4) + b"{x: ")
    with pytest.raises(DataError, match="not UTF-8 JSON"):
        read_safetensors(path)


def test_a_name_given_twice_is_refused(tmp_path: Path) -> None:
    raw = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
    path = tmp_path / "dup.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\x00")

    with pytest.raises(DataError, match="key 'a' appears twice"):
        read_safetensors(path)


def test_metadata_that_is_not_strings_is_refused(tmp_path: Path) -> None:
    header = {"__metadata__": {"round": 3}, "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}
    path = _file(tmp_path, header, b"\x00")

    with pytest.raises(DataError, match="__metadata__ must map strings to strings"):
        read_safetensors(path)


def test_the_writer_refuses_what_the_format_cannot_hold() -> None:
    with pytest.raises(DataError, match="complex64 has no safetensors equivalent"):
        write_safetensors(io.BytesIO(), {"z": np.zeros(2, dtype=np.complex64)}, {})
    with pytest.raises(DataError, match="metadata must map strings to strings"):
        write_safetensors(io.BytesIO(), {"a": np.zeros(1)}, {"round": 3})  # type: ignore[dict-item]
    with pytest.raises(DataError, match="cannot be stored"):
        write_safetensors(io.BytesIO(), {"__metadata__": np.zeros(1)}, {})


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="absent.safetensors: file not found"):
        read_safetensors(tmp_path / "absent.safetensors")


def test_the_safetensors_package_reads_what_we_write(tmp_path: Path) -> None:
    st = pytest.importorskip("safetensors.numpy", reason="the safetensors package is not installed (export extra)")
    tensors = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, -1], dtype=np.int64)}
    path = tmp_path / "ours.safetensors"
    with path.open("wb") as f:
        write_safetensors(f, tensors, {"task": "mnist-lenet"})

    loaded = st.load_file(str(path))

    assert sorted(loaded) == ["b", "w"]
    for name, value in tensors.items():
        np.testing.assert_array_equal(loaded[name], value)
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        assert f.metadata() == {"task": "mnist-lenet"}


def test_we_read_what_the_safetensors_package_writes(tmp_path: Path) -> None:
    st = pytest.importorskip("safetensors.numpy", reason="the safetensors package is not installed (export extra)")
    tensors = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([True, False]),
               "h": np.ones(3, dtype=np.float16)}
    path = tmp_path / "theirs.safetensors"
    st.save_file(tensors, str(path), metadata={"round": "4"})

    back = read_safetensors(path)

    assert sorted(back.tensors) == sorted(tensors) and back.metadata == {"round": "4"}
    for name, value in tensors.items():
        np.testing.assert_array_equal(back.tensors[name], value)
        assert back.tensors[name].dtype == value.dtype
