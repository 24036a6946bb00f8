"""A checkpoint's model in a standard file format, with the task's metadata.

Three formats, each written to a temporary file beside the target and renamed
onto it, so a reader never sees half a file:

* ``safetensors``: the model's tensors (checkpoint names, order and dtypes) and
  the metadata as ``__metadata__`` strings (non-string values JSON-encoded).
  Written by the ``safetensors`` package when it is installed, else by
  :mod:`enclavefl.ml.safetensors_format`; the two files read back the same.
* ``torch``: ``torch.save`` of ``{"format", "metadata", "state_dict"}``, holding
  only tensors, strings, numbers, lists and dicts, so ``torch.load(f,
  weights_only=True)`` reads it without unpickling arbitrary objects. The
  state_dict loads into the task's ``nn.Module`` with ``load_state_dict``.
* ``onnx``: the PyTorch model traced by ``torch.onnx.export`` (needs the
  ``onnx`` and ``onnxscript`` packages), with a dynamic batch dimension and
  the metadata in the model's ``metadata_props``.

The metadata names the job, the round, the model version and the parameter
digest of the checkpoint (:func:`enclavefl.server.checkpoint.params_digest`,
so an exported file can be traced to the run that made it), plus the task, its
params and, for built-in tasks, the inputs, layout, classes and output.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from enclavefl import __version__
from enclavefl.config import JobConfig
from enclavefl.errors import ConfigError, EnclaveFLError
from enclavefl.ml.safetensors_format import write_safetensors
from enclavefl.ml.task_models import TASK_MODELS, TaskModel, task_model
from enclavefl.server.checkpoint import Checkpoint, params_digest
from enclavefl.tensors import ParamSet, SparseRows

__all__ = [
    "EXPORT_FORMAT",
    "FORMATS",
    "export_metadata",
    "export_model",
    "metadata_strings",
    "model_tensors",
]

EXPORT_FORMAT = "enclavefl-model-1"
"""The ``format`` value of every export's metadata: the layout described in this module."""

FORMATS: Mapping[str, str] = {"safetensors": ".safetensors", "torch": ".pt", "onnx": ".onnx"}
"""The formats ``export`` writes, with their usual file name endings."""

_ONNX_PACKAGES = ("onnx", "onnxscript")


def model_tensors(params: ParamSet) -> dict[str, npt.NDArray[Any]]:
    """The model's tensors by name, in checkpoint order, as dense arrays."""
    return {name: value.to_dense() if isinstance(value, SparseRows) else np.asarray(value)
            for name, value in params.items()}


def export_metadata(config: JobConfig, ckpt: Checkpoint) -> dict[str, Any]:
    """What an exported file says about its model (plain JSON values).

    Keys: ``format``, ``enclavefl_version``, ``job``, ``round``, ``model_version``,
    ``params_digest``, ``task``, ``task_params``; for a built-in task also
    ``framework``, ``inputs`` (name, shape of one sample, dtype each),
    ``input_shape`` (the first input's), ``layout``, ``classes`` and ``output``,
    and for an image task ``pixel_scale``.
    """
    meta: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "enclavefl_version": __version__,
        "job": config.job.name,
        "round": ckpt.round,
        "model_version": ckpt.model_version,
        "params_digest": params_digest(ckpt.params),
        "task": config.task.name,
        "task_params": dict(config.task.params),
    }
    if config.task.name in TASK_MODELS:
        spec = task_model(config)
        meta.update(
            framework=spec.framework,
            inputs=[{"name": i.name, "shape": list(i.shape), "dtype": i.dtype} for i in spec.inputs],
            input_shape=list(spec.inputs[0].shape),
            layout=spec.layout,
            classes=list(spec.classes),
            output=spec.output,
        )
        if spec.image_shape is not None:
            meta["pixel_scale"] = "pixel / 255, in [0, 1]"
    return meta


def metadata_strings(meta: Mapping[str, Any]) -> dict[str, str]:
    """The metadata as a map of strings (safetensors and ONNX hold only strings): others as JSON."""
    return {k: v if isinstance(v, str) else json.dumps(v, separators=(",", ":")) for k, v in meta.items()}


