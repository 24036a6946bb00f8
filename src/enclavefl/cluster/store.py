"""What the servers of a cluster share, behind one interface: membership, rounds, accepted updates,
partial aggregates, model versions, the job config, the strategy's state, sessions and leases.

How this works: every method is one atomic step of the store, checked against
the store's own state, so servers that race (two leaders for a moment, a worker
re-sending to a second server) cannot break the invariants:

- A round moves through :class:`RoundPhase` only along :data:`ROUND_TRANSITIONS`;
  rounds follow each other (round *n+1* opens once *n* closed; a failed attempt
  reopens as the next attempt) and train on the current model version.
- An update is accepted once per round attempt, by update id and by worker, in
  the same step that replaces the accepting server's partial aggregate: the
  partial carries a generation and the ids it holds, and a write names the
  generation it replaces (compare-and-set). A server therefore folds updates
  into its aggregator, serialises it, and calls :meth:`Store.accept`; if that is
  refused it reloads its aggregator from its last partial and the update is
  counted nowhere. A worker hears "accepted" only after ``accept`` returned.
- Model versions go up by exactly one; the round close publishes the next
  version, the strategy state, and the round's CLOSED phase in one step.
- A leader's writes carry its :class:`Lease`; the store refuses them once the
  lease expired or another holder took it (its fencing token changed).

Blobs (models, partials, strategy state, config) are opaque bytes here; a
:class:`~enclavefl.cluster.sealing.SealedStore` seals them before they leave
the enclave. :class:`~enclavefl.cluster.memory.MemoryStore` serves one process,
:class:`~enclavefl.cluster.redis_store.RedisStore` a cluster.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from enclavefl.cluster.errors import StoreConflict, StoreError

__all__ = [
    "ROUND_TRANSITIONS",
    "AcceptedUpdate",
    "Lease",
    "Member",
    "MemberRole",
    "ModelVersion",
    "Partial",
    "RoundPhase",
    "RoundState",
    "Session",
    "StateBlob",
    "Store",
    "UpdateRef",
    "check_partials",
    "check_round_transition",
    "ttl_ms",
]

MemberRole = Literal["scheduler", "server"]


class RoundPhase(enum.Enum):
    OPEN = "open"          # sampled workers train; servers accept their updates
    CLOSING = "closing"    # no update is accepted; the leader merges the partials
    CLOSED = "closed"      # the next model version is published (terminal)
    FAILED = "failed"      # the attempt is abandoned; the round reopens as the next attempt


ROUND_TRANSITIONS: Final[Mapping[RoundPhase, frozenset[RoundPhase]]] = {
    RoundPhase.OPEN: frozenset({RoundPhase.CLOSING, RoundPhase.FAILED}),
    RoundPhase.CLOSING: frozenset({RoundPhase.CLOSED, RoundPhase.FAILED}),
    RoundPhase.CLOSED: frozenset(),
    RoundPhase.FAILED: frozenset({RoundPhase.OPEN}),
}
"""The phase changes a round may make; FAILED -> OPEN starts the next attempt."""


def check_round_transition(number: int, current: RoundPhase, new: RoundPhase) -> None:
    """Raises StoreConflict unless :data:`ROUND_TRANSITIONS` allows ``current`` -> ``new``."""
    if new not in ROUND_TRANSITIONS[current]:
        raise StoreConflict(f"round {number}: transition {current.value} -> {new.value} is not allowed "
                            f"(from {current.value}: {', '.join(sorted(p.value for p in ROUND_TRANSITIONS[current])) or 'none'})")


@dataclass(frozen=True, slots=True)
class Member:
    """A live process of the cluster, as it registered itself."""

    member_id: str
    role: MemberRole
    address: str
    """Where peers reach it (``host:port``)."""
    meta: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RoundState:
    """A round's latest attempt as the store holds it."""

    number: int
    attempt: int
    phase: RoundPhase
    model_version: int
    """The model version the round trains on; closing it publishes ``model_version + 1``."""
    sampled: frozenset[str]
    required: int
    """Updates that close the round early."""
    counters: Mapping[str, int] = field(default_factory=dict)
    """``accepted`` (updates accepted) and whatever each ``accept`` added (samples, bytes)."""
    reason: str = ""
    """Why the attempt failed ("" otherwise)."""


@dataclass(frozen=True, slots=True)
class UpdateRef:
    """An update's identity: the worker that made it and the id it carries on every (re-)send."""

    worker: str
    update_id: str


@dataclass(frozen=True, slots=True)
class AcceptedUpdate:
    """An update the store counted, and the server whose partial holds it."""

    worker: str
    update_id: str
    server: str


@dataclass(frozen=True, slots=True)
class Partial:
    """A server's partial aggregate of one round attempt: the blob holds exactly ``update_ids``."""

    server: str
    generation: int
    """How many times it was written (0: never); an ``accept`` names the generation it replaces."""
    update_ids: frozenset[str]
    blob: bytes


