"""The round engine of a cluster server: rounds live in the shared store; one leader opens and closes them.

How this works: each server runs a normal :class:`~enclavefl.server.ps.ParameterServer`
(joins, long-polls, staging, the close pipeline) whose engine is a
:class:`ClusterEngine`. Every ``cluster.poll_s`` the engine thread makes one
*tick*:

1. membership: it heartbeats its member entry, and binds the sessions of the
   workers joined to it (``bind_session``) so the leader can sample them;
2. follow: it reads the store's current round. A new model version (closed by
   whichever server led) is loaded with the strategy's state and metrics row
   and installed; an OPEN round attempt becomes a local
   :class:`~enclavefl.server.round.Round` whose aggregator is a
   :class:`~enclavefl.cluster.ledger.StoreAggregator`, so every update this
   server accepts is in the store's ledger and in its partial; a round that
   left OPEN is closed locally (no more uploads);
3. lead: it tries to take (or renew) the ``leader`` lease. The holder
   publishes the first model, opens rounds (sampling over the sessions of all
   live servers), and closes them when ``required`` updates were accepted or
   the update window passed: ``begin_close``, read the partials and the ledger,
   ``check_partials``, merge them in server-id order, run the existing
   :class:`~enclavefl.server.closing.ClosePipeline` (optimizer, evaluation,
   metrics, checkpoint), and ``finish_round`` with the model and the state. A
   round found CLOSING (its leader died during the close) is finished by the
   next leader from what the store holds.

Every leader write carries the lease: a leader that lost it cannot publish.
A round that failed ``round.max_retries + 1`` times ends the job on every server.

Draining (:meth:`ClusterEngine.drain`, or the scheduler holding the
``drain:<server id>`` lease): the server leaves the membership and drops its
workers' sessions at once, so no new round samples them; it hands the leader
lease over (after finishing a close it began), serves the round it has open
to its end (its partial stays in the store for the leader), then answers each
of its workers' next call with "unknown session": a worker with alternatives
joins its next server. Once every worker has moved (or two heartbeats
passed), the server ends; a worker that calls or joins it after that is sent
on too, never told FINISH (the job goes on elsewhere). The last live server
does not drain: it stops as a lone PS does.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

import yaml

from enclavefl.cluster.assignment import balance
from enclavefl.cluster.blobs import CloseState, decode_close_state, decode_model, encode_close_state, encode_model
from enclavefl.cluster.errors import LeaseLost, StoreConflict, StoreError, StoreUnavailable
from enclavefl.cluster.ledger import METRIC_SCALE, LedgerTarget, StoreAggregator
from enclavefl.cluster.settings import stored_settings
from enclavefl.cluster.store import Lease, Member, RoundPhase, RoundState, Session, Store, UpdateRef, check_partials
from enclavefl.config import ClusterConfig
from enclavefl.errors import ConfigError, RoundError, StaleSession, UpdateRejected
from enclavefl.messages import CLUSTER_SERVERS_KEY, ConfigValue, TaskInfo, UpdateMeta
from enclavefl.server.checkpoint import params_digest
from enclavefl.server.closing import ClosePipeline
from enclavefl.server.core import ServerCore
from enclavefl.server.engine import Engine, SyncEngine
from enclavefl.server.handle import patch_config, settings_of
from enclavefl.server.phases import Phase
from enclavefl.server.registry import WorkerRecord
from enclavefl.server.ps import EngineFactory
from enclavefl.server.round import Round, RoundRecord
from enclavefl.server.sampling import Candidate
from enclavefl.server.staging import UpdateTarget
from enclavefl.server.state import Stateful
from enclavefl.server.strategy import Strategy
from enclavefl.tensors import StreamHeader

__all__ = ["DRAIN_LEASE_PREFIX", "LEADER_LEASE", "PAUSE_LEASE", "STOP_LEASE_PREFIX", "UPDATE_ID_KEY", "ClusterEngine",
           "cluster_engine"]

log = logging.getLogger(__name__)

LEADER_LEASE = "leader"
"""The lease whose holder opens and closes rounds."""

PAUSE_LEASE = "pause"
"""Held by the scheduler while an operator has paused the job: the leader opens no round."""

DRAIN_LEASE_PREFIX = "drain:"
"""``drain:<server id>``, held by the scheduler: that server drains (see the module docstring)."""

STOP_LEASE_PREFIX = "stop:"
"""``stop:finish`` or ``stop:abort``, held by the scheduler when an operator stops the job: every server ends it
(``finish``: the open round completes first; ``abort``: it is abandoned)."""

UPDATE_ID_KEY = "update_id"
"""An update's ``extensions`` key for the id it carries on every (re-)send; else ``<round>/<worker name>``."""


@dataclass(slots=True)
class _Local:
    """The store's round attempt as this server mirrors it."""

    number: int
    attempt: int
    round: Round
    aggregator: StoreAggregator


