"""Robust aggregation: statistics that a few malicious updates cannot drag far.

References:
    Yin, Chen, Ramchandran, Bartlett. "Byzantine-Robust Distributed Learning:
    Towards Optimal Statistical Rates". ICML 2018. (coordinate-wise median,
    coordinate-wise trimmed mean)
    Blanchard, El Mhamdi, Guerraoui, Stainer. "Machine Learning with Adversaries:
    Byzantine Tolerant Gradient Descent". NeurIPS 2017. (Krum, Multi-Krum)
    El Mhamdi, Guerraoui, Rouault. "The Hidden Vulnerability of Distributed
    Learning in Byzantium". ICML 2018. (Multi-Krum as a building block)
    Sun, Kairouz, Suresh, McMahan. "Can You Really Backdoor Federated
    Learning?". arXiv:1911.07963, 2019. (norm bounding)

How this works: the median, the trimmed mean and Krum need all updates at
once, so they buffer (``buffers = True``). Each update is checked, flattened
into one vector (every tensor in template order, sparse rows densified with
zeros for the rows a worker did not touch, as a zero delta) and appended to an
:class:`~enclavefl.server.spill.UpdateSpill`, a file sized for
``max_buffered`` updates. ``result()`` reads the spill BLOCK_COORDS
coordinates at a time across all n updates, so it holds O(n * BLOCK_COORDS)
for the block plus O(model) for the result, never n models. Krum needs
distances between whole updates: it sums each block's share of the n x n
squared distances (from the block's Gram matrix), then reads the spill a
second time to average the updates it selected.

Vectors are stored as float32 when every float tensor of the template is at
most 32 bits wide, else as float64. Integer and bool tensors ride along as
floats (exact up to 2**24 in float32) and come back rounded.

Weights are claims: a worker reports its own ``num_samples``, and a malicious
one would report a huge number. The buffering aggregators still refuse a weight
that is not a positive finite number, as WeightedMean does, then ignore it:
every update counts once. NormBounded streams like WeightedMean and does use
the weight, after bounding the update's norm.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Final, final

import numpy as np
import numpy.typing as npt

from enclavefl.errors import ClosedError, UpdateRejected
from enclavefl.server.aggregator import Aggregator, WeightedMean
from enclavefl.server.spill import UpdateSpill
from enclavefl.tensors import DTYPES, ParamSet, SparseRows, StreamHeader, TensorSpec

__all__ = [
    "AGGREGATORS",
    "BLOCK_COORDS",
    "CoordinateMedian",
    "Krum",
    "NormBounded",
    "TrimmedMean",
]

_Float64Array = npt.NDArray[np.float64]

BLOCK_COORDS: int = 2**20
"""Coordinates per block in ``result()``, which holds a few (n_updates,
BLOCK_COORDS) float64 arrays at a time: 8 MiB per update each."""

# floor(trim_ratio * n) with this slack, so 0.29 * 100 trims 29, not 28.
_TRIM_SLACK: Final = 1e-9


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_weight(weight: float) -> None:
    if not (weight > 0 and np.isfinite(weight)):
        raise UpdateRejected(f"update weight must be a positive finite number, got {weight}")


def _check_header(update: ParamSet, template: StreamHeader) -> None:
    reason = StreamHeader.of(update).matches(template)
    if reason is not None:
        raise UpdateRejected(reason)


@dataclass(frozen=True, slots=True)
class _Layout:
    """Where each template tensor sits in a flattened update vector."""

    specs: tuple[TensorSpec, ...]
    offsets: tuple[int, ...]   # start of each tensor in the vector
    dim: int                   # coordinates in the whole model
    storage: np.dtype[Any]     # float32 or float64

    @classmethod
    def of(cls, template: StreamHeader) -> _Layout:
        offsets: list[int] = []
        dim = 0
        wide = False
        for spec in template.tensors:
            offsets.append(dim)
            dim += math.prod(spec.shape)
            dtype = DTYPES[spec.dtype]
            wide = wide or (dtype.kind == "f" and dtype.itemsize > 4)
        return cls(template.tensors, tuple(offsets), dim, np.dtype(np.float64 if wide else np.float32))

    def flatten(self, update: ParamSet) -> npt.NDArray[Any]:
        """The (dim,) vector of an update whose header matches the template.

        Raises:
            UpdateRejected: a float tensor holds NaN or Inf.
        """
        vec: npt.NDArray[Any] = np.empty(self.dim, dtype=self.storage)
        for spec, start in zip(self.specs, self.offsets):
            segment = vec[start : start + math.prod(spec.shape)]
            value = update[spec.name]
            if isinstance(value, SparseRows):
                # value.to_dense(), written in place instead of through a temporary.
                segment[...] = 0
                segment.reshape(spec.shape)[value.ids] = value.rows
            else:
                segment[...] = value.reshape(-1)
            if DTYPES[spec.dtype].kind == "f" and not np.isfinite(segment).all():
                raise UpdateRejected(f"tensor {spec.name!r} holds NaN or Inf values")
        return vec

    def unflatten(self, vec: _Float64Array) -> ParamSet:
        """A ParamSet in the template's names, shapes and dtypes (integers rounded)."""
        out: list[tuple[str, npt.NDArray[Any]]] = []
        for spec, start in zip(self.specs, self.offsets):
            segment = vec[start : start + math.prod(spec.shape)].reshape(spec.shape)
            dtype = DTYPES[spec.dtype]
            if dtype.kind in "iub":
                segment = np.rint(segment)
            out.append((spec.name, np.array(segment, dtype=dtype)))  # a copy, never a view of vec
        return ParamSet(out)


