"""A server's share of a round: its updates folded into a partial that the store accepts, exactly once.

How this works: the server's :class:`~enclavefl.server.round.Round` folds
each update into its aggregator under the round's lock, and records the
update only if the fold did not raise. Here the aggregator is a
:class:`StoreAggregator`, and writing the partial is a *group commit*, as a
database commits several transactions with one log write:

1. ``add`` (under the round's lock) only folds the update into a mergeable
   aggregator and lists it as not yet durable.
2. Outside the round's lock, :meth:`StoreAggregator.commit` blocks until that
   update is durable or refused. One caller at a time flushes: it takes every
   not-yet-durable update, serialises the aggregate (``partial()``) with them
   in it, and writes them all with one :meth:`Store.accept`. Updates folded
   while that write runs go into the next flush, so under load (several
   uploads at once) one partial write carries several updates, and Redis
   receives one partial per flush, not one per update.

A worker hears "accepted" only after the write that carried its update
returned. If the store refuses a write, nothing of it was recorded: a
duplicate (an update another server already accepted) is dropped and the
others are written again; any other refusal rejects every update of the
write. Either way the aggregator goes back to the last durable partial and
folds again the updates still waiting (their callers are still blocked in
``commit``, so their updates are still in memory), and the rejected ones are
taken out of the local round's record (:meth:`Round.retract`). When the store
could not be reached, the server's partial in the store says whether the
write happened.

The :class:`UpdateRef` comes from :class:`LedgerTarget`, the per-upload
target the engine hands the staging code: it names the update for the
aggregator for the duration of one ``Round.accept``, then commits it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
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


@dataclass(eq=False, slots=True)
class _Folded:
    """An update folded into the aggregator, kept until its write settles (to fold it again after a refusal)."""

    ref: UpdateRef
    counts: dict[str, int]
    update: ParamSet
    weight: float
    settled: bool = False
    error: UpdateRejected | None = None
    """Why the store did not take it (None once settled: it is durable)."""


class StoreAggregator(Aggregator):
    """Folds this server's updates of one round attempt; :meth:`commit` makes them durable, several per write.

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
        """The last durable partial (what the store holds for this server), at ``_generation``."""
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)
        self._naming: tuple[UpdateRef, dict[str, int]] | None = None
        self._waiting: list[_Folded] = []
        """Folded, not yet durable, in fold order."""
        self._folded: dict[UpdateRef, _Folded] = {}
        """Every folded update whose caller has not yet heard its outcome from ``commit``."""
        self._flushing = False
        self._closed = False
        # A server restarted with the same id mid-round resumes from the partial it had accepted.
        stored = store.partial(number, attempt, server)
        if stored is not None:
            self._generation, self._blob = stored.generation, stored.blob
            self._rebuild()

    @property
    def count(self) -> int:
        """Updates folded, durable or not."""
        return self._inner.count

    @property
    def generation(self) -> int:
        """The generation of this server's partial in the store (0: nothing accepted yet)."""
        return self._generation

    def name(self, ref: UpdateRef, counts: Mapping[str, int]) -> _Naming:
        """Names the update the next ``add`` folds (used by :class:`LedgerTarget` around one accept)."""
        return _Naming(self, ref, dict(counts))

    def add(self, update: ParamSet, weight: float) -> None:
        """Folds the update named by :meth:`name` and lists it as not yet durable; :meth:`commit` follows.

        The caller must keep ``update`` unchanged until ``commit`` returns: a refused write folds it again.

        Raises:
            UpdateRejected: the update is not named, is named twice, or does not fit (nothing changed).
        """
        naming = self._naming
        if naming is None:
            raise UpdateRejected("a cluster server folds only updates named by their (worker, update id)")
        ref, counts = naming
        if ref in self._folded:
            raise UpdateRejected(f"update {ref.update_id} of worker {ref.worker} is already folded on server "
                                 f"{self._server} in round {self._number}")
        self._inner.add(update, weight)  # UpdateRejected: nothing changed
        folded = _Folded(ref, counts, update, weight)
        self._waiting.append(folded)
        self._folded[ref] = folded

    def commit(self, ref: UpdateRef) -> None:
        """Blocks until the folded update ``ref`` is durable in the store (returns) or refused (raises).

        Call it without the round's lock held: the caller that finds no flush running writes every
        update waiting, its own included, in one :meth:`Store.accept`; the others wait for that write.

        Raises:
            UpdateRejected: the store refused the update ("already counted" for a duplicate), the round
                closed first, or ``ref`` was never folded; the aggregate no longer holds it.
        """
        while True:
            with self._lock:
                folded = self._folded.get(ref)
                if folded is None:
                    raise UpdateRejected(f"update {ref.update_id} of worker {ref.worker} was not folded on server "
                                         f"{self._server} in round {self._number}")
                while self._flushing and not folded.settled:
                    self._settled.wait()
                if folded.settled:
                    del self._folded[ref]
                    if folded.error is not None:
                        raise folded.error
                    return
                self._flushing = True
            try:
                self._flush()
            finally:
                with self._lock:
                    self._flushing = False
                    self._settled.notify_all()

    def _flush(self) -> None:
        """One write of every update waiting (the caller is the only flusher)."""
        with self._lock:
            batch = list(self._waiting)
            if not batch:
                return
            if self._closed:
                self._refuse(batch, f"round {self._number} closed on server {self._server} before the update "
                                    "was stored")
                return
            blob = self._inner.partial()  # under the lock: no fold interleaves with the snapshot
            generation = self._generation
        counts: dict[str, int] = {}
        for folded in batch:
            for key, amount in folded.counts.items():
                counts[key] = counts.get(key, 0) + amount
        refs = [f.ref for f in batch]
        try:
            new = self._store.accept(self._number, self._attempt, self._server, refs, blob, generation=generation,
                                     counts=counts)
        except DuplicateUpdate as exc:
            self._drop_duplicates(batch, exc)
            return
        except StoreUnavailable as exc:
            self._settle_unknown(batch, exc)
            return
        except StoreError as exc:
            with self._lock:
                self._refuse(batch, f"the store refused it: {exc}")
            return
        except Exception as exc:  # not the store's contract (a bug, a closed store): still settle every caller
            log.exception("server %s round %d: writing %d updates failed", self._server, self._number, len(batch))
            with self._lock:
                self._refuse(batch, f"writing it failed: {type(exc).__name__}: {exc}")
            return
        with self._lock:
            self._generation, self._blob = new, blob
            self._durable(batch)
        if len(batch) > 1:
            log.debug("server %s round %d: %d updates written in one partial (generation %d)", self._server,
                      self._number, len(batch), new)

    def _drop_duplicates(self, batch: Sequence[_Folded], exc: DuplicateUpdate) -> None:
        """A write refused for duplicates: those are rejected; the others wait for the next flush."""
        try:
            ledger = self._store.accepted(self._number, self._attempt)
        except StoreError as read_exc:
            with self._lock:
                self._refuse(batch, f"the store refused it ({exc}) and its ledger could not be read: {read_exc}")
            return
        ids = set(ledger)
        workers = {a.worker: uid for uid, a in ledger.items()}
        duplicates: list[_Folded] = []
        for folded in batch:
            ref = folded.ref
            other = workers.get(ref.worker)
            if ref.update_id in ids or (other is not None and other != ref.update_id):
                duplicates.append(folded)
            else:  # a second update of the same id or worker within the batch is a duplicate too
                ids.add(ref.update_id)
                workers[ref.worker] = ref.update_id
        with self._lock:
            if not duplicates:  # the store saw a duplicate the ledger does not show: refuse the write
                self._refuse(batch, f"the store refused it: {exc}")
                return
            for folded in duplicates:
                self._settle(folded, UpdateRejected(f"update {folded.ref.update_id} of worker {folded.ref.worker} "
                                                    f"is already counted in round {self._number}"))
            self._rebuild()
        log.info("server %s round %d: %d of %d updates of a write were already counted elsewhere; writing the rest "
                 "again", self._server, self._number, len(duplicates), len(batch))

    def _settle_unknown(self, batch: Sequence[_Folded], exc: StoreUnavailable) -> None:
        """After a write of unknown outcome: the stored partial says whether it happened."""
        try:
            stored = self._store.partial(self._number, self._attempt, self._server)
        except StoreError:
            stored = None
            known = False
        else:
            known = True
        with self._lock:
            if stored is not None and all(f.ref.update_id in stored.update_ids for f in batch):
                self._generation, self._blob = stored.generation, stored.blob
                self._durable(batch)
                return
            if stored is not None:
                self._generation, self._blob = stored.generation, stored.blob
            reason = "the store could not be reached" + ("" if known else " (nor read back)")
            self._refuse(batch, f"{reason}: {exc}")

    def _durable(self, batch: Sequence[_Folded]) -> None:
        """The write of ``batch`` landed (lock held)."""
        for folded in batch:
            self._settle(folded, None)

    def _refuse(self, batch: Sequence[_Folded], reason: str) -> None:
        """The write of ``batch`` did not land (lock held): each is rejected; the aggregate goes back to the
        last durable partial plus the updates still waiting."""
        for folded in batch:
            self._settle(folded, UpdateRejected(f"round {self._number}: update {folded.ref.update_id} of worker "
                                                f"{folded.ref.worker} was not accepted: {reason}"))
        if not self._closed:
            self._rebuild()

    def _settle(self, folded: _Folded, error: UpdateRejected | None) -> None:
        folded.settled, folded.error = True, error
        if folded in self._waiting:
            self._waiting.remove(folded)
        self._settled.notify_all()

    def _rebuild(self) -> None:
        """The aggregate := the last durable partial (or empty) + every update still waiting (lock held)."""
        fresh = self._make(self._template)
        if self._blob is not None:
            fresh.merge({self._server: self._blob})
        for folded in list(self._waiting):
            try:
                fresh.add(folded.update, folded.weight)
            except UpdateRejected as exc:  # it was folded once: not expected, but never lose the others
                self._settle(folded, exc)
        self._inner.close()
        self._inner = fresh
        log.info("server %s round %d attempt %d: partial reloaded at generation %d (%d updates, %d not yet "
                 "durable)", self._server, self._number, self._attempt, self._generation, fresh.count,
                 len(self._waiting))

    def result(self) -> ParamSet:
        return self._inner.result()

    def close(self) -> None:
        """Frees the aggregate. Updates still waiting are rejected by their ``commit`` (the round closed)."""
        with self._lock:
            self._closed = True
            self._inner.close()