class _Keepalive:
    """Renews the leader lease and the membership every ``heartbeat_s`` while a long step (a close) runs.

    The thread is owned by the ``with`` block: it ends (and is joined) when the block does.
    """

    def __init__(self, store: Store, lease: Lease, member_id: str, cluster: ClusterConfig) -> None:
        self._store, self._lease, self._member_id, self._cluster = store, lease, member_id, cluster
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"keepalive-{member_id}", daemon=True)

    def __enter__(self) -> _Keepalive:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(self._cluster.heartbeat_s + self._store_timeout_s())

    def _store_timeout_s(self) -> float:
        return self._cluster.redis.timeout_s

    def _run(self) -> None:
        while not self._stop.wait(self._cluster.heartbeat_s):
            try:
                self._store.renew_lease(self._lease, self._cluster.lease_ttl_s)
                self._store.heartbeat(self._member_id, self._cluster.member_ttl_s)
            except LeaseLost as exc:
                log.warning("server %s: lost the leader lease during a close: %s", self._member_id, exc)
                return  # the close's own writes are refused from now on (fenced)
            except StoreError as exc:
                log.warning("server %s: could not renew the leader lease: %s", self._member_id, exc)


class ClusterEngine(SyncEngine):
    """Synchronous rounds shared through a :class:`Store` by several servers (see the module docstring).

    Args (after the engine factory's four):
        store: the cluster's store (sealed, for anything outside an enclave).
        server_id: this server's member id: its partial's key and its lease holder name.
        cluster: the job's ``cluster`` section (TTLs, poll interval).
        address: where workers and peers reach this server (``host:port``), for the membership entry.
    """

    def __init__(self, *args: Any, store: Store, server_id: str, cluster: ClusterConfig, address: str = "",
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.store = store
        self.server_id = server_id
        self.cluster = cluster
        self.address = address
        self.lease: Lease | None = None
        self._local: _Local | None = None
        self._synced: int | None = None
        """The model version this server installed from (or published to) the store."""
        self._bound: dict[str, str] = {}
        self._placement: dict[str, str] = {}
        """Worker name -> its servers' addresses in order, as of the last heartbeat once round 1 opened."""
        self._next_heartbeat = 0.0
        self._first_seen: dict[tuple[int, int], float] = {}
        self._waiting_since: float | None = None
        self._model_checked = False
        """Whether the store's model was looked at since start, or since the store may have lost it."""
        self._empty_since: float | None = None
        """When this leader found the store empty (it restores the job two heartbeats later)."""
        self._yield_until = 0.0
        """Until then this server does not take the leader lease (it handed it to a server with a newer model)."""
        self._refused: dict[tuple[int, int], int] = {}
        """Uploads refused per round attempt since the last tick (added to the store's counters)."""
        self._refused_lock = threading.Lock()
        self._unpublished: tuple[int, int, bytes, bytes] | None = None
        """A close this leader made but could not publish yet: (round, attempt, model, state)."""
        self._unreachable_since: float | None = None
        self._config_blob: bytes | None = None
        """The job config in the store as last read (an operator's settings changes arrive there)."""
        self._drain = threading.Event()
        self._draining = False
        self._handover_until: float | None = None
        """Set (under the core's lock) once the drained server's round is over: its workers are sent on."""
        self.drained = False
        """True once this server drained and left the cluster (its loop has ended or is ending)."""

    # -- the loop ----------------------------------------------------------------------------------

    def loop(self) -> None:
        core = self.core
        self.store.register(self._member(), self.cluster.member_ttl_s)
        self._next_heartbeat = time.monotonic() + self.cluster.heartbeat_s
        log.info("server %s: registered (%s), ps %s", self.server_id, self.address or "no address", core.instance)
        try:
            while self._going():
                try:
                    self.tick()
                    if self._unreachable_since is not None:
                        log.warning("server %s: the store is reachable again after %.1fs", self.server_id,
                                    time.monotonic() - self._unreachable_since, extra={"event": "store_back"})
                        self._unreachable_since = None
                except StoreUnavailable as exc:
                    # Rounds pause: nothing opens or closes until the store answers again.
                    if self._unreachable_since is None:
                        self._unreachable_since = time.monotonic()
                        log.warning("server %s: the store is unreachable, rounds pause: %s", self.server_id, exc,
                                    extra={"event": "store_down"})
                with core.cond:
                    if self._going():
                        core.cond.wait(self.cluster.poll_s)
        finally:
            self._leave()

    def _going(self) -> bool:
        # A stop to finish ends the loop through core.finish() once the open round closed (see tick).
        return self.core.phase is not Phase.FINISHED and not self.core.stopping and not self.drained

    def drain(self) -> None:
        """Asks this server to leave the cluster once its open round is over (see the module docstring).

        Idempotent; may be called from any thread (a signal handler's callback, say).
        """
        self._drain.set()
        with self.core.cond:
            self.core.cond.notify_all()

    def tick(self) -> None:
        """One look at the store: membership, then follow, then lead (see the module docstring).

        Raises:
            RoundError: the job failed (a round failed more than ``round.max_retries`` times).
        """
        if self._drain.is_set():
            self._drain_tick()
            return
        self._membership()
        self._flush_refused()
        state = self.store.round_state()
        self._follow(state)
        if self.core.finishing and (state is None or state.phase in (RoundPhase.CLOSED, RoundPhase.FAILED)):
            log.info("server %s: the job was stopped; no round is open: ending it", self.server_id,
                     extra={"event": "stopped"})
            self.core.finish()
            return
        if time.monotonic() < self._yield_until:
            return  # it handed the lease to a server with a newer model (see _restore)
        lease = self.store.acquire_lease(LEADER_LEASE, self.server_id, self.cluster.lease_ttl_s)
        if lease is not None:
            if self.lease is None or lease.token != self.lease.token:
                log.info("server %s: took the leader lease (token %d)", self.server_id, lease.token,
                         extra={"event": "leader"})
            self.lease = lease
            self._lead(lease, state)
        elif self.lease is not None:
            log.warning("server %s: lost the leader lease", self.server_id)
            self.lease = None

    def _member(self) -> Member:
        # The model version it holds: after the store lost the job, the server holding the newest restores it.
        return Member(self.server_id, "server", self.address, {"instance": self.core.instance,
                                                                 "version": str(self.core.version)})

    def _leave(self) -> None:
        """Best effort: releases the lease and the membership (another server or the TTL takes over)."""
        try:
            if self.lease is not None:
                self.store.release_lease(self.lease)
            for worker_id in list(self._bound):
                self.store.drop_session(worker_id)
            self.store.deregister(self.server_id)
        except StoreError as exc:
            log.warning("server %s: could not leave the store cleanly: %s", self.server_id, exc)

    def _membership(self) -> None:
        now = time.monotonic()
        if now >= self._next_heartbeat:
            if not self.store.heartbeat(self.server_id, self.cluster.member_ttl_s):
                log.warning("server %s: membership had expired; registered again", self.server_id)
                self.store.register(self._member(), self.cluster.member_ttl_s)
                self._bound.clear()  # the store may have lost the sessions too (an emptied Redis): bind all again
                self._model_checked = False
            if self.store.lease(DRAIN_LEASE_PREFIX + self.server_id) is not None:
                log.info("server %s: the scheduler asks this server to drain", self.server_id)
                self._drain.set()
            self._check_stop()
            self._sync_settings()
            self._place()
            self._next_heartbeat = now + self.cluster.heartbeat_s
        with self.core.cond:
            joined = {w.worker_id: (w.fingerprint, w.name) for w in self.core.registry.records()}
        for worker_id, (fingerprint, name) in joined.items():
            if self._bound.get(worker_id) != fingerprint:
                self.store.bind_session(Session(worker_id, fingerprint, self.server_id, name))
                self._bound[worker_id] = fingerprint
        for worker_id in [w for w in self._bound if w not in joined]:
            self.store.drop_session(worker_id)
            del self._bound[worker_id]

    def _sync_settings(self) -> None:
        """Applies the settings an operator changed through the scheduler (the job config in the store).

        Only the settings that may change while a job runs are taken (``server/handle.py``'s
        ``PATCHABLE``); the rest of this server's config stays its own.
        """
        blob = self.store.config()
        if blob is None or blob == self._config_blob:
            return
        self._config_blob = blob
        core = self.core
        with core.cond:
            before = settings_of(core.config)
            try:
                new = stored_settings(core.config, blob)
            except ConfigError as exc:
                log.error("server %s: the job config in the store is not valid: %s", self.server_id, exc)
                return
            if new is None:
                return
            core.replace_config(new)
        changed = {k: v for k, v in settings_of(new).items() if before.get(k) != v}
        log.info("server %s: settings changed in the store: %s", self.server_id,
                 ", ".join(f"{k}={v}" for k, v in sorted(changed.items())), extra={"event": "settings"})

    def _check_stop(self) -> None:
        """Ends the job here when the scheduler holds a stop lease (an operator's stop)."""
        core = self.core
        if not core.stopping and self.store.lease(STOP_LEASE_PREFIX + "abort") is not None:
            log.warning("server %s: the job was stopped (abort): the open round is abandoned", self.server_id,
                        extra={"event": "stopped"})
            core.request_stop()
        elif not core.ending and self.store.lease(STOP_LEASE_PREFIX + "finish") is not None:
            log.info("server %s: the job was stopped (finish): the open round completes, no other opens",
                     self.server_id, extra={"event": "stopped"})
            core.request_finish()

    # -- drain -------------------------------------------------------------------------------------

    def _drain_tick(self) -> None:
        core = self.core
        if not self._draining:
            others = [m for m in self.store.members("server") if m.member_id != self.server_id]
            if not others:
                log.warning("server %s: asked to drain, but no other server is live: stopping instead",
                            self.server_id)
                core.request_stop()
                return
            self._draining = True
            with core.cond:
                self._placement = {}
            self.store.deregister(self.server_id)  # no new round samples this server's workers
            log.info("server %s: draining: left the membership; %d servers remain", self.server_id, len(others),
                     extra={"event": "draining"})
        # The sessions of workers the open round sampled stay (the leader waits for what they still send,
        # and this server serves that round to its end); the others go at once, so no round counts on them.
        state = self.store.round_state()
        waited = state.sampled if state is not None and state.phase is RoundPhase.OPEN else frozenset()
        for worker_id in [w for w in self._bound if w not in waited]:
            self.store.drop_session(worker_id)
            del self._bound[worker_id]
        if self.lease is not None:
            if state is not None and state.phase is RoundPhase.CLOSING:
                self._lead(self.lease, state)  # a close this leader began: finish it first
                return
            self.store.release_lease(self.lease)
            self.lease = None
            log.info("server %s: draining: released the leader lease", self.server_id)
        self._follow(state)
        if self._local is not None:
            return  # the round open here runs to its end: its uploads still land in this server's partial
        now = time.monotonic()
        with core.cond:
            if self._handover_until is None:
                self._handover_until = now + 2 * self.config.round.heartbeat_s + self.cluster.poll_s
                log.info("server %s: draining: handing %d workers over to the other servers", self.server_id,
                         len(core.registry))
                core.cond.notify_all()  # long-polls answer at once
            left = len(core.registry)
            if left and now < self._handover_until:
                return
            self.drained = True
        core.request_stop()  # its part ends here; a worker that calls again is sent on (before_finish)
        log.info("server %s: drained (%d workers did not call again); leaving", self.server_id, left,
                 extra={"event": "drained"})

    def before_finish(self, worker: WorkerRecord) -> None:
        if self.drained:
            # The job goes on elsewhere: a worker that calls (or joins) after the handover is sent on, never
            # told FINISH (it would end, and the rounds would wait for it).
            self.core.registry.remove(worker.worker_id, state="left", reason="handed over: the server left")
            raise StaleSession(f"server {self.server_id} has left the cluster: join another server")

    def task_for(self, worker: WorkerRecord) -> TaskInfo | None:
        if self._handover_until is not None:
            # An unknown session: the worker joins its next server.
            self.core.registry.remove(worker.worker_id, state="left", reason="handed over: the server drains")
            raise StaleSession(f"server {self.server_id} is leaving the cluster: join another server")
        task = super().task_for(worker)
        servers = self.wait_config(worker)
        return task if task is None or not servers else dataclasses.replace(task, config={**task.config, **servers})

    def _place(self) -> None:
        """Where every worker of the live servers should be (:func:`~enclavefl.cluster.assignment.balance`).

        Not before round 1 opened: while workers still join, the placement of a few would move them
        back and forth.
        """
        if self._draining or self.store.round_state() is None:
            return
        servers = [m for m in self.store.members("server") if m.address]
        live = {m.member_id for m in servers}
        names = [s.name for s in self.store.sessions() if s.server in live]
        placement = {name: ",".join(m.address for m in order) for name, order in balance(names, servers).items()}
        with self.core.cond:
            self._placement = placement

    def wait_config(self, worker: WorkerRecord) -> dict[str, ConfigValue]:
        """The worker's live servers in order (see :meth:`_place`): the first is where it should be.

        Train tasks carry it too: a worker moves after the round it trains (see
        :mod:`enclavefl.worker.servers`), so a server added mid-job takes its workers from the next round.
        """
        servers = self._placement.get(worker.name)
        return {} if self._draining or servers is None else {CLUSTER_SERVERS_KEY: servers}

    # -- follow ------------------------------------------------------------------------------------

    def _parts(self) -> dict[str, Stateful]:
        parts: dict[str, Stateful] = {"optimizer": self.strategy.optimizer, "algorithm": self.strategy.algorithm,
                                      "engine": self}
        parts.update(self.strategy.parts)
        return parts

    def _follow(self, state: RoundState | None) -> None:
        if state is None:
            if self._local is not None:
                # The store holds no round but this server serves one: the store lost the job's state (Redis
                # restarted without its append-only file). The round is over here; the leader restores.
                log.warning("server %s round %d: the store no longer knows the open round (it lost its state); "
                            "its updates are lost, the round opens again", self.server_id, self._local.number,
                            extra={"event": "store_emptied"})
                self._close_local()
                self._model_checked = False
            return
        if state.phase is RoundPhase.FAILED and state.attempt >= self.config.round.max_retries:
            raise RoundError(f"round {state.number} failed {state.attempt + 1} times, the last because: "
                             f"{state.reason}; the job fails")
        current = state.model_version + (1 if state.phase is RoundPhase.CLOSED else 0)
        if self._synced != current:
            self._pick_up(current)
        local = self._local
        if local is not None and (state.phase is not RoundPhase.OPEN
                                  or (local.number, local.attempt) != (state.number, state.attempt)):
            self._close_local()
        # A draining server still serves a round that sampled its workers before it left the membership.
        if (state.phase is RoundPhase.OPEN and self._local is None and self.core.version == state.model_version
                and (not self._draining or not state.sampled.isdisjoint(self._bound))):
            self._open_local(state)
        if state.phase is RoundPhase.CLOSED and state.number >= self.config.job.rounds:
            self.core.finish()

    def _pick_up(self, version: int) -> None:
        """Installs model ``version`` from the store, with the strategy's state and metrics row of its close."""
        core = self.core
        if core.version == version and version == 0:
            # Every server built the first model from the same task and seed; the store's must be it.
            published = self.store.model(0)
            if published is not None and params_digest(decode_model(published.blob)) != params_digest(core.params):
                raise RoundError(f"server {self.server_id}: the cluster's first model differs from this server's "
                                 "(another task, seed or model): refusing to serve it")
            self._synced = 0 if published is not None else None
            return
        if core.version == version:
            self._synced = version
            return
        model, blob = self.store.model(version), self.store.strategy_state()
        if model is None or blob is None or blob.version != version:
            return  # published but not yet readable as a pair: the next tick tries again
        params = decode_model(model.blob)
        state = decode_close_state(blob.blob)
        parts = self._parts()
        with core.cond:
            for name, part_state in state.parts.items():
                if name in parts:
                    parts[name].load_state(part_state)
            if core.phase is Phase.TRAINING:
                core.set_phase(Phase.AGGREGATING)
        with core.cond:
            seen = max((r["round"] for r in core.metrics.history if isinstance(r.get("round"), int)), default=0)
        missed = state.rows_after(seen)
        if not missed:
            raise RoundError(f"server {self.server_id}: model version {version} from the store carries no metrics "
                             f"row after round {seen}")
        with core.cond:
            for row in missed[:-1]:  # rounds led elsewhere while this server was not there (it joined late)
                core.metrics.append(row)
        core.install(params, version, state.round + 1, missed[-1])  # takes the lock itself
        with core.cond:
            if core.phase is Phase.AGGREGATING:
                core.set_phase(Phase.WAITING)
        self._synced = version
        log.info("server %s round %d: model version %d picked up from the store, digest %s", self.server_id,
                 state.round, version, params_digest(params)[:16])

    def _open_local(self, state: RoundState) -> None:
        core = self.core
        self._sync_settings()  # its tasks carry the operator's latest client settings
        aggregator = StoreAggregator(self.strategy.aggregator, self.upload_template, self.store,
                                     number=state.number, attempt=state.attempt, server=self.server_id)
        with core.cond:
            self._round_config = self.config
            rnd = Round(state.number, state.model_version, state.attempt, state.sampled, state.required, aggregator,
                        self.upload_template, self.config.round.update_window_s, notify=core.notify)
            self._local = _Local(state.number, state.attempt, rnd, aggregator)
            self.round = rnd
            core.registry.settle()
            self._opened()
            if core.phase is not Phase.TRAINING:
                core.set_phase(Phase.TRAINING)
            mine = sum(1 for w in state.sampled if w in core.registry)
        log.info("server %s round %d: open (attempt %d) on model version %d, %d of %d sampled workers here",
                 self.server_id, state.number, state.attempt, state.model_version, mine, len(state.sampled))

    def _close_local(self) -> None:
        local, core = self._local, self.core
        if local is None:
            return
        record = local.round.close()  # waits for an accept in progress; later uploads are refused
        local.aggregator.close()
        with core.cond:
            # As one PS: a worker of this server the round sampled that sent nothing is dropped.
            late = frozenset() if core.stopping else record.sampled - record.pushed - record.dropped
            for worker_id in late:
                if core.registry.remove(worker_id, reason=f"no update by the end of round {local.number}") is not None:
                    log.info("server %s round %d: worker %s dropped (no update by the end of round %d)",
                             self.server_id, local.number, worker_id, local.number)
            self._local = None
            self.round = None
            if core.phase is Phase.TRAINING:
                core.set_phase(Phase.AGGREGATING)

    # -- handler seams -------------------------------------------------------------------------------

    def target_for(self, meta: UpdateMeta) -> tuple[UpdateTarget, int, float]:
        local = self._local
        if self.core.phase is not Phase.TRAINING or local is None:
            raise UpdateRejected(f"no round is open on server {self.server_id} (phase {self.core.phase.value})")
        worker = self.core.registry.find(meta.worker_id)
        sampled_as = meta.worker_id
        if meta.worker_id not in local.round.sampled and worker is not None:
            sampled_as = self._failed_over_from(local, worker.name, worker.fingerprint) or meta.worker_id
        local.round.admit(meta if sampled_as == meta.worker_id else dataclasses.replace(meta, worker_id=sampled_as))
        raw = meta.extensions.get(UPDATE_ID_KEY)
        update_id = (raw.decode("utf-8", "replace")[:128] if raw else
                     f"{local.number}/{worker.name if worker is not None else meta.worker_id}")
        target = LedgerTarget(local.round, local.aggregator, UpdateRef(sampled_as, update_id), sampled_as=sampled_as,
                              on_refused=self._note_refused)
        return target, 0, local.round.deadline

    def note_rejection(self, worker_id: str) -> None:
        super().note_rejection(worker_id)
        self._note_refused()

    def _note_refused(self) -> None:
        """Counts a refused upload of the open round; the next tick adds it to the store's ``rejected`` counter
        (the PS lock may be held here: no store call)."""
        local = self._local
        if local is not None:
            with self._refused_lock:
                key = (local.number, local.attempt)
                self._refused[key] = self._refused.get(key, 0) + 1

    def _flush_refused(self) -> None:
        with self._refused_lock:
            refused, self._refused = self._refused, {}
        for (number, attempt), count in refused.items():
            self.store.count(number, attempt, {"rejected": count})

    def _failed_over_from(self, local: _Local, name: str, fingerprint: str) -> str | None:
        """The id the round sampled this worker as on another server, if it failed over from there mid-round.

        A worker whose server died joins an alternative (with a new worker id) and re-sends the update it
        trained for the open round. It counts as the worker the round sampled when the store holds a session
        of a sampled id, on another server, with the same name and certificate fingerprint; the store's
        ledger still counts one update per (sampled) worker and per update id. Only uploads from unsampled
        ids reach this look-up.
        """
        for session in self.store.sessions():
            if (session.worker_id in local.round.sampled and session.server != self.server_id
                    and session.name == name and session.fingerprint == fingerprint):
                log.info("server %s round %d: worker %s failed over from server %s (sampled as %s)",
                         self.server_id, local.number, name, session.server, session.worker_id,
                         extra={"event": "failover"})
                return session.worker_id
        return None

    # -- lead --------------------------------------------------------------------------------------

    def _lead(self, lease: Lease, state: RoundState | None) -> None:
        try:
            if state is None:
                if not self._model_checked and self.store.model() is None:
                    if self._synced is None:
                        self._publish_first(lease)
                    elif not self._restore(lease):
                        return
                self._model_checked = True
                self._open_next(lease, self.core.next_round, 0)
            elif state.phase is RoundPhase.CLOSED:
                if state.number < self.config.job.rounds and self.core.version == state.model_version + 1:
                    self._open_next(lease, state.number + 1, 0)
            elif state.phase is RoundPhase.FAILED:
                if state.attempt < self.config.round.max_retries and self.core.version == state.model_version:
                    self._open_next(lease, state.number, state.attempt + 1)
            elif state.phase is RoundPhase.OPEN:
                self._maybe_close(lease, state)
            else:  # CLOSING: this leader began it, or its predecessor died during the close
                self._close(lease, state)
        except (LeaseLost, StoreConflict) as exc:
            log.warning("server %s: a leader step was refused (%s); following the store", self.server_id, exc)

    def _publish_first(self, lease: Lease) -> None:
        core = self.core
        with core.cond:
            params, parts = core.params, core.part_states()
        self.store.publish_model(0, encode_model(params), lease=lease,
                                 strategy_state=encode_close_state(CloseState(0, (), parts)))
        self._synced = 0
        log.info("server %s: published the first model (version 0, digest %s)", self.server_id,
                 params_digest(params)[:16])

    def _restore(self, lease: Lease) -> bool:
        """Publishes this server's model, with its parts' state and history, into a store that lost the job.

        A close carries the model, the optimizer's and accountant's state and the metrics rows, and every
        server installs it, so the live server with the newest version holds the latest state there was:
        the job goes on from it (the round that was open is trained again). A leader behind another live
        server (by the versions in their membership entries) hands the lease over instead: False. So that
        every live server has registered again first (the store lost the membership too), it waits two
        heartbeats after it found the store empty (False meanwhile).
        """
        core = self.core
        now = time.monotonic()
        if self._empty_since is None:
            self._empty_since = now
            log.warning("server %s: the store is empty (Redis restarted without its append-only file?); restoring "
                        "the job once the live servers registered again", self.server_id,
                        extra={"event": "store_emptied"})
        if now - self._empty_since < 2 * self.cluster.heartbeat_s:
            return False
        ahead = [m.member_id for m in self.store.members("server")
                 if m.member_id != self.server_id and int(m.meta.get("version", "-1")) > core.version]
        if ahead:
            log.warning("server %s: the store is empty and %s hold a newer model than version %d: handing the leader "
                        "lease over for the restore", self.server_id, ", ".join(ahead), core.version)
            self.store.release_lease(lease)
            self.lease = None
            self._yield_until = now + 5 * self.cluster.poll_s
            return False
        self._empty_since = None
        with core.cond:
            params, version, history, parts = core.params, core.version, tuple(core.metrics.history), core.part_states()
            done = core.next_round - 1
        log.warning("server %s: the store is empty (Redis restarted without its append-only file?): restoring model "
                    "version %d after round %d from this server's state (digest %s)", self.server_id, version, done,
                    params_digest(params)[:16], extra={"event": "store_restored"})
        self.store.publish_model(version, encode_model(params), lease=lease,
                                 strategy_state=encode_close_state(CloseState(done, history, parts)))
        self._synced = version
        return True

    def _open_next(self, lease: Lease, number: int, attempt: int) -> None:
        if self.core.ending:
            return  # stopped: the round open when the stop came was the last
        cfg = self.config.round  # as of the last heartbeat; read again from the store just before opening
        if self.store.lease(PAUSE_LEASE) is not None:
            return  # paused by the operator: the open round (if any) ran on, no new one opens
        live = {m.member_id for m in self.store.members("server")}
        candidates = [Candidate(s.worker_id, s.name, 0) for s in self.store.sessions() if s.server in live]
        if len(candidates) < cfg.min_workers:
            now = time.monotonic()
            if self._waiting_since is None:
                self._waiting_since = now
                log.info("server %s round %d: waiting for min_workers=%d (%d joined across %d servers)",
                         self.server_id, number, cfg.min_workers, len(candidates), len(live))
            elif now - self._waiting_since > cfg.start_window_s * (cfg.max_retries + 1):
                raise RoundError(f"round {number}: fewer than min_workers={cfg.min_workers} joined the cluster "
                                 f"({len(candidates)}) within {cfg.max_retries + 1} start windows")
            return
        self._sync_settings()  # the round opens with the operator's latest settings
        cfg = self.config.round
        if len(candidates) < cfg.min_workers:
            return  # an operator raised min_workers just now: the next tick waits for them
        self._waiting_since = None
        sampled = self.sampler().sample(candidates, number, attempt)
        with self.core.cond:
            refusal = self._gate(number, len(sampled), len(candidates))  # a privacy budget, say
        if refusal is not None:
            self._end_by_gate(number, refusal)
            return
        required = max(1, math.ceil(cfg.update_ratio * len(sampled) - 1e-9))
        self.store.open_round(number, attempt, model_version=self.core.version, sampled=sampled, required=required,
                              lease=lease)
        self._first_seen[(number, attempt)] = time.monotonic()
        log.info("server %s round %d: opened (attempt %d) on model version %d, sampled %d of %d, need %d",
                 self.server_id, number, attempt, self.core.version, len(sampled), len(candidates), required)

    def _end_by_gate(self, number: int, refusal: str) -> None:
        """A strategy gate refused round ``number``: the job ends after round ``number - 1`` on every server.

        The leader checkpoints and writes ``job.rounds = number - 1`` into the job config in the store, which
        every server and the scheduler take (as an operator's change), so all of them end as finished.

        Raises:
            RoundError: the gate refused round 1 (no round to end after).
        """
        log.warning("server %s round %d: not opened: %s", self.server_id, number, refusal, extra={"event": "gate_stop"})
        if number <= 1:
            raise RoundError(f"round 1 cannot open: {refusal}")
        self.pipeline.checkpoint_latest()
        with self.core.cond:
            new = patch_config(self.core.config, {"job.rounds": number - 1}, rounds_done=number - 1, round_open=False)
        self.store.put_config(yaml.safe_dump(new.to_dict()).encode())
        self._sync_settings()

    def _maybe_close(self, lease: Lease, state: RoundState) -> None:
        seen = self._first_seen.setdefault((state.number, state.attempt), time.monotonic())
        accepted = state.counters.get("accepted", 0)
        expired = time.monotonic() - seen >= self.config.round.update_window_s
        if accepted >= state.required or expired or not self._answerable(state):
            if accepted < state.required:
                log.warning("server %s round %d: closed %s with %d of %d updates", self.server_id, state.number,
                            "by its window" if expired else "as no other sampled worker can still answer",
                            accepted, len(state.sampled))
            self._close(lease, self.store.begin_close(state.number, state.attempt, lease=lease))

    def _answerable(self, state: RoundState) -> bool:
        """Whether a sampled worker that has not pushed still has a session (on any server, live or not).

        A worker that left or was dropped has none: the round waits for it no longer, as one PS's round
        does not. A session on a dead server stays until the round ends, as its worker may fail over.
        """
        pushed = {a.worker for a in self.store.accepted(state.number, state.attempt).values()}
        waiting = state.sampled - pushed
        return bool(waiting) and any(s.worker_id in waiting for s in self.store.sessions())

    def _close(self, lease: Lease, state: RoundState) -> None:
        """Merges the partials of a CLOSING round and publishes the next model (or fails the attempt)."""
        number, attempt = state.number, state.attempt
        pending = self._unpublished
        if pending is not None and pending[:2] == (number, attempt):
            # This leader ran the close already and could not publish it (the store was unreachable):
            # publish the same bytes again, never a second optimizer step.
            self._publish_close(lease, state, pending[2], pending[3], count=-1, servers=-1)
            return
        with _Keepalive(self.store, lease, self.server_id, self.cluster):  # a close may outlast the TTLs
            self._close_and_publish(lease, state)

    def _close_and_publish(self, lease: Lease, state: RoundState) -> None:
        number, attempt = state.number, state.attempt
        self._follow(state)  # the local round closes: no upload is folded from here on
        self._flush_refused()  # this server's refusals count in the row (the others' as they reported them)
        state = self.store.round_state(number) or state
        partials, accepted = self.store.partials(number, attempt), self.store.accepted(number, attempt)
        check_partials(number, attempt, partials, accepted)
        log.info("server %s round %d: closing attempt %d: merging %d updates from %d servers", self.server_id, number,
                 attempt, len(accepted), len(partials), extra={"event": "round_closing"})
        aggregator = self.strategy.aggregator(self.upload_template)
        if partials:
            aggregator.merge({server: p.blob for server, p in partials.items()})
        if aggregator.count < self.config.round.min_updates:
            aggregator.close()
            why = f"round {number} got {aggregator.count} updates, min_updates={self.config.round.min_updates}"
            retries = self.config.round.max_retries
            log.warning("server %s round %d: %s; %s", self.server_id, number, why,
                        f"retry {attempt + 1} of {retries}" if attempt < retries else f"gave up after {retries} retries")
            self.store.fail_round(number, attempt, why, lease=lease)
            return
        record = self._record(state, {a.worker for a in accepted.values()}, aggregator.count,
                              float(getattr(aggregator, "total_weight", 0.0)))
        try:
            self.pipeline.close(record, aggregator, seconds_wait=0.0)
        except UpdateRejected as exc:
            self.store.fail_round(number, attempt, str(exc), lease=lease)
            return
        core = self.core
        with core.cond:
            params, history, parts = core.params, tuple(core.metrics.history), core.part_states()
            if core.phase is Phase.AGGREGATING:
                core.set_phase(Phase.WAITING)
        model, close_state = encode_model(params), encode_close_state(CloseState(number, history, parts))
        self._unpublished = (number, attempt, model, close_state)
        self._publish_close(lease, state, model, close_state, count=aggregator.count, servers=len(partials))

    def _publish_close(self, lease: Lease, state: RoundState, model: bytes, close_state: bytes, *, count: int,
                       servers: int) -> None:
        """``finish_round`` with what the close made (StoreUnavailable: kept, and retried by the next tick)."""
        try:
            self.store.finish_round(state.number, state.attempt, model=model, strategy_state=close_state, lease=lease)
        except (LeaseLost, StoreConflict) as exc:
            # This server's model is ahead of the store's: it cannot serve the cluster's rounds any more.
            raise RoundError(f"server {self.server_id} round {state.number}: the close could not be published "
                             f"({exc}); another leader finishes it") from exc
        self._unpublished = None
        self._synced = state.model_version + 1
        log.info("server %s round %d: closed, %s updates from %s servers, model version %d published", self.server_id,
                 state.number, count if count >= 0 else "the", servers if servers >= 0 else "its", self._synced,
                 extra={"event": "round_closed"})

    def _record(self, state: RoundState, pushed: set[str], count: int, weight: float) -> RoundRecord:
        """The round as the whole cluster saw it (from the store's counters), for the metrics row."""
        counters = state.counters
        means: dict[str, float] = {}
        for name in ("loss", "accuracy"):
            n = counters.get(f"n:{name}", 0)
            if n:
                means[name] = counters.get(f"m:{name}", 0) / METRIC_SCALE / n
        opened = self._first_seen.get((state.number, state.attempt), time.monotonic())
        return RoundRecord(
            number=state.number, model_version=state.model_version, attempt=state.attempt, sampled=state.sampled,
            pushed=frozenset(pushed), dropped=frozenset(state.sampled - pushed), rejected=counters.get("rejected", 0),
            num_samples=counters.get("num_samples", 0), weight=weight, bytes_in=counters.get("bytes_in", 0),
            bytes_out=0, opened_at=opened, worker_metrics=(means,) if means else (),
        )


def cluster_engine(store: Store, server_id: str, cluster: ClusterConfig, *, address: str = "") -> EngineFactory:
    """The engine factory a cluster server's :class:`~enclavefl.server.ps.ParameterServer` is built with.

    The engine it makes raises ConfigError for a strategy with round stages or gates, which it does not run.
    """

    def make(core: ServerCore, strategy: Strategy, pipeline: ClosePipeline, template: StreamHeader) -> Engine:
        if strategy.stages is not None:
            raise ConfigError("cluster mode runs no round stages yet (secure aggregation): the leader would skip them")
        return ClusterEngine(core, strategy, pipeline, template, store=store, server_id=server_id, cluster=cluster,
                             address=address)

    return make
