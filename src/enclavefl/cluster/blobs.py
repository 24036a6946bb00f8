"""What a cluster stores as bytes: the model, and the close's state (the strategy's parts and the metrics rows).

How this works: the model is a tensor file (:func:`enclavefl.tensors.write_params`);
the close's state is the JSON-plus-arrays format of
:mod:`enclavefl.server.partials` under its own magic: the JSON holds the round
it closed, the job's metrics rows so far and each stateful part's JSON state, the arrays
hold each part's tensors, named ``<part>/<tensor>`` as a checkpoint names them.
Neither is pickled; both are sealed by a :class:`~enclavefl.cluster.sealing.SealedStore`
before they reach Redis. A server that picks up a new model version loads the
parts from it, so any server can be the next leader with the same optimizer
moments, control variates and history; a server that joined late, or a
restarted scheduler, gets the rows it missed (a few hundred bytes per round).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from enclavefl.errors import ProtocolError, UpdateRejected
from enclavefl.server.partials import decode_partial, encode_partial
from enclavefl.server.state import PartState
from enclavefl.tensors import CodecLimits, ParamSet, read_params, write_params

__all__ = ["CloseState", "decode_close_state", "decode_model", "encode_close_state", "encode_model"]

STATE_MAGIC: Final = b"EFLSTAT1"


def encode_model(params: ParamSet) -> bytes:
    """The model as a tensor file's bytes."""
    out = io.BytesIO()
    write_params(out, params)
    return out.getvalue()


def decode_model(blob: bytes, limits: CodecLimits = CodecLimits()) -> ParamSet:
    """The model in a blob of :func:`encode_model`.

    Raises:
        ProtocolError: not a tensor file, truncated, trailing bytes, or over ``limits``.
    """
    return read_params(io.BytesIO(blob), limits)


@dataclass(frozen=True, slots=True)
class CloseState:
    """What a round's close leaves besides the model: every server loads it with the new version."""

    round: int
    """The round whose close made this state (0: the job's first model)."""
    history: tuple[Mapping[str, Any], ...]
    """The job's metrics rows up to that round, oldest first (none for the first model)."""
    parts: Mapping[str, PartState]

    def rows_after(self, round_: int) -> list[dict[str, Any]]:
        """The rows of rounds after ``round_`` (what a node that has seen up to ``round_`` lacks)."""
        return [dict(r) for r in self.history if isinstance(r.get("round"), int) and r["round"] > round_]


def encode_close_state(state: CloseState) -> bytes:
    """``state`` as bytes.

    Raises:
        ValueError: a part's name is empty or holds '/', or its JSON state is not JSON (NaN included).
    """
    metas: dict[str, Any] = {}
    arrays: list[tuple[str, Any]] = []
    for name, part in state.parts.items():
        if not name or "/" in name:
            raise ValueError(f"part name {name!r} must be non-empty and without '/'")
        metas[name] = {"meta": dict(part.meta), "tensors": list(part.tensors)}
        arrays.extend((f"{name}/{tensor}", value) for tensor, value in part.tensors.items())
    meta = {"round": state.round, "history": [dict(r) for r in state.history], "parts": metas}
    return encode_partial(meta, ParamSet(arrays), magic=STATE_MAGIC)


def decode_close_state(blob: bytes, limits: CodecLimits = CodecLimits()) -> CloseState:
    """The state in a blob of :func:`encode_close_state`.

    Raises:
        ProtocolError: the blob breaks the format, or its JSON does not describe its arrays.
    """
    try:
        meta, arrays = decode_partial(blob, limits, magic=STATE_MAGIC)
    except UpdateRejected as exc:
        raise ProtocolError(f"cluster strategy state: {exc}") from exc
    round_, history, metas = meta.get("round"), meta.get("history"), meta.get("parts")
    if (not isinstance(round_, int) or round_ < 0 or not isinstance(history, list)
            or not all(isinstance(r, dict) for r in history) or not isinstance(metas, dict)):
        raise ProtocolError("cluster strategy state: expected round (int >= 0), history (a list of objects) "
                            "and parts (an object)")
    parts: dict[str, PartState] = {}
    used: set[str] = set()
    for name, entry in metas.items():
        if (not isinstance(entry, dict) or not isinstance(entry.get("meta"), dict)
                or not isinstance(entry.get("tensors"), list)):
            raise ProtocolError(f"cluster strategy state: part {name!r} is malformed")
        keys = [f"{name}/{tensor}" for tensor in entry["tensors"]]
        missing = [k for k in keys if k not in arrays]
        if missing:
            raise ProtocolError(f"cluster strategy state: part {name!r} lacks tensor {missing[0]!r}")
        used.update(keys)
        parts[name] = PartState(entry["meta"], ParamSet((t, arrays[k]) for t, k in zip(entry["tensors"], keys)))
    extra = sorted(set(arrays) - used)
    if extra:
        raise ProtocolError(f"cluster strategy state: tensor {extra[0]!r} belongs to no part")
    return CloseState(round_, tuple(history), parts)
