"""Fault injection FOR EXPERIMENTS: Byzantine updates and stragglers, as the job's ``faults`` section says.

How this works: :func:`faults_for` reads the job's ``faults`` section and tells
worker ``i`` of ``n`` what it should do wrong. An attacker gets an
:class:`Attack` to append to the end of its update pipeline, so what it
corrupts is exactly what it would otherwise have pushed; a straggler gets a
slowdown factor, which the worker turns into a :class:`Slowdown` wait between
local training and the push. Nothing here runs unless a job asks for it, and a
worker it applies to says so in its log.

The attacks follow the robust-aggregation literature: the sign flip sends the
negated update times a factor (Li et al. 2019, RSA, "sign-flipping attack"), the
scaling attack a multiple of the update (the "boosting" of Bhagoji et al. 2019),
and the Gaussian attack random noise of the update's shape in its place
(Blanchard et al. 2017, the Krum paper's "Gaussian Byzantine" workers).
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Literal, final

import numpy as np
import numpy.typing as npt

from enclavefl.errors import ConfigError
from enclavefl.messages import UpdateKind
from enclavefl.tensors import ParamSet, SparseRows, Tensor
from enclavefl.worker.pipeline import UpdateContext, UpdateTransform

if TYPE_CHECKING:
    from enclavefl.config import JobConfig

__all__ = ["ATTACKS", "Attack", "AttackName", "Slowdown", "faults_for"]

log = logging.getLogger(__name__)

AttackName = Literal["sign_flip", "scale", "noise"]

ATTACKS: tuple[AttackName, ...] = ("sign_flip", "scale", "noise")
"""The attacks :class:`Attack` knows."""


@final
class Attack:
    """A Byzantine worker's last pipeline step: corrupts every floating-point tensor of the update.

    ``sign_flip`` sends ``-scale x u``, ``scale`` sends ``scale x u``, and ``noise``
    sends ``N(0, scale^2)`` noise of ``u``'s shape instead of ``u``, drawn from a
    generator seeded by (job seed, worker index, round): a rerun sends the same
    noise. Integer and bool tensors (counters, flags) pass unchanged; a
    :class:`~enclavefl.tensors.SparseRows` keeps its row ids and has its rows
    attacked. The output has the input's dtypes and the kind the step declares
    (default DELTA: put it after :class:`~enclavefl.worker.pipeline.Delta`).
    """

    name: str = "attack"

    def __init__(self, attack: AttackName, scale: float, *, seed: int = 0, index: int = 0,
                 produces: UpdateKind = UpdateKind.DELTA) -> None:
        """Prepares the attack.

        Args:
            attack: ``sign_flip``, ``scale`` or ``noise``.
            scale: the factor (sign_flip, scale) or the noise's standard deviation; > 0.
            seed: the job seed (noise only).
            index: the worker's index (noise only): attackers draw different noise.
            produces: the kind of update this step receives and passes on.

        Raises:
            ValueError: an unknown attack or a scale that is not a positive finite number.
        """
        if attack not in ATTACKS:
            raise ValueError(f"unknown attack {attack!r}: expected one of {list(ATTACKS)}")
        if not (np.isfinite(scale) and scale > 0):
            raise ValueError(f"attack scale must be a positive finite number, got {scale!r}")
        self.attack: AttackName = attack
        self.scale = float(scale)
        self.seed = seed
        self.index = index
        self.produces = produces

    def __repr__(self) -> str:
        return f"Attack({self.attack!r}, scale={self.scale:g}, index={self.index})"

    def __call__(self, update: ParamSet, context: UpdateContext) -> ParamSet:
        """Returns the attacked update; ``update`` is left as it was."""
        rng = np.random.default_rng([self.seed, self.index, context.round]) if self.attack == "noise" else None
        out: list[tuple[str, Tensor]] = []
        for name, value in update.items():
            if isinstance(value, SparseRows):
                out.append((name, SparseRows(value.ids, self._corrupt(value.rows, rng), value.shape)))
            else:
                out.append((name, self._corrupt(value, rng)))
        return ParamSet(out)

    def _corrupt(self, array: npt.NDArray[np.generic], rng: np.random.Generator | None) -> npt.NDArray[np.generic]:
        if not np.issubdtype(array.dtype, np.floating):
            return array
        if rng is not None:
            return np.asarray(rng.normal(0.0, self.scale, size=array.shape), dtype=array.dtype)
        factor = -self.scale if self.attack == "sign_flip" else self.scale
        # asarray: a 0-d tensor times a scalar is a numpy scalar, not an array.
        return np.asarray(np.multiply(array, factor, dtype=array.dtype))


@final
class Slowdown:
    """Makes a worker a straggler: after each local fit it waits ``(factor - 1) x`` the fit's time.

    The wait is on the worker's stop event, so stopping the worker is not
    delayed by it.
    """

    def __init__(self, factor: float, stop: threading.Event) -> None:
        """Raises ValueError if ``factor`` is below 1 or not finite."""
        if not (np.isfinite(factor) and factor >= 1):
            raise ValueError(f"slowdown factor must be a finite number >= 1, got {factor!r}")
        self.factor = float(factor)
        self._stop = stop

    def after_fit(self, fit_s: float) -> bool:
        """Waits ``(factor - 1) x fit_s`` seconds, or until the stop event is set.

        Returns:
            True if the stop event is set (the worker should abandon the round).
        """
        delay = (self.factor - 1.0) * max(fit_s, 0.0)
        if delay <= 0:
            return self._stop.is_set()
        return self._stop.wait(delay)


def faults_for(config: JobConfig, index: int, num_workers: int) -> tuple[list[UpdateTransform], float]:
    """What worker ``index`` of ``num_workers`` does wrong under the job's ``faults`` section.

    Workers ``0 .. byzantine-1`` attack; the last ``slow`` indices are stragglers.
    Logs one line when a fault applies to this worker.

    Returns:
        The transforms to append to the end of the worker's pipeline (empty, or
        one :class:`Attack`), and its slowdown factor (1.0: not slowed).

    Raises:
        ConfigError: ``index`` is outside ``0 .. num_workers-1``, or the section asks
            for more attackers or stragglers than there are workers.
    """
    f = config.faults
    if not 0 <= index < num_workers:
        raise ConfigError(f"faults: worker index {index} is outside 0..{num_workers - 1}")
    for key, count in (("byzantine", f.byzantine), ("slow", f.slow)):
        if count > num_workers:
            raise ConfigError(f"faults.{key} = {count}: more than the {num_workers} workers of this job")
    transforms: list[UpdateTransform] = []
    what: list[str] = []
    if index < f.byzantine:
        transforms.append(Attack(f.attack, f.scale, seed=config.job.seed, index=index))
        what.append(f"{f.attack} scale {f.scale:g}")
    slowdown = f.slowdown if index >= num_workers - f.slow else 1.0
    if slowdown > 1.0:
        what.append(f"{slowdown:g}x slower")
    if what:
        log.warning("worker-%d: FAULT INJECTION %s (an experiment: the job's faults section)", index, ", ".join(what))
    return transforms, slowdown
