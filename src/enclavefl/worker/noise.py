"""The worker's noise steps: its share of distributed DP's noise, and local DP (Gaussian or SignDS).

Both run after :class:`~enclavefl.worker.clipping.ClipUpdate`, last in the
update pipeline, and do nothing unless the train task asks for them.

- :class:`DistributedNoise` (``privacy.dp.mode: distributed``): adds
  ``N(0, s^2)`` to every floating-point coordinate of the clipped update, with
  ``s`` the task's ``privacy.dp.noise_std`` (the PS sets it to
  ``z C / sqrt(round.min_updates)``, so the sum of any round the PS accepts
  carries DP-FedAvg's whole noise; McMahan et al. 2018).
- :class:`LocalDp` (``privacy.local_dp``): ``gaussian`` clips the update to
  ``clip_norm`` and adds the noise of the analytic Gaussian mechanism (Balle and
  Wang 2018, :mod:`enclavefl.gaussian_mechanism`) for (``epsilon``, ``delta``)
  at sensitivity ``2 clip_norm`` (any two clipped updates are that far apart at
  most); ``signds`` replaces the update by SignDS's indices and sign (Jiang et
  al. 2022, :mod:`enclavefl.signds`).

Row-sparse tensors are made dense before noise is added: noise on the sent rows
only would reveal which rows the worker touched. The randomness comes from the
operating system, not from the job seed: whoever could predict it could remove
the noise. Pass a generator only in tests.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import final

import numpy as np

from enclavefl.gaussian_mechanism import analytic_gaussian_sigma
from enclavefl.messages import (
    DP_NOISE_STD_KEY,
    LOCAL_DP_CLIP_NORM_KEY,
    LOCAL_DP_DELTA_KEY,
    LOCAL_DP_DIMS_OUT_KEY,
    LOCAL_DP_EPSILON_KEY,
    LOCAL_DP_MECHANISM_KEY,
    LOCAL_DP_THRESHOLD_RATIO_KEY,
    LOCAL_DP_TOP_K_KEY,
    SIGNDS_INDICES_TENSOR,
    SIGNDS_SIGN_TENSOR,
    ConfigValue,
    UpdateKind,
)
from enclavefl.norms import clip_update
from enclavefl.signds import select_dimensions
from enclavefl.tensors import Array, ParamSet, SparseRows, Tensor
from enclavefl.worker.pipeline import UpdateContext

__all__ = ["DistributedNoise", "LocalDp", "add_gaussian_noise", "flatten_floats"]


def _number(config: Mapping[str, ConfigValue], key: str, *, positive: bool = True) -> float:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or (positive and not value > 0) or value < 0:
        raise ValueError(f"task config {key} = {value!r}: expected a {'positive' if positive else 'non-negative'} "
                         "finite number")
    return float(value)


def _dense(value: Tensor) -> Array:
    return value.to_dense() if isinstance(value, SparseRows) else value


def add_gaussian_noise(update: ParamSet, std: float, rng: np.random.Generator) -> ParamSet:
    """``update`` with N(0, std^2) added to every floating-point coordinate (row-sparse tensors made dense)."""
    out: list[tuple[str, Tensor]] = []
    for name, value in update.items():
        dense = _dense(value)
        if dense.dtype.kind != "f" or std == 0:
            out.append((name, value))
            continue
        noisy = np.asarray(dense, dtype=np.float64) + rng.normal(0.0, std, size=dense.shape)
        out.append((name, np.asarray(noisy, dtype=dense.dtype)))
    return ParamSet(out)


def flatten_floats(update: ParamSet) -> Array:
    """Every floating-point coordinate of ``update``, in tensor order, as one float64 vector (shape (d,))."""
    parts = [np.asarray(_dense(v), dtype=np.float64).ravel() for v in update.values() if _dense(v).dtype.kind == "f"]
    return np.concatenate(parts) if parts else np.zeros(0)


@final
class DistributedNoise:
    """Adds the worker's share of distributed DP's noise (the task's ``privacy.dp.noise_std``)."""

    name: str = "dp-noise"
    produces: UpdateKind = UpdateKind.DELTA

    def __init__(self, rng: np.random.Generator | None = None) -> None:
        self._rng = rng or np.random.default_rng()

    def __call__(self, update: ParamSet, context: UpdateContext) -> ParamSet:
        """Raises ValueError if the task's noise std is not a non-negative number."""
        if DP_NOISE_STD_KEY not in context.task_config:
            return update
        std = _number(context.task_config, DP_NOISE_STD_KEY, positive=False)
        return add_gaussian_noise(update, std, self._rng)


@final
class LocalDp:
    """Local DP on the upload: Gaussian noise, or SignDS's indices and sign (the task's ``privacy.local_dp.*``)."""

    name: str = "local-dp"
    produces: UpdateKind = UpdateKind.DELTA

    def __init__(self, rng: np.random.Generator | None = None, *, max_epsilon: float | None = None,
                 max_delta: float | None = None) -> None:
        """Prepares the step.

        Args:
            rng: only for tests; default the operating system's randomness.
            max_epsilon: the most one upload may spend, whatever the task says: a worker that does not
                trust the PS pins its own budget here (from its own job file) and refuses a weaker task.
            max_delta: the same for delta (``gaussian``).
        """
        self._rng = rng or np.random.default_rng()
        self._sigmas: dict[tuple[float, float, float], float] = {}
        self.max_epsilon = max_epsilon
        self.max_delta = max_delta

    def sigma(self, epsilon: float, delta: float, clip_norm: float) -> float:
        """The Gaussian noise std for one (epsilon, delta) release of an update clipped to ``clip_norm``."""
        key = (epsilon, delta, clip_norm)
        if key not in self._sigmas:
            self._sigmas[key] = analytic_gaussian_sigma(epsilon, delta, 2.0 * clip_norm)
        return self._sigmas[key]

    def __call__(self, update: ParamSet, context: UpdateContext) -> ParamSet:
        """Raises ValueError on an unknown mechanism, a parameter out of range or a non-finite update."""
        config = context.task_config
        mechanism = config.get(LOCAL_DP_MECHANISM_KEY)
        if mechanism is None:
            return update
        epsilon = _number(config, LOCAL_DP_EPSILON_KEY)
        if self.max_epsilon is not None and epsilon > self.max_epsilon:
            raise ValueError(f"task config {LOCAL_DP_EPSILON_KEY} = {epsilon:g} is above this worker's own limit "
                             f"{self.max_epsilon:g}: refused, nothing is uploaded")
        if mechanism == "gaussian":
            delta = _number(config, LOCAL_DP_DELTA_KEY)
            if not delta < 1:
                raise ValueError(f"task config {LOCAL_DP_DELTA_KEY} = {delta!r}: expected a number in (0, 1)")
            if self.max_delta is not None and delta > self.max_delta:
                raise ValueError(f"task config {LOCAL_DP_DELTA_KEY} = {delta:g} is above this worker's own limit "
                                 f"{self.max_delta:g}: refused, nothing is uploaded")
            clip_norm = _number(config, LOCAL_DP_CLIP_NORM_KEY)
            clipped = clip_update(update, clip_norm)
            return add_gaussian_noise(clipped, self.sigma(epsilon, delta, clip_norm), self._rng)
        if mechanism == "signds":
            k, h = config.get(LOCAL_DP_TOP_K_KEY), config.get(LOCAL_DP_DIMS_OUT_KEY)
            if isinstance(k, bool) or isinstance(h, bool) or not isinstance(k, int) or not isinstance(h, int):
                raise ValueError(f"task config {LOCAL_DP_TOP_K_KEY} = {k!r}, {LOCAL_DP_DIMS_OUT_KEY} = {h!r}: "
                                 "expected integers")
            ratio = _number(config, LOCAL_DP_THRESHOLD_RATIO_KEY)
            indices, sign = select_dimensions(flatten_floats(update), k=k, h=h, epsilon=epsilon,
                                              threshold_ratio=ratio, rng=self._rng)
            return ParamSet([(SIGNDS_INDICES_TENSOR, indices), (SIGNDS_SIGN_TENSOR, np.array([sign], dtype=np.int64))])
        raise ValueError(f"task config {LOCAL_DP_MECHANISM_KEY} = {mechanism!r}: expected gaussian or signds")
