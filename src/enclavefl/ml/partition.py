"""Splitting one data set among simulated workers: IID and the usual non-IID skews.

Every partitioner returns one int64 index array per worker (sorted, disjoint,
together covering the data exactly once) and is deterministic for a seed, so
a worker can rebuild its own share from the job file alone. The skews follow
the NIID-Bench recipes (Li et al. 2022, "Federated Learning on Non-IID Data
Silos: An Experimental Study"):

* ``dirichlet``: label skew. For each class, shares ``p ~ Dir(alpha)`` over the
  workers (Hsu et al. 2019; Yurochkin et al. 2019); small alpha gives each
  worker few classes. Workers already holding ``n / num_workers`` samples get
  no more (NIID-Bench's balancing).
* ``quantity``: size skew. Worker sizes from ``Dir(alpha)``, labels IID.
* ``writer``: the natural split of LEAF data, whole writers per worker.

:data:`PARTITIONERS` calls them all the same way, by name from a job file::

    parts = PARTITIONERS["dirichlet"](dataset, 4, seed=1, alpha=0.5)
    shares = [dataset.subset(p) for p in parts]
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from enclavefl.errors import ConfigError, DataError
from enclavefl.ml.datasets.arrays import ArrayDataset, IndexArray, flatten_federated

__all__ = [
    "PARTITIONERS",
    "PartitionRow",
    "Partitioner",
    "by_writer",
    "dirichlet",
    "iid",
    "label_histogram",
    "label_skew",
    "partition_summary",
    "quantity_skew",
]

logger = logging.getLogger(__name__)

# Re-drawing until every worker reaches min_size terminates quickly for sane
# settings; this bound turns an impossible request into an error, not a hang.
MAX_DRAWS = 1000


def iid(n: int, num_workers: int, seed: int) -> list[IndexArray]:
    """Shuffle ``n`` samples and deal them into near-equal shares (sizes differ by <= 1).

    Raises:
        ConfigError: ``num_workers`` < 1 or more workers than samples.
    """
    _check_counts(n, num_workers)
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part).astype(np.int64) for part in np.array_split(order, num_workers)]


def dirichlet(
    labels: npt.ArrayLike, num_workers: int, alpha: float, seed: int, min_size: int = 1
) -> list[IndexArray]:
    """Label-skewed split: per class, worker shares drawn from ``Dir(alpha)``.

    Args:
        labels: int class label of each sample, shape ``(n,)``.
        num_workers: number of shares.
        alpha: concentration; 0.1 is strongly skewed, 100 is close to IID.
        seed: seeds the draws; same seed, same split.
        min_size: re-draw until every worker has at least this many samples.

    Raises:
        ConfigError: bad ``alpha``/``num_workers``/``min_size``, or ``min_size`` not
            reached within MAX_DRAWS draws.
        DataError: ``labels`` is not 1-D non-negative integers.
    """
    y = _labels(labels)
    n = int(y.shape[0])
    _check_counts(n, num_workers)
    _check_alpha(alpha)
    _check_min_size(min_size, n, num_workers)
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    cap = n / num_workers
    for _ in range(MAX_DRAWS):
        shares: list[list[IndexArray]] = [[] for _ in range(num_workers)]
        sizes = np.zeros(num_workers, dtype=np.int64)
        for members in by_class:
            members = rng.permutation(members)
            p = rng.dirichlet(np.full(num_workers, alpha))
            p = np.where(sizes < cap, p, 0.0)
            if p.sum() <= 0.0:
                p = np.full(num_workers, 1.0)
            cuts = (np.cumsum(p / p.sum()) * len(members)).astype(np.int64)[:-1]
            for worker, chunk in enumerate(np.split(members, cuts)):
                shares[worker].append(chunk)
                sizes[worker] += len(chunk)
        if int(sizes.min()) >= min_size:
            return [np.sort(np.concatenate(s)).astype(np.int64) for s in shares]
    raise ConfigError(
        f"dirichlet: no split with min_size={min_size} for {num_workers} workers and "
        f"alpha={alpha} in {MAX_DRAWS} draws; lower min_size or raise alpha"
    )


def quantity_skew(
    n: int, num_workers: int, seed: int, alpha: float = 0.5, min_size: int = 1
) -> list[IndexArray]:
    """Size-skewed split: worker sizes from ``Dir(alpha)`` times ``n``, labels IID.

    Raises:
        ConfigError: bad arguments, or ``min_size`` not reached within MAX_DRAWS draws.
    """
    _check_counts(n, num_workers)
    _check_alpha(alpha)
    _check_min_size(min_size, n, num_workers)
    rng = np.random.default_rng(seed)
    for _ in range(MAX_DRAWS):
        p = rng.dirichlet(np.full(num_workers, alpha))
        cuts = (np.cumsum(p) * n).astype(np.int64)[:-1]
        sizes = np.diff(np.concatenate(([0], cuts, [n])))
        if int(sizes.min()) >= min_size:
            order = rng.permutation(n)
            return [np.sort(part).astype(np.int64) for part in np.split(order, cuts)]
    raise ConfigError(
        f"quantity_skew: no split with min_size={min_size} for {num_workers} workers and "
        f"alpha={alpha} in {MAX_DRAWS} draws; lower min_size or raise alpha"
    )


def by_writer(federated: Mapping[str, ArrayDataset], num_workers: int) -> list[IndexArray]:
    """Natural split: whole writers dealt round-robin to workers, in the mapping's order.

    Indices refer to :func:`~enclavefl.ml.datasets.flatten_federated` of
    ``federated``, so ``flat.subset(parts[w])`` is worker ``w``'s writers, concatenated.

    Raises:
        ConfigError: ``num_workers`` < 1 or more workers than writers.
    """
    if num_workers < 1 or num_workers > len(federated):
        raise ConfigError(
            f"by_writer: num_workers must be in 1..{len(federated)} (the number of writers), "
            f"got {num_workers}"
        )
    shares: list[list[IndexArray]] = [[] for _ in range(num_workers)]
    start = 0
    for position, dataset in enumerate(federated.values()):
        shares[position % num_workers].append(np.arange(start, start + len(dataset), dtype=np.int64))
        start += len(dataset)
    return [np.concatenate(s) for s in shares]


def label_histogram(labels: npt.ArrayLike, num_classes: int) -> npt.NDArray[np.int64]:
    """Count samples per class: shape ``(num_classes,)``.

    Raises:
        DataError: a label is negative or not below ``num_classes``.
    """
    y = _labels(labels)
    if y.size and int(y.max()) >= num_classes:
        raise DataError(f"label_histogram: labels must be below num_classes={num_classes}, found {int(y.max())}")
    return np.bincount(y, minlength=num_classes).astype(np.int64)


@dataclass(frozen=True, slots=True, eq=False)
class PartitionRow:
    """One worker's share, for a log line or a table."""

    worker: int
    size: int
    histogram: npt.NDArray[np.int64]


