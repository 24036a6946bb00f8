"""LEAF FEMNIST: handwritten characters grouped by writer, in LEAF's JSON shards.

Layout (LEAF, https://leaf.cmu.edu, Caldas et al. 2018): a split folder holds
``all_data_<k>_..._{train,test}_<r>.json`` shards, each::

    {"users": [id, ...], "num_samples": [n, ...],
     "user_data": {id: {"x": [[784 floats], ...], "y": [label, ...]}}}

``x`` is a 28x28 image flattened row-major, with LEAF's convention kept as is:
floats in [0, 1] where the *background is 1.0* (ink is dark), unlike MNIST's 0.
``y`` is in 0..61: 10 digits, 26 upper-case then 26 lower-case letters.

Each writer is one natural federated client, so the loader returns a
:data:`FederatedDataset` keyed by writer id, in shard order (natural sort of the
file names) then the order of each shard's ``users`` list.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from enclavefl.errors import DataError
from enclavefl.ml.datasets.arrays import ArrayDataset, FederatedDataset

__all__ = ["LEAF_URL", "load_femnist", "load_leaf_json"]

logger = logging.getLogger(__name__)

LEAF_URL = "https://leaf.cmu.edu"
NUM_CLASSES = 62
IMAGE_SIZE = 28
# One LEAF FEMNIST shard is ~4 MB (sampled) to ~100 MB (full); json needs several
# times the file size in memory, so refuse absurd files before parsing.
DEFAULT_MAX_BYTES = 1 << 30
_HINT = f"build LEAF FEMNIST with the preprocess.sh of {LEAF_URL}"


def load_femnist(
    data_dir: str | os.PathLike[str], split: str = "train", *, max_bytes: int = DEFAULT_MAX_BYTES
) -> FederatedDataset:
    """Load every ``*.json`` shard of a LEAF FEMNIST split, one data set per writer.

    Args:
        data_dir: LEAF's ``data/femnist/data`` folder (holding ``train/`` and
            ``test/``), or the split folder itself.
        split: ``"train"`` or ``"test"``.
        max_bytes: refuse a shard larger than this.

    Returns:
        Writer id -> images ``(n, 1, 28, 28)`` float32 (background 1.0) and labels int64 in 0..61.

    Raises:
        DataError: no shard is found, a shard is malformed, or a writer appears twice.
    """
    if split not in ("train", "test"):
        raise DataError(f"FEMNIST: split must be 'train' or 'test', got {split!r}")
    root = Path(data_dir)
    folder = root / split if (root / split).is_dir() else root
    shards = sorted(folder.glob("*.json"), key=_natural_key)
    if not shards:
        raise DataError(f"FEMNIST: no *.json shard in {folder} (split {split!r}); {_HINT}")
    federated: FederatedDataset = {}
    for shard in shards:
        for user, dataset in load_leaf_json(shard, max_bytes=max_bytes).items():
            if user in federated:
                raise DataError(f"{shard}: writer {user!r} already appeared in an earlier shard")
            federated[user] = dataset
    logger.debug(
        "loaded FEMNIST %s: %d writers, %d samples from %d shards",
        split, len(federated), sum(len(d) for d in federated.values()), len(shards),
    )
    return federated


def load_leaf_json(path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES) -> FederatedDataset:
    """Read one LEAF FEMNIST JSON shard, checking every field against the format.

    Raises:
        DataError: the file is missing, too large, not JSON, or breaks the layout
            (names the key, the user and what was expected).
    """
    file = Path(path)
    try:
        size = file.stat().st_size
        if size > max_bytes:
            raise DataError(f"{file}: {size} bytes is above the limit of {max_bytes}")
        with file.open("rb") as fh:
            doc = json.load(fh, parse_constant=_refuse_constant)
    except FileNotFoundError as exc:
        raise DataError(f"{file}: file not found; {_HINT}") from exc
    except OSError as exc:
        raise DataError(f"{file}: cannot read ({exc}); {_HINT}") from exc
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, NaN
        raise DataError(f"{file}: not valid LEAF JSON ({exc}); {_HINT}") from exc
    try:
        return _parse(file, doc)
    except DataError as exc:
        raise DataError(f"{exc}; {_HINT}") from exc


def _parse(file: Path, doc: Any) -> FederatedDataset:
    if not isinstance(doc, dict):
        raise DataError(f"{file}: expected a JSON object, got {type(doc).__name__}")
    missing = [k for k in ("users", "num_samples", "user_data") if k not in doc]
    if missing:
        raise DataError(f"{file}: missing key(s) {missing}; expected users, num_samples, user_data")
    users, counts, user_data = doc["users"], doc["num_samples"], doc["user_data"]
    if not isinstance(users, list) or not all(isinstance(u, str) for u in users):
        raise DataError(f"{file}: 'users' must be a list of strings")
    if not isinstance(counts, list) or not all(type(n) is int and n >= 0 for n in counts):
        raise DataError(f"{file}: 'num_samples' must be a list of non-negative ints")
    if len(users) != len(counts):
        raise DataError(f"{file}: {len(users)} users but {len(counts)} num_samples entries")
    if len(set(users)) != len(users):
        raise DataError(f"{file}: 'users' lists a writer twice")
    if not isinstance(user_data, dict):
        raise DataError(f"{file}: 'user_data' must be an object")
    extra = set(user_data) - set(users)
    if extra:
        raise DataError(f"{file}: user_data has writers not in 'users': {sorted(extra)[:5]}")
    return {user: _parse_user(file, user, count, user_data.get(user)) for user, count in zip(users, counts)}


def _parse_user(file: Path, user: str, count: int, entry: Any) -> ArrayDataset:
    where = f"{file}: user_data[{user!r}]"
    if not isinstance(entry, dict) or "x" not in entry or "y" not in entry:
        raise DataError(f"{where}: expected an object with 'x' and 'y'")
    xs, ys = entry["x"], entry["y"]
    if not isinstance(xs, list) or not isinstance(ys, list):
        raise DataError(f"{where}: 'x' and 'y' must be lists")
    if len(xs) != count or len(ys) != count:
        raise DataError(f"{where}: num_samples says {count}, found {len(xs)} x and {len(ys)} y")
    pixels = IMAGE_SIZE * IMAGE_SIZE
    for i, row in enumerate(xs):
        if not isinstance(row, list) or len(row) != pixels:
            found = len(row) if isinstance(row, list) else type(row).__name__
            raise DataError(f"{where}.x[{i}]: expected {pixels} values, found {found}")
    x = _numeric(where + ".x", xs, (count, pixels), "f")
    if not np.isfinite(x).all():
        raise DataError(f"{where}.x: values must be finite")
    y = _numeric(where + ".y", ys, (count,), "i")
    if y.size and (int(y.min()) < 0 or int(y.max()) >= NUM_CLASSES):
        raise DataError(
            f"{where}.y: labels must be in 0..{NUM_CLASSES - 1}, found {int(y.min())}..{int(y.max())}"
        )
    images = x.astype(np.float32).reshape(count, 1, IMAGE_SIZE, IMAGE_SIZE)
    return ArrayDataset(x=images, y=y.astype(np.int64))


def _numeric(where: str, values: list[Any], shape: tuple[int, ...], kind: str) -> np.ndarray[Any, Any]:
    """Convert JSON numbers to an array, refusing strings, bools and nulls.

    ``kind`` "f" admits ints and floats, "i" admits ints only.
    """
    if shape[0] == 0:
        return np.zeros(shape, dtype=np.float64 if kind == "f" else np.int64)
    array = np.asarray(values)
    allowed = "iuf" if kind == "f" else "iu"
    if array.shape != shape or array.dtype.kind not in allowed:
        expected = "numbers" if kind == "f" else "integers"
        raise DataError(f"{where}: expected {expected} of shape {shape}, got {array.dtype} {array.shape}")
    return array


def _refuse_constant(name: str) -> float:
    raise ValueError(f"non-finite number {name} in JSON")


def _natural_key(path: Path) -> list[int | str]:
    """Sort ``all_data_10`` after ``all_data_2``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]
