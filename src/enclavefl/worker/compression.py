"""The worker's upload compression: the step after the update pipeline that encodes what is pushed.

How this works: the PS puts ``privacy.compression.upload.*`` in every train
task's config map (:data:`~enclavefl.messages.COMPRESSION_TYPE_KEY` and its
neighbours); without them :meth:`UploadCompressor.encode` passes the update on
unchanged. With them it encodes every non-empty floating-point dense tensor
(:mod:`enclavefl.compression`): integer and bool tensors and
:class:`~enclavefl.tensors.SparseRows` (DLRM's embedding rows, already sparse)
travel as they are. The result is an
:class:`~enclavefl.tensors.EncodedUpdate` announced as
:attr:`~enclavefl.messages.UpdateKind.QUANTIZED`.

During the job's first ``warmup_rounds`` the kept fraction falls exponentially
to the sparse rate (:func:`kept_fraction`). Top-k keeps error feedback (Stich et al. 2018, "Sparsified SGD with Memory";
Lin et al. 2018, "Deep Gradient Compression"): the compressor adds the residual
of earlier rounds to the update before it selects the top values, and keeps as
the new residual everything it did not send (including the quantization error
of ``topk_quantize``). The residual lives in this object, which the worker
keeps for its whole process, so it persists across rounds and re-joins. It is
committed only when the PS accepts the push (:meth:`UploadCompressor.settle`):
a refused update counted for nothing, so the residual goes back to what it was,
as an uncompressed worker's refused delta is lost too.

Differential privacy: clipping runs in the pipeline, before this step, so the
fresh delta is bounded; but the residual and the quantization error can make
the decoded upload longer than ``clip_norm``. When the task carries
``privacy.dp.clip_norm`` the compressor therefore scales its encoding (the
quantization scales or the top-k values) so that the *decoded* upload's norm is
at most ``clip_norm``, which is what the PS measures and what the noise is
calibrated to; the part scaled away stays in the residual.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, Final, TypeAlias, final

import numpy as np
import numpy.typing as npt

from enclavefl.compression import CompressionType, decode_tensor, encode_tensor, encoding_for
from enclavefl.messages import (
    COMPRESSION_BITS_KEY,
    COMPRESSION_SPARSE_RATE_KEY,
    COMPRESSION_TYPE_KEY,
    COMPRESSION_WARMUP_KEY,
    DP_CLIP_NORM_KEY,
    UpdateKind,
)
from enclavefl.tensors import EncodedTensor, EncodedUpdate, ParamSet, SparseRows, Tensor
from enclavefl.worker.pipeline import UpdateContext

__all__ = ["UploadCompressor", "kept_fraction"]

log = logging.getLogger(__name__)

Array: TypeAlias = npt.NDArray[Any]
_TYPES: Final = ("none", "quantize", "topk", "topk_quantize")
_NORM_MARGIN: Final = 1.0 - 1e-6  # scale a hair below clip_norm: float32 scales round either way
_MAX_RESCALES: Final = 4


def kept_fraction(sparse_rate: float, warmup_rounds: int, round_: int) -> float:
    """Top-k's kept fraction in ``round_`` (1-based): ``sparse_rate ** (round_ / warmup_rounds)`` while warming up.

    Lin et al. 2018 (Deep Gradient Compression) raise the sparsity exponentially
    over the first epochs, so the early, large updates are not held back by the
    residual for long; with 4 warm-up rounds and a rate of 0.01 the rounds keep
    31.6 %, 10 %, 3.16 % and then 1 %.
    """
    if warmup_rounds <= 0 or round_ >= warmup_rounds:
        return sparse_rate
    return float(sparse_rate ** (max(round_, 1) / warmup_rounds))


@final
class UploadCompressor:
    """Encodes the pipeline's output as the task's ``privacy.compression.upload`` says; keeps top-k's residual."""

    name: str = "compress"

    def __init__(self, rng: np.random.Generator | None = None, *, residual: Mapping[str, Array] | None = None) -> None:
        """A compressor with no pending encoding.

        Args:
            rng: randomness of the stochastic rounding (default: a fresh OS-seeded generator).
            residual: top-k's committed residual to start from (a simulated client's, kept by the
                driver between rounds); default none.
        """
        self._rng = rng if rng is not None else np.random.default_rng()
        self._residual: dict[str, Array] = dict(residual) if residual is not None else {}
        self._pending: dict[str, Array] | None = None

    @property
    def residual(self) -> Mapping[str, Array]:
        """Top-k's committed residual per tensor name (what was not sent yet)."""
        return dict(self._residual)

    def encode(self, update: ParamSet, kind: UpdateKind, context: UpdateContext) -> tuple[ParamSet | EncodedUpdate,
                                                                                            UpdateKind]:
        """The update to push and its kind: unchanged without compression, else encoded and QUANTIZED.

        Raises:
            ValueError: the task's compression settings are malformed, the update is
                not a delta, or it holds NaN or Inf.
        """
        self._pending = None
        config = context.task_config
        ctype = config.get(COMPRESSION_TYPE_KEY, "none")
        if ctype == "none":
            return update, kind
        if not isinstance(ctype, str) or ctype not in _TYPES:
            raise ValueError(f"task config {COMPRESSION_TYPE_KEY} = {ctype!r}: expected one of {list(_TYPES)}")
        bits = config.get(COMPRESSION_BITS_KEY, 8)
        if bits not in (8, 4) or isinstance(bits, bool):
            raise ValueError(f"task config {COMPRESSION_BITS_KEY} = {bits!r}: expected 8 or 4")
        rate = config.get(COMPRESSION_SPARSE_RATE_KEY, 0.01)
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate < 1:
            raise ValueError(f"task config {COMPRESSION_SPARSE_RATE_KEY} = {rate!r}: expected a number in (0, 1)")
        warmup = config.get(COMPRESSION_WARMUP_KEY, 0)
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"task config {COMPRESSION_WARMUP_KEY} = {warmup!r}: expected an int >= 0")
        rate = kept_fraction(float(rate), warmup, context.round)
        if kind is not UpdateKind.DELTA:
            raise ValueError(f"upload compression encodes a delta, the pipeline produced {kind.value}")
        encoding = encoding_for(ctype, int(bits))  # type: ignore[arg-type]  # checked against _TYPES above
        if encoding is None:  # pragma: no cover - "none" returned above
            return update, kind
        feedback = ctype in ("topk", "topk_quantize")
        sent: list[tuple[str, Tensor | EncodedTensor]] = []
        totals: dict[str, Array] = {}  # tensor + residual, per compressed tensor (error feedback only)
        for name, value in update.items():
            if isinstance(value, SparseRows) or value.dtype.kind != "f" or value.size == 0:
                sent.append((name, value))
                continue
            total = value
            if feedback:
                total = self._with_residual(name, value)
                totals[name] = total
            sent.append((name, encode_tensor(total, encoding, self._rng, sparse_rate=float(rate))))
        clip = config.get(DP_CLIP_NORM_KEY)
        if clip is not None:
            if isinstance(clip, bool) or not isinstance(clip, int | float) or not clip > 0:
                raise ValueError(f"task config {DP_CLIP_NORM_KEY} = {clip!r}: expected a positive number")
            sent = _bound_norm(sent, float(clip))
        if feedback:
            decoded = {name: decode_tensor(v) for name, v in sent if isinstance(v, EncodedTensor)}
            self._pending = {name: np.asarray(total - decoded[name], dtype=total.dtype)
                             for name, total in totals.items()}
        return EncodedUpdate(sent), UpdateKind.QUANTIZED

    def settle(self, accepted: bool) -> None:
        """The PS's verdict on the last push: keep its residual if it was accepted, else the previous one."""
        if accepted and self._pending is not None:
            self._residual.update(self._pending)
        self._pending = None

    def _with_residual(self, name: str, value: Array) -> Array:
        residual = self._residual.get(name)
        if residual is None:
            return value
        if residual.shape != value.shape or residual.dtype != value.dtype:
            log.warning("compression: tensor %r is now %s%s (residual %s%s): its residual is dropped",
                        name, value.dtype, value.shape, residual.dtype, residual.shape)
            del self._residual[name]
            return value
        return np.asarray(value + residual, dtype=value.dtype)


