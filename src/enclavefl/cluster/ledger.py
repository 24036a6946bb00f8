"""A server's share of a round: its updates folded into a partial that the store accepts, exactly once.

How this works: the server's :class:`~enclavefl.server.round.Round` folds
each update into its aggregator under the round's lock, and records the
update only if the fold did not raise. Here the aggregator is a
:class:`StoreAggregator`: its ``add`` folds the update into a mergeable
aggregator, serialises it (``partial()``) and calls :meth:`Store.accept`
with the update's :class:`UpdateRef`, all inside that same lock. If the store
refuses (a duplicate, the round closing, another writer), the aggregator is
reloaded from its last accepted partial and ``add`` raises
:class:`UpdateRejected`, so the round records nothing and the worker hears
"rejected" ("already counted" for a duplicate). A worker hears "accepted" only
after ``accept`` returned. When the store could not be reached, the server's
partial in the store says whether the write happened.

The :class:`UpdateRef` comes from :class:`LedgerTarget`, the per-upload
target the engine hands the staging code: it names the update for the
aggregator for the duration of one ``Round.accept``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Final

from enclavefl.cluster.errors import DuplicateUpdate, StoreError, StoreUnavailable
from enclavefl.cluster.store import Store, UpdateRef
from enclavefl.errors import UpdateRejected
from enclavefl.server.aggregator import Aggregator
from enclavefl.server.round import Round
from enclavefl.server.strategy import AggregatorFactory
from enclavefl.tensors import ParamSet, StreamHeader

__all__ = ["METRIC_SCALE", "LedgerTarget", "StoreAggregator", "metric_counts"]

log = logging.getLogger(__name__)

METRIC_SCALE: Final = 1_000_000
"""Store counters are integers: a worker's reported loss and accuracy are summed in millionths."""

_METRICS: Final = ("loss", "accuracy")


def metric_counts(metrics: Mapping[str, float]) -> dict[str, int]:
    """The round counters a worker's reported metrics add (``m:<name>`` in millionths, ``n:<name>`` one)."""
    counts: dict[str, int] = {}
    for name in _METRICS:
        value = metrics.get(name)
        if value is not None:
            counts[f"m:{name}"] = int(round(float(value) * METRIC_SCALE))
            counts[f"n:{name}"] = 1
    return counts


