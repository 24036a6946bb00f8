"""Criteo Display Advertising Challenge click logs (Kaggle, 2014), original TSV.

Layout (https://ailab.criteo.com/ressources/): one impression per line, fields
separated by tabs, a missing value is an empty field.

* ``train.txt``: label (0/1 click), 13 integer features I1..I13 (counts, may be
  negative), 26 categorical features C1..C26 (32-bit hashes as 8 hex digits):
  40 fields.
* ``test.txt``: the same without the label: 39 fields.

Encoding, as in the DLRM reference preprocessing (Naumov et al. 2019):

* dense: ``log(1 + max(x, 0))`` as float32; empty -> 0.
* categorical: per column, ``1 + int(hex, 16) % (table_size - 1)``, so index 0
  is reserved for "missing" and every index fits an embedding table of
  ``table_size`` rows. Deterministic, with no vocabulary pass over the data.
"""

from __future__ import annotations

import logging
import math
import os
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from enclavefl.errors import ConfigError, DataError

__all__ = ["CRITEO_URL", "NUM_CATEGORICAL", "NUM_DENSE", "CriteoData", "iter_criteo", "load_criteo"]

logger = logging.getLogger(__name__)

CRITEO_URL = "https://ailab.criteo.com/ressources/"
NUM_DENSE = 13
NUM_CATEGORICAL = 26
MISSING_INDEX = 0
_HINT = f"get the Kaggle Display Advertising Challenge data from {CRITEO_URL}"


@dataclass(frozen=True, slots=True, eq=False)
class CriteoData:
    """Encoded Criteo rows, aligned along axis 0.

    Attributes:
        dense: float32 ``(N, 13)``, ``log(1 + max(x, 0))``.
        categorical: int64 ``(N, 26)``, indices in ``[0, table_size)``; 0 means missing.
        labels: float32 ``(N,)`` of 0/1 clicks, or None for the unlabelled test format.
        table_size: rows of each embedding table the indices were hashed into.
    """

    dense: npt.NDArray[np.float32]
    categorical: npt.NDArray[np.int64]
    labels: npt.NDArray[np.float32] | None
    table_size: int

    def __post_init__(self) -> None:
        n = self.dense.shape[0]
        if self.dense.shape != (n, NUM_DENSE) or self.categorical.shape != (n, NUM_CATEGORICAL):
            raise DataError(
                f"CriteoData: expected dense (N, {NUM_DENSE}) and categorical (N, {NUM_CATEGORICAL}), "
                f"got {self.dense.shape} and {self.categorical.shape}"
            )
        if self.labels is not None and self.labels.shape != (n,):
            raise DataError(f"CriteoData: expected labels of shape ({n},), got {self.labels.shape}")

    def __len__(self) -> int:
        return int(self.dense.shape[0])

    @property
    def embedding_sizes(self) -> list[int]:
        """Rows per embedding table, as ``DLRM(embedding_sizes=...)`` expects."""
        return [self.table_size] * NUM_CATEGORICAL

    def subset(self, indices: npt.ArrayLike) -> CriteoData:
        """Return the rows at ``indices`` (one worker's share).

        Raises:
            DataError: if ``indices`` is not 1-D integer or out of range.
        """
        idx = np.asarray(indices)
        if idx.size == 0:
            idx = idx.astype(np.int64)
        if idx.ndim != 1 or idx.dtype.kind not in "iu":
            raise DataError(f"subset: expected 1-D integer indices, got {idx.dtype} {idx.shape}")
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise DataError(f"subset: indices must lie in [0, {len(self)})")
        labels = None if self.labels is None else self.labels[idx]
        return CriteoData(self.dense[idx], self.categorical[idx], labels, self.table_size)


def load_criteo(
    path: str | os.PathLike[str],
    *,
    table_size: int = 100_000,
    has_label: bool = True,
    max_rows: int | None = None,
) -> CriteoData:
    """Read and encode a Criteo TSV file (``train.txt`` or ``test.txt`` layout).

    Rows are read as a stream into compact buffers; pass ``max_rows`` to bound
    memory on the full 45-million-line file, or use :func:`iter_criteo` to
    handle a file block by block.

    Args:
        path: the TSV file.
        table_size: rows per embedding table (>= 2; index 0 is "missing").
        has_label: True for the 40-field train format, False for the 39-field test format.
        max_rows: stop after this many rows (None: read all).

    Raises:
        ConfigError: ``table_size`` < 2 or ``max_rows`` < 0.
        DataError: missing file, or a row with the wrong field count or a bad
            value (names file:line and the field).
    """
    # With block_rows=None the reader yields exactly one block, empty for an empty file.
    return next(iter_criteo(path, table_size=table_size, has_label=has_label, max_rows=max_rows, block_rows=None))


