"""A worker's local round between the pull and the push: one function for the worker runtime and the simulation.

How this works: a deployed :class:`~enclavefl.worker.runtime.Worker` and a
simulated client (:func:`enclavefl.simulation.fit_client`) must train to the same
bits and upload the same encoding, or a simulation stops predicting a
deployment. So both call the steps here, in this order:

1. :func:`check_settings`: the PS asks for a client algorithm this code runs;
2. :func:`split_download`: the downloaded model, and SCAFFOLD's server variate
   (``scaffold.c/`` tensors), which must be there exactly when the task runs SCAFFOLD;
3. :func:`train_local_round`: SCAFFOLD's correction from the client's variate
   ``c_i``, the fit with the PS's settings, the variate's update and its change
   (Karimireddy et al. 2020, option II), the update pipeline
   (:mod:`enclavefl.worker.pipeline`) and the upload compression
   (:class:`~enclavefl.worker.compression.UploadCompressor`).

What differs between the two callers stays with them: the worker pulls,
pushes, logs, runs secure aggregation's stages around this, keeps ``c_i`` and
the compressor for its whole process and rolls them back when the PS refuses
(``LocalUpdate.control_before``, ``UploadCompressor.settle``); a simulated
client gets both from the driver's per-client store and hands them back.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from enclavefl.errors import ConfigError, ProtocolError
from enclavefl.messages import CONTROL_DELTA_PREFIX, CONTROL_PREFIX, ClientSettings, ConfigValue, UpdateKind
from enclavefl.tensors import EncodedUpdate, ParamSet, Tensor
from enclavefl.training import FitConfig, FitResult, Trainer
from enclavefl.worker.compression import UploadCompressor
from enclavefl.worker.control import ScaffoldClient
from enclavefl.worker.pipeline import UpdateContext, UpdateTransform, run_pipeline

__all__ = ["ALGORITHMS", "LocalUpdate", "check_settings", "fit_config", "split_download", "train_local_round"]

ALGORITHMS: Final = ("fedavg", "fedprox", "scaffold")
"""The client algorithms a worker runs."""


@dataclass(frozen=True, slots=True)
class LocalUpdate:
    """What a local round produced.

    Attributes:
        payload: what to push: ``update`` encoded as the task's upload compression says.
        kind: the payload's kind.
        update: the pipeline's output before compression (what secure aggregation masks).
        result: the fit's result (examples, metrics, steps).
        fit_s: local training time, in seconds.
        control_before: SCAFFOLD's ``c_i`` before this round (None for other algorithms):
            what the variate goes back to when the PS does not accept the update.
    """

    payload: ParamSet | EncodedUpdate
    kind: UpdateKind
    update: ParamSet
    result: FitResult
    fit_s: float
    control_before: ParamSet | None


def check_settings(settings: ClientSettings, round_: int) -> None:
    """Refuses a client algorithm this worker does not run.

    Raises:
        ProtocolError: ``settings.algorithm`` is not one of :data:`ALGORITHMS`.
    """
    if settings.algorithm not in ALGORITHMS:
        raise ProtocolError(
            f"round {round_}: the PS asks for client algorithm {settings.algorithm!r}; this worker runs {list(ALGORITHMS)}"
        )


def split_download(download: ParamSet, settings: ClientSettings, round_: int) -> tuple[ParamSet, ParamSet]:
    """The downloaded model, and SCAFFOLD's server variate keyed by parameter name (empty unless SCAFFOLD).

    Raises:
        ProtocolError: the task runs SCAFFOLD and the model holds no ``scaffold.c/`` tensors, or the
            other way round.
    """
    model: list[tuple[str, Tensor]] = []
    control: list[tuple[str, Tensor]] = []
    for name, value in download.items():
        if name.startswith(CONTROL_PREFIX):
            control.append((name[len(CONTROL_PREFIX) :], value))
        else:
            model.append((name, value))
    scaffold = settings.algorithm == "scaffold"
    if scaffold and not control:
        raise ProtocolError(f"round {round_}: the task runs SCAFFOLD but the model holds no {CONTROL_PREFIX} tensors")
    if not scaffold and control:
        raise ProtocolError(
            f"round {round_}: the model holds {CONTROL_PREFIX} tensors but the task runs {settings.algorithm}"
        )
    return ParamSet(model), ParamSet(control)


def fit_config(settings: ClientSettings, round_: int, seed: int, correction: ParamSet | None) -> FitConfig:
    """Local training as the PS's settings say; only the shuffle seed is the worker's own."""
    return FitConfig(
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        lr=settings.lr,
        round=round_,
        seed=seed,
        proximal_mu=settings.proximal_mu if settings.algorithm == "fedprox" else 0.0,
        correction=correction,
        optimizer=settings.optimizer,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
    )


def train_local_round(
    trainer: Trainer,
    transforms: Sequence[UpdateTransform],
    compressor: UploadCompressor,
    settings: ClientSettings,
    round_: int,
    global_params: ParamSet,
    server_control: ParamSet,
    *,
    seed: int,
    variate: ScaffoldClient | None,
    task_config: Mapping[str, ConfigValue],
    name: str,
    after_fit: Callable[[float], bool] | None = None,
) -> LocalUpdate | None:
    """Trains on ``global_params``, runs the update pipeline and encodes the upload.

    Args:
        trainer: the local model and data.
        transforms: the update pipeline; under SCAFFOLD it must append the control delta.
        compressor: encodes the pipeline's output; its pending residual is the caller's to
            settle once the PS has answered.
        settings: the PS's client settings for this round.
        global_params, server_control: from :func:`split_download`.
        seed: the job seed; with the round it fixes the local shuffle.
        variate: SCAFFOLD's client variate ``c_i`` (required under SCAFFOLD, else None); updated
            in place. If a later step raises, it is put back as it was.
        task_config: the train task's per-round settings (``privacy.dp.clip_norm``, compression, ...).
        name: the worker's name, for error messages.
        after_fit: called with the fit's seconds before anything else happens (a straggler's
            wait); True abandons the round.

    Returns:
        The round's update, or None if ``after_fit`` abandoned the round (the variate is untouched then).

    Raises:
        ConfigError: the task runs SCAFFOLD and the transforms left out the control delta.
        ProtocolError: ``server_control`` does not fit the model or the variate.
        ValueError: a transform or the compressor refused the update.
    """
    correction = None
    if variate is not None:
        correction = variate.correction(server_control)  # checks c against the model
    started = time.monotonic()
    trainer.set_parameters(global_params)
    result = trainer.fit(fit_config(settings, round_, seed, correction))
    local_params = trainer.get_parameters()
    fit_s = time.monotonic() - started
    if after_fit is not None and after_fit(fit_s):
        return None
    control_before: ParamSet | None = None
    control_delta: ParamSet | None = None
    if variate is not None:
        control_before = variate.state()
        control_delta = variate.update(global_params, local_params, server_control, result.steps, settings.lr)
    try:
        context = UpdateContext(global_params, local_params, result, settings, round_, control_delta,
                                task_config=task_config)
        update, kind = run_pipeline(transforms, context)
        if control_delta is not None:
            _check_control_delta(update, control_delta, transforms, name)
        payload, kind = compressor.encode(update, kind, context)
    except BaseException:
        if variate is not None and control_before is not None:
            variate.load_state(control_before)  # nothing was sent: c_i must not move
        raise
    return LocalUpdate(payload, kind, update, result, fit_s, control_before)


def _check_control_delta(update: ParamSet, control_delta: ParamSet, transforms: Sequence[UpdateTransform],
                         name: str) -> None:
    expected = [f"{CONTROL_DELTA_PREFIX}{tensor}" for tensor in control_delta]
    missing = [tensor for tensor in expected if tensor not in update]
    if missing:
        names = [t.name for t in transforms]
        raise ConfigError(
            f"worker {name}: the task runs SCAFFOLD but the update transforms {names} "
            f"left out {missing[:3]}; add ControlDelta after Delta"
        )