class StoreAggregator(Aggregator):
    """Folds this server's updates of one round attempt, each accepted by the store with its partial.

    Args:
        make: the strategy's aggregator factory; what it makes must be ``mergeable``.
        template: the header every update must match.
        store: the cluster's store.
        number, attempt: the round attempt.
        server: this server's member id (its partial's key). If the store holds a partial of this
            server for the attempt (the server restarted), the aggregator starts from it.

    Raises:
        UpdateRejected: the factory's aggregator cannot be split across servers, or the stored
            partial does not fit it.
        StoreError: the stored partial cannot be read.
    """

    def __init__(self, make: AggregatorFactory, template: StreamHeader, store: Store, *, number: int,
                 attempt: int, server: str) -> None:
        self._make = make
        self._template = template
        self._store = store
        self._number, self._attempt, self._server = number, attempt, server
        self._inner = make(template)
        if not self._inner.mergeable:
            raise UpdateRejected(f"{type(self._inner).__name__} cannot be split across servers (cluster mode "
                                 "needs a mergeable aggregator: mean)")
        self._generation = 0
        self._blob: bytes | None = None
        self._lock = threading.Lock()
        self._pending: tuple[UpdateRef, dict[str, int]] | None = None
        # A server restarted with the same id mid-round resumes from the partial it had accepted.
        stored = store.partial(number, attempt, server)
        if stored is not None:
            self._generation, self._blob = stored.generation, stored.blob
            self._reload(stored.blob)

    @property
    def count(self) -> int:
        return self._inner.count

    @property
    def generation(self) -> int:
        """The generation of this server's partial in the store (0: nothing accepted yet)."""
        return self._generation

    def name(self, ref: UpdateRef, counts: Mapping[str, int]) -> _Naming:
        """Names the update the next ``add`` folds (used by :class:`LedgerTarget` around one accept)."""
        return _Naming(self, ref, dict(counts))

    def add(self, update: ParamSet, weight: float) -> None:
        pending = self._pending
        if pending is None:
            raise UpdateRejected("a cluster server folds only updates named by their (worker, update id)")
        ref, counts = pending
        self._inner.add(update, weight)  # UpdateRejected: nothing changed
        blob = self._inner.partial()
        try:
            self._generation = self._store.accept(self._number, self._attempt, self._server, [ref], blob,
                                                  generation=self._generation, counts=counts)
            self._blob = blob
            return
        except DuplicateUpdate as exc:
            self._reload(self._blob)
            raise UpdateRejected(f"update {ref.update_id} of worker {ref.worker} is already counted in round "
                                 f"{self._number}") from exc
        except StoreUnavailable as exc:
            if self._settle_unknown(ref):
                return
            raise UpdateRejected(f"round {self._number}: the store could not be reached to accept update "
                                 f"{ref.update_id}: {exc}") from exc
        except StoreError as exc:
            self._reload(self._blob)
            raise UpdateRejected(f"round {self._number}: the store refused update {ref.update_id}: {exc}") from exc

    def _settle_unknown(self, ref: UpdateRef) -> bool:
        """After an accept of unknown outcome: the stored partial says whether it happened (True: it did)."""
        try:
            stored = self._store.partial(self._number, self._attempt, self._server)
        except StoreError:
            self._reload(self._blob)
            return False
        if stored is not None and ref.update_id in stored.update_ids:
            self._generation, self._blob = stored.generation, stored.blob
            return True
        self._reload(self._blob if stored is None else stored.blob)
        if stored is not None:
            self._generation = stored.generation
        return False

    def _reload(self, blob: bytes | None) -> None:
        """Back to the last accepted partial (or empty): what the store holds for this server."""
        fresh = self._make(self._template)
        if blob is not None:
            fresh.merge({self._server: blob})
        self._inner.close()
        self._inner = fresh
        log.info("server %s round %d attempt %d: partial reloaded at generation %d (%d updates)", self._server,
                 self._number, self._attempt, self._generation, fresh.count)

    def result(self) -> ParamSet:
        return self._inner.result()

    def close(self) -> None:
        self._inner.close()


class _Naming:
    """Holds the aggregator's lock and names the update for the ``add`` inside it."""

    def __init__(self, aggregator: StoreAggregator, ref: UpdateRef, counts: dict[str, int]) -> None:
        self._aggregator, self._ref, self._counts = aggregator, ref, counts

    def __enter__(self) -> None:
        self._aggregator._lock.acquire()
        self._aggregator._pending = (self._ref, self._counts)

    def __exit__(self, *exc: object) -> None:
        self._aggregator._pending = None
        self._aggregator._lock.release()


class LedgerTarget:
    """One upload's target: the local round, with the update named for the store's ledger."""

    def __init__(self, round_: Round, aggregator: StoreAggregator, ref: UpdateRef, *, sampled_as: str = "") -> None:
        """``sampled_as``: the id the round knows the uploader by (a worker that failed over from another
        server uploads under a new id); empty: the uploader's own."""
        self._round = round_
        self._aggregator = aggregator
        self._ref = ref
        self._sampled_as = sampled_as
        self.number = round_.number

    def _id(self, worker_id: str) -> str:
        return self._sampled_as or worker_id

    def accept(self, worker_id: str, update: ParamSet, weight: float, num_samples: int, nbytes: int,
               metrics: Mapping[str, float], staleness: int = 0) -> None:
        counts = {"num_samples": num_samples, "bytes_in": nbytes, **metric_counts(metrics)}
        with self._aggregator.name(self._ref, counts):
            self._round.accept(self._id(worker_id), update, weight, num_samples, nbytes, metrics, staleness)

    def end_upload(self, worker_id: str) -> None:
        self._round.end_upload(self._id(worker_id))

    def note_rejection(self, worker_id: str) -> None:
        self._round.note_rejection(self._id(worker_id))
