"""The PS's record of when each row of a tracked tensor last changed, for downloads of changed rows.

How this works: for each tracked tensor (an embedding table, say) the tracker
keeps one int64 per row, the model version at which that row last changed. When
a close installs version ``v``, :meth:`RowVersions.observe` compares the old and
the new tensor row by row, bit for bit (so ``-0.0`` vs ``0.0`` and NaN payloads
count as changes), and stamps the rows that differ with ``v``. A worker holding
version ``w`` then needs exactly the rows stamped after ``w``
(:meth:`RowVersions.changed_since`).

It compares the installed models rather than the aggregate's nonzero rows:
a server optimizer with momentum or weight decay changes rows no worker sent,
and the comparison sees those too, so the worker's copy stays bit-identical.
Memory: 8 bytes per row of each tracked tensor; the comparison runs in blocks
of rows, so its temporaries stay small whatever the table's size.

A fresh tracker (a new PS, or one resumed from a checkpoint) stamps every row
with its starting version: workers of an earlier PS instance drop their copy
when they join the new one, so nobody holds an older version of this one.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from typing import Any, Final, final

import numpy as np
import numpy.typing as npt

from enclavefl.tensors import ParamSet

__all__ = ["RowVersions", "tracked_names"]

_BLOCK_BYTES: Final = 4 * 2**20  # bounds the temporaries of one comparison


def tracked_names(params: ParamSet, patterns: Sequence[str]) -> tuple[str, ...]:
    """The dense tensors whose rows the PS tracks: those matching ``patterns``, or every one of rank >= 2.

    A tensor of rank 0 is never tracked; a rank-1 tensor only when a pattern names it
    (its rows are single values).
    """
    names: list[str] = []
    for name, value in params.items():
        if not isinstance(value, np.ndarray) or value.ndim == 0:
            continue
        if patterns:
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
                names.append(name)
        elif value.ndim >= 2:
            names.append(name)
    return tuple(names)


def _changed_rows(old: npt.NDArray[Any], new: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
    """Row ids where ``old`` and ``new`` differ in any bit; every row if their dtype or shape differ."""
    if old.dtype != new.dtype or old.shape != new.shape:
        return np.arange(new.shape[0] if new.ndim else 0, dtype=np.int64)
    rows = new.shape[0]
    if rows == 0:
        return np.empty(0, dtype=np.int64)
    width = math.prod(new.shape[1:])
    as_uint = np.dtype(f"u{new.dtype.itemsize}")  # compare bit patterns, not float values
    a = np.ascontiguousarray(old).reshape(rows, width).view(as_uint)
    b = np.ascontiguousarray(new).reshape(rows, width).view(as_uint)
    step = max(1, _BLOCK_BYTES // max(1, width * new.dtype.itemsize))
    parts = [np.flatnonzero((a[i : i + step] != b[i : i + step]).any(axis=1)) + i for i in range(0, rows, step)]
    return np.concatenate(parts).astype(np.int64, copy=False)


@final
class RowVersions:
    """Per tracked tensor, the model version at which each row last changed. Not thread-safe: the PS lock guards it."""

    def __init__(self, params: ParamSet, version: int, names: Sequence[str]) -> None:
        """Starts tracking ``names`` of ``params``, every row stamped ``version``.

        Raises:
            ValueError: a name is not a dense tensor of rank >= 1 in ``params``.
        """
        self._versions: dict[str, npt.NDArray[np.int64]] = {}
        for name in names:
            value = params.get(name)
            if not isinstance(value, np.ndarray) or value.ndim == 0:
                raise ValueError(f"RowVersions: {name!r} is not a dense tensor of rank >= 1 in the model")
            self._versions[name] = np.full(value.shape[0], version, dtype=np.int64)
        self._version = version

    @property
    def version(self) -> int:
        """The newest version observed."""
        return self._version

    @property
    def names(self) -> tuple[str, ...]:
        """The tracked tensors, in model order."""
        return tuple(self._versions)

    def rows(self, name: str) -> int:
        """How many rows tensor ``name`` has."""
        return int(self._versions[name].shape[0])

    def observe(self, old: Mapping[str, Any], new: Mapping[str, Any], version: int) -> None:
        """Stamps every row that differs between ``old`` and ``new`` with ``version``.

        A tracked tensor that is missing or not dense in either model counts as
        changed in every row (its next download is dense).

        Raises:
            ValueError: ``version`` is not after the last one observed.
        """
        if version <= self._version:
            raise ValueError(f"RowVersions.observe: version {version} is not after {self._version}")
        for name, stamps in self._versions.items():
            a, b = old.get(name), new.get(name)
            if isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and b.ndim and b.shape[0] == stamps.shape[0]:
                stamps[_changed_rows(a, b)] = version
            else:
                stamps[:] = version
        self._version = version

    def changed_since(self, name: str, version: int) -> npt.NDArray[np.int64]:
        """Sorted ids of the rows of ``name`` that changed after ``version``.

        Raises:
            KeyError: ``name`` is not tracked.
        """
        return np.flatnonzero(self._versions[name] > version).astype(np.int64, copy=False)