def iter_criteo(
    path: str | os.PathLike[str],
    *,
    table_size: int = 100_000,
    has_label: bool = True,
    max_rows: int | None = None,
    block_rows: int | None = 1_000_000,
) -> Iterator[CriteoData]:
    """Read and encode a Criteo TSV file in blocks of ``block_rows`` rows (None: one block).

    Scoring the 6-million-line ``test.txt`` this way holds one block of
    features at a time. Arguments and errors as in :func:`load_criteo`; errors
    name the line in the whole file.
    """
    if table_size < 2:
        raise ConfigError(f"load_criteo: table_size must be >= 2 (index 0 is reserved), got {table_size}")
    if max_rows is not None and max_rows < 0:
        raise ConfigError(f"load_criteo: max_rows must be >= 0, got {max_rows}")
    if block_rows is not None and block_rows < 1:
        raise ConfigError(f"iter_criteo: block_rows must be >= 1, got {block_rows}")
    file = Path(path)
    offset = 1 if has_label else 0
    expected = offset + NUM_DENSE + NUM_CATEGORICAL
    buckets = table_size - 1
    labels, dense, categorical = array("f"), array("f"), array("q")
    rows = total = 0

    def block() -> CriteoData:
        return CriteoData(
            dense=np.frombuffer(dense, dtype=np.float32).reshape(rows, NUM_DENSE).copy(),
            categorical=np.frombuffer(categorical, dtype=np.int64).reshape(rows, NUM_CATEGORICAL).copy(),
            labels=np.frombuffer(labels, dtype=np.float32).copy() if has_label else None,
            table_size=table_size,
        )

    try:
        with file.open("rb") as fh:
            for lineno, line in enumerate(fh, start=1):
                if max_rows is not None and total >= max_rows:
                    break
                fields = line.rstrip(b"\r\n").split(b"\t")
                if len(fields) != expected:
                    raise DataError(
                        f"{file}:{lineno}: expected {expected} tab-separated fields "
                        f"({'label, ' if has_label else ''}{NUM_DENSE} integer, {NUM_CATEGORICAL} "
                        f"categorical), got {len(fields)}; {_HINT}"
                    )
                try:
                    column = 0
                    if has_label:
                        label = fields[0]
                        if label not in (b"0", b"1"):
                            raise ValueError(f"label must be 0 or 1, got {label[:20]!r}")
                        labels.append(1.0 if label == b"1" else 0.0)
                    for column in range(offset, offset + NUM_DENSE):
                        raw = fields[column]
                        dense.append(math.log1p(max(int(raw), 0)) if raw else 0.0)
                    for column in range(offset + NUM_DENSE, expected):
                        raw = fields[column]
                        if not raw:
                            categorical.append(MISSING_INDEX)
                        elif len(raw) > 16:
                            raise ValueError(f"categorical value too long ({len(raw)} bytes)")
                        else:
                            categorical.append(1 + int(raw, 16) % buckets)
                except ValueError as exc:
                    raise DataError(
                        f"{file}:{lineno}: field {column + 1} ({_field_name(column, has_label)}): "
                        f"{exc}; {_HINT}"
                    ) from exc
                rows += 1
                total += 1
                if rows == block_rows:
                    yield block()
                    labels, dense, categorical = array("f"), array("f"), array("q")
                    rows = 0
    except FileNotFoundError as exc:
        raise DataError(f"{file}: file not found; {_HINT}") from exc
    except OSError as exc:
        raise DataError(f"{file}: cannot read ({exc}); {_HINT}") from exc
    logger.debug("read Criteo %s: %d rows, table_size %d", file, total, table_size)
    if rows or block_rows is None:
        yield block()


def _field_name(column: int, has_label: bool) -> str:
    index = column - (1 if has_label else 0)
    if index < 0:
        return "label"
    if index < NUM_DENSE:
        return f"I{index + 1}"
    return f"C{index - NUM_DENSE + 1}"