@dataclass(frozen=True, slots=True)
class ModelVersion:
    version: int
    blob: bytes


@dataclass(frozen=True, slots=True)
class StateBlob:
    """The strategy's state (optimizer moments, accountant) as of model ``version``."""

    version: int
    blob: bytes


@dataclass(frozen=True, slots=True)
class Session:
    """A worker's binding: which certificate it joined with and which server serves it."""

    worker_id: str
    fingerprint: str
    server: str
    name: str = ""


@dataclass(frozen=True, slots=True)
class Lease:
    """A held lease. ``token`` grows with every acquisition of the name: the fencing token."""

    name: str
    holder: str
    token: int


def check_partials(number: int, attempt: int, partials: Mapping[str, Partial],
                   accepted: Mapping[str, AcceptedUpdate]) -> None:
    """Checks that the partials hold exactly the accepted updates, each in its server's partial.

    A partial that lost updates (an older value written back) or holds ids the
    ledger does not give to it is refused here, before the leader merges.

    Raises:
        StoreError: a partial and the ledger disagree (named: server, missing and extra ids).
    """
    for server, partial in sorted(partials.items()):
        owned = {uid for uid, a in accepted.items() if a.server == server}
        if set(partial.update_ids) != owned:
            missing, extra = sorted(owned - partial.update_ids), sorted(partial.update_ids - owned)
            raise StoreError(f"round {number} attempt {attempt}: the partial of server {server} (generation "
                             f"{partial.generation}) disagrees with the accepted ledger: missing {missing}, extra {extra}")
    orphans = sorted(uid for uid, a in accepted.items() if a.server not in partials)
    if orphans:
        raise StoreError(f"round {number} attempt {attempt}: accepted updates {orphans} are in no partial")


