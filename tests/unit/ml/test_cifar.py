"""CIFAR-10 loaders on files written in both official layouts, and the restricted unpickler."""

from __future__ import annotations

import io
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from enclavefl.errors import DataError
from enclavefl.ml.datasets import load_cifar10, load_cifar10_binary_batch, load_cifar10_python_batch

TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


def _records(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    pixels = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    return labels, pixels


def _write_bin(path: Path, labels: np.ndarray, pixels: np.ndarray) -> None:
    path.write_bytes(np.concatenate([labels[:, None], pixels], axis=1).tobytes())


class _Python2Pickler(pickle._Pickler):
    """Writes str/bytes as Python 2 ``str`` (BINSTRING), like the cPickle that made the official files."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: str | bytes) -> None:
        data = obj if isinstance(obj, bytes) else obj.encode("latin1")
        record = pickle.BINSTRING + struct.pack("<i", len(data)) + data
        self.write(record)  # type: ignore[attr-defined]
        self.memoize(obj)  # type: ignore[attr-defined]

    dispatch[bytes] = save_py2_str  # type: ignore[assignment]
    dispatch[str] = save_py2_str  # type: ignore[assignment]


def _official_dict(labels: np.ndarray, pixels: np.ndarray) -> dict[bytes, Any]:
    return {
        b"batch_label": b"training batch 1 of 5",
        b"labels": [int(v) for v in labels],
        b"data": pixels,
        b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
    }


def _write_py2(path: Path, labels: np.ndarray, pixels: np.ndarray) -> None:
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(_official_dict(labels, pixels))
    # Python 2 era numpy named its module numpy.core, as the official files do.
    path.write_bytes(buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))


def _check(dataset_x: np.ndarray, dataset_y: np.ndarray, labels: np.ndarray, pixels: np.ndarray) -> None:
    assert dataset_x.shape == (len(labels), 3, 32, 32) and dataset_x.dtype == np.float32
    assert dataset_y.dtype == np.int64
    np.testing.assert_array_equal(dataset_y, labels)
    # Documented layout: 1024 red, then green, then blue, each 32x32 row-major.
    i, row, col = 1, 5, 7
    for channel in range(3):
        expected = pixels[i, channel * 1024 + row * 32 + col]
        assert round(float(dataset_x[i, channel, row, col]) * 255) == expected
    np.testing.assert_array_equal(np.rint(dataset_x * 255).astype(np.uint8).reshape(len(labels), -1), pixels)


def test_binary_batch_follows_the_record_layout(tmp_path: Path) -> None:
    labels, pixels = _records(12, seed=0)
    _write_bin(tmp_path / "data_batch_1.bin", labels, pixels)
    data = load_cifar10_binary_batch(tmp_path / "data_batch_1.bin")
    _check(data.x, data.y, labels, pixels)


def test_python2_style_pickle_is_read(tmp_path: Path) -> None:
    labels, pixels = _records(9, seed=1)
    _write_py2(tmp_path / "test_batch", labels, pixels)
    assert b"numpy.core.multiarray" in (tmp_path / "test_batch").read_bytes()
    data = load_cifar10_python_batch(tmp_path / "test_batch")
    _check(data.x, data.y, labels, pixels)


@pytest.mark.parametrize("protocol", [pickle.DEFAULT_PROTOCOL, 5])
def test_python3_pickles_are_read(tmp_path: Path, protocol: int) -> None:
    labels, pixels = _records(7, seed=protocol)
    with (tmp_path / "test_batch").open("wb") as fh:
        pickle.dump(_official_dict(labels, pixels), fh, protocol=protocol)
    data = load_cifar10_python_batch(tmp_path / "test_batch")
    _check(data.x, data.y, labels, pixels)


@pytest.mark.parametrize("layout", ["cifar-10-batches-bin", "cifar-10-batches-py", "."])
def test_load_cifar10_detects_the_layout(tmp_path: Path, layout: str) -> None:
    folder = tmp_path / layout
    folder.mkdir(exist_ok=True)
    written: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for seed, stem in enumerate([*TRAIN, "test_batch"]):
        labels, pixels = _records(4, seed)
        written[stem] = (labels, pixels)
        if layout == "cifar-10-batches-py":
            _write_py2(folder / stem, labels, pixels)
        else:
            _write_bin(folder / f"{stem}.bin", labels, pixels)
    train = load_cifar10(tmp_path, "train")
    assert len(train) == 20
    np.testing.assert_array_equal(train.y, np.concatenate([written[s][0] for s in TRAIN]))
    test = load_cifar10(tmp_path, "test")
    _check(test.x, test.y, *written["test_batch"])


def test_incomplete_split_names_what_is_missing(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    labels, pixels = _records(2, seed=0)
    for stem in TRAIN[:4]:
        _write_bin(folder / f"{stem}.bin", labels, pixels)
    with pytest.raises(DataError, match="data_batch_5") as info:
        load_cifar10(tmp_path, "train")
    assert "cs.toronto.edu/~kriz/cifar.html" in str(info.value)
    assert str(tmp_path) in str(info.value)


def test_truncated_binary_batch_is_refused(tmp_path: Path) -> None:
    labels, pixels = _records(3, seed=0)
    path = tmp_path / "test_batch.bin"
    _write_bin(path, labels, pixels)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="whole number of 3073-byte records") as info:
        load_cifar10_binary_batch(path)
    assert str(path) in str(info.value)


def test_binary_label_out_of_range_is_refused(tmp_path: Path) -> None:
    labels, pixels = _records(3, seed=0)
    labels[2] = 10
    _write_bin(tmp_path / "test_batch.bin", labels, pixels)
    with pytest.raises(DataError, match="labels must be in 0..9, found 10"):
        load_cifar10_binary_batch(tmp_path / "test_batch.bin")


def test_missing_batch_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data_batch_1: file not found"):
        load_cifar10_python_batch(tmp_path / "data_batch_1")


class _RunsCommand:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (self.command,))


def test_pickle_with_forbidden_global_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "data_batch_1"
    with path.open("wb") as fh:
        pickle.dump({b"data": _RunsCommand(f"touch {marker}"), b"labels": []}, fh)
    with pytest.raises(DataError, match=r"refusing pickle global (posix|os)\.system") as info:
        load_cifar10_python_batch(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_pickle_calling_eval_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "test_batch"
    path.write_bytes(b"\x80\x02cbuiltins\neval\nX\x06\x00\x00\x00[1, 2]\x85R.")
    with pytest.raises(DataError, match="refusing pickle global builtins.eval"):
        load_cifar10_python_batch(path)


def test_pickle_cannot_allocate_an_array_of_its_choosing(tmp_path: Path) -> None:
    path = tmp_path / "test_batch"
    # numpy.ndarray((10**12,)): would reserve terabytes if the class itself were handed out.
    path.write_bytes(b"\x80\x02cnumpy\nndarray\n\x8a\x06\x00\x10\xa5\xd4\xe8\x00\x85\x85R.")
    with pytest.raises(DataError, match="not a readable CIFAR-10 pickle"):
        load_cifar10_python_batch(path)
    # _reconstruct with a shape other than numpy's (0,).
    path.write_bytes(
        b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
        b"\x8a\x06\x00\x10\xa5\xd4\xe8\x00\x85U\x01b\x87R."
    )
    with pytest.raises(DataError, match="unexpected _reconstruct arguments"):
        load_cifar10_python_batch(path)


def test_hostile_array_state_is_refused_before_numpy_sees_it(tmp_path: Path) -> None:
    # An object-dtype state claiming 10**6 elements but holding a 2-item list:
    # numpy's own ndarray.__setstate__ crashes the interpreter on this one.
    path = tmp_path / "test_batch"
    path.write_bytes(
        b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
        b"(K\x01J\x40\x42\x0f\x00\x85cnumpy\ndtype\nU\x02O8\x89\x88\x87R"
        b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x3ftb\x89](K\x01K\x02etb."
    )
    with pytest.raises(DataError, match="unexpected array dtype b'O8'"):
        load_cifar10_python_batch(path)
    # A uint8 state whose bytes do not fill the shape it claims.
    path.write_bytes(
        b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
        b"(K\x01J\x40\x42\x0f\x00\x85cnumpy\ndtype\nU\x02u1\x89\x88\x87R"
        b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89U\x03abctb."
    )
    with pytest.raises(DataError, match=r"needs 1000000 bytes, the file holds 3"):
        load_cifar10_python_batch(path)


def test_object_arrays_and_wrong_layouts_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "test_batch"
    cases: list[tuple[object, str]] = [
        ({b"data": np.array([[1, 2]], dtype=object), b"labels": [0]}, "unexpected array dtype b?'O8'"),
        ({b"data": np.zeros((1, 3072), np.float32), b"labels": [0]}, "unexpected array dtype b?'f4'"),
        ({b"data": [[0] * 3072], b"labels": [0]}, "must be a uint8"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "2 rows but 'labels' has 1"),
        ({b"data": np.zeros((1, 100), np.uint8), b"labels": [0]}, "3072 columns"),
        ({b"data": np.zeros((1, 3072), np.uint8), b"labels": [11]}, "found 11"),
        ({b"labels": [0]}, "missing key b'data'"),
        ([1, 2, 3], "expected a dict"),
    ]
    for payload, message in cases:
        with path.open("wb") as fh:
            pickle.dump(payload, fh, protocol=4)
        with pytest.raises(DataError, match=message):
            load_cifar10_python_batch(path)


def test_corrupt_pickle_is_refused(tmp_path: Path) -> None:
    labels, pixels = _records(2, seed=0)
    path = tmp_path / "test_batch"
    _write_py2(path, labels, pixels)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match="not a readable CIFAR-10 pickle") as info:
        load_cifar10_python_batch(path)
    assert str(path) in str(info.value)
