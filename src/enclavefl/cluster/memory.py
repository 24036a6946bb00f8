"""The store of a single process: every step under one lock, in memory.

What the single parameter server would use (it needs no Redis), and the
reference the Redis store is tested against: both pass the same conformance
suite. Nothing survives the process.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import final

from enclavefl.cluster.errors import DuplicateUpdate, LeaseLost, StoreConflict
from enclavefl.cluster.store import (
    AcceptedUpdate,
    Lease,
    Member,
    MemberRole,
    ModelVersion,
    Partial,
    RoundPhase,
    RoundState,
    Session,
    StateBlob,
    Store,
    UpdateRef,
    check_round_transition,
    ttl_ms,
)
from enclavefl.errors import ClosedError

__all__ = ["MemoryStore"]

_Key = tuple[int, int]


@final
class MemoryStore(Store):
    """A thread-safe in-memory :class:`Store`.

    Args:
        clock: seconds on a monotonic clock (membership and lease expiry); tests pass a fake one.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._closed = False
        self._members: dict[str, tuple[Member, float]] = {}
        self._config: bytes | None = None
        self._models: dict[int, bytes] = {}
        self._version: int | None = None
        self._strategy: StateBlob | None = None
        self._current: int | None = None
        self._rounds: dict[int, RoundState] = {}
        self._ledgers: dict[_Key, dict[str, AcceptedUpdate]] = {}
        self._by_worker: dict[_Key, dict[str, str]] = {}
        self._partials: dict[_Key, dict[str, Partial]] = {}
        self._sessions: dict[str, Session] = {}
        self._leases: dict[str, tuple[Lease, float]] = {}
        self._fences: dict[str, int] = {}

    def _open(self) -> None:
        if self._closed:
            raise ClosedError("the store was closed")

    def _expires(self, ttl_s: float) -> float:
        return self._clock() + ttl_ms(ttl_s) / 1000

    # -- membership ----------------------------------------------------------------------------

    def register(self, member: Member, ttl_s: float) -> None:
        with self._lock:
            self._open()
            self._members[member.member_id] = (member, self._expires(ttl_s))

    def heartbeat(self, member_id: str, ttl_s: float) -> bool:
        with self._lock:
            self._open()
            entry = self._members.get(member_id)
            if entry is None or entry[1] <= self._clock():
                self._members.pop(member_id, None)
                return False
            self._members[member_id] = (entry[0], self._expires(ttl_s))
            return True

    def deregister(self, member_id: str) -> None:
        with self._lock:
            self._open()
            self._members.pop(member_id, None)

    def members(self, role: MemberRole | None = None) -> list[Member]:
        with self._lock:
            self._open()
            now = self._clock()
            for member_id in [m for m, (_, expires) in self._members.items() if expires <= now]:
                del self._members[member_id]
            return sorted((m for m, _ in self._members.values() if role is None or m.role == role),
                          key=lambda m: m.member_id)

    # -- config and model ----------------------------------------------------------------------

    def put_config(self, blob: bytes) -> None:
        with self._lock:
            self._open()
            self._config = bytes(blob)

    def config(self) -> bytes | None:
        with self._lock:
            self._open()
            return self._config

    def _check_lease(self, lease: Lease | None) -> None:
        if lease is None:
            return
        held = self._held(lease.name)
        if held is None or held.token != lease.token or held.holder != lease.holder:
            raise LeaseLost(f"lease {lease.name!r} (token {lease.token}, holder {lease.holder}) is no longer held"
                            + (f"; {held.holder} holds token {held.token}" if held else ""))

    def _install(self, version: int, blob: bytes, strategy_state: bytes | None) -> None:
        self._models[version] = bytes(blob)
        self._models.pop(version - 2, None)  # the current and the previous version are kept
        self._version = version
        if strategy_state is not None:
            self._strategy = StateBlob(version, bytes(strategy_state))

    def publish_model(self, version: int, blob: bytes, *, strategy_state: bytes | None = None,
                      lease: Lease | None = None) -> None:
        with self._lock:
            self._open()
            self._check_lease(lease)
            current = self._version
            if current == version and self._models.get(version) == blob:
                return  # a repeated publish
            if current is not None and version != current + 1:
                raise StoreConflict(f"model version {version} cannot follow the current version {current} "
                                    f"(expected {current + 1})")
            state = self._rounds.get(self._current) if self._current is not None else None
            if state is not None and state.phase in (RoundPhase.OPEN, RoundPhase.CLOSING):
                raise StoreConflict(f"model version {version} not published: round {state.number} is "
                                    f"{state.phase.value} (its close publishes the next version)")
            self._install(version, blob, strategy_state)

    def model(self, version: int | None = None) -> ModelVersion | None:
        with self._lock:
            self._open()
            wanted = self._version if version is None else version
            if wanted is None or wanted not in self._models:
                return None
            return ModelVersion(wanted, self._models[wanted])

    def strategy_state(self) -> StateBlob | None:
        with self._lock:
            self._open()
            return self._strategy

    # -- rounds --------------------------------------------------------------------------------

    def open_round(self, number: int, attempt: int, *, model_version: int, sampled: Collection[str],
                   required: int, lease: Lease | None = None) -> RoundState:
        with self._lock:
            self._open()
            self._check_lease(lease)
            if self._version is None:
                raise StoreConflict(f"round {number} cannot open: no model version is published")
            if model_version != self._version:
                raise StoreConflict(f"round {number} would train on model version {model_version}, "
                                    f"the current version is {self._version}")
            current = self._rounds.get(self._current) if self._current is not None else None
            if current is not None:
                if (current.number, current.attempt, current.phase, current.model_version) == (
                        number, attempt, RoundPhase.OPEN, model_version):
                    return current  # a repeated open
                if current.number == number:
                    check_round_transition(number, current.phase, RoundPhase.OPEN)
                    if attempt != current.attempt + 1:
                        raise StoreConflict(f"round {number}: attempt {attempt} cannot follow failed attempt "
                                            f"{current.attempt} (expected {current.attempt + 1})")
                elif current.number == number - 1:
                    if current.phase is not RoundPhase.CLOSED:
                        raise StoreConflict(f"round {number} cannot open: round {current.number} is "
                                            f"{current.phase.value}, not closed")
                else:
                    raise StoreConflict(f"round {number} cannot open: the current round is {current.number}")
            state = RoundState(number, attempt, RoundPhase.OPEN, model_version, frozenset(sampled), required,
                               {"accepted": 0})
            self._rounds[number] = state
            self._current = number
            return state

    def round_state(self, number: int | None = None) -> RoundState | None:
        with self._lock:
            self._open()
            wanted = self._current if number is None else number
            return None if wanted is None else self._rounds.get(wanted)

    def _current_attempt(self, number: int, attempt: int) -> RoundState:
        state = self._rounds.get(number) if self._current == number else None
        if state is None or state.attempt != attempt:
            found = "none" if state is None else f"attempt {state.attempt} ({state.phase.value})"
            raise StoreConflict(f"round {number} attempt {attempt} is not the current round attempt "
                                f"(current round {self._current}, {found})")
        return state

    def _move(self, state: RoundState, phase: RoundPhase, reason: str = "") -> RoundState:
        check_round_transition(state.number, state.phase, phase)
        new = RoundState(state.number, state.attempt, phase, state.model_version, state.sampled, state.required,
                         state.counters, reason)
        self._rounds[state.number] = new
        return new

    def begin_close(self, number: int, attempt: int, *, lease: Lease | None = None) -> RoundState:
        with self._lock:
            self._open()
            self._check_lease(lease)
            state = self._current_attempt(number, attempt)
            if state.phase is RoundPhase.CLOSING:
                return state
            return self._move(state, RoundPhase.CLOSING)

    def fail_round(self, number: int, attempt: int, reason: str, *, lease: Lease | None = None) -> RoundState:
        with self._lock:
            self._open()
            self._check_lease(lease)
            state = self._current_attempt(number, attempt)
            if state.phase is RoundPhase.FAILED:
                return state
            new = self._move(state, RoundPhase.FAILED, reason)
            self._partials.pop((number, attempt), None)
            return new

    def finish_round(self, number: int, attempt: int, *, model: bytes, strategy_state: bytes | None = None,
                     lease: Lease | None = None) -> RoundState:
        with self._lock:
            self._open()
            self._check_lease(lease)
            state = self._current_attempt(number, attempt)
            version = state.model_version + 1
            if state.phase is RoundPhase.CLOSED and self._version == version and self._models.get(version) == model:
                return state  # a repeated finish
            check_round_transition(number, state.phase, RoundPhase.CLOSED)
            if self._version != state.model_version:
                raise StoreConflict(f"round {number} trained on model version {state.model_version}, but the "
                                    f"current version is {self._version}: version {version} is not published twice")
            new = self._move(state, RoundPhase.CLOSED)
            self._install(version, model, strategy_state)
            self._partials.pop((number, attempt), None)
            return new

    # -- accepted updates ------------------------------------------------------------------------

    def accept(self, number: int, attempt: int, server: str, updates: Sequence[UpdateRef], partial: bytes, *,
               generation: int, counts: Mapping[str, int] | None = None) -> int:
        with self._lock:
            self._open()
            key = (number, attempt)
            state = self._current_attempt(number, attempt)
            ledger = self._ledgers.setdefault(key, {})
            by_worker = self._by_worker.setdefault(key, {})
            partials = self._partials.setdefault(key, {})
            held = partials.get(server)
            current_gen = held.generation if held is not None else 0
            if held is not None and current_gen == generation + 1 and held.blob == partial and all(
                    (a := ledger.get(u.update_id)) is not None and (a.server, a.worker) == (server, u.worker)
                    for u in updates):
                return current_gen  # a repeated accept
            if state.phase is not RoundPhase.OPEN:
                raise StoreConflict(f"round {number} attempt {attempt} is {state.phase.value}: no update is accepted")
            if current_gen != generation:
                raise StoreConflict(f"round {number} attempt {attempt}: the partial of server {server} is at "
                                    f"generation {current_gen}, the write replaces {generation} (another writer?)")
            refused: list[str] = []
            seen: set[str] = set()
            for u in updates:
                other = by_worker.get(u.worker)
                if u.update_id in ledger or u.update_id in seen or (other is not None and other != u.update_id):
                    refused.append(u.update_id)
                seen.add(u.update_id)
            if refused:
                raise DuplicateUpdate(f"round {number} attempt {attempt}: updates {sorted(refused)} were accepted "
                                      "before (or their worker has another accepted update); nothing recorded",
                                      refused)
            for u in updates:
                ledger[u.update_id] = AcceptedUpdate(u.worker, u.update_id, server)
                by_worker[u.worker] = u.update_id
            ids = (held.update_ids if held is not None else frozenset()) | {u.update_id for u in updates}
            partials[server] = Partial(server, generation + 1, ids, bytes(partial))
            counters = dict(state.counters)
            counters["accepted"] = counters.get("accepted", 0) + len(updates)
            for name, amount in (counts or {}).items():
                counters[name] = counters.get(name, 0) + int(amount)
            self._rounds[number] = RoundState(state.number, state.attempt, state.phase, state.model_version,
                                              state.sampled, state.required, counters, state.reason)
            return generation + 1

    def count(self, number: int, attempt: int, counts: Mapping[str, int]) -> bool:
        with self._lock:
            self._open()
            state = self._rounds.get(number) if self._current == number else None
            if state is None or state.attempt != attempt or state.phase not in (RoundPhase.OPEN, RoundPhase.CLOSING):
                return False
            counters = dict(state.counters)
            for name, amount in counts.items():
                counters[name] = counters.get(name, 0) + int(amount)
            self._rounds[number] = dataclasses.replace(state, counters=counters)
            return True

    def accepted(self, number: int, attempt: int) -> dict[str, AcceptedUpdate]:
        with self._lock:
            self._open()
            return dict(self._ledgers.get((number, attempt), {}))

    def partials(self, number: int, attempt: int) -> dict[str, Partial]:
        with self._lock:
            self._open()
            return dict(self._partials.get((number, attempt), {}))

    def partial(self, number: int, attempt: int, server: str) -> Partial | None:
        with self._lock:
            self._open()
            return self._partials.get((number, attempt), {}).get(server)

    # -- sessions --------------------------------------------------------------------------------

    def bind_session(self, session: Session) -> None:
        with self._lock:
            self._open()
            self._sessions[session.worker_id] = session

    def session(self, worker_id: str) -> Session | None:
        with self._lock:
            self._open()
            return self._sessions.get(worker_id)

    def drop_session(self, worker_id: str) -> None:
        with self._lock:
            self._open()
            self._sessions.pop(worker_id, None)

    def sessions(self) -> list[Session]:
        with self._lock:
            self._open()
            return sorted(self._sessions.values(), key=lambda s: s.worker_id)

    # -- leases ----------------------------------------------------------------------------------

    def _held(self, name: str) -> Lease | None:
        entry = self._leases.get(name)
        if entry is None or entry[1] <= self._clock():
            self._leases.pop(name, None)
            return None
        return entry[0]

    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> Lease | None:
        with self._lock:
            self._open()
            held = self._held(name)
            if held is not None and held.holder != holder:
                return None
            if held is None:
                self._fences[name] = self._fences.get(name, 0) + 1
                held = Lease(name, holder, self._fences[name])
            self._leases[name] = (held, self._expires(ttl_s))
            return held

    def renew_lease(self, lease: Lease, ttl_s: float) -> None:
        with self._lock:
            self._open()
            self._check_lease(lease)
            self._leases[lease.name] = (lease, self._expires(ttl_s))

    def release_lease(self, lease: Lease) -> None:
        with self._lock:
            self._open()
            held = self._held(lease.name)
            if held is not None and (held.token, held.holder) == (lease.token, lease.holder):
                del self._leases[lease.name]

    def lease(self, name: str) -> Lease | None:
        with self._lock:
            self._open()
            return self._held(name)

    def close(self) -> None:
        with self._lock:
            self._closed = True
