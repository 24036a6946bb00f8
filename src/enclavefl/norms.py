"""The L2 norm of a whole update and clipping to it: DP-FedAvg's per-client bound.

DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent
Language Models") bounds each client's influence on the average by scaling its
whole update, every floating-point tensor taken together as one vector, so its
L2 norm is at most ``clip_norm``; the noise the server adds is calibrated to that
bound. Integer and bool tensors (counters such as BatchNorm's
``num_batches_tracked``) are neither measured nor scaled: they are not averaged
as real values. The worker clips (:class:`enclavefl.worker.clipping.ClipUpdate`)
and the PS measures again, since outside an enclave the worker's code is not attested.
"""

from __future__ import annotations

import math

import numpy as np

from enclavefl.tensors import Array, ParamSet, SparseRows, Tensor

__all__ = ["clip_update", "update_norm"]


def _values(value: Tensor) -> Array:
    # A SparseRows' absent rows are zeros: its norm is that of the rows it sends.
    return value.rows if isinstance(value, SparseRows) else value


def _is_float(value: Tensor) -> bool:
    return _values(value).dtype.kind == "f"


def update_norm(update: ParamSet) -> float:
    """The L2 norm of every floating-point tensor of ``update`` taken as one vector (float64 sums)."""
    total = 0.0
    for value in update.values():
        if _is_float(value):
            flat = np.asarray(_values(value), dtype=np.float64).ravel()
            total += float(np.dot(flat, flat))
    return math.sqrt(total)


def clip_update(update: ParamSet, clip_norm: float) -> ParamSet:
    """``update * min(1, clip_norm / norm)`` on its floating-point tensors; the input is not changed.

    Raises:
        ValueError: ``clip_norm`` is not a positive finite number, or the update is not finite.
    """
    if not (clip_norm > 0 and math.isfinite(clip_norm)):
        raise ValueError(f"clip_norm must be a positive finite number, got {clip_norm}")
    norm = update_norm(update)
    if not math.isfinite(norm):
        raise ValueError(f"the update's L2 norm is {norm}: it cannot be clipped")
    if norm <= clip_norm:
        return update
    scale = clip_norm / norm
    out: list[tuple[str, Tensor]] = []
    for name, value in update.items():
        if not _is_float(value):
            out.append((name, value))
        elif isinstance(value, SparseRows):
            out.append((name, SparseRows(value.ids, np.asarray(value.rows * scale, dtype=value.rows.dtype),
                                         value.shape)))
        else:
            out.append((name, np.asarray(value * scale, dtype=value.dtype)))
    return ParamSet(out)