class _UpdateBuffer:
    """What the buffering aggregators share: checks, flattening, the spill and a lock.

    Each aggregator owns one (composition, not a base class) and adds only its
    statistic. Whoever reads blocks holds ``lock`` for the whole pass.
    """

    def __init__(self, owner: str, template: StreamHeader, spill_dir: Path, max_buffered: int) -> None:
        if not _is_int(max_buffered) or max_buffered < 1:
            raise ValueError(f"{owner}: max_buffered must be an int >= 1, got {max_buffered!r}")
        self.layout = _Layout.of(template)
        if self.layout.dim == 0:
            raise ValueError(f"{owner}: the template has no coordinates to aggregate")
        self.lock = threading.Lock()
        self._owner = owner
        self._template = template
        self._closed = False
        self._spill = UpdateSpill(spill_dir, self.layout.dim, max_buffered, self.layout.storage)

    @property
    def count(self) -> int:
        return len(self._spill)

    def add(self, update: ParamSet, weight: float) -> None:
        _check_weight(weight)
        _check_header(update, self._template)
        if self._closed:
            raise ClosedError(f"{self._owner}.add() called after close()")
        if len(self._spill) >= self._spill.capacity:
            # Checked again under the lock by the spill; this only saves flattening.
            raise UpdateRejected(
                f"{self._owner} already holds {self._spill.capacity} updates, "
                f"its limit (server.max_buffered_updates)"
            )
        vec = self.layout.flatten(update)  # outside the lock: concurrent uploads flatten in parallel
        with self.lock:
            if self._closed:
                raise ClosedError(f"{self._owner}.add() called after close()")
            try:
                self._spill.append(vec)
            except OSError as exc:
                raise UpdateRejected(f"{self._owner} could not spill the update to disk: {exc}") from exc

    def stored(self) -> int:
        """How many updates are stored; call with ``lock`` held.

        Raises:
            UpdateRejected: none are (never aggregate from zero updates).
            ClosedError: after close.
        """
        if self._closed:
            raise ClosedError(f"{self._owner}.result() called after close()")
        n = len(self._spill)
        if n == 0:
            raise UpdateRejected("no update was aggregated; refusing to produce a result from zero updates")
        return n

    def blocks(self) -> Iterator[tuple[slice, _Float64Array]]:
        """(coordinates, block) pairs covering the model; block is (n, width) float64."""
        step = BLOCK_COORDS
        for start in range(0, self.layout.dim, step):
            stop = min(start + step, self.layout.dim)
            yield slice(start, stop), self._spill.block(start, stop).astype(np.float64, copy=False)

    def reduce(self, statistic: Callable[[_Float64Array], _Float64Array]) -> ParamSet:
        """Apply `statistic` ((n, width) -> (width,)) block by block; call with ``lock`` held."""
        out: _Float64Array = np.empty(self.layout.dim, dtype=np.float64)
        for coords, block in self.blocks():
            out[coords] = statistic(block)
        return self.layout.unflatten(out)

    def close(self) -> None:
        with self.lock:
            self._closed = True
            self._spill.close()


