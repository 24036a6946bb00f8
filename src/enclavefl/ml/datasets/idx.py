"""MNIST and Fashion-MNIST in LeCun's IDX format, plain or gzipped.

IDX layout (http://yann.lecun.com/exdb/mnist/): a big-endian header, then raw
bytes. The 4-byte magic is ``0x00 0x00 <type> <ndim>``: type 0x08 is unsigned
byte, so images are 2051 (``0x00000803``, 3 dims) and labels 2049
(``0x00000801``, 1 dim). Then come ``ndim`` big-endian uint32 sizes, then the
data in row-major order: images at offset 16, labels at offset 8.

How this reads a file safely: the header is parsed first and the size it
promises is compared with what the file really holds *before* the payload is
read. For a plain file that is its length on disk; for a gzip file it is the
ISIZE trailer (uncompressed length mod 2**32, exact below ``max_bytes`` of
4 GiB), and afterwards the stream must end exactly there with a valid CRC.
Only then is the payload read and copied into numpy arrays.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import struct
import zlib
from pathlib import Path
from typing import IO

import numpy as np
import numpy.typing as npt

from enclavefl.errors import DataError
from enclavefl.ml.datasets.arrays import ArrayDataset

__all__ = [
    "FASHION_MNIST_URL",
    "MNIST_URL",
    "load_fashion_mnist",
    "load_idx_images",
    "load_idx_labels",
    "load_mnist",
]

logger = logging.getLogger(__name__)

MNIST_URL = "http://yann.lecun.com/exdb/mnist/"
FASHION_MNIST_URL = "https://github.com/zalandoresearch/fashion-mnist"

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
_GZIP_MAGIC = b"\x1f\x8b"
# Largest payload accepted by default: above MNIST's 47 MB, below 2**32 so that
# the gzip ISIZE trailer (a 32-bit field) is an exact length check.
DEFAULT_MAX_BYTES = 1 << 31
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}


def load_idx_images(
    path: str | os.PathLike[str],
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    source_url: str = MNIST_URL,
) -> npt.NDArray[np.float32]:
    """Read an IDX image file (magic 2051) as float32 NCHW images in [0, 1].

    Args:
        path: ``*-images-idx3-ubyte`` file, gzipped or not.
        max_bytes: refuse files whose header promises more bytes than this.
        source_url: where users get the official file (used in error messages).

    Returns:
        Array of shape ``(N, 1, rows, cols)``: pixel / 255.

    Raises:
        DataError: the file is missing, truncated, or not an IDX image file.
    """
    raw = _read_idx(Path(path), IMAGES_MAGIC, max_bytes, source_url)
    images = raw.astype(np.float32)
    images /= 255.0
    return images.reshape(raw.shape[0], 1, raw.shape[1], raw.shape[2])


def load_idx_labels(
    path: str | os.PathLike[str],
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    source_url: str = MNIST_URL,
) -> npt.NDArray[np.int64]:
    """Read an IDX label file (magic 2049) as int64 labels of shape ``(N,)``.

    Raises:
        DataError: the file is missing, truncated, or not an IDX label file.
    """
    return _read_idx(Path(path), LABELS_MAGIC, max_bytes, source_url).astype(np.int64)


def load_mnist(data_dir: str | os.PathLike[str], split: str = "train") -> ArrayDataset:
    """Load the MNIST train (60000) or test (10000) split from its four official files.

    Finds ``train-images-idx3-ubyte[.gz]`` (or the dotted ``train-images.idx3-ubyte``
    spelling), and likewise ``train-labels``/``t10k-*``, in ``data_dir``.

    Returns:
        Images ``(N, 1, 28, 28)`` float32 in [0, 1] and labels int64 in 0..9.

    Raises:
        DataError: a file is missing or malformed, or images and labels disagree.
    """
    return _load_pair(Path(data_dir), split, "MNIST", MNIST_URL)


def load_fashion_mnist(data_dir: str | os.PathLike[str], split: str = "train") -> ArrayDataset:
    """Load Fashion-MNIST: same file names and layout as MNIST, 10 clothing classes.

    Raises:
        DataError: a file is missing or malformed, or images and labels disagree.
    """
    return _load_pair(Path(data_dir), split, "Fashion-MNIST", FASHION_MNIST_URL)


def _load_pair(data_dir: Path, split: str, name: str, url: str) -> ArrayDataset:
    if split not in _SPLIT_PREFIX:
        raise DataError(f"{name}: split must be 'train' or 'test', got {split!r}")
    prefix = _SPLIT_PREFIX[split]
    images_path = _find(data_dir, prefix, "images", "idx3", name, url)
    labels_path = _find(data_dir, prefix, "labels", "idx1", name, url)
    images = load_idx_images(images_path, source_url=url)
    labels = load_idx_labels(labels_path, source_url=url)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{name} {split}: {images_path} holds {images.shape[0]} images but "
            f"{labels_path} holds {labels.shape[0]} labels; get the official files from {url}"
        )
    if labels.size and int(labels.max()) > 9:
        raise DataError(
            f"{labels_path}: labels must be in 0..9, found {int(labels.max())}; "
            f"get the official files from {url}"
        )
    logger.debug("loaded %s %s: %d samples from %s", name, split, labels.shape[0], data_dir)
    return ArrayDataset(x=images, y=labels)


def _find(data_dir: Path, prefix: str, kind: str, idx: str, name: str, url: str) -> Path:
    stems = (f"{prefix}-{kind}-{idx}-ubyte", f"{prefix}-{kind}.{idx}-ubyte")
    candidates = [data_dir / (stem + ext) for stem in stems for ext in (".gz", "")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(c.name for c in candidates)
    raise DataError(
        f"{name}: no {prefix} {kind} file in {data_dir} (looked for {tried}); "
        f"get the official files from {url}"
    )


def _read_idx(path: Path, magic: int, max_bytes: int, url: str) -> npt.NDArray[np.uint8]:
    """Return the payload of an unsigned-byte IDX file, shaped by its header."""
    hint = f"get the official files from {url}"
    try:
        with path.open("rb") as raw:
            file_size = os.fstat(raw.fileno()).st_size
            gzipped = raw.read(2) == _GZIP_MAGIC
            raw.seek(0)
            if not gzipped:
                return _parse(raw, path, magic, max_bytes, hint, on_disk=file_size)
            if file_size < 18:
                raise DataError(f"{path}: truncated gzip file ({file_size} bytes); {hint}")
            raw.seek(file_size - 4)
            (isize,) = struct.unpack("<I", raw.read(4))
            raw.seek(0)
            with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                return _parse(stream, path, magic, max_bytes, hint, gzip_isize=isize)
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file not found; {hint}") from exc
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: corrupt or truncated gzip stream ({exc}); {hint}") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc}); {hint}") from exc


def _parse(
    stream: IO[bytes] | gzip.GzipFile,
    path: Path,
    magic: int,
    max_bytes: int,
    hint: str,
    *,
    on_disk: int | None = None,
    gzip_isize: int | None = None,
) -> npt.NDArray[np.uint8]:
    ndim = magic & 0xFF
    header_size = 4 + 4 * ndim
    header = stream.read(header_size)
    if len(header) >= 4:
        (found,) = struct.unpack(">I", header[:4])
        if found != magic:
            raise DataError(
                f"{path}: bad IDX magic number: expected {magic} (0x{magic:08x}), "
                f"got {found} (0x{found:08x}); {hint}"
            )
    if len(header) < header_size:
        raise DataError(
            f"{path}: truncated IDX header: expected {header_size} bytes, got {len(header)}; {hint}"
        )
    dims = struct.unpack(f">{ndim}I", header[4:])
    if ndim == 3 and (dims[1] == 0 or dims[2] == 0):
        raise DataError(f"{path}: IDX image size must be positive, got {dims[1]}x{dims[2]}")
    payload = math.prod(dims)
    total = header_size + payload
    if total > max_bytes:
        raise DataError(
            f"{path}: IDX header promises {total} bytes (dims {dims}), above the limit of "
            f"{max_bytes}; {hint}"
        )
    if on_disk is not None and on_disk != total:
        raise DataError(
            f"{path}: IDX header promises {total} bytes (dims {dims}) but the file holds "
            f"{on_disk} ({'truncated' if on_disk < total else 'trailing data'}); {hint}"
        )
    if gzip_isize is not None and gzip_isize != total % (1 << 32):
        raise DataError(
            f"{path}: IDX header promises {total} bytes (dims {dims}) but the gzip trailer "
            f"records {gzip_isize} uncompressed bytes (truncated or corrupt); {hint}"
        )
    data = stream.read(payload)
    if len(data) != payload:
        raise DataError(f"{path}: truncated: expected {payload} data bytes, got {len(data)}; {hint}")
    if stream.read(1):
        raise DataError(f"{path}: trailing data after the {total} bytes the header promises; {hint}")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)