class _Naming:
    """Holds the aggregator's lock and names the update for the ``add`` inside it."""

    def __init__(self, aggregator: StoreAggregator, ref: UpdateRef, counts: dict[str, int]) -> None:
        self._aggregator, self._ref, self._counts = aggregator, ref, counts

    def __enter__(self) -> None:
        self._aggregator._lock.acquire()
        self._aggregator._naming = (self._ref, self._counts)

    def __exit__(self, *exc: object) -> None:
        self._aggregator._naming = None
        self._aggregator._lock.release()


class LedgerTarget:
    """One upload's target: the local round, with the update named for the store's ledger."""

    def __init__(self, round_: Round, aggregator: StoreAggregator, ref: UpdateRef, *, sampled_as: str = "",
                 on_refused: Callable[[], None] | None = None) -> None:
        """``on_refused``: called when the upload is refused (the server counts it for the round's row).
        ``sampled_as``: the id the round knows the uploader by (a worker that failed over from another
        server uploads under a new id); empty: the uploader's own."""
        self._round = round_
        self._aggregator = aggregator
        self._ref = ref
        self._sampled_as = sampled_as
        self._on_refused = on_refused
        self.number = round_.number

    def _id(self, worker_id: str) -> str:
        return self._sampled_as or worker_id

    def accept(self, worker_id: str, update: ParamSet, weight: float, num_samples: int, nbytes: int,
               metrics: Mapping[str, float], staleness: int = 0) -> None:
        """Folds and records the update under the round's lock, then commits it outside that lock.

        Raises:
            UpdateRejected: the round or the store refused it; neither the aggregate nor the round's
                record holds it.
        """
        counts = {"num_samples": num_samples, "bytes_in": nbytes, **metric_counts(metrics)}
        with self._aggregator.name(self._ref, counts):
            self._round.accept(self._id(worker_id), update, weight, num_samples, nbytes, metrics, staleness)
        try:
            self._aggregator.commit(self._ref)
        except UpdateRejected:
            self._round.retract(self._id(worker_id), weight, num_samples, nbytes, metrics)
            raise

    def end_upload(self, worker_id: str) -> None:
        self._round.end_upload(self._id(worker_id))

    def note_rejection(self, worker_id: str) -> None:
        self._round.note_rejection(self._id(worker_id))
        if self._on_refused is not None:
            self._on_refused()
