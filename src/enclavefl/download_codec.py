"""What a model download may carry besides dense tensors: 8-bit blocks, and the rows changed since a version.

How this works: a download is an ordinary :class:`~enclavefl.tensors.ParamSet`
stream, so the transport carries it unchanged; two conventions give some of its
tensors another meaning, and the worker resolves them with
:func:`resolve_download` before it trains.

- **Quantized tensors** (``privacy.compression.download.type: quantize``). A
  float32 or float64 tensor ``name`` travels as ``uint8`` codes of the same shape,
  followed by ``download.q/<name>``: one ``(lo, step)`` pair per block of
  :data:`QUANT_BLOCK` consecutive values (row-major), in the tensor's own dtype.
  Code ``q`` stands for ``lo + q * step``; codes are the nearest (deterministic
  rounding, half to even), so each value is off by at most ``step / 2``, where
  ``step = (max - min) / 255`` of its block (block-wise quantization as in
  Dettmers et al. 2022, with a linear min-max code). The PS keeps full precision; only
  the broadcast is rounded. A block costs 1024 bytes of codes plus two values, so
  a float32 tensor travels about 3.97x smaller. Tensors below
  :data:`QUANT_MIN_VALUES` values, and any other dtype, stay dense.
- **Changed rows** (``transport.sparse_downloads``). A model tensor sent as
  ``sparse_rows`` holds only the rows that changed after the version the worker
  said it holds (``PullRequest.model_version``); every other row is as in the
  worker's copy of that version. Uploads of embedding tables use the same
  encoding; a DLRM (Naumov et al. 2019) changes only the rows its workers looked up.

Nothing here trusts the stream: every quantized tensor needs its block
parameters of the exact shape and a finite value, and every changed-rows tensor
needs a cached tensor of the same dense shape and dtype; anything else is a
:class:`~enclavefl.errors.ProtocolError`. Row ids were checked (strictly
increasing, in range) by the stream decoder already.
"""

from __future__ import annotations

import math
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from enclavefl.errors import ProtocolError
from enclavefl.tensors import ParamSet, SparseRows, Tensor

__all__ = [
    "NO_MODEL",
    "QUANT_BLOCK",
    "QUANT_MIN_VALUES",
    "QUANT_PARAMS_PREFIX",
    "dequantize",
    "quantize",
    "quantize_download",
    "resolve_download",
]

Array = npt.NDArray[Any]

NO_MODEL: Final = -1
"""The version a worker announces (``PullRequest.model_version``) when it holds no model of the PS instance."""

QUANT_PARAMS_PREFIX: Final = "download.q/"
"""A quantized tensor ``name`` is followed by ``download.q/<name>``: its ``(lo, step)`` per block."""

QUANT_BLOCK: Final = 1024
"""Values per quantization block (row-major over the flattened tensor; the last block may be shorter)."""

QUANT_MIN_VALUES: Final = 1024
"""Tensors with fewer values stay dense: their bytes do not matter, their precision may (biases, norms)."""

_LEVELS: Final = 255  # 8-bit codes 0..255
_CHUNK_BLOCKS: Final = 256  # blocks quantized at a time: 256 Ki values, 2 MiB of float64 temporaries
_QUANTIZED_DTYPES: Final = (np.dtype("<f4"), np.dtype("<f8"))


def quantize(values: Array) -> tuple[Array, Array] | None:
    """8-bit codes and per-block ``(lo, step)`` of a float32 or float64 array.

    Works through :data:`_CHUNK_BLOCKS` blocks at a time, so its temporaries stay a
    few MiB whatever the tensor's size.

    Returns:
        ``(codes, params)``: codes uint8 of ``values.shape``; params of ``values.dtype``,
        shape ``(ceil(size / QUANT_BLOCK), 2)``. None when the array cannot be quantized
        (another dtype, no values, a value that is not finite, or a block so wide its
        step is not finite): it then travels dense.
    """
    if values.dtype not in _QUANTIZED_DTYPES or values.size == 0:
        return None
    flat = np.ascontiguousarray(values).reshape(-1)
    blocks = math.ceil(flat.size / QUANT_BLOCK)
    codes = np.empty(flat.size, dtype=np.uint8)
    params = np.empty((blocks, 2), dtype=values.dtype)
    for first in range(0, blocks, _CHUNK_BLOCKS):
        last = min(first + _CHUNK_BLOCKS, blocks)
        start, stop = first * QUANT_BLOCK, min(last * QUANT_BLOCK, flat.size)
        if not _quantize_chunk(flat[start:stop], codes[start:stop], params[first:last]):
            return None
    return codes.reshape(values.shape), params


def _quantize_chunk(chunk: Array, codes: Array, params: Array) -> bool:
    """Fills ``codes`` and ``params`` (rows: blocks of ``chunk``); False if a value or a step is not finite."""
    blocks = params.shape[0]
    grid = np.empty(blocks * QUANT_BLOCK, dtype=np.float64)  # float64, so max - min cannot overflow
    grid[: chunk.size] = chunk
    grid[chunk.size :] = chunk[-1]  # padding repeats a real value: it changes no block's range
    grid = grid.reshape(blocks, QUANT_BLOCK)  # (blocks, B)
    if not np.isfinite(grid).all():
        return False
    lo = grid.min(axis=1)
    step = (grid.max(axis=1) - lo) / _LEVELS  # (blocks,)
    # Stored in the tensor's dtype; the codes are computed against the stored values, so decoding matches.
    params[:, 0] = lo
    params[:, 1] = step
    if not np.isfinite(params).all():
        return False
    stored_lo = params[:, 0].astype(np.float64)[:, None]
    stored_step = params[:, 1].astype(np.float64)
    grid -= stored_lo
    grid /= np.where(stored_step > 0, stored_step, 1.0)[:, None]
    np.rint(grid, out=grid)
    np.clip(grid, 0, _LEVELS, out=grid)
    codes[:] = grid.reshape(-1)[: codes.size]
    return True


