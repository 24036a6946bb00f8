"""Streaming weighted aggregation: each update is folded in as it arrives.

Memory is one float64 running sum per tensor (plus, for tensors that receive
row-sparse updates, one weight per row) and one scratch buffer the size of the
largest tensor, whatever the number of workers: an update is never kept after
it has been added.

Sparse embedding updates (DLRM) carry only the rows a worker touched. A row's
mean is taken over the workers that touched it, weighted by their sample
counts, so rows a worker did not touch are not pulled toward zero.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from enclavefl.errors import UpdateRejected
from enclavefl.tensors import DTYPES, ParamSet, SparseRows, StreamHeader

__all__ = ["Aggregator", "WeightedMean"]


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


@dataclass(slots=True)
class _Slot:
    total: np.ndarray                   # float64, dense shape
    row_weight: np.ndarray | None       # float64 (rows,), only once a sparse update arrived
    dense_weight: float


class WeightedMean(Aggregator):
    """The weighted mean of updates (FedAvg's aggregation, McMahan et al. 2017)."""

    def __init__(self, template: StreamHeader) -> None:
        self._template = template
        self._slots: dict[str, _Slot] = {}
        self._count = 0
        self._weight = 0.0
        self._lock = threading.Lock()
        self._scratch = np.empty(0, dtype=np.float64)

    def _scratch_for(self, size: int) -> np.ndarray:
        if self._scratch.size < size:
            self._scratch = np.empty(size, dtype=np.float64)
        return self._scratch[:size]

    @property
    def count(self) -> int:
        return self._count

    @property
    def total_weight(self) -> float:
        return self._weight

    def _slot(self, name: str, shape: tuple[int, ...]) -> _Slot:
        slot = self._slots.get(name)
        if slot is None:
            slot = _Slot(np.zeros(shape, dtype=np.float64), None, 0.0)
            self._slots[name] = slot
        return slot

    def add(self, update: ParamSet, weight: float) -> None:
        if not (weight > 0 and np.isfinite(weight)):
            raise UpdateRejected(f"update weight must be a positive finite number, got {weight}")
        reason = StreamHeader.of(update).matches(self._template)
        if reason is not None:
            raise UpdateRejected(reason)
        with self._lock:
            # Everything above is checked; below only arithmetic that cannot fail
            # part-way on valid input, so the aggregate is never half-updated.
            for spec in self._template.tensors:
                value = update[spec.name]
                slot = self._slot(spec.name, spec.shape)
                if isinstance(value, SparseRows):
                    if slot.row_weight is None:
                        slot.row_weight = np.full(spec.shape[0], slot.dense_weight, dtype=np.float64)
                    rows = slot.total[value.ids]
                    rows += np.asarray(value.rows, dtype=np.float64) * weight
                    slot.total[value.ids] = rows
                    slot.row_weight[value.ids] += weight
                else:
                    # Scale into a reused float64 scratch buffer, then add: exact
                    # float64 arithmetic without allocating per update.
                    scaled = self._scratch_for(value.size).reshape(value.shape)
                    np.multiply(value, weight, out=scaled, dtype=np.float64)
                    slot.total += scaled
                    slot.dense_weight += weight
                    if slot.row_weight is not None:
                        slot.row_weight += weight
            self._count += 1
            self._weight += weight

    def result(self) -> ParamSet:
        with self._lock:
            if self._count == 0:
                raise UpdateRejected("no update was aggregated; refusing to produce a result from zero updates")
            out: list[tuple[str, np.ndarray]] = []
            for spec in self._template.tensors:
                slot = self._slots[spec.name]
                if slot.row_weight is not None:
                    denom = slot.row_weight.reshape((-1,) + (1,) * (len(spec.shape) - 1))
                    mean = np.divide(slot.total, denom, out=np.zeros_like(slot.total), where=denom > 0)
                elif slot.dense_weight > 0:
                    mean = slot.total / slot.dense_weight
                else:
                    mean = np.zeros_like(slot.total)
                dtype = np.dtype(DTYPES[spec.dtype])
                if dtype.kind in "iub":
                    mean = np.rint(mean)
                # np.asarray: arithmetic on a 0-d array yields a numpy scalar.
                out.append((spec.name, np.asarray(mean, dtype=dtype)))
            return ParamSet(out)