@final
class CoordinateMedian(Aggregator):
    """Coordinate-wise median of the updates (Yin et al. 2018), weights ignored.

    With an even number of updates, a coordinate's median is the mean of its
    two middle values (numpy's definition), not the lower or upper one.

    Args:
        template: the model's header; updates must match it.
        spill_dir: where the spill file goes (see UpdateSpill about TEEs).
        max_buffered: most updates it holds; one more is rejected.

    Raises:
        ValueError: `max_buffered` < 1 or the template has no coordinates.
        OSError: the spill file could not be created.
    """

    buffers: ClassVar[bool] = True

    def __init__(self, template: StreamHeader, *, spill_dir: Path, max_buffered: int) -> None:
        self._buffer = _UpdateBuffer("CoordinateMedian", template, spill_dir, max_buffered)

    @property
    def count(self) -> int:
        return self._buffer.count

    def add(self, update: ParamSet, weight: float) -> None:
        self._buffer.add(update, weight)

    def result(self) -> ParamSet:
        with self._buffer.lock:
            self._buffer.stored()
            return self._buffer.reduce(lambda block: np.median(block, axis=0))

    def close(self) -> None:
        self._buffer.close()


@final
class TrimmedMean(Aggregator):
    """Coordinate-wise trimmed mean (Yin et al. 2018), weights ignored.

    With n updates, each coordinate drops its k = floor(trim_ratio * n) largest
    and k smallest values and averages the n - 2k left.

    Args:
        template, spill_dir, max_buffered: as for CoordinateMedian.
        trim_ratio: the fraction trimmed at each end, in [0, 0.5).

    Raises:
        ValueError: `trim_ratio` is out of range, or as for CoordinateMedian.
        OSError: the spill file could not be created.
    """

    buffers: ClassVar[bool] = True

    def __init__(self, template: StreamHeader, *, spill_dir: Path, max_buffered: int, trim_ratio: float) -> None:
        if isinstance(trim_ratio, bool) or not isinstance(trim_ratio, (int, float)) or not 0 <= trim_ratio < 0.5:
            raise ValueError(f"TrimmedMean: trim_ratio must be a number in [0, 0.5), got {trim_ratio!r}")
        self._trim_ratio = float(trim_ratio)
        self._buffer = _UpdateBuffer("TrimmedMean", template, spill_dir, max_buffered)

    @property
    def trim_ratio(self) -> float:
        return self._trim_ratio

    @property
    def count(self) -> int:
        return self._buffer.count

    def add(self, update: ParamSet, weight: float) -> None:
        self._buffer.add(update, weight)

    def result(self) -> ParamSet:
        """The trimmed mean.

        Raises:
            UpdateRejected: no updates, or trimming would leave none (2k >= n).
        """
        with self._buffer.lock:
            n = self._buffer.stored()
            k = math.floor(self._trim_ratio * n + _TRIM_SLACK)
            if 2 * k >= n:
                raise UpdateRejected(
                    f"trimmed mean with trim_ratio={self._trim_ratio} drops {k} of n={n} updates "
                    f"at each end, which leaves none"
                )
            # (n, width) sorted per coordinate; keep rows k .. n-k-1.
            return self._buffer.reduce(lambda block: np.sort(block, axis=0)[k : n - k].mean(axis=0))

    def close(self) -> None:
        self._buffer.close()