@contextlib.contextmanager
def _atomic(out: Path) -> Iterator[Path]:
    """A temporary path beside ``out``; renamed onto ``out`` (after fsync) when the block succeeds."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except OSError as exc:
        raise ConfigError(f"{out}: cannot write ({exc.strerror or exc})") from exc
    finally:
        tmp.unlink(missing_ok=True)


def _write_with(out: Path, write: Callable[[IO[bytes]], object]) -> None:
    with _atomic(out) as tmp, tmp.open("wb") as f:
        write(f)


def _safetensors(out: Path, tensors: dict[str, npt.NDArray[Any]], meta: dict[str, Any]) -> None:
    strings = metadata_strings(meta)
    if importlib.util.find_spec("safetensors") is not None:
        from safetensors.numpy import save

        data = save({n: np.asarray(a, order="C") for n, a in tensors.items()}, metadata=strings)
        _write_with(out, lambda f: f.write(data))
    else:
        _write_with(out, lambda f: write_safetensors(f, tensors, strings))


def _torch(out: Path, tensors: dict[str, npt.NDArray[Any]], meta: dict[str, Any]) -> None:
    import torch

    # np.array copies: checkpoint tensors may be read-only views, which torch will not wrap.
    state = OrderedDict((n, torch.from_numpy(np.array(a))) for n, a in tensors.items())
    _write_with(out, lambda f: torch.save({"format": EXPORT_FORMAT, "metadata": meta, "state_dict": state}, f))


def _onnx_model(config: JobConfig) -> TaskModel:
    """The task's model if ONNX export can trace it, and the packages it needs are there."""
    name = config.task.name
    if name not in TASK_MODELS:
        raise ConfigError(f"--format onnx needs a built-in task's model; task {name!r} is a user task "
                          "(export safetensors or torch, and build the model with its own code)")
    spec = task_model(config)
    if spec.framework != "pytorch":
        raise ConfigError(f"--format onnx exports PyTorch models; task {name} is a Keras model: "
                          "use --format safetensors or torch")
    if spec.layout == "tabular":
        # DLRM.forward checks every index against its table with a data-dependent branch,
        # which the exporter cannot trace.
        raise ConfigError(f"--format onnx cannot trace task {name} (its forward checks every categorical index "
                          "against its table): use --format safetensors or torch")
    missing = [p for p in _ONNX_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise ConfigError(f"--format onnx needs the {' and '.join(missing)} package(s), not installed: "
                          "pip install 'enclavefl[export]'")
    return spec


def _onnx(out: Path, config: JobConfig, params: ParamSet, meta: dict[str, Any]) -> None:
    import torch

    spec = _onnx_model(config)
    model = spec.load(params)
    batch = torch.export.Dim("batch")
    example = tuple(torch.zeros((2, *i.shape), dtype=getattr(torch, i.dtype)) for i in spec.inputs)
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    try:
        # The exporter warns and logs about its own internals (deprecations, optional
        # torchvision ops) that a user of the command cannot act on.
        exporter_log.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model, example, None, dynamo=True, verbose=False, external_data=False,
                input_names=[i.name for i in spec.inputs], output_names=[spec.output],
                dynamic_shapes=tuple({0: batch} for _ in spec.inputs),
            )
    except Exception as exc:  # the exporter raises many kinds; none is the user's to fix
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise EnclaveFLError(f"ONNX export of task {spec.task} failed: {type(exc).__name__}: {first}") from exc
    finally:
        exporter_log.setLevel(level)
    if program is None:  # pragma: no cover - dynamo=True with f=None returns the program
        raise EnclaveFLError(f"ONNX export of task {spec.task} returned no program")
    program.model.metadata_props.update(metadata_strings(meta))
    with _atomic(out) as tmp:
        program.save(str(tmp), external_data=False)


def export_model(config: JobConfig, ckpt: Checkpoint, fmt: str, out: Path) -> dict[str, Any]:
    """Writes ``ckpt``'s model to ``out`` in format ``fmt``; returns the :func:`export_metadata` it holds.

    Raises:
        ConfigError: unknown format; ONNX asked for a model it cannot export (a
            user, Keras or DLRM task) or without its packages; the parameters do
            not fit the task's model (ONNX); ``out`` cannot be written.
        EnclaveFLError: the ONNX exporter failed.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    meta = export_metadata(config, ckpt)
    if fmt == "onnx":
        _onnx(out, config, ckpt.params, meta)
    elif fmt == "torch":
        _torch(out, model_tensors(ckpt.params), meta)
    else:
        _safetensors(out, model_tensors(ckpt.params), meta)
    return meta