def partition_summary(
    parts: Sequence[IndexArray], labels: npt.ArrayLike, num_classes: int
) -> list[PartitionRow]:
    """Size and label histogram of each worker's share."""
    y = _labels(labels)
    return [
        PartitionRow(worker=w, size=int(len(p)), histogram=label_histogram(y[p], num_classes))
        for w, p in enumerate(parts)
    ]


def label_skew(parts: Sequence[IndexArray], labels: npt.ArrayLike, num_classes: int) -> float:
    """Mean total-variation distance between each share's label distribution and the global one.

    0 for a perfectly stratified split, up to 1 when shares hold disjoint classes
    that are rare globally. Empty shares are skipped.
    """
    y = _labels(labels)
    overall = label_histogram(y, num_classes) / max(len(y), 1)
    distances = [
        0.5 * float(np.abs(label_histogram(y[p], num_classes) / len(p) - overall).sum())
        for p in parts
        if len(p)
    ]
    return float(np.mean(distances)) if distances else 0.0


class Partitioner(Protocol):
    """A partitioner as :data:`PARTITIONERS` holds it, callable the same way for every name.

    ``data`` is a data set, or a writer mapping (flattened in order for the
    sample-level partitioners). Options are the partitioner's own keywords
    (``alpha``, ``min_size``); unknown ones raise ConfigError.
    """

    def __call__(
        self, data: ArrayDataset | Mapping[str, ArrayDataset], num_workers: int, *, seed: int = 0,
        **options: float,
    ) -> list[IndexArray]: ...