@final
class Krum(Aggregator):
    """Krum and Multi-Krum (Blanchard et al. 2017; El Mhamdi et al. 2018), weights ignored.

    With n updates of which at most f are Byzantine, update i scores the sum of
    its squared L2 distances to its n - f - 2 nearest other updates; the `multi`
    lowest scores are selected (ties go to the earlier update) and the result is
    their plain mean. ``multi=1`` is Krum.

    After each ``result()``, :attr:`selected` and :attr:`scores` tell which
    updates were kept; an update's index is the order in which ``add`` stored it
    (0-based).

    Args:
        template, spill_dir, max_buffered: as for CoordinateMedian.
        byzantine: f, the number of malicious updates to tolerate (>= 0).
        multi: how many updates to average (>= 1).

    Raises:
        ValueError: `byzantine` or `multi` is out of range, or as for CoordinateMedian.
        OSError: the spill file could not be created.
    """

    buffers: ClassVar[bool] = True

    def __init__(
        self, template: StreamHeader, *, spill_dir: Path, max_buffered: int, byzantine: int, multi: int = 1
    ) -> None:
        if not _is_int(byzantine) or byzantine < 0:
            raise ValueError(f"Krum: byzantine must be an int >= 0, got {byzantine!r}")
        if not _is_int(multi) or multi < 1:
            raise ValueError(f"Krum: multi must be an int >= 1, got {multi!r}")
        self._byzantine = byzantine
        self._multi = multi
        self._selected: tuple[int, ...] = ()
        self._scores: tuple[float, ...] = ()
        self._buffer = _UpdateBuffer("Krum", template, spill_dir, max_buffered)

    @property
    def byzantine(self) -> int:
        return self._byzantine

    @property
    def multi(self) -> int:
        return self._multi

    @property
    def selected(self) -> tuple[int, ...]:
        """Indices of the updates the last ``result()`` averaged, ascending; () before."""
        return self._selected

    @property
    def scores(self) -> tuple[float, ...]:
        """Every update's score in the last ``result()``, by index; () before."""
        return self._scores

    @property
    def count(self) -> int:
        return self._buffer.count

    def add(self, update: ParamSet, weight: float) -> None:
        self._buffer.add(update, weight)

    def result(self) -> ParamSet:
        """The mean of the selected updates.

        Raises:
            UpdateRejected: no updates, fewer than 2f + 3, or fewer than `multi`.
        """
        with self._buffer.lock:
            n = self._buffer.stored()
            f = self._byzantine
            if n < 2 * f + 3:
                raise UpdateRejected(f"Krum with byzantine f={f} needs n >= 2f + 3 = {2 * f + 3} updates, got n={n}")
            if self._multi > n:
                raise UpdateRejected(f"Krum with multi={self._multi} cannot select that many of n={n} updates")
            scores = self._scores_of(n)
            order = np.argsort(scores, kind="stable")  # stable: a tie goes to the lower index
            chosen = np.sort(order[: self._multi])
            self._selected = tuple(int(i) for i in chosen)
            self._scores = tuple(float(s) for s in scores)
            return self._buffer.reduce(lambda block: block[chosen].mean(axis=0))

    def _scores_of(self, n: int) -> _Float64Array:
        # (n, n) squared distances, summed over blocks: a distance splits into
        # per-block parts, and each part is ||a||^2 + ||b||^2 - 2 a.b of the block.
        dist2: _Float64Array = np.zeros((n, n), dtype=np.float64)
        for _, block in self._centred_blocks():
            gram = block @ block.T                       # (n, n)
            sq = np.diag(gram)                           # (n,)
            dist2 += sq[:, None] + sq[None, :] - 2.0 * gram
        np.maximum(dist2, 0.0, out=dist2)                # rounding can leave -1e-16
        np.fill_diagonal(dist2, np.inf)                  # an update is not its own neighbour
        nearest = n - self._byzantine - 2
        scores: _Float64Array = np.sort(dist2, axis=1)[:, :nearest].sum(axis=1)  # (n,)
        return scores

    def _centred_blocks(self) -> Iterator[tuple[slice, _Float64Array]]:
        """The spill's blocks minus their per-coordinate mean.

        Distances do not change under a shift, and centring keeps the Gram terms
        near the distances' size, so less is lost to cancellation.
        """
        for coords, block in self._buffer.blocks():
            block -= block.mean(axis=0)
            yield coords, block

    def close(self) -> None:
        self._buffer.close()


