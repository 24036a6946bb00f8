"""MNIST / Fashion-MNIST IDX loaders on the real files, and their errors on broken copies."""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from enclavefl.errors import DataError
from enclavefl.ml.datasets import ArrayDataset, load_fashion_mnist, load_idx_images, load_idx_labels, load_mnist

DATA = Path(__file__).resolve().parents[3] / ".." / "shared" / "data"
MNIST = DATA / "mnist"
FASHION = DATA / "fashion-mnist"


def _need(folder: Path) -> Path:
    if not folder.is_dir():
        pytest.skip(f"real data not found: {folder} (the shared data folder beside the repo)")
    return folder


@pytest.fixture(scope="module")
def mnist_train() -> ArrayDataset:
    return load_mnist(_need(MNIST), "train")


def _raw(path: Path) -> bytes:
    with gzip.open(path, "rb") as fh:
        return fh.read()


@pytest.mark.shared
def test_mnist_train_shapes_counts_and_ranges(mnist_train: ArrayDataset) -> None:
    assert mnist_train.x.shape == (60000, 1, 28, 28)
    assert mnist_train.x.dtype == np.float32
    assert mnist_train.y.shape == (60000,)
    assert mnist_train.y.dtype == np.int64
    assert float(mnist_train.x.min()) == 0.0 and float(mnist_train.x.max()) == 1.0
    assert set(np.unique(mnist_train.y).tolist()) == set(range(10))
    assert int(mnist_train.y[0]) == 5


@pytest.mark.shared
def test_mnist_train_first_record_matches_documented_offsets(mnist_train: ArrayDataset) -> None:
    # Layout from yann.lecun.com: images at offset 16, labels at offset 8, row-major.
    images = _raw(MNIST / "train-images-idx3-ubyte.gz")
    labels = _raw(MNIST / "train-labels-idx1-ubyte.gz")
    assert struct.unpack(">IIII", images[:16]) == (2051, 60000, 28, 28)
    first = np.frombuffer(images[16 : 16 + 784], dtype=np.uint8).reshape(28, 28)
    last = np.frombuffer(images[-784:], dtype=np.uint8).reshape(28, 28)
    np.testing.assert_array_equal(np.rint(mnist_train.x[0, 0] * 255).astype(np.uint8), first)
    np.testing.assert_array_equal(np.rint(mnist_train.x[-1, 0] * 255).astype(np.uint8), last)
    assert int(mnist_train.y[0]) == labels[8]
    assert int(mnist_train.y[-1]) == labels[-1]


@pytest.mark.shared
def test_mnist_test_split() -> None:
    test = load_mnist(_need(MNIST), "test")
    labels = _raw(MNIST / "t10k-labels-idx1-ubyte.gz")
    assert test.x.shape == (10000, 1, 28, 28)
    assert int(test.y[0]) == labels[8] == 7
    np.testing.assert_array_equal(test.y, np.frombuffer(labels[8:], dtype=np.uint8))


