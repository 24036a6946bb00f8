"""CIFAR-10 in both official distributions: the binary and the Python version.

Layouts (https://www.cs.toronto.edu/~kriz/cifar.html):

* binary (``cifar-10-batches-bin/``): ``data_batch_1.bin`` .. ``data_batch_5.bin``
  and ``test_batch.bin``, each 10000 records of 3073 bytes: 1 label byte (0..9),
  then 3072 pixel bytes, the 1024 red, 1024 green and 1024 blue values of a
  32x32 image in row-major order.
* Python (``cifar-10-batches-py/``): ``data_batch_1`` .. ``data_batch_5`` and
  ``test_batch``, pickled dicts with ``b"data"`` (a ``(N, 3072)`` uint8 array,
  same pixel layout) and ``b"labels"`` (a list of N ints). They were written by
  Python 2, so they are read with ``encoding="bytes"``; keys may be str when a
  batch was re-pickled by Python 3, and both spellings are accepted.

The pickles are read with :class:`_CifarUnpickler`, never ``pickle.load``.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from enclavefl.errors import DataError
from enclavefl.ml.datasets.arrays import ArrayDataset

__all__ = [
    "CIFAR10_URL",
    "load_cifar10",
    "load_cifar10_binary_batch",
    "load_cifar10_python_batch",
]

logger = logging.getLogger(__name__)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"

RECORD_BYTES = 3073
IMAGE_BYTES = 3072
NUM_CLASSES = 10
# One official batch is ~31 MB; refuse anything far bigger before reading it.
DEFAULT_MAX_BYTES = 1 << 28
_HINT = f"get the official CIFAR-10 files from {CIFAR10_URL}"


class _NdarrayToken:
    """Stands for ``numpy.ndarray`` inside a pickle; only :func:`_reconstruct` accepts it.

    The real class is never handed out, so a pickle cannot call ``ndarray(shape)``
    to allocate memory of a size it chose.
    """


class _DtypeSpec:
    """Stands for ``numpy.dtype(spec, align, copy)`` inside a pickle; only uint8 resolves.

    numpy's own ``dtype.__setstate__`` never sees the file's bytes.
    """

    def __init__(self, spec: object = None, align: object = False, copy: object = False) -> None:
        self.spec = spec

    def __setstate__(self, state: object) -> None:
        """Ignore the byte order / field state: a uint8 has none."""

    def resolve(self) -> np.dtype[np.uint8]:
        if self.spec not in ("u1", b"u1", "|u1", b"|u1", "uint8", b"uint8"):
            raise ValueError(f"unexpected array dtype {self.spec!r}: a CIFAR-10 batch holds uint8")
        return np.dtype(np.uint8)


class _PendingArray:
    """What ``_reconstruct`` returns: filled by BUILD, checked here, read by the loader.

    numpy writes ``_reconstruct(ndarray, (0,), b"b")`` then BUILD with the state
    ``(version, shape, dtype, is_fortran, raw_bytes)``. numpy's C
    ``ndarray.__setstate__`` is not safe on hostile states (an object dtype with
    a short list crashes numpy 2.4; dtype states had similar bugs, numpy#30476),
    so the state is checked here and the
    array made with ``np.frombuffer`` only once the byte count matches the shape.
    """

    def __init__(self) -> None:
        self.array: npt.NDArray[np.uint8] | None = None

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise ValueError("unexpected ndarray state")
        shape, dtype, fortran, raw = state[-4:]
        if not isinstance(dtype, _DtypeSpec) or not isinstance(fortran, bool):
            raise ValueError("unexpected ndarray state")
        self.array = _uint8_array(raw, dtype, shape, "F" if fortran else "C")


def _uint8_array(raw: object, dtype: object, shape: object, order: str) -> npt.NDArray[np.uint8]:
    if not isinstance(dtype, _DtypeSpec):
        raise ValueError(f"unexpected array dtype {type(dtype).__name__}")
    uint8 = dtype.resolve()
    if not isinstance(raw, (bytes, bytearray)):
        raise ValueError(f"unexpected array data {type(raw).__name__}")
    if (
        not isinstance(shape, tuple)
        or len(shape) > 4
        or not all(type(d) is int and d >= 0 for d in shape)
    ):
        raise ValueError(f"unexpected array shape {shape!r}")
    expected = 1
    for d in shape:
        expected *= d
    if expected != len(raw):
        raise ValueError(f"array of shape {shape} needs {expected} bytes, the file holds {len(raw)}")
    array = np.frombuffer(raw, dtype=uint8)
    return array.reshape(shape, order="F" if order == "F" else "C")


def _reconstruct(subtype: object, shape: object, typecode: object) -> _PendingArray:
    """numpy's ``_reconstruct``, for the one call its pickles make."""
    if subtype is not _NdarrayToken or shape != (0,):
        raise ValueError(f"unexpected _reconstruct arguments ({subtype!r}, {shape!r})")
    return _PendingArray()


def _frombuffer(buf: object, dtype: object, shape: object, order: object) -> npt.NDArray[np.uint8]:
    """numpy's protocol-5 form: an array over bytes stored in the pickle itself."""
    if order not in ("C", "F"):
        raise ValueError(f"unexpected _frombuffer order {order!r}")
    return _uint8_array(buf, dtype, shape, str(order))


def _allowed_globals() -> dict[tuple[str, str], object]:
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): _NdarrayToken,
        ("numpy", "dtype"): _DtypeSpec,
    }
    # Python 2 / numpy 1 files name numpy.core, numpy 2 writes numpy._core.
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = _reconstruct
        allowed[(f"{package}.numeric", "_frombuffer")] = _frombuffer
    return allowed


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that can build uint8 arrays, lists, dicts, ints and bytes, and nothing else.

    Why this is safe: a pickle can run code only through ``find_class`` (every
    GLOBAL/STACK_GLOBAL opcode) and by calling what it returns (REDUCE, NEWOBJ,
    BUILD). Here ``find_class`` returns only stand-ins written in this module
    for the four names numpy's array pickles use: ``ndarray`` and ``dtype``
    become inert records, ``_reconstruct`` and ``_frombuffer`` check their
    arguments and build a uint8 array with ``np.frombuffer`` once the byte
    count matches the shape. No numpy constructor or ``__setstate__`` ever sees
    the file's values, nothing imports modules, opens files or runs Python
    code, and memory stays proportional to the file, whose size is capped
    before reading. Everything else (``os.system``, ``builtins.eval``, ...)
    raises DataError.
    """

    _ALLOWED = _allowed_globals()

    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        found = self._ALLOWED.get((module, name))
        if found is None:
            raise DataError(
                f"{self._path}: refusing pickle global {module}.{name}: a CIFAR-10 batch "
                f"holds only numpy arrays, lists and bytes; {_HINT}"
            )
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"{self._path}: refusing pickle persistent id; {_HINT}")


def load_cifar10_binary_batch(
    path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES
) -> ArrayDataset:
    """Read one binary batch (``data_batch_N.bin`` / ``test_batch.bin``).

    Returns:
        Images ``(N, 3, 32, 32)`` float32 in [0, 1] and labels int64 in 0..9.

    Raises:
        DataError: missing file, size not a positive multiple of 3073, or a label above 9.
    """
    file = Path(path)
    size = _checked_size(file, max_bytes)
    if size == 0 or size % RECORD_BYTES:
        raise DataError(
            f"{file}: expected a whole number of {RECORD_BYTES}-byte records "
            f"(1 label + {IMAGE_BYTES} pixels), got {size} bytes; {_HINT}"
        )
    try:
        content = file.read_bytes()
    except OSError as exc:
        raise DataError(f"{file}: cannot read ({exc}); {_HINT}") from exc
    if len(content) != size:
        raise DataError(f"{file}: changed while being read ({size} -> {len(content)} bytes)")
    records = np.frombuffer(content, dtype=np.uint8).reshape(-1, RECORD_BYTES)
    return _to_dataset(file, records[:, 1:], records[:, 0])


def load_cifar10_python_batch(
    path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES
) -> ArrayDataset:
    """Read one Python-version batch through the restricted unpickler.

    Returns:
        Images ``(N, 3, 32, 32)`` float32 in [0, 1] and labels int64 in 0..9.

    Raises:
        DataError: missing file, a forbidden or broken pickle, or a layout other
            than ``{b"data": (N, 3072) uint8, b"labels": [N ints in 0..9]}``.
    """
    file = Path(path)
    _checked_size(file, max_bytes)
    try:
        with file.open("rb") as fh:
            batch = _CifarUnpickler(fh, file).load()
    except DataError:
        raise
    except OSError as exc:
        raise DataError(f"{file}: cannot read ({exc}); {_HINT}") from exc
    except Exception as exc:  # malformed pickles raise almost anything
        raise DataError(f"{file}: not a readable CIFAR-10 pickle ({exc!r}); {_HINT}") from exc
    try:
        data, labels = _check_batch(file, batch)
    except DataError as exc:
        raise DataError(f"{exc}; {_HINT}") from exc
    return _to_dataset(file, data, np.asarray(labels, dtype=np.uint8))


def load_cifar10(data_dir: str | os.PathLike[str], split: str = "train") -> ArrayDataset:
    """Load the CIFAR-10 train (50000, five batches) or test (10000) split.

    Looks in ``data_dir/cifar-10-batches-bin``, ``data_dir/cifar-10-batches-py``
    and ``data_dir`` itself, and uses the first layout whose files are all there.

    Raises:
        DataError: no complete set of batches is found, or a batch is malformed.
    """
    if split not in ("train", "test"):
        raise DataError(f"CIFAR-10: split must be 'train' or 'test', got {split!r}")
    stems = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    root = Path(data_dir)
    layouts = [
        (root / "cifar-10-batches-bin", ".bin", load_cifar10_binary_batch),
        (root / "cifar-10-batches-py", "", load_cifar10_python_batch),
        (root, ".bin", load_cifar10_binary_batch),
        (root, "", load_cifar10_python_batch),
    ]
    for folder, suffix, loader in layouts:
        files = [folder / (stem + suffix) for stem in stems]
        if all(f.is_file() for f in files):
            parts = [loader(f) for f in files]
            dataset = ArrayDataset(
                x=np.concatenate([p.x for p in parts]), y=np.concatenate([p.y for p in parts])
            )
            logger.debug("loaded CIFAR-10 %s: %d samples from %s", split, len(dataset), folder)
            return dataset
    raise DataError(
        f"CIFAR-10: no complete {split} split in {root} (looked for {', '.join(stems)} "
        f"with or without .bin, in cifar-10-batches-bin/, cifar-10-batches-py/ or {root}); {_HINT}"
    )


def _check_batch(file: Path, batch: object) -> tuple[npt.NDArray[np.uint8], list[int]]:
    """The official layout: ``{b"data": (N, 3072) uint8, b"labels": [N ints in 0..9]}``."""
    if not isinstance(batch, dict):
        raise DataError(f"{file}: expected a dict, got {type(batch).__name__}")
    data = _field(batch, "data", file)
    labels = _field(batch, "labels", file)
    if isinstance(data, _PendingArray):
        data = data.array
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{file}: 'data' must be a uint8 (N, {IMAGE_BYTES}) array, got {found}")
    if data.shape[1] != IMAGE_BYTES:
        raise DataError(f"{file}: 'data' must have {IMAGE_BYTES} columns, got {data.shape[1]}")
    if not isinstance(labels, list) or not all(type(v) is int for v in labels):
        raise DataError(f"{file}: 'labels' must be a list of ints")
    if len(labels) != data.shape[0]:
        raise DataError(f"{file}: 'data' has {data.shape[0]} rows but 'labels' has {len(labels)}")
    bad = [v for v in labels if not 0 <= v < NUM_CLASSES]
    if bad:
        raise DataError(f"{file}: labels must be in 0..{NUM_CLASSES - 1}, found {bad[0]}")
    return data, labels


def _checked_size(file: Path, max_bytes: int) -> int:
    try:
        size = file.stat().st_size
    except FileNotFoundError as exc:
        raise DataError(f"{file}: file not found; {_HINT}") from exc
    except OSError as exc:
        raise DataError(f"{file}: cannot read ({exc}); {_HINT}") from exc
    if size > max_bytes:
        raise DataError(f"{file}: {size} bytes is above the limit of {max_bytes}; {_HINT}")
    return size


def _field(batch: dict[Any, Any], key: str, file: Path) -> Any:
    for spelling in (key.encode(), key):
        if spelling in batch:
            return batch[spelling]
    raise DataError(f"{file}: missing key b{key!r}; found keys {sorted(map(repr, batch))}")


def _to_dataset(file: Path, pixels: npt.NDArray[np.uint8], labels: npt.NDArray[np.uint8]) -> ArrayDataset:
    if labels.size and int(labels.max()) >= NUM_CLASSES:
        raise DataError(
            f"{file}: labels must be in 0..{NUM_CLASSES - 1}, found {int(labels.max())}; {_HINT}"
        )
    images = pixels.astype(np.float32).reshape(-1, 3, 32, 32)
    images /= 255.0
    return ArrayDataset(x=images, y=labels.astype(np.int64))