def _sum_squares(values: npt.NDArray[Any]) -> float:
    """Sum of squares in float64, BLOCK_COORDS values at a time (bounded temporaries)."""
    flat = values.reshape(-1)
    total = 0.0
    for start in range(0, flat.size, BLOCK_COORDS):
        chunk = flat[start : start + BLOCK_COORDS].astype(np.float64)
        total += float(np.dot(chunk, chunk))
    return total


def _scaled(update: ParamSet, factor: float) -> ParamSet:
    """`update` with every float tensor multiplied by `factor` (integer tensors kept)."""
    out: list[tuple[str, npt.NDArray[Any] | SparseRows]] = []
    for name, value in update.items():
        data = value.rows if isinstance(value, SparseRows) else value
        if data.dtype.kind != "f":
            out.append((name, value))
            continue
        scaled = (data * factor).astype(data.dtype, copy=False)
        out.append((name, SparseRows(value.ids, scaled, value.shape) if isinstance(value, SparseRows) else scaled))
    return ParamSet(out)


@final
class NormBounded(Aggregator):
    """Weighted mean of norm-bounded updates (Sun et al. 2019), streaming.

    An update whose global L2 norm (over every float tensor, the rows of sparse
    tensors included) is above `max_norm` is scaled down to `max_norm` (up to
    rounding) before it is folded into a WeightedMean with its weight. Integer
    tensors count neither toward the norm nor get scaled.

    Args:
        template: the model's header; updates must match it.
        max_norm: the bound, a positive finite number.

    Raises:
        ValueError: `max_norm` is not a positive finite number.
    """

    def __init__(self, template: StreamHeader, *, max_norm: float) -> None:
        if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not 0 < max_norm < math.inf:
            raise ValueError(f"NormBounded: max_norm must be a positive finite number, got {max_norm!r}")
        self._template = template
        self._max_norm = float(max_norm)
        self._inner = WeightedMean(template)
        self._lock = threading.Lock()
        self._clipped = 0

    @property
    def max_norm(self) -> float:
        return self._max_norm

    @property
    def clipped(self) -> int:
        """How many added updates were scaled down."""
        return self._clipped

    @property
    def count(self) -> int:
        return self._inner.count

    @property
    def total_weight(self) -> float:
        return self._inner.total_weight

    def add(self, update: ParamSet, weight: float) -> None:
        _check_weight(weight)
        _check_header(update, self._template)
        sum_sq = 0.0
        for name, value in update.items():
            data = value.rows if isinstance(value, SparseRows) else value
            if data.dtype.kind == "f":
                part = _sum_squares(data)
                if not math.isfinite(part):
                    raise UpdateRejected(f"tensor {name!r} holds NaN or Inf values, or values whose squares overflow")
                sum_sq += part
        norm = math.sqrt(sum_sq)
        clip = norm > self._max_norm
        folded = _scaled(update, self._max_norm / norm) if clip else update
        with self._lock:
            self._inner.add(folded, weight)
            if clip:
                self._clipped += 1

    def result(self) -> ParamSet:
        return self._inner.result()


AGGREGATORS: Final[Mapping[str, Callable[..., Aggregator]]] = MappingProxyType(
    {
        "krum": Krum,
        "mean": WeightedMean,
        "median": CoordinateMedian,
        "norm_bounded": NormBounded,
        "trimmed_mean": TrimmedMean,
    }
)
"""Aggregators by configuration name. Each takes the template first, then
keyword settings: ``mean`` none; ``median`` spill_dir and max_buffered;
``trimmed_mean`` those and trim_ratio; ``krum`` those and byzantine (and
optionally multi); ``norm_bounded`` max_norm."""
