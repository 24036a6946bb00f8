"""SignDS: sign-based dimension selection, a local-DP upload of a few indices and one sign.

Jiang, Zhou and Grossklags 2022 ("SignDS-FL: Local Differentially Private
Federated Learning with Sign-based Dimension Selection"). A worker flattens the
floating-point tensors of its update into one vector of ``d`` coordinates and
draws a sign ``s`` in {-1, +1} uniformly at random, independently of its data.
The ``k = max(1, floor(sparse_rate * d))`` coordinates largest in direction
``s`` (the largest values for +1, the smallest for -1) form the top-k set.
The worker then releases a set J of ``h`` indices chosen by the exponential
mechanism with the utility ``u(J) = 1[|J & topk| >= nu_th]``, with
``nu_th = ceil(threshold_ratio * h)``:

    P[J] proportional to exp(epsilon * u(J)).

Only the top-k set depends on the data, and changing it changes the utility of
any J by at most 1 while the normaliser stays the same sum over the sizes of
the intersection (``sum_nu C(k, nu) C(d - k, h - nu) exp(epsilon 1[nu >= nu_th])``),
so the release is epsilon-DP against any change of the worker's data (pure
local DP; the paper's Theorem on EM-MDS). Sampling is done in two steps:
``nu`` with probability proportional to ``C(k, nu) C(d - k, h - nu) exp(epsilon 1[nu >= nu_th])``,
then ``nu`` indices uniformly from the top-k set and ``h - nu`` from the rest.

The PS rebuilds ``global_lr * s`` on the released indices and sums over the
workers (:mod:`enclavefl.server.signds`). When ``dims_out`` is 0, ``h`` is
chosen as the one in 1..min(50, d) that maximises the expected number of
top-k indices minus the expected number of other indices in J (the signed
selections' useful part minus their noise): our rule, computed from public
settings only, so the PS derives the same ``h``. The magnitude estimation of
the paper's later version (MagRR) is not implemented: the step is the fixed
``global_lr``.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

__all__ = [
    "MAX_DIMS_OUT",
    "count_distribution",
    "select_dimensions",
    "signds_dims_out",
    "signds_top_k",
]

MAX_DIMS_OUT = 50
"""The most indices one upload may carry (the cloud cluster's ``sign_dim_out`` range)."""


def signds_top_k(d: int, sparse_rate: float) -> int:
    """k, the size of the top-k set: ``max(1, floor(sparse_rate * d))``. Raises ValueError for d < 2."""
    if d < 2:
        raise ValueError(f"SignDS needs at least 2 floating-point coordinates, got {d}")
    return min(d - 1, max(1, math.floor(sparse_rate * d)))


def _log_comb(n: int, r: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(r + 1) - math.lgamma(n - r + 1)


def count_distribution(d: int, k: int, h: int, epsilon: float, threshold_ratio: float) -> npt.NDArray[np.float64]:
    """P[nu] for nu = 0..h: the probability that the mechanism's J holds nu top-k indices.

    Raises:
        ValueError: not 1 <= k < d and 1 <= h <= d.
    """
    if not (1 <= k < d and 1 <= h <= d):
        raise ValueError(f"need 1 <= k < d and 1 <= h <= d, got d={d}, k={k}, h={h}")
    threshold = math.ceil(threshold_ratio * h)
    logs = np.full(h + 1, -np.inf)
    for nu in range(max(0, h - (d - k)), min(k, h) + 1):
        logs[nu] = _log_comb(k, nu) + _log_comb(d - k, h - nu) + (epsilon if nu >= threshold else 0.0)
    top = float(np.max(logs))
    weights = np.exp(logs - top)
    out: npt.NDArray[np.float64] = weights / weights.sum()
    return out


def signds_dims_out(d: int, k: int, epsilon: float, threshold_ratio: float, dims_out: int = 0) -> int:
    """h, the number of indices per upload: ``dims_out`` if given, else our rule (module docstring)."""
    if dims_out > 0:
        return min(dims_out, d)
    best, best_value = 1, -math.inf
    for h in range(1, min(MAX_DIMS_OUT, d) + 1):
        p = count_distribution(d, k, h, epsilon, threshold_ratio)
        expected_top = float(np.dot(np.arange(h + 1), p))
        value = 2.0 * expected_top - h  # E[top-k indices] - E[other indices]
        if value > best_value + 1e-12:
            best, best_value = h, value
    return best


def select_dimensions(flat: npt.NDArray[np.floating], *, k: int, h: int, epsilon: float, threshold_ratio: float,
                      rng: np.random.Generator) -> tuple[npt.NDArray[np.int64], int]:
    """One worker's SignDS release: ``h`` sorted distinct indices into ``flat`` and the sign.

    Args:
        flat: the update's floating-point coordinates, shape (d,), finite.
        rng: the worker's private randomness (the PS must not be able to predict it).

    Raises:
        ValueError: ``flat`` is not finite, or k, h do not fit d.
    """
    d = int(flat.shape[0])
    if not np.isfinite(flat).all():
        raise ValueError("SignDS: the update is not finite")
    p = count_distribution(d, k, h, epsilon, threshold_ratio)
    sign = 1 if rng.random() < 0.5 else -1
    order = np.argpartition(-sign * np.asarray(flat, dtype=np.float64), k - 1)
    top, rest = order[:k], order[k:]
    nu = int(rng.choice(h + 1, p=p))
    chosen = np.concatenate([
        top[rng.choice(k, size=nu, replace=False)],
        rest[rng.choice(d - k, size=h - nu, replace=False)],
    ])
    return np.sort(chosen.astype(np.int64)), sign