class Store(ABC):
    """Everything the servers of a job share. Every method is one atomic step.

    Contract for every implementation:

    - Reads never block on other callers for longer than one step.
    - A refused write (:class:`StoreConflict`, :class:`DuplicateUpdate`,
      :class:`LeaseLost`) changed nothing.
    - :class:`StoreUnavailable` means the store could not be reached: the write
      may or may not have happened, and repeating it with the same arguments is
      safe (writes are idempotent for identical arguments).
    - Methods taking ``lease`` refuse with :class:`LeaseLost` unless that lease
      is still held with that token; ``None`` skips the check (a single process,
      or a job's set-up before any server runs).
    - After :meth:`close`, any use raises ``ClosedError``.
    """

    # -- membership -------------------------------------------------------------------------------

    @abstractmethod
    def register(self, member: Member, ttl_s: float) -> None:
        """Adds (or refreshes) ``member``; it stays listed for ``ttl_s`` unless heartbeats extend it."""

    @abstractmethod
    def heartbeat(self, member_id: str, ttl_s: float) -> bool:
        """Extends the member's life to ``ttl_s`` from now; False if it had expired (register again)."""

    @abstractmethod
    def deregister(self, member_id: str) -> None:
        """Removes the member now (a clean leave). Unknown ids are ignored."""

    @abstractmethod
    def members(self, role: MemberRole | None = None) -> list[Member]:
        """The live members (of ``role``), sorted by id."""

    # -- job config and model -----------------------------------------------------------------------

    @abstractmethod
    def put_config(self, blob: bytes) -> None:
        """Replaces the job's config (the scheduler writes it; servers read it)."""

    @abstractmethod
    def config(self) -> bytes | None:
        """The job's config, or None before the scheduler wrote it."""

    @abstractmethod
    def publish_model(self, version: int, blob: bytes, *, strategy_state: bytes | None = None,
                      lease: Lease | None = None) -> None:
        """Publishes model ``version`` outside a round close: the job's first model, or a checkpoint's.

        Raises:
            StoreConflict: ``version`` is not the current version + 1 (the first may be any), or a
                round is open or closing (its close publishes the next version).
            LeaseLost: ``lease`` is no longer held.
        """

    @abstractmethod
    def model(self, version: int | None = None) -> ModelVersion | None:
        """Model ``version`` (default: the current one), or None if not published or already pruned.

        The current and the previous version are kept.
        """

    @abstractmethod
    def strategy_state(self) -> StateBlob | None:
        """The strategy's state published with the current model, or None."""

    # -- rounds ------------------------------------------------------------------------------------

    @abstractmethod
    def open_round(self, number: int, attempt: int, *, model_version: int, sampled: Collection[str],
                   required: int, lease: Lease | None = None) -> RoundState:
        """Opens round ``number`` (attempt ``attempt``) on ``model_version`` with its sampled workers.

        Allowed when no round exists yet, when round ``number - 1`` is CLOSED, or when round
        ``number`` FAILED and ``attempt`` is its attempt + 1. ``model_version`` must be the current.

        Raises:
            StoreConflict: out of order, or not on the current model version.
            LeaseLost: ``lease`` is no longer held.
        """

    @abstractmethod
    def round_state(self, number: int | None = None) -> RoundState | None:
        """Round ``number``'s latest attempt (default: the current round), or None."""

    @abstractmethod
    def begin_close(self, number: int, attempt: int, *, lease: Lease | None = None) -> RoundState:
        """OPEN -> CLOSING: no update is accepted from now on.

        Raises:
            StoreConflict: the round attempt is not current or not OPEN.
            LeaseLost: ``lease`` is no longer held.
        """

    @abstractmethod
    def fail_round(self, number: int, attempt: int, reason: str, *, lease: Lease | None = None) -> RoundState:
        """OPEN or CLOSING -> FAILED; the attempt's partials are deleted (its ledger stays for audit).

        Raises:
            StoreConflict: the round attempt is not current, or CLOSED already.
            LeaseLost: ``lease`` is no longer held.
        """

    @abstractmethod
    def finish_round(self, number: int, attempt: int, *, model: bytes, strategy_state: bytes | None = None,
                     lease: Lease | None = None) -> RoundState:
        """CLOSING -> CLOSED, publishing model version ``model_version + 1`` (and the strategy state) with it.

        The attempt's partials are deleted; its ledger stays.

        Raises:
            StoreConflict: the round attempt is not current or not CLOSING, or the current model version
                moved (a version published twice is refused, never doubled).
            LeaseLost: ``lease`` is no longer held.
        """

    # -- accepted updates and partial aggregates ----------------------------------------------------

    @abstractmethod
    def accept(self, number: int, attempt: int, server: str, updates: Sequence[UpdateRef], partial: bytes, *,
               generation: int, counts: Mapping[str, int] | None = None) -> int:
        """Accepts ``updates`` for ``server`` and replaces its partial with ``partial``, as one step.

        Args:
            partial: the server's aggregate of every update it accepted in this attempt, these included.
            generation: the partial's generation this write replaces (0 for the first).
            counts: amounts added to the round's counters (``num_samples``, ``bytes_in``, ...).

        Returns:
            The partial's new generation (``generation + 1``).

        Raises:
            DuplicateUpdate: an update id was accepted before in this attempt (by any server), or its
                worker already has another update accepted; nothing was recorded.
            StoreConflict: the round attempt is not current or not OPEN, or the partial's generation is
                not ``generation`` (another writer).
        """

    @abstractmethod
    def count(self, number: int, attempt: int, counts: Mapping[str, int]) -> bool:
        """Adds ``counts`` to the round attempt's counters (refused uploads, say), if it is current and not closed.

        Returns:
            False when the attempt is not the current one or is CLOSED or FAILED (nothing added).
        """

    @abstractmethod
    def accepted(self, number: int, attempt: int) -> dict[str, AcceptedUpdate]:
        """The attempt's accepted updates by update id."""

    @abstractmethod
    def partials(self, number: int, attempt: int) -> dict[str, Partial]:
        """The attempt's partial aggregates by server (empty once the round finished or failed)."""

    @abstractmethod
    def partial(self, number: int, attempt: int, server: str) -> Partial | None:
        """One server's partial of the attempt (a restarted server resumes from it), or None."""

    # -- sessions ----------------------------------------------------------------------------------

    @abstractmethod
    def bind_session(self, session: Session) -> None:
        """Binds (or rebinds, after a failover) a worker id to its certificate and server."""

    @abstractmethod
    def session(self, worker_id: str) -> Session | None:
        """The worker's binding, or None."""

    @abstractmethod
    def drop_session(self, worker_id: str) -> None:
        """Forgets the worker's binding. Unknown ids are ignored."""

    @abstractmethod
    def sessions(self) -> list[Session]:
        """Every binding, sorted by worker id."""

    # -- leases ------------------------------------------------------------------------------------

    @abstractmethod
    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> Lease | None:
        """Takes lease ``name`` for ``ttl_s`` if nobody holds it; None if another holder does.

        A holder that asks again while it holds the lease gets the same token (its TTL renewed).
        """

    @abstractmethod
    def renew_lease(self, lease: Lease, ttl_s: float) -> None:
        """Extends ``lease`` to ``ttl_s`` from now.

        Raises:
            LeaseLost: it expired or another holder took it.
        """

    @abstractmethod
    def release_lease(self, lease: Lease) -> None:
        """Gives ``lease`` up (a clean hand-over); a lease no longer held is ignored."""

    @abstractmethod
    def lease(self, name: str) -> Lease | None:
        """Who holds lease ``name`` now, or None."""

    @abstractmethod
    def close(self) -> None:
        """Releases connections. Idempotent."""


def ttl_ms(ttl_s: float) -> int:
    """``ttl_s`` in whole milliseconds (at least 1).

    Raises:
        ValueError: ``ttl_s`` is not a positive number.
    """
    if not ttl_s > 0:
        raise ValueError(f"ttl_s must be > 0, got {ttl_s!r}")
    return max(1, int(round(ttl_s * 1000)))