def _iid_entry(
    data: ArrayDataset | Mapping[str, ArrayDataset], num_workers: int, *, seed: int = 0, **options: float
) -> list[IndexArray]:
    _no_options("iid", options, ())
    return iid(len(_flat(data)), num_workers, seed)


def _dirichlet_entry(
    data: ArrayDataset | Mapping[str, ArrayDataset], num_workers: int, *, seed: int = 0, **options: float
) -> list[IndexArray]:
    _no_options("dirichlet", options, ("alpha", "min_size"))
    return dirichlet(
        _flat(data).y, num_workers, float(options.get("alpha", 0.5)), seed,
        min_size=_int_option("dirichlet", "min_size", options.get("min_size", 1)),
    )


def _quantity_entry(
    data: ArrayDataset | Mapping[str, ArrayDataset], num_workers: int, *, seed: int = 0, **options: float
) -> list[IndexArray]:
    _no_options("quantity", options, ("alpha", "min_size"))
    return quantity_skew(
        len(_flat(data)), num_workers, seed, alpha=float(options.get("alpha", 0.5)),
        min_size=_int_option("quantity", "min_size", options.get("min_size", 1)),
    )


def _writer_entry(
    data: ArrayDataset | Mapping[str, ArrayDataset], num_workers: int, *, seed: int = 0, **options: float
) -> list[IndexArray]:
    _no_options("writer", options, ())
    if isinstance(data, ArrayDataset):
        raise ConfigError("partition 'writer' needs per-writer data (a FederatedDataset such as FEMNIST)")
    return by_writer(data, num_workers)


PARTITIONERS: dict[str, Partitioner] = {
    "dirichlet": _dirichlet_entry,
    "iid": _iid_entry,
    "quantity": _quantity_entry,
    "writer": _writer_entry,
}
"""Partitioners by job-file name; indices refer to the data set (or its flattening)."""


def _flat(data: ArrayDataset | Mapping[str, ArrayDataset]) -> ArrayDataset:
    return data if isinstance(data, ArrayDataset) else flatten_federated(data)


def _no_options(name: str, options: Mapping[str, float], known: Sequence[str]) -> None:
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"partition {name!r}: unknown option(s) {unknown}; known: {list(known)}")


def _int_option(name: str, key: str, value: float) -> int:
    if not float(value).is_integer():
        raise ConfigError(f"partition {name!r}: {key} must be an integer, got {value}")
    return int(value)


def _labels(labels: npt.ArrayLike) -> npt.NDArray[np.int64]:
    y = np.asarray(labels)
    if y.ndim != 1 or (y.size and y.dtype.kind not in "iu"):
        raise DataError(f"labels: expected a 1-D integer array, got {y.dtype} {y.shape}")
    if y.size and int(y.min()) < 0:
        raise DataError(f"labels: expected non-negative class ids, found {int(y.min())}")
    return y.astype(np.int64)


def _check_counts(n: int, num_workers: int) -> None:
    if num_workers < 1:
        raise ConfigError(f"num_workers must be >= 1, got {num_workers}")
    if n < num_workers:
        raise ConfigError(f"cannot split {n} samples among {num_workers} workers")


def _check_alpha(alpha: float) -> None:
    if not alpha > 0 or not np.isfinite(alpha):
        raise ConfigError(f"alpha must be a positive finite number, got {alpha}")


def _check_min_size(min_size: int, n: int, num_workers: int) -> None:
    if min_size < 0 or min_size * num_workers > n:
        raise ConfigError(
            f"min_size must be in 0..{n // num_workers} for {n} samples and {num_workers} workers, "
            f"got {min_size}"
        )
