"""Streaming weighted aggregation: each update is folded in as it arrives.

How this works: each tensor has one running accumulator (plus, for tensors
that receive row-sparse updates, one float64 weight per row), whatever the
number of workers: an update is never kept after it has been added. Updates
are folded BLOCK_VALUES values at a time through small float64 scratch
blocks, so arithmetic is always float64 and the temporaries do not grow with
the model; a float64 sum's dense rows are added into the accumulator in place.

The accumulator's dtype is the ``accumulate`` setting:

- ``"float64"`` (the default): a float64 running weighted *sum* per tensor (8
  bytes per value), divided by the total weight in ``result()``. The error is
  far below the output's float32 rounding, so the result does not depend on
  the order updates arrive in (an in-process simulation reproduces a
  multi-process run bit for bit).
- ``"float32"``: float16 and float32 tensors keep a float32
  running weighted *mean* (4 bytes per value, half the float64 sum). Each
  update is folded as ``m += (w / W) * (x - m)`` in float64 and rounded to
  float32 once, so an element carries at most one float32 rounding per update;
  a mean, unlike a sum, never grows past the largest input, so it cannot
  overflow float32 however large the weights. The error is bounded in
  docs/performance.md ("Accumulation in float32"): at most
  ``2**-24 * sum_k (W_k / W) * |m_k|`` per element, where ``m_k`` is the mean
  of the first k updates and ``W_k`` their weight, about ``(N + 1) / 2``
  float32 roundings of the mean for N equal weights in the worst case and
  ``sqrt(N / 3)`` typically. float64 tensors keep a float64 sum, integer and
  bool tensors a float64 sum rounded at the end, as with ``"float64"``.

Compensated (Kahan-Babuska/Neumaier) float32 summation was measured and not
kept: its compensation term is a second float32 array, 8 bytes per value like
the float64 sum, and less accurate than it.

Sparse embedding updates (DLRM) carry only the rows a worker touched. A row's
mean is taken over the workers that touched it, weighted by their sample
counts, so rows a worker did not touch are not pulled toward zero.

Either way the result is deterministic for a given order of updates.

Partials (cluster mode): several servers each fold their own workers'
updates, ``partial()`` turns one aggregator's running state into bytes
(:mod:`enclavefl.server.partials`), and ``merge()`` folds such partials into
another aggregator, in the order of their keys (server ids), so every merge of
the same partials gives the same bits. With ``"float64"`` a merge adds each
server's float64 sum; float addition is not associative, so the merged sum
equals the sum of the same updates folded into one aggregator exactly when no
addition rounds (values with few significant bits), and otherwise within a few
float64 roundings, far below the result's float32 rounding (the float32 result
differs only when the exact mean lies that close to a float32 rounding
boundary). Merging one partial into an empty aggregator restores it bit for
bit, in either setting: that is how a server reloads its last partial.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Literal, get_args

import numpy as np
import numpy.typing as npt

from enclavefl.errors import ClosedError, UpdateRejected
from enclavefl.server.partials import decode_partial, encode_partial, partial_count
from enclavefl.tensors import DTYPES, ParamSet, SparseRows, StreamHeader, Tensor

__all__ = ["Accumulate", "Aggregator", "WeightedMean"]

Accumulate = Literal["float64", "float32"]
"""The dtype a WeightedMean accumulates float16/float32 tensors in."""

BLOCK_VALUES: Final = 2**18
"""Values folded per step: two float64 scratch blocks of 2 MiB each."""

_F64: Final = np.dtype(np.float64)
_F32: Final = np.dtype(np.float32)


class Aggregator(ABC):
    """Folds weighted updates into an aggregate, one at a time.

    ``add`` either folds the whole update or, on error, leaves the aggregate
    exactly as it was. Implementations are safe to call from several threads.
    """

    buffers: ClassVar[bool] = False
    """True for an aggregator that keeps every update until ``result()``.

    A streaming aggregator holds O(model) whatever the number of updates; a
    buffering one (median, Krum) grows with each update, so the PS bounds how
    many it may hold with ``server.max_buffered_updates``.
    """

    @abstractmethod
    def add(self, update: ParamSet, weight: float) -> None:
        """Folds one update. Raises UpdateRejected (aggregate unchanged) on a mismatch."""

    @abstractmethod
    def result(self) -> ParamSet:
        """The aggregate of everything added so far, in the template's dtypes.

        Raises:
            UpdateRejected: nothing was added (never aggregate from zero updates).
        """

    @property
    @abstractmethod
    def count(self) -> int:
        """How many updates have been folded in."""

    def close(self) -> None:
        """Releases what the aggregator holds outside memory, such as spill files.

        Idempotent. The default holds nothing and does nothing.
        """

    mergeable: ClassVar[bool] = False
    """True for an aggregator with :meth:`partial` and :meth:`merge` (several servers may fold one round)."""

    def partial(self) -> bytes:
        """Everything folded so far as bytes (no pickle) that :meth:`merge` of another instance folds in.

        Raises:
            NotImplementedError: this aggregator cannot be split across servers (``mergeable`` is False).
        """
        raise NotImplementedError(f"{type(self).__name__} cannot be split across servers (no partial())")

    def merge(self, partials: Mapping[str, bytes]) -> None:
        """Folds other aggregators' partials into this one, in the sorted order of their keys.

        Either every partial is folded or, on error, the aggregate is left as it was.

        Args:
            partials: blobs made by :meth:`partial` of aggregators of the same kind, settings and
                template, keyed by who made them (server ids); the key order fixes the fold order.

        Raises:
            UpdateRejected: a blob is malformed or made by another kind, setting or template.
            NotImplementedError: this aggregator cannot be split across servers.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot be split across servers (no merge())")


