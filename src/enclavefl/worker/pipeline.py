"""The worker's update pipeline: what happens to a round's result before it is pushed.

How this works: after local training the worker builds an
:class:`UpdateContext` (the model it downloaded, the model it trained, the fit
result, the PS's settings, the round) and hands the trained parameters to an
ordered list of :class:`UpdateTransform` steps; :func:`run_pipeline` feeds each
step's output to the next. The default list is :class:`Delta` (send
``local - global``), :class:`SparsifyRows` when the trainer reports the
embedding rows it touched, :class:`ControlDelta` (SCAFFOLD's control-variate
change, a no-op for other algorithms),
:class:`~enclavefl.worker.clipping.ClipUpdate` (differential privacy's L2 bound,
a no-op unless the task carries one) and the noise steps of
:mod:`enclavefl.worker.noise` (distributed and local DP, no-ops unless asked). Later stages (masking) plug in by being added to the list; each declares the
:class:`~enclavefl.messages.UpdateKind` of what it produces, and the last one
decides what the update header announces. Upload compression is not a
transform: it changes the wire encoding rather than the values, so the worker
runs it after the whole list (:class:`~enclavefl.worker.compression.UploadCompressor`),
and every transform, clipping and a fault-injection attack included, sees plain arrays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, final, runtime_checkable

import numpy as np
import numpy.typing as npt

from enclavefl.messages import CONTROL_DELTA_PREFIX, ClientSettings, ConfigValue, UpdateKind
from enclavefl.tensors import ParamSet, SparseRows, Tensor
from enclavefl.training import FitResult, Trainer

__all__ = [
    "ControlDelta",
    "Delta",
    "SparseTrainer",
    "SparsifyRows",
    "UpdateContext",
    "UpdateTransform",
    "compute_delta",
    "default_transforms",
    "run_pipeline",
    "sparsify_rows",
]


@dataclass(frozen=True, slots=True)
class UpdateContext:
    """What a transform may read about the round besides the update it transforms.

    Attributes:
        global_params: the model the round started from, as downloaded (SCAFFOLD's
            ``scaffold.c/`` tensors removed).
        local_params: the model after local training (``Trainer.get_parameters()``).
        result: what local training reported.
        settings: the PS's client settings for this round.
        round: the federation round.
        control_delta: SCAFFOLD's ``delta c_i`` per floating-point model tensor, in
            model order and named like the model's tensors; None unless the round
            runs SCAFFOLD.
        task_config: the train task's per-round settings of later stages
            (``privacy.dp.clip_norm``, ...), as the PS sent them.
    """

    global_params: ParamSet
    local_params: ParamSet
    result: FitResult
    settings: ClientSettings
    round: int
    control_delta: ParamSet | None = None
    task_config: Mapping[str, ConfigValue] = field(default_factory=dict)


class UpdateTransform(Protocol):
    """One step of the update pipeline.

    A transform returns a new :class:`ParamSet` and leaves its input and the
    context unchanged (the input may be the trainer's own arrays). It raises
    ValueError when the update does not fit what it expects; the round is then
    lost and nothing is pushed.
    """

    @property
    def name(self) -> str:
        """A short label for logs and error messages."""
        ...

    @property
    def produces(self) -> UpdateKind:
        """What the update holds after this step."""
        ...

    def __call__(self, update: ParamSet, context: UpdateContext) -> ParamSet: ...


@runtime_checkable
class SparseTrainer(Protocol):
    """A trainer that can say which embedding rows its last ``fit`` looked up.

    Such a trainer's tables travel as :class:`~enclavefl.tensors.SparseRows` of
    those rows (see :class:`SparsifyRows`).
    """

    def touched_rows(self) -> Mapping[str, npt.NDArray[np.int64]]:
        """Row ids per tensor name touched by the last ``fit``."""
        ...


def _dense(value: Tensor) -> npt.NDArray[np.generic]:
    return value.to_dense() if isinstance(value, SparseRows) else value


def compute_delta(new: ParamSet, old: ParamSet) -> ParamSet:
    """``new - old`` per tensor of ``new``, in the tensor's own dtype.

    A bool tensor's delta is all False (a flag has no difference to average).

    Raises:
        ValueError: ``old`` lacks a tensor of ``new``.
    """
    missing = [name for name in new if name not in old]
    if missing:
        raise ValueError(f"the trained model has tensors the downloaded one lacks: {missing[:5]}")
    out = []
    for name, value in new.items():
        a = _dense(value)
        b = _dense(old[name])
        if a.dtype == np.bool_:
            out.append((name, np.zeros_like(a)))
        else:
            # asarray: on 0-d tensors (BatchNorm num_batches_tracked) ufuncs return a numpy scalar.
            out.append((name, np.asarray(np.subtract(a, b, dtype=a.dtype))))
    return ParamSet(out)


def sparsify_rows(update: ParamSet, touched: Mapping[str, npt.NDArray[np.int64]]) -> ParamSet:
    """Sends the tensors in ``touched`` as SparseRows of those row ids (embedding tables).

    A trainer that looks up few rows per round (DLRM) reports them through
    :meth:`SparseTrainer.touched_rows`; the PS averages each row over the
    workers that sent it.

    Raises:
        ValueError: a name is not in ``update`` or a row id is out of range.
    """
    unknown = sorted(set(touched) - set(update))
    if unknown:
        raise ValueError(f"touched_rows names tensors the model does not have: {unknown[:5]}")
    out: list[tuple[str, Tensor]] = []
    for name, value in update.items():
        ids = touched.get(name)
        if ids is None:
            out.append((name, value))
            continue
        out.append((name, SparseRows.from_dense(_dense(value), np.unique(np.asarray(ids, dtype=np.int64)))))
    return ParamSet(out)


@final
class Delta:
    """``local - global``: what FedAvg and its relatives average."""

    name: str = "delta"
    produces: UpdateKind = UpdateKind.DELTA

    def __call__(self, update: ParamSet, context: UpdateContext) -> ParamSet:
        """Raises ValueError if the downloaded model lacks a tensor of ``update``."""
        return compute_delta(update, context.global_params)


@final
class SparsifyRows:
    """Sends the embedding tables a :class:`SparseTrainer` reports as their touched rows only."""

    name: str = "sparsify-rows"
    produces: UpdateKind = UpdateKind.DELTA

    def __init__(self, trainer: SparseTrainer) -> None:
        self._trainer = trainer

    def __call__(self, update: ParamSet, context: UpdateContext) -> ParamSet:
        """Raises ValueError on a row id out of range or a tensor the update lacks."""
        return sparsify_rows(update, self._trainer.touched_rows())


@final
class ControlDelta:
    """Appends SCAFFOLD's ``delta c_i`` as ``scaffold.dc/<param>`` tensors after the model's.

    The PS expects them in the model's floating-point tensor order, after every
    model tensor (see ``Scaffold.upload_template`` on the server). Without a
    control delta in the context (any algorithm but SCAFFOLD) the update passes
    unchanged. Put it after :class:`Delta`, and before any transform that must
    cover the whole upload (a secure-aggregation mask): ``delta c_i`` is an
    average gradient and reveals as much as the model delta.
    """

    name: str = "control-delta"
    produces: UpdateKind = UpdateKind.DELTA

    def __call__(self, update: ParamSet, context: UpdateContext) -> ParamSet:
        """Raises ValueError if the update already holds a ``scaffold.dc/`` tensor."""
        if context.control_delta is None:
            return update
        clash = [name for name in update if name.startswith(CONTROL_DELTA_PREFIX)]
        if clash:
            raise ValueError(f"the update already holds control-variate tensors: {clash[:5]}")
        extra = ((f"{CONTROL_DELTA_PREFIX}{name}", value) for name, value in context.control_delta.items())
        return ParamSet([*update.items(), *extra])


def default_transforms(trainer: Trainer) -> list[UpdateTransform]:
    """The worker's default pipeline: Delta, SparsifyRows for a SparseTrainer, ControlDelta, ClipUpdate,
    DistributedNoise, LocalDp (the last three do nothing unless the task asks for them).

    To add a stage, extend this list where it belongs and hand it to the worker.
    """
    from enclavefl.worker.clipping import ClipUpdate  # they import this module
    from enclavefl.worker.noise import DistributedNoise, LocalDp

    transforms: list[UpdateTransform] = [Delta()]
    if isinstance(trainer, SparseTrainer):
        transforms.append(SparsifyRows(trainer))
    transforms.append(ControlDelta())
    transforms.append(ClipUpdate())
    transforms.append(DistributedNoise())
    transforms.append(LocalDp())
    return transforms


def run_pipeline(transforms: Sequence[UpdateTransform], context: UpdateContext) -> tuple[ParamSet, UpdateKind]:
    """Runs ``transforms`` in order on the trained parameters.

    Returns:
        The update to push and its kind: what the last transform produces, or
        WEIGHTS (the trained parameters themselves) for an empty list.

    Raises:
        ValueError: a transform refused the update.
        TypeError: a transform returned something other than a ParamSet.
    """
    update, kind = context.local_params, UpdateKind.WEIGHTS
    for transform in transforms:
        update = transform(update, context)
        if not isinstance(update, ParamSet):
            raise TypeError(f"update transform {transform.name!r} returned {type(update).__name__}, not a ParamSet")
        kind = transform.produces
    return update, kind
