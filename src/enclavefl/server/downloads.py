"""What one worker downloads: the model dense, 8-bit quantized, or only the rows changed since its copy.

How this works: :meth:`ParameterServer.model_for` hands the broadcast (the
model plus what the client algorithm adds) to :meth:`DownloadPolicy.encode`
with the version the worker says it holds (``PullRequest.model_version``; -1:
none). With ``transport.sparse_downloads`` on, each tensor the
:class:`~enclavefl.server.row_versions.RowVersions` tracks goes as the rows
changed after that version (``sparse_rows``), unless the worker is more than
``max_behind_versions`` behind or more than ``max_diff_fraction`` of the rows
changed, when it goes dense; every other tensor goes dense. With
``privacy.compression.download.type: quantize``, :meth:`DownloadPolicy.compress`
then quantizes the broadcast (:func:`~enclavefl.download_codec.quantize_download`)
outside the PS lock, once per model version, shared by every download of it.
The worker resolves both with :func:`~enclavefl.download_codec.resolve_download`.

The tracker learns of each new model from :meth:`DownloadPolicy.on_install`,
which the server core calls with the old and new model as it installs a
version. Every call but :meth:`DownloadPolicy.compress` and :meth:`DownloadPolicy.row`
runs under the PS lock.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, final

import numpy as np

from enclavefl.config import JobConfig
from enclavefl.download_codec import NO_MODEL, quantize_download
from enclavefl.errors import ProtocolError
from enclavefl.server.row_versions import RowVersions, tracked_names
from enclavefl.tensors import ParamSet, SparseRows, Tensor

__all__ = ["DownloadPolicy"]

log = logging.getLogger(__name__)


@final
class DownloadPolicy:
    """Encodes each worker's download as the job's ``transport.sparse_downloads`` and download compression say."""

    def __init__(self, config: JobConfig, params: ParamSet, version: int) -> None:
        """Starts tracking rows (if sparse downloads are on) with every row stamped ``version``."""
        sparse = config.transport.sparse_downloads
        self._quantize = config.privacy.compression.download.type == "quantize"
        self._max_behind = sparse.max_behind_versions
        self._max_fraction = sparse.max_diff_fraction
        self._rows: RowVersions | None = None
        if sparse.enabled:
            names = tracked_names(params, sparse.tensors)
            self._rows = RowVersions(params, version, names)
            log.info("sparse downloads: tracking the rows of %d tensors (%s)", len(names),
                     ", ".join(names[:4]) + (" ..." if len(names) > 4 else ""))
        self._quantized: tuple[int, ParamSet] | None = None  # (version, its encoded broadcast)
        self._quantizing = threading.Lock()  # compress() runs outside the PS lock
        self._counts = threading.Lock()  # row() runs outside the PS lock too
        self._downloads = 0
        self._sparse_downloads = 0
        self._dense_bytes = 0

    @property
    def rows(self) -> RowVersions | None:
        """The row tracker, or None when sparse downloads are off."""
        return self._rows

    def on_install(self, old: ParamSet, new: ParamSet, version: int) -> None:
        """Stamps the rows that differ between the installed model ``old`` and its successor ``new``."""
        if self._rows is not None:
            self._rows.observe(old, new, version)

    def encode(self, broadcast: ParamSet, version: int, held: int, worker_id: str) -> ParamSet:
        """What worker ``worker_id``, holding model version ``held``, downloads of ``broadcast`` (version ``version``).

        Raises:
            ProtocolError: sparse downloads are on and ``held`` is a version this PS has not made yet,
                or below -1 (with them off the PS reads nothing from it).
        """
        rows = self._rows
        if rows is not None and (held > version or held < NO_MODEL):
            raise ProtocolError(f"PullModel: worker {worker_id} says it holds model version {held}, but the PS "
                                f"is at version {version} (expected -1 for none, or 0..{version})")
        with self._counts:
            self._downloads += 1
            self._dense_bytes += broadcast.nbytes
        if rows is not None and held != NO_MODEL and version - held <= self._max_behind:
            sparse = self._changed_rows(broadcast, rows, held)
            if sparse is not None:
                with self._counts:
                    self._sparse_downloads += 1
                return sparse
        return broadcast

    @property
    def compresses(self) -> bool:
        """Whether :meth:`compress` changes a download (the job quantizes downloads)."""
        return self._quantize

    def compress(self, download: ParamSet, version: int) -> ParamSet:
        """``download`` (what :meth:`encode` returned for ``version``) quantized if the job says so.

        Safe to call without the PS lock: the quantized broadcast is made once per version
        and shared; concurrent callers for the same version wait for the first.
        """
        if not self._quantize:
            return download
        with self._quantizing:
            cached = self._quantized
            # One version's broadcast never changes (the model and an algorithm's extras move together at a close).
            if cached is not None and cached[0] == version:
                return cached[1]
            encoded = quantize_download(download)
            self._quantized = (version, encoded)
            return encoded

    def _changed_rows(self, broadcast: ParamSet, rows: RowVersions, held: int) -> ParamSet | None:
        """``broadcast`` with each tracked tensor as its rows changed after ``held`` (dense where too many did)."""
        out: list[tuple[str, Tensor]] = []
        any_sparse = False
        tracked = set(rows.names)
        for name, value in broadcast.items():
            if name in tracked and isinstance(value, np.ndarray) and value.ndim and value.shape[0] == rows.rows(name):
                ids = rows.changed_since(name, held)
                if ids.size <= self._max_fraction * value.shape[0]:
                    out.append((name, SparseRows(ids, value[ids], value.shape)))
                    any_sparse = True
                    continue
            out.append((name, value))
        return ParamSet(out) if any_sparse else None

    def row(self) -> dict[str, Any]:
        """The download figures since the last call, for the round's metrics row; resets them.

        ``bytes_out_dense`` is what the same downloads would have cost dense (``bytes_out`` is what they cost).
        """
        with self._counts:
            out = {"downloads": self._downloads, "downloads_sparse": self._sparse_downloads,
                   "bytes_out_dense": self._dense_bytes}
            self._downloads = self._sparse_downloads = self._dense_bytes = 0
        return out