@dataclass(slots=True)
class _Slot:
    # (rows, row_len) view of the tensor's accumulator: float32 holds the running
    # mean, float64 the running weighted sum.
    acc: npt.NDArray[Any]
    row_weight: npt.NDArray[np.float64] | None   # (rows,), only once a sparse update arrived
    dense_weight: float

    @property
    def is_mean(self) -> bool:
        return self.acc.dtype == _F32


def _as_rows(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """A (rows, row_len) view: rows along the first axis (one row for a scalar)."""
    if array.ndim == 0:
        return array.reshape(1, 1)
    return array.reshape(array.shape[0], int(np.prod(array.shape[1:], dtype=np.int64)))


class WeightedMean(Aggregator):
    """The weighted mean of updates (FedAvg's aggregation, McMahan et al. 2017).

    Args:
        template: the header every update must match.
        accumulate: ``"float32"`` keeps a float32 running mean for float16 and
            float32 tensors (half the memory of ``"float64"``, error bounded in
            the module docstring); ``"float64"`` keeps a float64 running sum.

    Raises:
        ValueError: `accumulate` is neither "float32" nor "float64".
    """

    def __init__(self, template: StreamHeader, *, accumulate: Accumulate = "float64") -> None:
        if accumulate not in get_args(Accumulate):
            raise ValueError(f"WeightedMean: accumulate must be 'float32' or 'float64', got {accumulate!r}")
        self._template = template
        self._accumulate: Accumulate = accumulate
        self._slots: dict[str, _Slot] = {}
        self._count = 0
        self._weight = 0.0
        self._lock = threading.Lock()
        self._block_a = np.empty(0, dtype=np.float64)
        self._block_b = np.empty(0, dtype=np.float64)
        self._closed = False

    @property
    def count(self) -> int:
        return self._count

    @property
    def total_weight(self) -> float:
        return self._weight

    @property
    def accumulate(self) -> Accumulate:
        return self._accumulate

    @property
    def nbytes(self) -> int:
        """Bytes of running state held: accumulators, row weights and scratch blocks."""
        with self._lock:
            held = self._block_a.nbytes + self._block_b.nbytes
            for slot in self._slots.values():
                held += slot.acc.nbytes + (0 if slot.row_weight is None else slot.row_weight.nbytes)
            return held

    def _slot(self, name: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> _Slot:
        slot = self._slots.get(name)
        if slot is None:
            narrow = self._accumulate == "float32" and dtype.kind == "f" and dtype.itemsize <= 4
            acc = np.zeros(shape, dtype=_F32 if narrow else _F64)
            slot = _Slot(_as_rows(acc), None, 0.0)
            self._slots[name] = slot
        return slot

    def _blocks(self, size: int) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Two float64 scratch blocks of at least `size` values (at most BLOCK_VALUES)."""
        if self._block_a.size < size:
            self._block_a = np.empty(size, dtype=np.float64)
            self._block_b = np.empty(size, dtype=np.float64)
        return self._block_a, self._block_b

    def add(self, update: ParamSet, weight: float) -> None:
        if not (weight > 0 and np.isfinite(weight)):
            raise UpdateRejected(f"update weight must be a positive finite number, got {weight}")
        reason = StreamHeader.of(update).matches(self._template)
        if reason is not None:
            raise UpdateRejected(reason)
        with self._lock:
            if self._closed:
                raise ClosedError("WeightedMean.add() called after close()")
            # Everything above is checked; below only arithmetic that cannot fail
            # part-way on valid input, so the aggregate is never half-updated.
            for spec in self._template.tensors:
                self._fold(self._slot(spec.name, spec.shape, DTYPES[spec.dtype]), update[spec.name], weight)
            self._count += 1
            self._weight += weight

    def _fold(self, slot: _Slot, value: Tensor, weight: float) -> None:
        rows, row_len = slot.acc.shape
        ids: npt.NDArray[Any] | None = None
        if isinstance(value, SparseRows):
            if slot.row_weight is None:
                slot.row_weight = np.full(rows, slot.dense_weight, dtype=np.float64)
            ids, data = value.ids, _as_rows(value.rows)
        else:
            data = _as_rows(value)
        # The weight already folded in, before this update: per row once rows
        # have their own weights, else the tensor's single weight.
        before: npt.NDArray[np.float64] | float = (
            slot.dense_weight if slot.row_weight is None else slot.row_weight
        )
        step = max(1, BLOCK_VALUES // max(row_len, 1))
        count = data.shape[0]
        a, b = self._blocks(min(count, step) * row_len)
        for start in range(0, count, step):
            stop = min(start + step, count)
            where: slice | npt.NDArray[Any] = slice(start, stop) if ids is None else ids[start:stop]
            n = (stop - start) * row_len
            in_place = ids is None and not slot.is_mean
            if in_place:
                # A float64 sum's dense rows are added in place (a view): copying them into a
                # block and back moved 16 bytes per value per update for nothing.
                acc = slot.acc[start:stop]
            else:
                acc = a[:n].reshape(stop - start, row_len)
                acc[...] = slot.acc[where]
            x = b[:n].reshape(stop - start, row_len)
            x[...] = data[start:stop]
            if slot.is_mean:
                # m += (w / W_after) * (x - m), float64, then one rounding to float32.
                prior = before[where].reshape(-1, 1) if isinstance(before, np.ndarray) else before
                x -= acc
                x *= weight / (prior + weight)
                acc += x
            else:
                x *= weight
                acc += x
            if not in_place:
                slot.acc[where] = acc
        if ids is None:
            slot.dense_weight += weight
        if slot.row_weight is not None:
            if ids is None:
                slot.row_weight += weight
            else:
                slot.row_weight[ids] += weight

    def result(self) -> ParamSet:
        with self._lock:
            if self._closed:
                raise ClosedError("WeightedMean.result() called after close()")
            if self._count == 0:
                raise UpdateRejected("no update was aggregated; refusing to produce a result from zero updates")
            out: list[tuple[str, np.ndarray]] = []
            for spec in self._template.tensors:
                slot = self._slots[spec.name]
                acc = slot.acc
                dtype = DTYPES[spec.dtype]
                if slot.is_mean:
                    # Already the mean: a copy in the wire dtype, so callers never share it.
                    out.append((spec.name, np.array(acc.reshape(spec.shape), dtype=dtype)))
                    continue
                if slot.row_weight is not None:
                    denom = slot.row_weight.reshape(-1, 1)
                    mean = np.divide(acc, denom, out=np.zeros_like(acc), where=denom > 0)
                elif slot.dense_weight > 0:
                    mean = acc / slot.dense_weight
                else:
                    mean = np.zeros_like(acc)
                if dtype.kind in "iub":
                    mean = np.rint(mean)
                # np.asarray: mean is already a fresh array; reshape restores 0-d and N-d shapes.
                out.append((spec.name, np.asarray(mean.reshape(spec.shape), dtype=dtype)))
            return ParamSet(out)

    def close(self) -> None:
        """Frees the running state (one or two model-sized buffers) before the caller builds the next model.

        The PS closes the round's aggregator right after ``result()``, so at the
        round's close it holds the old model, the aggregate and the new model,
        not the running sums as well. Idempotent; ``add`` and ``result`` raise
        ClosedError afterwards.
        """
        with self._lock:
            self._closed = True
            self._slots = {}
            self._block_a = np.empty(0, dtype=np.float64)
            self._block_b = np.empty(0, dtype=np.float64)

    # -- partials (cluster mode) ------------------------------------------------------------------

    mergeable: ClassVar[bool] = True

    def _acc_dtype(self, dtype: np.dtype[Any]) -> np.dtype[Any]:
        narrow = self._accumulate == "float32" and dtype.kind == "f" and dtype.itemsize <= 4
        return _F32 if narrow else _F64

    def _template_entries(self) -> list[list[Any]]:
        return [[spec.name, spec.dtype, list(spec.shape)] for spec in self._template.tensors]

    def partial(self) -> bytes:
        """The running state as a blob: per tensor its accumulator (the float64 sum, or the float32
        mean) and, for tensors that got sparse rows, the float64 weight of every row; plus the
        count and total weight. About 8 (float64) or 4 (float32) bytes per value."""
        with self._lock:
            if self._closed:
                raise ClosedError("WeightedMean.partial() called after close()")
            slots: dict[str, Any] = {}
            arrays: list[tuple[str, Tensor]] = []
            for spec in self._template.tensors:
                slot = self._slots.get(spec.name)
                if slot is None:
                    continue
                slots[spec.name] = {"dense_weight": slot.dense_weight, "rows": slot.row_weight is not None}
                arrays.append((f"acc/{spec.name}", slot.acc.reshape(spec.shape)))
                if slot.row_weight is not None:
                    arrays.append((f"rows/{spec.name}", slot.row_weight))
            meta = {"kind": "weighted_mean", "format": 1, "accumulate": self._accumulate,
                    "template": self._template_entries(), "count": self._count, "weight": self._weight,
                    "slots": slots}
            # Encoded under the lock: the arrays are views of the live accumulators.
            return encode_partial(meta, ParamSet(arrays))

    def _check_partial(self, source: str, blob: bytes) -> tuple[int, float, dict[str, tuple[float, Any, Any]]]:
        """A partial's count, weight and per-tensor (dense weight, accumulator, row weights), all checked."""
        meta, arrays = decode_partial(blob)
        where = f"partial of {source}"
        expected = {"kind": "weighted_mean", "format": 1, "accumulate": self._accumulate,
                    "template": self._template_entries()}
        count = partial_count(meta, expected, where)
        weight, slots = meta.get("weight"), meta.get("slots")
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not (weight >= 0 and np.isfinite(weight)):
            raise UpdateRejected(f"{where}: weight must be a finite number >= 0, got {weight!r}")
        if not isinstance(slots, dict):
            raise UpdateRejected(f"{where}: slots must be an object, got {type(slots).__name__}")
        names = [spec.name for spec in self._template.tensors]
        if sorted(slots) != (sorted(names) if count else []):
            raise UpdateRejected(f"{where}: holds tensors {sorted(slots)[:5]} for {count} updates, expected "
                                 f"{sorted(names)[:5] if count else []}")
        out: dict[str, tuple[float, Any, Any]] = {}
        wanted: set[str] = set()
        for spec in self._template.tensors:
            if spec.name not in slots:
                continue
            entry = slots[spec.name]
            dense_weight = entry.get("dense_weight") if isinstance(entry, dict) else None
            has_rows = entry.get("rows") if isinstance(entry, dict) else None
            if (not isinstance(dense_weight, (int, float)) or isinstance(dense_weight, bool)
                    or not (dense_weight >= 0 and np.isfinite(dense_weight)) or not isinstance(has_rows, bool)):
                raise UpdateRejected(f"{where}: tensor {spec.name!r}: expected a finite dense_weight >= 0 and a "
                                     f"boolean rows, got {str(entry)[:200]}")
            acc_dtype = self._acc_dtype(DTYPES[spec.dtype])
            acc = arrays.get(f"acc/{spec.name}")
            if not isinstance(acc, np.ndarray) or acc.dtype != acc_dtype or acc.shape != spec.shape:
                found = "none" if acc is None else f"{getattr(acc, 'dtype', 'sparse')} {getattr(acc, 'shape', '')}"
                raise UpdateRejected(f"{where}: tensor {spec.name!r}: accumulator must be {acc_dtype} {spec.shape}, "
                                     f"found {found}")
            wanted.add(f"acc/{spec.name}")
            rows: Any = None
            if has_rows:
                n_rows = _as_rows(acc).shape[0]
                rows = arrays.get(f"rows/{spec.name}")
                if (not isinstance(rows, np.ndarray) or rows.dtype != _F64 or rows.shape != (n_rows,)
                        or not (np.isfinite(rows).all() and (rows >= 0).all())):
                    raise UpdateRejected(f"{where}: tensor {spec.name!r}: row weights must be {n_rows} finite float64 "
                                         f"values >= 0")
                wanted.add(f"rows/{spec.name}")
            out[spec.name] = (float(dense_weight), _as_rows(acc), rows)
        extra = sorted(set(arrays) - wanted)
        if extra:
            raise UpdateRejected(f"{where}: arrays {extra[:5]} belong to no tensor")
        return count, float(weight), out

    def merge(self, partials: Mapping[str, bytes]) -> None:
        # Everything is decoded and checked before the first fold, so a bad partial changes nothing.
        checked = [(source, self._check_partial(source, partials[source])) for source in sorted(partials)]
        with self._lock:
            if self._closed:
                raise ClosedError("WeightedMean.merge() called after close()")
            for _source, (count, weight, tensors) in checked:
                for spec in self._template.tensors:
                    if spec.name in tensors:
                        self._merge_slot(self._slot(spec.name, spec.shape, DTYPES[spec.dtype]), *tensors[spec.name])
                self._count += count
                self._weight += weight

    def _merge_slot(self, slot: _Slot, dense_weight: float, acc: npt.NDArray[Any],
                    rows: npt.NDArray[np.float64] | None) -> None:
        """Folds one partial's tensor (acc: (rows, row_len) view) into ``slot``; arithmetic only."""
        n_rows, row_len = slot.acc.shape
        if rows is not None and slot.row_weight is None:
            slot.row_weight = np.full(n_rows, slot.dense_weight, dtype=np.float64)
        if slot.row_weight is not None and rows is None:
            rows = np.full(n_rows, dense_weight, dtype=np.float64)
        if slot.is_mean:
            # m += (W_p / (W + W_p)) * (m_p - m) per row, in float64 blocks, one rounding to float32.
            step = max(1, BLOCK_VALUES // max(row_len, 1))
            for start in range(0, n_rows, step):
                where = slice(start, min(start + step, n_rows))
                prior: Any = slot.dense_weight if slot.row_weight is None else slot.row_weight[where].reshape(-1, 1)
                added: Any = dense_weight if rows is None else rows[where].reshape(-1, 1)
                total = prior + added
                frac = np.divide(added, total, out=np.zeros_like(np.asarray(total, dtype=np.float64)),
                                 where=np.asarray(total) > 0)
                m = slot.acc[where].astype(np.float64)
                x = acc[where].astype(np.float64)
                x -= m
                x *= frac
                m += x
                slot.acc[where] = m
        else:
            slot.acc += acc  # float64 sums: in place, no temporary
        slot.dense_weight += dense_weight
        if slot.row_weight is not None and rows is not None:
            slot.row_weight += rows
