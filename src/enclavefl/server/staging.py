"""Upload staging: one update is decoded into a bounded buffer and checked whole before it is accepted.

A compressed upload (kind QUANTIZED) is decoded chunk by chunk into dense
tensors as its bytes arrive, so it costs the staging buffer no more than a
dense one; the checks after that (finite values, the DP norm, the aggregator's
own) see the decoded, plain update.

At most ``server.max_concurrent_uploads`` updates are staged at once (a
semaphore held from ``open`` to ``commit``/``abort``), so PS memory is
O(model x (max_concurrent_uploads + 2)) however many workers push.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Protocol

import numpy as np

from enclavefl.errors import ProtocolError, UpdateRejected
from enclavefl.messages import UpdateMeta, UpdateSink
from enclavefl.tensors import ParamSet, SparseRows

__all__ = ["PayloadDecoder", "StagedUpdate", "UpdateOutcome", "UpdateTarget", "check_finite"]

UpdateOutcome = Callable[[bool, str, int], None]
"""Hears how a staged upload ended: accepted or not, why not ("" when accepted), bytes received.

Called once per upload, without the server lock held."""

log = logging.getLogger(__name__)


class PayloadDecoder(Protocol):
    """Turns an upload's chunks into its tensors: a dense :class:`~enclavefl.tensors.StreamDecoder`, or a
    :class:`~enclavefl.compression.CompressedDecoder` that decodes each chunk into the staged dense tensors."""

    @property
    def bytes_received(self) -> int: ...

    def feed(self, chunk: bytes | memoryview) -> None:
        """Raises ProtocolError (framing, limits) or UpdateRejected (a bad index or scale)."""
        ...

    def finish(self) -> ParamSet:
        """Raises ProtocolError on a truncated or malformed payload."""
        ...


class UpdateTarget(Protocol):
    """Where a staged update goes once it is whole: a sync round or the async buffer."""

    number: int

    def accept(self, worker_id: str, update: ParamSet, weight: float, num_samples: int, nbytes: int,
               metrics: Mapping[str, float], staleness: int = 0) -> None:
        """Folds and records the update atomically; UpdateRejected leaves both unchanged."""
        ...

    def end_upload(self, worker_id: str) -> None: ...

    def note_rejection(self, worker_id: str) -> None:
        """An upload of ``worker_id`` was refused (counted, and named in the metrics row)."""
        ...


def check_finite(update: ParamSet) -> None:
    """Raises UpdateRejected if a floating tensor holds NaN or Inf."""
    for name, value in update.items():
        data = value.rows if isinstance(value, SparseRows) else value
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            raise UpdateRejected(f"tensor {name!r} holds NaN or Inf values")


class StagedUpdate(UpdateSink):
    """One update being received; owns an upload slot until commit() or abort()."""

    def __init__(self, target: UpdateTarget, meta: UpdateMeta, decoder: PayloadDecoder, slot: threading.Semaphore,
                 *, weight: float, num_samples: int, staleness: int = 0, log_prefix: str = "ps",
                 on_end: UpdateOutcome | None = None) -> None:
        self._target = target
        self._meta = meta
        self._decoder = decoder
        self._slot = slot
        self._weight = weight
        self._num_samples = num_samples
        self._staleness = staleness
        self._log_prefix = log_prefix
        self._on_end = on_end
        self._done = False

    def feed(self, chunk: bytes | memoryview) -> None:
        self._decoder.feed(chunk)

    def commit(self) -> None:
        try:
            try:
                update = self._decoder.finish()
            except ProtocolError as exc:
                raise UpdateRejected(str(exc)) from exc
            check_finite(update)
            self._target.accept(self._meta.worker_id, update, self._weight, self._num_samples,
                                self._decoder.bytes_received, self._meta.metrics, self._staleness)
        except UpdateRejected as exc:
            self._rejected(str(exc))
            raise
        finally:
            self._release()
        log.info("%s round %d: accepted update from %s (%d samples, weight %g, %d bytes)", self._log_prefix,
                 self._target.number, self._meta.worker_id, self._num_samples, self._weight,
                 self._decoder.bytes_received)
        if self._on_end is not None:
            self._on_end(True, "", self._decoder.bytes_received)

    def abort(self, reason: str) -> None:
        if not self._done:
            self._rejected(reason)
        self._release()

    def _rejected(self, reason: str) -> None:
        self._target.note_rejection(self._meta.worker_id)
        log.warning("%s round %d: rejected update from %s: %s", self._log_prefix, self._target.number,
                    self._meta.worker_id, reason)
        if self._on_end is not None:
            self._on_end(False, reason, self._decoder.bytes_received)

    def _release(self) -> None:
        if not self._done:
            self._done = True
            self._target.end_upload(self._meta.worker_id)
            self._slot.release()
