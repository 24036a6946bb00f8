"""The scheduler: owns a cluster's job in the store and shows the whole cluster to the management plane.

How this works: :meth:`Scheduler.run` writes the job's config into the store,
registers itself as the ``scheduler`` member, and then looks at the store
every ``cluster.poll_s``: each model version a leader publishes carries the
round's metrics row (:class:`~enclavefl.cluster.blobs.CloseState`), which the
scheduler appends to its own ``metrics.jsonl`` and publishes as a ``round``
event; the job ends when its last round is CLOSED (or a round failed
``round.max_retries + 1`` times). A pause is the ``pause`` lease, held and
renewed by the scheduler: the leader opens no round while anyone holds it.

Scaling (:meth:`Scheduler.scale`, ``POST /api/v1/scale``): fewer servers
means draining the extra ones (the highest ids): the scheduler holds the
``drain:<id>`` lease of each, renewed until that server has left the
membership, and each drains as :mod:`enclavefl.cluster.engine` says (its
round ends there, its workers move on). More servers need a way to start
them: the ``spawn`` callback the scheduler was given (for servers it starts
itself on its host); without one the operator starts ``enclavefl server``.

:class:`ClusterHandle` is the :class:`~enclavefl.management.schema.JobHandle`
of the cluster, built from the store: status and rounds as one PS reports
them, every worker session of a live server, and the cluster's nodes (every
server as SERVER, every worker as WORKER) for the cloud ``/state``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from enclavefl.cluster.blobs import decode_close_state
from enclavefl.cluster.engine import DRAIN_LEASE_PREFIX, LEADER_LEASE, PAUSE_LEASE, STOP_LEASE_PREFIX
from enclavefl.cluster.errors import StoreError, StoreUnavailable
from enclavefl.cluster.settings import stored_settings
from enclavefl.cluster.store import Lease, Member, RoundPhase, RoundState, Store
from enclavefl.config import JobConfig
from enclavefl.errors import ConfigError
from enclavefl.management.schema import Identity, JobState, RoundsPage, Status, StopMode, WorkerInfo
from enclavefl.server.events import EventBus
from enclavefl.server.handle import MAX_ROUNDS_PAGE, patch_config, settings_of
from enclavefl.server.metrics import MetricsLog

__all__ = ["MAX_SERVERS", "PAUSE_LEASE", "ClusterHandle", "Scheduler"]

log = logging.getLogger(__name__)

MAX_SERVERS = 64
"""The most servers a scale request may ask for."""

SERVER_START_S = 120.0
"""A server the scheduler started counts as starting this long, or until it registers."""


def _id_order(member_id: str) -> tuple[int, str]:
    """``server-2`` before ``server-10``: shorter ids first, then by text."""
    return len(member_id), member_id


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """The whole rows of an earlier run's ``metrics.jsonl`` (a torn last line is dropped)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    rows: list[dict[str, Any]] = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            break
        if isinstance(row, dict):
            rows.append(row)
    return rows


