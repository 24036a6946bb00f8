"""SignDS on the PS: checks each upload of indices and a sign, and rebuilds the mean update.

Jiang, Zhou and Grossklags 2022 ("SignDS-FL: Local Differentially Private
Federated Learning with Sign-based Dimension Selection"); the worker's side and
the mechanism are in :mod:`enclavefl.signds`. An upload is two tensors:
``signds/indices`` (int64, shape (h,): sorted, distinct coordinates of the
model's floating-point values flattened in tensor order) and ``signds/sign``
(int64, shape (1,): -1 or +1). The template fixes both shapes, so the PS stages
at most ``8 (h + 1)`` bytes per upload and checks every index before it touches
the sum. :class:`SignDsSum` keeps one float64 counter per coordinate (O(model)
whatever the number of workers) and returns

    mean delta = global_lr * (1 / n) * sum_i s_i * 1[coordinate in J_i]

over the ``n`` uploads, in the model's tensors and dtypes (integer and bool
tensors get a zero delta).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from enclavefl.errors import UpdateRejected
from enclavefl.messages import SIGNDS_INDICES_TENSOR, SIGNDS_SIGN_TENSOR
from enclavefl.server.aggregator import Aggregator
from enclavefl.server.partials import decode_partial, encode_partial, partial_count
from enclavefl.tensors import DTYPES, ParamSet, SparseRows, StreamHeader, Tensor, TensorSpec

__all__ = ["SignDsSum", "float_values", "signds_template"]


def float_values(model: StreamHeader) -> int:
    """d: how many floating-point values the model has (what SignDS selects among)."""
    return sum(math.prod(spec.shape) for spec in model.tensors if DTYPES[spec.dtype].kind == "f")


def signds_template(dims_out: int) -> StreamHeader:
    """The header of every SignDS upload with ``dims_out`` indices."""
    return StreamHeader((TensorSpec(SIGNDS_INDICES_TENSOR, "int64", (dims_out,)),
                         TensorSpec(SIGNDS_SIGN_TENSOR, "int64", (1,))))


class SignDsSum(Aggregator):
    """Sums the workers' signed selections; ``result()`` is ``global_lr`` times their mean, shaped like the model."""

    def __init__(self, model: StreamHeader, dims_out: int, global_lr: float) -> None:
        self.model = model
        self.dims_out = dims_out
        self.global_lr = global_lr
        self._d = float_values(model)
        self._sum = np.zeros(self._d, dtype=np.float64)
        self._count = 0
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        return self._count

    def _check(self, update: ParamSet) -> tuple[np.ndarray, int]:
        if list(update) != [SIGNDS_INDICES_TENSOR, SIGNDS_SIGN_TENSOR]:
            raise UpdateRejected(f"a SignDS upload holds {SIGNDS_INDICES_TENSOR} and {SIGNDS_SIGN_TENSOR}, "
                                 f"got {list(update)[:5]}")
        indices, sign = update[SIGNDS_INDICES_TENSOR], update[SIGNDS_SIGN_TENSOR]
        if isinstance(indices, SparseRows) or isinstance(sign, SparseRows):
            raise UpdateRejected("a SignDS upload is dense")
        if indices.dtype != np.int64 or indices.shape != (self.dims_out,) or sign.dtype != np.int64 \
                or sign.shape != (1,):
            raise UpdateRejected(f"a SignDS upload is int64 indices of shape ({self.dims_out},) and an int64 sign "
                                 f"of shape (1,), got {indices.dtype}{indices.shape} and {sign.dtype}{sign.shape}")
        s = int(sign[0])
        if s not in (-1, 1):
            raise UpdateRejected(f"the SignDS sign must be -1 or +1, got {s}")
        if self.dims_out and (int(indices[0]) < 0 or int(indices[-1]) >= self._d):
            raise UpdateRejected(f"SignDS indices must lie in [0, {self._d}), got [{int(indices.min())}, "
                                 f"{int(indices.max())}]")
        if self.dims_out > 1 and not bool(np.all(np.diff(indices) > 0)):
            raise UpdateRejected("SignDS indices must be sorted and distinct")
        return indices, s

    def add(self, update: ParamSet, weight: float) -> None:
        """Folds one upload, whatever ``weight`` says (each worker counts once, as in the paper).

        Raises:
            UpdateRejected: the upload is not h sorted distinct indices in range and a sign of -1 or +1.
        """
        indices, sign = self._check(update)
        with self._lock:
            self._sum[indices] += float(sign)  # distinct indices: no two writes to one slot
            self._count += 1

    # -- partials (cluster mode) ------------------------------------------------------------------

    mergeable: ClassVar[bool] = True
    """Each server of a cluster sums its own workers' selections; the leader adds the sums."""

    def _meta(self) -> dict[str, Any]:
        return {"kind": "signds_sum", "format": 1, "dims_out": self.dims_out, "global_lr": self.global_lr,
                "template": [[s.name, s.dtype, list(s.shape)] for s in self.model.tensors]}

    def partial(self) -> bytes:
        """The sum of the signed selections so far (float64, one value per float of the model) and the count."""
        with self._lock:
            return encode_partial({**self._meta(), "count": self._count}, ParamSet({"sum": self._sum}))

    def merge(self, partials: Mapping[str, bytes]) -> None:
        """Adds other servers' sums, all checked first (a bad one changes nothing).

        Raises:
            UpdateRejected: a blob of another kind, setting or model, or a sum no count of +-1 selections makes.
        """
        checked: list[tuple[int, np.ndarray]] = []
        for source in sorted(partials):
            meta, arrays = decode_partial(partials[source])
            where = f"partial of {source}"
            count, total = partial_count(meta, self._meta(), where), arrays.get("sum")
            if list(arrays) != ["sum"] or not isinstance(total, np.ndarray) or total.dtype != np.float64 \
                    or total.shape != (self._d,):
                raise UpdateRejected(f"{where}: expected one float64 array 'sum' of shape ({self._d},)")
            # Each of `count` uploads adds +-1 at dims_out distinct indices: whole numbers within +-count.
            if not (np.all(np.abs(total) <= count) and np.all(total == np.round(total))
                    and float(np.abs(total).sum()) <= count * self.dims_out):
                raise UpdateRejected(f"{where}: the sum is not one that {count} SignDS uploads can make")
            checked.append((count, total))
        with self._lock:
            for count, total in checked:
                self._sum += total
                self._count += count

    def result(self) -> ParamSet:
        with self._lock:
            if self._count == 0:
                raise UpdateRejected("no SignDS upload was added")
            mean = self._sum * (self.global_lr / self._count)
        out: list[tuple[str, Tensor]] = []
        offset = 0
        for spec in self.model.tensors:
            dtype = DTYPES[spec.dtype]
            if dtype.kind != "f":
                out.append((spec.name, np.zeros(spec.shape, dtype=dtype)))
                continue
            size = math.prod(spec.shape)
            out.append((spec.name, np.asarray(mean[offset:offset + size].reshape(spec.shape), dtype=dtype)))
            offset += size
        return ParamSet(out)
