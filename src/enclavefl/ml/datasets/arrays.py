"""In-memory labelled data as numpy arrays: the one shape every loader returns.

Loaders turn files into an :class:`ArrayDataset` (samples along axis 0) so that
partitioners, trainers and the wire codec never need to know a file format. A
federated source with a natural split (LEAF writers) is a
:data:`FederatedDataset`, a dict from owner id to that owner's samples.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from enclavefl.errors import DataError

__all__ = [
    "ArrayDataset",
    "FederatedDataset",
    "IndexArray",
    "concatenate",
    "flatten_federated",
]

IndexArray = npt.NDArray[np.int64]
"""Sample indices (int64, 1-D) into a data set."""


@dataclass(frozen=True, slots=True, eq=False)
class ArrayDataset:
    """Features and integer labels of one data set, aligned along axis 0.

    The arrays are not copied; treat them as read-only.

    Attributes:
        x: features, float32, shape ``(N, ...)`` (images are ``(N, C, H, W)`` in [0, 1]).
        y: class labels, int64, shape ``(N,)``.

    Raises:
        DataError: if the dtypes are not float32/int64, ``y`` is not 1-D,
            or ``x`` and ``y`` hold different numbers of samples.
    """

    x: npt.NDArray[np.float32]
    y: npt.NDArray[np.int64]

    def __post_init__(self) -> None:
        if not isinstance(self.x, np.ndarray) or self.x.dtype != np.float32:
            raise DataError(f"ArrayDataset.x: expected a float32 ndarray, got {_describe(self.x)}")
        if not isinstance(self.y, np.ndarray) or self.y.dtype != np.int64:
            raise DataError(f"ArrayDataset.y: expected an int64 ndarray, got {_describe(self.y)}")
        if self.x.ndim < 1 or self.y.ndim != 1:
            raise DataError(
                f"ArrayDataset: expected x of shape (N, ...) and y of shape (N,), "
                f"got x {self.x.shape} and y {self.y.shape}"
            )
        if self.x.shape[0] != self.y.shape[0]:
            raise DataError(
                f"ArrayDataset: x holds {self.x.shape[0]} samples but y holds {self.y.shape[0]}"
            )

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, indices: npt.ArrayLike) -> ArrayDataset:
        """Return the samples at ``indices`` (in that order), e.g. one worker's share.

        Raises:
            DataError: if ``indices`` is not a 1-D integer array or an index is out of range.
        """
        idx = np.asarray(indices)
        if idx.size == 0:
            idx = idx.astype(np.int64)
        if idx.ndim != 1 or idx.dtype.kind not in "iu":
            raise DataError(f"subset: expected 1-D integer indices, got {_describe(idx)}")
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise DataError(
                f"subset: indices must lie in [0, {len(self)}), "
                f"got min {int(idx.min())} and max {int(idx.max())}"
            )
        return ArrayDataset(x=self.x[idx], y=self.y[idx])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample of ``x`` (``(1, 28, 28)`` for MNIST)."""
        return tuple(int(d) for d in self.x.shape[1:])


FederatedDataset = dict[str, ArrayDataset]
"""Samples grouped by their natural owner (a LEAF writer id), in file order."""


def concatenate(parts: Iterable[ArrayDataset]) -> ArrayDataset:
    """Join data sets end to end, keeping their order.

    Raises:
        DataError: if ``parts`` is empty or the parts' sample shapes differ.
    """
    items = list(parts)
    if not items:
        raise DataError("concatenate: expected at least one data set, got none")
    shapes = {p.sample_shape for p in items}
    if len(shapes) != 1:
        raise DataError(f"concatenate: sample shapes differ: {sorted(shapes)}")
    return ArrayDataset(
        x=np.concatenate([p.x for p in items], axis=0),
        y=np.concatenate([p.y for p in items], axis=0),
    )


def flatten_federated(federated: Mapping[str, ArrayDataset]) -> ArrayDataset:
    """Concatenate every owner's samples in the mapping's order.

    Indices returned by :func:`enclavefl.ml.partition.by_writer` refer to this order.

    Raises:
        DataError: if ``federated`` is empty or sample shapes differ.
    """
    return concatenate(federated.values())


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"ndarray of dtype {value.dtype} and shape {value.shape}"
    return type(value).__name__