class Scheduler:
    """Owns job ``config`` in ``store`` (see the module docstring).

    Args:
        out_dir: receives ``metrics.jsonl`` (the rows of every round, as the servers record them).
        identity: what the scheduler's own attestation proves, for the status.
        spawn: starts a server with the given member id (a process on the scheduler's host), for
            :meth:`scale` up; None: scaling up is the operator's.
    """

    def __init__(self, config: JobConfig, store: Store, *, out_dir: Path, scheduler_id: str = "scheduler",
                 address: str = "", identity: Identity | None = None,
                 spawn: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.store = store
        self.scheduler_id = scheduler_id
        self.address = address
        self.identity = identity or Identity()
        self.events = EventBus()
        # A restarted scheduler keeps the rows it recorded; the next close's state brings those it missed.
        path = out_dir / config.summary.metrics_file
        self.metrics = MetricsLog(path, _read_rows(path))
        self.metrics.subscribe(self._publish_row)
        self.started_at = time.time()
        self.started_monotonic = time.monotonic()
        self.state: JobState = "starting"
        self.failure: str | None = None
        self._seen_version = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pause: Lease | None = None
        self._paused = False
        self.round: RoundState | None = None
        self._spawn = spawn
        self._drains: dict[str, Lease] = {}
        """Servers asked to drain, with the drain lease held for each until it has left."""
        self._starting: dict[str, float] = {}
        """Servers this scheduler started that have not registered yet, with when it stops waiting for them."""
        self._used: set[str] = set()
        """Every server id seen or started: a new server never reuses one (its directory, its log)."""
        self._servers: list[str] = []
        self._leader = ""
        self._stop_mode: StopMode | None = None
        self._stop_asked = 0.0
        self._unreachable_since: float | None = None
        self._config_blob: bytes | None = None
        """The job config in the store as last read (a leader may change ``job.rounds`` there)."""

    def _seen_round(self) -> int:
        return max((r["round"] for r in self.metrics.history if isinstance(r.get("round"), int)), default=0)

    def _publish_row(self, row: dict[str, Any]) -> None:
        self.events.publish("round", **row)

    # -- the loop ------------------------------------------------------------------------------------

    def run(self) -> JobState:
        """Runs until the job ends or :meth:`stop`; returns how it ended.

        Raises:
            StoreError: the store refused the job's config (another job's scheduler, a wrong key).
        """
        cluster = self.config.cluster
        self.store.put_config(yaml.safe_dump(self.config.to_dict()).encode())
        member = Member(self.scheduler_id, "scheduler", self.address)
        log.info("scheduler %s: job %s in the store, %d rounds", self.scheduler_id, self.config.job.name,
                 self.config.job.rounds)
        next_heartbeat = 0.0  # the first heartbeat registers it (inside the loop: an outage there only pauses it)
        while not self._stop.is_set():
            try:
                if time.monotonic() >= next_heartbeat:
                    if not self.store.heartbeat(self.scheduler_id, cluster.member_ttl_s):
                        self.store.register(member, cluster.member_ttl_s)
                    self._hold_pause()
                    self._hold_drains()
                    self._hold_stop()
                    self._keep_config()
                    self._watch_cluster()
                    next_heartbeat = time.monotonic() + cluster.heartbeat_s
                ended = self.tick() or self._stopped()
                self.note_store(True, "a tick succeeded")
                if ended:
                    break
            except StoreUnavailable as exc:
                self.note_store(False, str(exc))
            self._stop.wait(cluster.poll_s)
        try:
            self.store.deregister(self.scheduler_id)
        except StoreError as exc:
            log.warning("scheduler %s: could not deregister: %s", self.scheduler_id, exc)
        return self.state

    # -- settings ------------------------------------------------------------------------------------

    def replace_config(self, config: JobConfig) -> None:
        """Makes ``config`` the job's (validated by the caller): written into the store, where every server
        reads it at its next heartbeat and before each round (``cluster/engine.py``).

        Raises:
            StoreError: the store could not be written; the scheduler's own config is unchanged.
        """
        self.store.put_config(yaml.safe_dump(config.to_dict()).encode())
        with self._lock:
            self.config = config
        log.info("scheduler %s: job settings changed in the store", self.scheduler_id)

    # -- stop ----------------------------------------------------------------------------------------

    def request_stop(self, mode: StopMode) -> bool:
        """Ends the job on every server (``finish``: after the open round; ``abort``: at once).

        The scheduler holds the ``stop:<mode>`` lease until it ends; its :meth:`run` ends (``stopped``)
        once no server is left. False if a stop was asked for already or the job has ended.
        """
        with self._lock:
            if self._stop_mode is not None or self.state in ("finished", "failed", "stopped"):
                return False
            self._stop_mode, self._stop_asked = mode, time.monotonic()
        log.warning("scheduler %s: stop (%s) asked for: every server ends the job", self.scheduler_id, mode)
        self._hold_stop()
        return True

    def _hold_stop(self) -> None:
        with self._lock:
            mode = self._stop_mode
        if mode is not None:
            self.store.acquire_lease(STOP_LEASE_PREFIX + mode, self.scheduler_id, self.config.cluster.member_ttl_s)

    def _stopped(self) -> bool:
        """After a stop: True (the job is ``stopped``) once every server has left."""
        with self._lock:
            mode, asked = self._stop_mode, self._stop_asked
        if mode is None or time.monotonic() - asked < self.config.cluster.heartbeat_s:
            return False
        if self.store.members("server"):
            return False
        self.state = "stopped"
        self.events.publish("job", state="stopped", reason=f"stopped by an operator ({mode})")
        log.info("scheduler %s: every server has ended the job (stop: %s)", self.scheduler_id, mode)
        return True

    # -- what the cluster does, for the logs and the feed ---------------------------------------------

    def _watch_cluster(self) -> None:
        """Says when servers join or leave and when the leader lease changes hands (log line and event)."""
        servers = sorted((m.member_id for m in self.store.members("server")), key=_id_order)
        lease = self.store.lease(LEADER_LEASE)
        leader = lease.holder if lease is not None else ""
        with self._lock:
            self._used.update(servers)
        if servers != self._servers:
            joined = [m for m in servers if m not in self._servers]
            left = [m for m in self._servers if m not in servers]
            self._servers = servers
            log.info("scheduler %s: servers %s (joined %s, left %s)", self.scheduler_id, ", ".join(servers) or "none",
                     ", ".join(joined) or "none", ", ".join(left) or "none", extra={"event": "servers"})
            self.events.publish("cluster", event="servers", servers=servers, joined=joined, left=left)
        if leader != self._leader:
            self._leader = leader
            if leader:
                log.info("scheduler %s: %s leads (token %d)", self.scheduler_id, leader, lease.token if lease else 0,
                         extra={"event": "leader"})
                self.events.publish("cluster", event="leader", leader=leader)

    def _keep_config(self) -> None:
        """Takes the settings a leader changed in the store (a budget ends the job early: ``job.rounds``), and
        writes the job's config again if the store lost it (Redis restarted without its append-only file)."""
        blob = self.store.config()
        if blob is not None and blob == self._config_blob:
            return
        self._config_blob = blob  # None (an emptied store) is never skipped: the config is written again
        if blob is not None:
            with self._lock:
                try:
                    new = stored_settings(self.config, blob)
                except ConfigError as exc:
                    log.error("scheduler %s: the job config in the store is not valid: %s", self.scheduler_id, exc)
                    return
                if new is not None:
                    self.config = new
            if new is not None:
                log.info("scheduler %s: job settings changed in the store (job.rounds=%d)", self.scheduler_id,
                         new.job.rounds)
            return
        with self._lock:
            config = self.config
        self.store.put_config(yaml.safe_dump(config.to_dict()).encode())
        log.warning("scheduler %s: the store had lost the job (Redis restarted without its append-only file?): "
                    "config written again; the leader restores the model from the servers' last version",
                    self.scheduler_id, extra={"event": "store_emptied"})
        self.events.publish("cluster", event="store_emptied",
                            reason="the store lost its state; the leader restores the servers' last model version")

    def note_store(self, up: bool, reason: str) -> None:
        """The store stopped answering (``up`` False) or answers again: a log line and a ``cluster`` event, once.

        A Redis store calls it (:attr:`RedisStore.on_outage`) even for an outage its retries bridged;
        the loop calls it when a tick found the store unreachable. Any thread.
        """
        with self._lock:
            since = self._unreachable_since
            if (since is None) == up:
                return
            self._unreachable_since = None if up else time.monotonic()
        if up:
            seconds = time.monotonic() - since if since is not None else 0.0
            log.warning("scheduler %s: the store is reachable again after %.1fs (%s)", self.scheduler_id, seconds,
                        reason, extra={"event": "store_back"})
            self.events.publish("cluster", event="store_back", reason=f"unreachable for {seconds:.1f}s")
        else:
            log.warning("scheduler %s: the store is unreachable, rounds pause: %s", self.scheduler_id, reason,
                        extra={"event": "store_down"})
            self.events.publish("cluster", event="store_down", reason=reason)

    def stop(self) -> None:
        """Ends :meth:`run` only (a signal to the scheduler): the servers go on; :meth:`request_stop` ends the job."""
        self._stop.set()

    def tick(self) -> bool:
        """One look at the store; True once the job has ended."""
        state = self.store.round_state()
        with self._lock:
            self.round = state
        if state is None:
            return False
        if self.state == "starting":
            self.state = "running"
        current = state.model_version + (1 if state.phase is RoundPhase.CLOSED else 0)
        if current > self._seen_version:
            blob = self.store.strategy_state()
            if blob is not None and blob.version == current:
                close = decode_close_state(blob.blob)
                for row in close.rows_after(self._seen_round()):
                    self.metrics.append(row)
                self._seen_version = current
        if state.phase is RoundPhase.FAILED and state.attempt >= self.config.round.max_retries:
            self.state, self.failure = "failed", f"round {state.number} failed: {state.reason}"
            self.events.publish("job", state="failed", reason=self.failure)
            return True
        if state.phase is RoundPhase.CLOSED and state.number >= self.config.job.rounds \
                and self._seen_version >= state.model_version + 1:
            self.state = "finished"
            self.events.publish("job", state="finished", reason=f"{state.number} rounds done")
            return True
        return False

    # -- pause ---------------------------------------------------------------------------------------

    def _hold_pause(self) -> None:
        with self._lock:
            paused, held = self._paused, self._pause
        ttl = self.config.cluster.member_ttl_s
        if paused:
            lease = self.store.acquire_lease(PAUSE_LEASE, self.scheduler_id, ttl)
            with self._lock:
                self._pause = lease
        elif held is not None:
            self.store.release_lease(held)
            with self._lock:
                self._pause = None

    def set_paused(self, paused: bool) -> bool:
        """Pauses (no new round opens) or resumes; False if it already was so."""
        with self._lock:
            if self._paused == paused:
                return False
            self._paused = paused
        self._hold_pause()
        self.events.publish("control", action="pause" if paused else "resume")
        return True

    # -- scale ---------------------------------------------------------------------------------------

    def scale(self, servers: int) -> dict[str, Any]:
        """Asks for ``servers`` live servers: drains the extra ones (highest ids first), or starts more.

        Returns what it did: ``live`` (the servers not draining), ``draining``, ``starting`` (ids).

        Raises:
            ConfigError: ``servers`` is outside 1..MAX_SERVERS, or more servers are asked for and this
                scheduler was given no way to start them.
            StoreError: the store could not be read or written.
        """
        if not 1 <= servers <= MAX_SERVERS:
            raise ConfigError(f"servers={servers}: expected 1..{MAX_SERVERS}")
        members = sorted((m.member_id for m in self.store.members("server")), key=_id_order)
        now = time.monotonic()
        with self._lock:
            self._used.update(members)
            self._starting = {k: t for k, t in self._starting.items() if k not in members and t > now}
            live = [m for m in members if m not in self._drains]
            pending = sorted(self._starting, key=_id_order)
        starting: list[str] = []
        if servers < len(live):
            for server_id in live[servers:]:
                lease = self.store.acquire_lease(DRAIN_LEASE_PREFIX + server_id, self.scheduler_id,
                                                 self.config.cluster.member_ttl_s)
                if lease is not None:
                    with self._lock:
                        self._drains[server_id] = lease
                    log.info("scheduler %s: server %s asked to drain (scale to %d)", self.scheduler_id, server_id,
                             servers)
            live = live[:servers]
        elif servers > len(live) + len(pending):
            if self._spawn is None:
                raise ConfigError(f"servers={servers}: {len(live)} are live and this scheduler starts no servers; "
                                  "start more with `enclavefl server --scheduler ...`")
            number = 0
            while len(live) + len(pending) + len(starting) < servers:
                candidate = f"server-{number}"
                if candidate not in self._used:
                    starting.append(candidate)
                number += 1
            for server_id in starting:
                with self._lock:
                    self._used.add(server_id)
                    self._starting[server_id] = time.monotonic() + SERVER_START_S
                self._spawn(server_id)
                log.info("scheduler %s: server %s started (scale to %d)", self.scheduler_id, server_id, servers)
        self.events.publish("control", action="scale", servers=servers)
        with self._lock:
            draining = sorted(self._drains, key=_id_order)
        return {"servers": servers, "live": live, "draining": draining,
                "starting": sorted({*pending, *starting}, key=_id_order)}

    def _hold_drains(self) -> None:
        """Renews the drain lease of each server still a member; releases those of servers that left."""
        with self._lock:
            drains = dict(self._drains)
        if not drains:
            return
        members = {m.member_id for m in self.store.members("server")}
        for server_id, lease in drains.items():
            if server_id in members:
                self.store.acquire_lease(lease.name, self.scheduler_id, self.config.cluster.member_ttl_s)
                continue
            self.store.release_lease(lease)
            with self._lock:
                self._drains.pop(server_id, None)
            log.info("scheduler %s: server %s has left", self.scheduler_id, server_id)

    def round_state(self) -> RoundState | None:
        """The store's current round as of the last tick (None before the first round)."""
        with self._lock:
            return self.round

    @property
    def paused(self) -> bool:
        with self._lock:
            return self._paused


class ClusterHandle:
    """The management plane's view of a cluster (a :class:`~enclavefl.management.schema.JobHandle`)."""

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler

    @property
    def events(self) -> EventBus:
        return self._scheduler.events

    def status(self) -> Status:
        s = self._scheduler
        state = s.round_state()
        if state is None:
            number, done, version, participants, updates, phase = 1, 0, 0, 0, 0, "waiting"
        else:
            closed = state.phase is RoundPhase.CLOSED
            number = state.number + 1 if closed else state.number
            done = state.number if closed else state.number - 1
            version = state.model_version + (1 if closed else 0)
            is_open = state.phase is RoundPhase.OPEN
            participants = len(state.sampled) if is_open else 0
            updates = state.counters.get("accepted", 0) if is_open else 0
            phase = {RoundPhase.OPEN: "training", RoundPhase.CLOSING: "aggregating"}.get(state.phase, "waiting")
        job_state: JobState = "paused" if s.paused and s.state == "running" else s.state
        if job_state in ("finished", "failed", "stopped"):
            phase = "finished"
        rounds = s.config.job.rounds
        return Status(
            job=s.config.job.name, instance=s.scheduler_id, state=job_state, phase=phase, round=number,
            rounds=rounds, rounds_done=done, rounds_left=max(rounds - done, 0), model_version=version,
            participants=participants, updates=updates, workers_joined=len(self.workers()),
            started_at=s.started_at, uptime_s=time.monotonic() - s.started_monotonic,
            attestation_mode=s.config.attestation.mode, identity=s.identity,
            failure=s.failure,
        )

    def servers(self) -> list[Member]:
        """The live servers, by id (none when the store cannot be reached)."""
        return self._live_servers()

    def leader(self) -> str:
        """The server holding the leader lease ("" when none does, or the store cannot be reached)."""
        try:
            lease = self._scheduler.store.lease(LEADER_LEASE)
        except StoreError:
            return ""
        return lease.holder if lease is not None else ""

    def _live_servers(self) -> list[Member]:
        try:
            return self._scheduler.store.members("server")
        except StoreError:
            return []

    def workers(self) -> list[WorkerInfo]:
        store = self._scheduler.store
        live = {m.member_id for m in self._live_servers()}
        try:
            sessions = store.sessions()
        except StoreError:
            return []
        return [WorkerInfo(worker_id=s.worker_id, name=s.name, state="joined", last_seen_s=0.0, rounds_contributed=0,
                           bytes_in=0, bytes_out=0, identity=Identity(fingerprint=s.fingerprint))
                for s in sessions if s.server in live]

    def rounds(self, offset: int, limit: int) -> RoundsPage:
        rows = self._scheduler.metrics.history
        limit = max(0, min(limit, MAX_ROUNDS_PAGE))
        return RoundsPage(total=len(rows), offset=offset, rows=[dict(r) for r in rows[offset:offset + limit]])

    def nodes(self) -> list[dict[str, str]]:
        """The cloud ``/state`` nodes: every live server as SERVER, every worker of a live server as WORKER."""
        servers = self._live_servers()
        nodes = [{"node_id": m.member_id, "tcp_address": m.address, "role": "SERVER"} for m in servers]
        nodes += [{"node_id": w.worker_id, "tcp_address": "", "role": "WORKER"} for w in self.workers()]
        return nodes

    def stop(self, mode: StopMode, *, by: str) -> None:
        """Ends the job on every server (:meth:`Scheduler.request_stop`); a no-op once it has ended."""
        if mode not in ("finish", "abort"):
            raise ConfigError(f"stop mode {mode!r}: expected 'finish' or 'abort'")
        if self._scheduler.request_stop(mode):
            self._scheduler.events.publish("control", action="stop", by=by, mode=mode)

    def pause(self, *, by: str) -> bool:
        return self._scheduler.set_paused(True)

    def resume(self, *, by: str) -> bool:
        return self._scheduler.set_paused(False)

    def scale(self, servers: int, *, by: str) -> dict[str, Any]:
        """:meth:`Scheduler.scale`, asked for by ``by``."""
        log.info("scheduler: %s asks for %d servers", by, servers)
        return self._scheduler.scale(servers)

    def settings(self) -> dict[str, Any]:
        return settings_of(self._scheduler.config)

    def patch_settings(self, changes: Mapping[str, Any], *, by: str) -> dict[str, Any]:
        """Validates ``changes`` like one PS does and writes them into the store: every server applies them
        from the next round it opens or serves (see :meth:`Scheduler.replace_config`).

        Raises:
            ConfigError: as :func:`~enclavefl.server.handle.patch_config` says.
            StoreError: the store could not be written (nothing changed).
        """
        s = self._scheduler
        if not changes:
            return settings_of(s.config)
        state = s.round_state()
        done = 0 if state is None else state.number - (0 if state.phase is RoundPhase.CLOSED else 1)
        is_open = state is not None and state.phase in (RoundPhase.OPEN, RoundPhase.CLOSING)
        new = patch_config(s.config, changes, rounds_done=done, round_open=is_open)
        s.replace_config(new)
        s.events.publish("control", action="config", by=by, changes={k: settings_of(new)[k] for k in changes})
        return settings_of(new)
