"""Atomic checkpoints: raw tensors plus a JSON header, never pickle.

A checkpoint file is ``EFLCKPT1``, the length of a JSON metadata block (u64,
little-endian), the metadata (round, model version, metrics history, and the
JSON part of each stateful server part's state), then the parameters in the
tensor file format of :mod:`enclavefl.tensors`. The tensors of the parts'
state (optimizer moments, control variates, ...) follow the model's in the same
tensor file, named ``@state/<part>/<tensor>``; the metadata says how many
tensors belong to the model. It is written
to a temporary file, fsynced and renamed, so a crash leaves either the old
checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from enclavefl.errors import CheckpointError, ProtocolError
from enclavefl.server.state import PartState
from enclavefl.tensors import CodecLimits, ParamSet, iter_chunks, read_params, write_params

__all__ = ["Checkpoint", "latest_checkpoint", "list_checkpoints", "load_checkpoint", "params_digest", "save_checkpoint"]

MAGIC = b"EFLCKPT1"
MAX_META_BYTES = 256 * 2**20
_STATE_PREFIX = "@state/"
_NAME = re.compile(r"^round-(\d{6,})\.ckpt$")


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The state a PS needs to continue: the last completed round and its model."""

    round: int
    model_version: int
    params: ParamSet
    history: list[dict[str, Any]] = field(default_factory=list)
    path: Path | None = None
    parts: dict[str, PartState] = field(default_factory=dict)
    """State of the stateful server parts by name (``optimizer``, ``algorithm``, ``engine``)."""


def _pack(ckpt: Checkpoint) -> tuple[ParamSet, dict[str, Any]]:
    """The model and every part's tensors as one ParamSet, and the parts' JSON metadata."""
    items = list(ckpt.params.items())
    metas: dict[str, Any] = {}
    for part, state in ckpt.parts.items():
        if "/" in part or not part:
            raise CheckpointError(f"checkpoint part name {part!r} must be non-empty and without '/'")
        metas[part] = {"meta": dict(state.meta), "tensors": list(state.tensors)}
        items.extend((f"{_STATE_PREFIX}{part}/{name}", value) for name, value in state.tensors.items())
    return ParamSet(items), metas


def _unpack(path: Path, combined: ParamSet, model_tensors: int, metas: Any) -> tuple[ParamSet, dict[str, PartState]]:
    names = list(combined)
    if not 0 <= model_tensors <= len(names) or not isinstance(metas, dict):
        raise CheckpointError(f"{path}: metadata does not describe its tensors (model_tensors={model_tensors})")
    params = ParamSet((n, combined[n]) for n in names[:model_tensors])
    parts: dict[str, PartState] = {}
    rest = set(names[model_tensors:])
    for part, entry in metas.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("meta"), dict) or not isinstance(entry.get("tensors"), list):
            raise CheckpointError(f"{path}: state of part {part!r} is malformed")
        keys = [f"{_STATE_PREFIX}{part}/{t}" for t in entry["tensors"]]
        missing = [k for k in keys if k not in rest]
        if missing:
            raise CheckpointError(f"{path}: state of part {part!r} lacks tensor {missing[0]!r}")
        rest.difference_update(keys)
        parts[part] = PartState(entry["meta"], ParamSet((t, combined[k]) for t, k in zip(entry["tensors"], keys)))
    if rest:
        raise CheckpointError(f"{path}: tensor {sorted(rest)[0]!r} belongs to no model or part")
    return params, parts


def params_digest(params: ParamSet) -> str:
    """SHA-256 of the parameters' wire payload (names and shapes included)."""
    h = hashlib.sha256()
    for spec in params.specs():
        h.update(f"{spec.name}|{spec.dtype}|{spec.shape}|{spec.encoding};".encode())
    for chunk in iter_chunks(params, 4 * 2**20):
        h.update(chunk)
    return h.hexdigest()


def save_checkpoint(directory: Path, ckpt: Checkpoint, *, keep: int = 3) -> Path:
    """Writes ``round-NNNNNN.ckpt`` atomically and prunes all but the newest ``keep``.

    Raises:
        CheckpointError: the directory cannot be written (the previous checkpoint survives).
    """
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"round-{ckpt.round:06d}.ckpt"
    combined, metas = _pack(ckpt)
    meta = json.dumps(
        {
            "round": ckpt.round,
            "model_version": ckpt.model_version,
            "digest": params_digest(ckpt.params),
            "history": ckpt.history,
            "model_tensors": len(ckpt.params),
            "parts": metas,
        },
        separators=(",", ":"),
    ).encode()
    fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".ckpt", dir=directory)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + struct.pack("<Q", len(meta)) + meta)
            write_params(f, combined)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"{final}: cannot write checkpoint: {exc.strerror or exc}") from exc
    for old in sorted(list_checkpoints(directory))[:-keep]:
        old[1].unlink(missing_ok=True)
    return final


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """The checkpoint files in ``directory`` as (round, path), oldest first; empty when there is none."""
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _NAME.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def load_checkpoint(path: Path, limits: CodecLimits = CodecLimits()) -> Checkpoint:
    """Reads and checks one checkpoint file.

    Raises:
        CheckpointError: the file is unreadable, truncated, or its digest does not match.
    """
    try:
        with path.open("rb") as f:
            head = f.read(len(MAGIC) + 8)
            if len(head) != len(MAGIC) + 8 or head[: len(MAGIC)] != MAGIC:
                raise CheckpointError(f"{path}: not an enclavefl checkpoint (bad magic)")
            (meta_len,) = struct.unpack("<Q", head[len(MAGIC):])
            if meta_len > MAX_META_BYTES:
                raise CheckpointError(f"{path}: metadata block of {meta_len} bytes exceeds {MAX_META_BYTES}")
            raw = f.read(meta_len)
            if len(raw) != meta_len:
                raise CheckpointError(f"{path}: truncated metadata ({len(raw)} of {meta_len} bytes)")
            meta = json.loads(raw)
            combined = read_params(f, limits)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint: {exc.strerror or exc}") from exc
    except (ProtocolError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt checkpoint: {exc}") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("round"), int) or not isinstance(meta.get("history"), list):
        raise CheckpointError(f"{path}: metadata lacks round/history")
    version = meta.get("model_version", meta["round"])
    if not isinstance(version, int) or not all(isinstance(row, dict) for row in meta["history"]):
        raise CheckpointError(f"{path}: metadata has a non-integer model_version or a history row that is not an object")
    model_tensors = meta.get("model_tensors", len(combined))
    if not isinstance(model_tensors, int):
        raise CheckpointError(f"{path}: metadata has a non-integer model_tensors")
    params, parts = _unpack(path, combined, model_tensors, meta.get("parts", {}))
    digest = params_digest(params)
    if meta.get("digest") != digest:
        raise CheckpointError(f"{path}: parameter digest {digest[:16]} does not match the recorded {str(meta.get('digest'))[:16]}")
    return Checkpoint(
        round=meta["round"],
        model_version=version,
        params=params,
        history=meta["history"],
        path=path,
        parts=parts,
    )


def latest_checkpoint(directory: Path, limits: CodecLimits = CodecLimits()) -> Checkpoint | None:
    """The newest checkpoint in ``directory``, or None if there is none.

    Raises:
        CheckpointError: the newest checkpoint is corrupt (it is not silently skipped).
    """
    found = list_checkpoints(directory)
    if not found:
        return None
    return load_checkpoint(found[-1][1], limits)
