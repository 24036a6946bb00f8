"""Per-client state that outlives a round in a simulation: one tensor file per client id.

A deployed worker keeps its SCAFFOLD variate ``c_i`` in memory for the whole
job. A simulated client exists only while a pool process runs its round, so
the driver keeps the variate for it, here, between rounds: on disk in the run
directory (a thousand variates of a 1M-parameter model are 4 GB, which must
not sit in the server's memory), written only when the PS accepted the
round's update, as a worker rolls its variate back otherwise. Because the
store is in the run directory, a resumed simulation continues with the
variates its clients had, as workers that outlived a PS restart would.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import final

from enclavefl.errors import CheckpointError, ProtocolError
from enclavefl.tensors import ParamSet, read_params, write_params

__all__ = ["ClientStateStore"]


@final
class ClientStateStore:
    """Client ``i``'s state as ``<root>/client-<i>.params``, replaced atomically; only the driver writes it."""

    def __init__(self, root: Path) -> None:
        self._root = root

    @property
    def root(self) -> Path:
        return self._root

    def _path(self, index: int) -> Path:
        return self._root / f"client-{index:06d}.params"

    def load(self, index: int) -> ParamSet | None:
        """Client ``index``'s state, or None if it has none yet.

        Raises:
            CheckpointError: the file is not a readable tensor file.
        """
        path = self._path(index)
        try:
            with path.open("rb") as f:
                return read_params(f)
        except FileNotFoundError:
            return None
        except (OSError, ProtocolError) as exc:
            raise CheckpointError(f"client state {path}: {exc}") from exc

    def save(self, index: int, state: ParamSet) -> None:
        """Replaces client ``index``'s state (a reader sees the old file or the new one).

        Raises:
            CheckpointError: the file cannot be written (the temporary file is removed).
        """
        self._root.mkdir(parents=True, exist_ok=True)
        path = self._path(index)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with tmp.open("wb") as f:
                write_params(f, state)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise CheckpointError(f"client state {path}: cannot write: {exc}") from exc