def dequantize(codes: Array, params: Array, where: str = "tensor") -> Array:
    """The values ``lo + code * step`` that :func:`quantize`'s output stands for, in ``params``' dtype.

    Raises:
        ProtocolError: codes are not uint8, params are not float32/float64 of shape
            ``(ceil(codes.size / QUANT_BLOCK), 2)``, or a parameter is not finite.
    """
    if codes.dtype != np.uint8:
        raise ProtocolError(f"{where}: quantized codes must be uint8, got {codes.dtype}")
    blocks = math.ceil(codes.size / QUANT_BLOCK)
    if params.dtype not in _QUANTIZED_DTYPES or params.shape != (blocks, 2):
        raise ProtocolError(f"{where}: block parameters must be float32 or float64 of shape {(blocks, 2)} "
                            f"for {codes.size} values, got {params.dtype} {params.shape}")
    if not np.isfinite(params).all():
        raise ProtocolError(f"{where}: a block parameter is not finite")
    flat = np.ascontiguousarray(codes).reshape(-1)
    out = np.empty(flat.size, dtype=params.dtype)
    full = flat.size // QUANT_BLOCK  # whole blocks: (full, B) against (full, 1) parameters
    grid = out[: full * QUANT_BLOCK].reshape(full, QUANT_BLOCK)
    np.multiply(flat[: full * QUANT_BLOCK].reshape(full, QUANT_BLOCK), params[:full, 1:2], out=grid)
    grid += params[:full, 0:1]
    if full < blocks:  # the shorter last block
        out[full * QUANT_BLOCK :] = params[full, 0] + flat[full * QUANT_BLOCK :].astype(params.dtype) * params[full, 1]
    return out.reshape(codes.shape)


def quantize_download(params: ParamSet) -> ParamSet:
    """The download of ``params`` with every large float32/float64 dense tensor quantized (see module doc).

    The result shares the arrays of the tensors it leaves as they are.
    """
    out: list[tuple[str, Tensor]] = []
    for name, value in params.items():
        if isinstance(value, np.ndarray) and value.size >= QUANT_MIN_VALUES and not name.startswith(QUANT_PARAMS_PREFIX):
            coded = quantize(value)
            if coded is not None:
                out.append((name, coded[0]))
                out.append((f"{QUANT_PARAMS_PREFIX}{name}", coded[1]))
                continue
        out.append((name, value))
    return ParamSet(out)


def _dequantize_all(download: ParamSet) -> ParamSet:
    names = list(download)
    out: list[tuple[str, Tensor]] = []
    for i, name in enumerate(names):
        value = download[name]
        if name.startswith(QUANT_PARAMS_PREFIX):
            owner = name[len(QUANT_PARAMS_PREFIX):]
            if i == 0 or names[i - 1] != owner:
                raise ProtocolError(f"download: {name!r} does not follow the tensor {owner!r} it describes")
            continue
        following = names[i + 1] if i + 1 < len(names) else ""
        if following == f"{QUANT_PARAMS_PREFIX}{name}":
            params = download[following]
            if isinstance(value, SparseRows) or isinstance(params, SparseRows):
                raise ProtocolError(f"download: quantized tensor {name!r} and its block parameters must be dense")
            out.append((name, dequantize(value, params, f"download tensor {name!r}")))
        else:
            out.append((name, value))
    return ParamSet(out)


def _apply_rows(name: str, rows: SparseRows, base: ParamSet | None, base_version: int) -> Array:
    if base is None:
        raise ProtocolError(f"download: tensor {name!r} holds changed rows, but this worker holds no model "
                            f"(it asked for a full download)")
    old = base.get(name)
    if not isinstance(old, np.ndarray):
        raise ProtocolError(f"download: tensor {name!r} holds rows changed since version {base_version}, "
                            "which this worker's copy does not have as a dense tensor")
    if old.shape != rows.shape or old.dtype != rows.rows.dtype:
        raise ProtocolError(f"download: tensor {name!r}: changed rows of {rows.rows.dtype} {rows.shape}, but the "
                            f"copy of version {base_version} is {old.dtype} {old.shape}")
    new = old.copy()  # copy on write: the old copy may still be a round's reference model
    new[rows.ids] = rows.rows
    return new


def resolve_download(download: ParamSet, base: ParamSet | None, base_version: int) -> ParamSet:
    """The full model a download stands for: quantized tensors decoded, changed rows applied to ``base``.

    Args:
        download: what the PS sent, as decoded from the stream.
        base: the model of ``base_version`` that the worker told the PS it holds, or None
            (it asked for a full download).
        base_version: its version, for messages.

    Returns:
        Every tensor of ``download`` in its order, dense; block parameters removed. Arrays of
        ``base`` are never written to.

    Raises:
        ProtocolError: the download does not follow the conventions of the module doc, or
            holds changed rows that do not fit ``base``.
    """
    plain = _dequantize_all(download)
    if not any(isinstance(value, SparseRows) for value in plain.values()):
        return plain
    return ParamSet(
        (name, _apply_rows(name, value, base, base_version) if isinstance(value, SparseRows) else value)
        for name, value in plain.items()
    )