@pytest.mark.shared
@pytest.mark.parametrize("split,count", [("train", 60000), ("test", 10000)])
def test_fashion_mnist_splits(split: str, count: int) -> None:
    data = load_fashion_mnist(_need(FASHION), split)
    prefix = "train" if split == "train" else "t10k"
    labels = _raw(FASHION / f"{prefix}-labels-idx1-ubyte.gz")
    assert data.x.shape == (count, 1, 28, 28) and data.y.shape == (count,)
    np.testing.assert_array_equal(data.y, np.frombuffer(labels[8:], dtype=np.uint8))
    assert np.bincount(data.y).tolist() == [count // 10] * 10  # Fashion-MNIST is balanced


@pytest.mark.shared
def test_reads_uncompressed_files_with_dotted_names(tmp_path: Path) -> None:
    source = _need(MNIST)
    for kind, idx in (("images", "idx3"), ("labels", "idx1")):
        (tmp_path / f"t10k-{kind}.{idx}-ubyte").write_bytes(_raw(source / f"t10k-{kind}-{idx}-ubyte.gz"))
    plain = load_mnist(tmp_path, "test")
    packed = load_mnist(source, "test")
    np.testing.assert_array_equal(plain.x, packed.x)
    np.testing.assert_array_equal(plain.y, packed.y)


def test_missing_files_name_the_folder_and_the_source(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz") as info:
        load_mnist(tmp_path, "test")
    assert str(tmp_path) in str(info.value)
    assert "yann.lecun.com" in str(info.value)
    with pytest.raises(DataError, match="zalandoresearch"):
        load_fashion_mnist(tmp_path, "train")


def test_missing_single_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nothing.gz: file not found"):
        load_idx_labels(tmp_path / "nothing.gz")


def test_rejects_bad_split(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="'validation'"):
        load_mnist(tmp_path, "validation")


@pytest.mark.shared
def test_truncated_gzip_copy_is_refused(tmp_path: Path) -> None:
    original = (_need(MNIST) / "t10k-labels-idx1-ubyte.gz").read_bytes()
    broken = tmp_path / "t10k-labels-idx1-ubyte.gz"
    broken.write_bytes(original[: len(original) // 2])
    with pytest.raises(DataError, match="gzip trailer") as info:
        load_idx_labels(broken)
    assert str(broken) in str(info.value)


@pytest.mark.shared
def test_gzip_with_a_hole_but_intact_trailer_is_refused(tmp_path: Path) -> None:
    original = (_need(MNIST) / "t10k-labels-idx1-ubyte.gz").read_bytes()
    broken = tmp_path / "t10k-labels-idx1-ubyte.gz"
    broken.write_bytes(original[:2000] + original[3000:])  # trailer (ISIZE) still says 10008
    with pytest.raises(DataError, match="corrupt or truncated gzip") as info:
        load_idx_labels(broken)
    assert str(broken) in str(info.value)


@pytest.mark.shared
def test_wrong_magic_is_refused(tmp_path: Path) -> None:
    labels = bytearray(_raw(_need(MNIST) / "t10k-labels-idx1-ubyte.gz"))
    path = tmp_path / "labels.idx1-ubyte"
    path.write_bytes(bytes(labels))
    with pytest.raises(DataError, match=r"expected 2051 \(0x00000803\), got 2049") as info:
        load_idx_images(path)  # a label file is not an image file
    assert str(path) in str(info.value)
    labels[3] = 0x02
    path.write_bytes(bytes(labels))
    with pytest.raises(DataError, match="bad IDX magic number"):
        load_idx_labels(path)


def test_header_promising_more_than_the_file_holds_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "images.idx3-ubyte"
    path.write_bytes(struct.pack(">IIII", 2051, 3, 28, 28) + bytes(2 * 784))
    with pytest.raises(DataError, match=r"promises 2368 bytes .* holds 1584 \(truncated\)"):
        load_idx_images(path)
    path.write_bytes(struct.pack(">IIII", 2051, 2, 28, 28) + bytes(2 * 784 + 1))
    with pytest.raises(DataError, match="trailing data"):
        load_idx_images(path)


def test_huge_header_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "images.idx3-ubyte.gz"
    with gzip.open(path, "wb") as fh:
        fh.write(struct.pack(">IIII", 2051, 0xFFFFFFFF, 0xFFFF, 0xFFFF))
    with pytest.raises(DataError, match="above the limit"):
        load_idx_images(path)


def test_truncated_header_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "labels.idx1-ubyte"
    path.write_bytes(struct.pack(">I", 2049) + b"\x00\x00")
    with pytest.raises(DataError, match="truncated IDX header"):
        load_idx_labels(path)


@pytest.mark.shared
def test_image_and_label_counts_must_agree(tmp_path: Path) -> None:
    source = _need(MNIST)
    shutil.copy(source / "t10k-images-idx3-ubyte.gz", tmp_path / "t10k-images-idx3-ubyte.gz")
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, 3) + bytes([1, 2, 3]))
    with pytest.raises(DataError, match="10000 images but .* 3 labels"):
        load_mnist(tmp_path, "test")


def test_labels_above_nine_are_refused(tmp_path: Path) -> None:
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, 1, 28, 28) + bytes(784))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, 1) + bytes([12]))
    with pytest.raises(DataError, match="labels must be in 0..9, found 12"):
        load_mnist(tmp_path, "test")