def _decoded_norm(sent: list[tuple[str, Tensor | EncodedTensor]]) -> float:
    total = 0.0
    for _, value in sent:
        if isinstance(value, EncodedTensor):
            flat = decode_tensor(value).astype(np.float64).ravel()
        elif isinstance(value, SparseRows):
            flat = value.rows.astype(np.float64).ravel() if value.rows.dtype.kind == "f" else np.empty(0)
        else:
            flat = value.astype(np.float64).ravel() if value.dtype.kind == "f" else np.empty(0)
        total += float(np.dot(flat, flat))
    return math.sqrt(total)


def _scaled(value: Tensor | EncodedTensor, factor: float) -> Tensor | EncodedTensor:
    """``value`` whose decoded form is ``factor`` times as large (floating-point values only)."""
    if isinstance(value, EncodedTensor):
        parts = list(value.parts)
        # q*: scales (low, step) come before the (possibly deflated) codes; topk: values are the last part.
        target = len(parts) - 1 if value.encoding == "topk" else len(parts) - 2
        parts[target] = np.asarray(parts[target] * factor, dtype=parts[target].dtype)
        return EncodedTensor(value.dtype, value.shape, value.encoding, value.nnz, tuple(parts), value.coded_bytes)
    if isinstance(value, SparseRows):
        if value.rows.dtype.kind != "f":
            return value
        return SparseRows(value.ids, np.asarray(value.rows * factor, dtype=value.rows.dtype), value.shape)
    if value.dtype.kind != "f":
        return value
    return np.asarray(value * factor, dtype=value.dtype)


def _bound_norm(sent: list[tuple[str, Tensor | EncodedTensor]], clip: float) -> list[tuple[str, Tensor | EncodedTensor]]:
    """Scales the encoding until the decoded upload's L2 norm is at most ``clip`` (float32 rounding: a few tries)."""
    for _ in range(_MAX_RESCALES):
        norm = _decoded_norm(sent)
        if norm <= clip:
            return sent
        factor = clip / norm * _NORM_MARGIN
        sent = [(name, _scaled(value, factor)) for name, value in sent]
    norm = _decoded_norm(sent)
    if norm > clip:
        raise ValueError(f"the compressed update's norm {norm:.6g} stays above privacy.dp.clip_norm={clip:g}")
    return sent
