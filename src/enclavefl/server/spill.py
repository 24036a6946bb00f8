"""A fixed-capacity store of flattened updates in a file, so buffering stays off the heap.

How this works: :class:`UpdateSpill` creates one uniquely named file in the
directory it is given and sizes it with ``ftruncate`` to ``capacity * dim``
items. The file starts sparse: disk blocks are used only as rows are written.
Row ``i`` holds the ``i``-th appended vector.

Writes go through ``os.pwrite`` and reads through ``os.preadv`` straight into
the numpy array returned. No memory map: writing through one would turn a full
disk into SIGBUS, which kills the process (``pwrite`` turns it into an
``OSError`` that the caller can refuse the update with), and pages read through
one count in the process's resident set until it is unmapped, so PS memory
would grow with every buffered update. What stays resident is the kernel's page
cache, which it can evict, and the block the caller asked for.

The file holds updates in the clear. Inside a TEE, put the directory on a
mount the enclave encrypts; a host directory would leak every update.
"""

from __future__ import annotations

import os
import tempfile
import weakref
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from enclavefl.errors import ClosedError, UpdateRejected

__all__ = ["UpdateSpill"]

_PREFIX: Final = "update-spill-"
_SUFFIX: Final = ".bin"


def _remove(fd: int, path: str) -> None:
    """Close and delete the spill file; best effort, it may be gone already."""
    try:
        os.close(fd)
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class UpdateSpill:
    """Up to `capacity` vectors of `dim` items each, kept in a file in `directory`.

    Not thread-safe: its owner (a buffering aggregator) serialises calls.
    Also a context manager that closes on exit. If the owner never closes it,
    the file is deleted when the spill is garbage collected or the interpreter
    exits.

    Args:
        directory: where the file goes; it must exist.
        dim: items per vector, >= 1.
        capacity: most vectors the file holds, >= 1.
        dtype: a float dtype for the stored items.

    Raises:
        ValueError: `dim` or `capacity` is not an int >= 1, or `dtype` is not a float dtype.
        OSError: the file could not be created or sized.
    """

    def __init__(self, directory: Path, dim: int, capacity: int, dtype: npt.DTypeLike = np.float32) -> None:
        for name, value in (("dim", dim), ("capacity", capacity)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"UpdateSpill: {name} must be an int >= 1, got {value!r}")
        item = np.dtype(dtype)
        if item.kind != "f":
            raise ValueError(f"UpdateSpill: dtype must be a float dtype, got {item}")
        self._dim = dim
        self._capacity = capacity
        self._dtype: np.dtype[Any] = item.newbyteorder("=")
        self._row_bytes = dim * item.itemsize
        self._len = 0
        self._closed = False
        fd, path = tempfile.mkstemp(prefix=_PREFIX, suffix=_SUFFIX, dir=directory)
        self._path = Path(path)
        # Registered before anything else can fail, so the file never outlives us.
        self._finalizer = weakref.finalize(self, _remove, fd, path)
        self._fd = fd
        try:
            os.ftruncate(fd, capacity * self._row_bytes)
        except BaseException:
            self._closed = True
            self._finalizer()
            raise

    @property
    def path(self) -> Path:
        """The spill file (deleted by :meth:`close`)."""
        return self._path

    @property
    def dim(self) -> int:
        """Items per vector."""
        return self._dim

    @property
    def capacity(self) -> int:
        """How many vectors the file can hold."""
        return self._capacity

    @property
    def dtype(self) -> np.dtype[Any]:
        """The stored item type (native byte order)."""
        return self._dtype

    def __len__(self) -> int:
        return self._len

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise ClosedError(f"UpdateSpill.{what}() called after close()")

    def append(self, vec: npt.ArrayLike) -> int:
        """Store one vector (cast to the spill's dtype) and return its row index.

        A failed append stores nothing: the next one reuses the same row.

        Raises:
            UpdateRejected: the spill is full.
            ValueError: `vec` is not 1-D with `dim` items.
            OSError: the write failed (a full disk, for example).
            ClosedError: after :meth:`close`.
        """
        self._check_open("append")
        if self._len >= self._capacity:
            raise UpdateRejected(
                f"update buffer is full: it holds {self._capacity} updates "
                f"(raise server.max_buffered_updates to keep more)"
            )
        arr = np.asarray(vec)
        if arr.shape != (self._dim,):
            raise ValueError(f"UpdateSpill.append: expected a vector of shape ({self._dim},), got {arr.shape}")
        data = np.ascontiguousarray(arr, dtype=self._dtype).view(np.uint8).data  # 1-D bytes
        offset = self._len * self._row_bytes
        written = 0
        while written < len(data):  # pwrite may write less than asked
            written += os.pwrite(self._fd, data[written:], offset + written)
        index = self._len
        self._len += 1
        return index

    def block(self, start: int, stop: int) -> npt.NDArray[Any]:
        """Coordinates ``[start, stop)`` of every stored vector, as a copy.

        Returns:
            shape ``(len(self), stop - start)``, the spill's dtype; row ``i`` is
            the ``i``-th appended vector.

        Raises:
            ValueError: not ``0 <= start <= stop <= dim``.
            ClosedError: after :meth:`close`.
        """
        self._check_open("block")
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop <= self._dim):
            raise ValueError(f"UpdateSpill.block: need 0 <= start <= stop <= {self._dim}, got [{start}, {stop})")
        out = np.empty((self._len, stop - start), dtype=self._dtype)
        for i in range(self._len):
            self._read_into(out[i], i * self._row_bytes + start * self._dtype.itemsize)
        return out

    def _read_into(self, target: npt.NDArray[Any], offset: int) -> None:
        """Fills the contiguous 1-D ``target`` from the file at ``offset`` (short reads continue)."""
        view = target.view(np.uint8).data.cast("B")
        done = 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got == 0:
                raise OSError(f"{self._path}: unexpected end of file at byte {offset + done}")
            done += got

    def row(self, index: int) -> npt.NDArray[Any]:
        """The `index`-th appended vector, as a copy of shape ``(dim,)``.

        Raises:
            IndexError: `index` is not in ``[0, len(self))``.
            ClosedError: after :meth:`close`.
        """
        self._check_open("row")
        if not (isinstance(index, int) and 0 <= index < self._len):
            raise IndexError(f"UpdateSpill.row: index {index!r} is not in [0, {self._len})")
        out = np.empty(self._dim, dtype=self._dtype)
        self._read_into(out, index * self._row_bytes)
        return out

    def close(self) -> None:
        """Close and delete the file. Idempotent; later calls other than close raise ClosedError."""
        if self._closed:
            return
        self._closed = True
        self._finalizer()

    def __enter__(self) -> UpdateSpill:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self._len}/{self._capacity} rows"
        return f"UpdateSpill({state}, dim={self._dim}, dtype={self._dtype})"
