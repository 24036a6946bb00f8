"""A running parameter server as the management plane sees it: :class:`PsHandle`.

How this works: the handle implements
:class:`~enclavefl.management.schema.JobHandle` over one
:class:`~enclavefl.server.ps.ParameterServer`. It keeps no state of its own
that could drift from the PS's: every read takes the server lock for the few
microseconds it needs to copy counters out of :class:`ServerCore`, the engine
and the worker registry, and builds the API's models after releasing it. The
event bus is the core's (one per PS); the handle only adds ``control`` events
for what an operator asked, and, once :meth:`PsHandle.connect_credentials` is
called, ``attestation`` events for every trust decision of the PS's
credentials.

Control goes through the same seams the engines watch: a pause keeps the
next round from opening, a stop is ``ParameterServer.stop(mode)``, and new
settings replace :attr:`ServerCore.config`, which the engine, the sampler and
the close pipeline read afresh for each round.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, final

from pydantic import ValidationError

from enclavefl.config import JobConfig
from enclavefl.config_errors import describe_errors
from enclavefl.errors import ConfigError
from enclavefl.management.schema import Identity, JobState, RoundsPage, Status, StopMode, WorkerInfo
from enclavefl.messages import PeerIdentity
from enclavefl.server.events import EventBus
from enclavefl.server.phases import Phase

if TYPE_CHECKING:
    from enclavefl.server.ps import ParameterServer

__all__ = ["MAX_ROUNDS_PAGE", "PATCHABLE", "AttestationMode", "AuditEntry", "PsHandle", "identity_of", "patch_config",
           "patchable", "settings_of"]

AttestationMode = Literal["simulated", "gramine", "none"]

PATCHABLE: Final = (
    "job.rounds",
    "round.min_workers",
    "round.start_window_s",
    "round.fraction",
    "round.update_ratio",
    "round.update_window_s",
    "round.min_updates",
    "round.max_retries",
    "round.buffer_size",
    "client.epochs",
    "client.batch_size",
    "client.lr",
)
"""The settings an operator may change while the job runs (applied from the next round)."""

_SYNC_ONLY: Final = frozenset({"round.fraction", "round.update_ratio"})
_ASYNC_ONLY: Final = frozenset({"round.buffer_size"})

MAX_ROUNDS_PAGE: Final = 1000
"""The most metrics rows one :meth:`PsHandle.rounds` call returns."""

_ETA_ROWS: Final = 20
"""The ETA is the mean duration of the last this-many rounds times the rounds left."""


class AuditEntry(Protocol):
    """What the handle reads of an attestation decision (the transport's ``AuditRecord`` has it)."""

    @property
    def peer(self) -> str: ...
    @property
    def decision(self) -> str: ...
    @property
    def field(self) -> str: ...
    @property
    def reason(self) -> str: ...
    @property
    def evidence(self) -> str: ...
    @property
    def mr_enclave(self) -> str: ...
    @property
    def weaker(self) -> tuple[str, ...]: ...


class _AuditSource(Protocol):
    def subscribe(self, listener: Callable[[Any], None]) -> None: ...


class _Credentials(Protocol):
    """What :meth:`PsHandle.connect_credentials` needs of the PS's credentials."""

    def own_identity(self) -> PeerIdentity: ...

    @property
    def audit_log(self) -> _AuditSource | None: ...


def identity_of(peer: PeerIdentity | None) -> Identity:
    """The API's view of what a node's attestation proved."""
    if peer is None:
        return Identity()
    return Identity(evidence=peer.evidence, mr_enclave=peer.measurement, mr_signer=peer.mr_signer,
                    isv_prod_id=peer.isv_prod_id, isv_svn=peer.isv_svn, tcb_status=peer.tcb_status,
                    advisories=tuple(peer.advisories), weaker=tuple(peer.weaker), fingerprint=peer.fingerprint)


def _seconds(row: Mapping[str, Any]) -> float:
    return sum(float(row.get(k) or 0.0) for k in ("seconds_wait", "seconds_train", "seconds_aggregate", "seconds_eval"))


def _get(config: JobConfig, dotted: str) -> Any:
    section, _, key = dotted.partition(".")
    return getattr(getattr(config, section), key)


def patchable(config: JobConfig) -> tuple[str, ...]:
    """The settings of :data:`PATCHABLE` that apply to this job's round mode."""
    skip = _ASYNC_ONLY if config.round.mode == "sync" else _SYNC_ONLY
    return tuple(k for k in PATCHABLE if k not in skip)


def settings_of(config: JobConfig) -> dict[str, Any]:
    """The job's current value of each setting an operator may change."""
    return {key: _get(config, key) for key in patchable(config)}


def patch_config(config: JobConfig, changes: Mapping[str, Any], *, rounds_done: int, round_open: bool) -> JobConfig:
    """``config`` with ``changes`` (dotted keys), validated like the job file; nothing is applied here.

    Raises:
        ConfigError: a key that does not exist or may not change while the job runs, a value
            the job file would refuse (naming the dotted key), or ``job.rounds`` below the
            rounds done (or the open round).
    """
    allowed = patchable(config)
    for key in changes:
        if key in allowed:
            continue
        section, _, name = str(key).partition(".")
        known = section in JobConfig.model_fields and name in type(getattr(config, section)).model_fields
        why = "may not change while the job runs" if known else "is not a setting"
        raise ConfigError(f"{key}: {why}; the settings that may change are {', '.join(allowed)}")
    merged = config.model_dump()
    for key, value in changes.items():
        section, _, name = key.partition(".")
        merged[section][name] = value
    try:
        new = JobConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError("; ".join(describe_errors(exc, root=JobConfig))) from exc
    floor = rounds_done + 1 if round_open else rounds_done
    if "job.rounds" in changes and new.job.rounds < floor:
        what = f"round {rounds_done + 1} is open" if round_open else f"{rounds_done} rounds are done"
        raise ConfigError(f"job.rounds = {new.job.rounds}: must be at least {floor} ({what})")
    return new


@final
class PsHandle:
    """The :class:`~enclavefl.management.schema.JobHandle` of one parameter server.

    Get it with :meth:`ParameterServer.handle`. Every method is thread-safe and
    returns quickly (none waits for a round).
    """

    def __init__(self, ps: ParameterServer, *, attestation_mode: AttestationMode | None = None,
                 identity: Identity | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        """Prepares the view; prefer :meth:`ParameterServer.handle`, which makes one per PS.

        Args:
            attestation_mode: shown in the status; default the job's ``attestation.mode``.
            identity: what this PS's own attestation proves; default: none
                (:meth:`connect_credentials` sets it from the PS's credentials).
            clock: monotonic seconds (the registry's clock), for ages and uptime.
        """
        self._ps = ps
        self._core = ps.core
        self._mode: AttestationMode = attestation_mode or ps.config.attestation.mode
        self._identity = identity or Identity()
        self._clock = clock

    # ------------------------------------------------------------------ wiring
    @property
    def events(self) -> EventBus:
        return self._core.events

    @property
    def identity(self) -> Identity:
        """What this PS's own attestation proves (shown in :meth:`status`)."""
        return self._identity

    def set_identity(self, identity: Identity) -> None:
        self._identity = identity

    def audit_listener(self) -> Callable[[AuditEntry], None]:
        """A listener for the credentials' audit log: each trust decision becomes an ``attestation`` event."""
        bus = self._core.events

        def publish(entry: AuditEntry) -> None:
            bus.publish("attestation", peer=entry.peer, decision=entry.decision, field=entry.field,
                        reason=entry.reason, evidence=entry.evidence, mr_enclave=entry.mr_enclave,
                        weaker=list(entry.weaker))

        return publish

    def connect_credentials(self, credentials: _Credentials) -> None:
        """Shows the PS's own identity from its credentials and publishes their audit decisions.

        Call it once, before the PS serves workers (``app.serve`` does).
        """
        self._identity = identity_of(credentials.own_identity())
        audit = credentials.audit_log
        if audit is not None:
            audit.subscribe(self.audit_listener())

    # ------------------------------------------------------------------ reads
    def status(self) -> Status:
        core, engine = self._core, self._ps.engine
        with core.cond:
            config = core.config
            phase, next_round, version = core.phase, core.next_round, core.version
            participants, updates = engine.open_counts()
            joined = len(core.registry)
            outcome, paused, running, failure = core.outcome, core.paused, core.running, core.failure
            history = core.metrics.history
            recent = [_seconds(r) for r in history[-_ETA_ROWS:]]
        rounds, done = config.job.rounds, next_round - 1
        left = max(0, rounds - done)
        state: JobState
        if outcome is not None:
            state = outcome
        elif paused:
            state = "paused"
        else:
            state = "running" if running else "starting"
        eta = left * sum(recent) / len(recent) if recent and outcome is None else None
        return Status(
            job=config.job.name, instance=core.instance, state=state, phase=phase.value,
            round=done if outcome is not None or phase is Phase.FINISHED else next_round,
            rounds=rounds, rounds_done=done, rounds_left=left, model_version=version,
            participants=participants, updates=updates, workers_joined=joined,
            started_at=core.started_at, uptime_s=round(self._clock() - core.started_monotonic, 3),
            eta_s=None if eta is None else round(eta, 3), attestation_mode=self._mode, identity=self._identity,
            failure=failure if state == "failed" else None,
        )

    def workers(self) -> list[WorkerInfo]:
        core = self._core
        with core.cond:
            # Copied under the lock: the handler changes these records as workers call.
            rows = [(w.worker_id, w.name, w.state, w.last_seen, w.rounds_contributed, w.bytes_in, w.bytes_out,
                     w.identity, w.reason) for w in [*core.registry.records(), *core.registry.departed()]]
        now = self._clock()
        return [WorkerInfo(worker_id=wid, name=name, state=state, last_seen_s=round(max(now - seen, 0.0), 3),
                           rounds_contributed=contributed, bytes_in=bytes_in, bytes_out=bytes_out,
                           identity=identity_of(peer), reason=reason)
                for wid, name, state, seen, contributed, bytes_in, bytes_out, peer, reason in rows]

    def rounds(self, offset: int, limit: int) -> RoundsPage:
        """Metrics rows ``offset .. offset + limit`` (oldest first; at most :data:`MAX_ROUNDS_PAGE`)."""
        offset, limit = max(offset, 0), min(max(limit, 0), MAX_ROUNDS_PAGE)
        with self._core.cond:
            history = self._core.metrics.history
            total = len(history)
            rows = [dict(r) for r in history[offset:offset + limit]]
        return RoundsPage(total=total, offset=offset, rows=rows)

    # ------------------------------------------------------------------ control
    def stop(self, mode: StopMode, *, by: str) -> None:
        """Ends the job as ``mode`` says (see :meth:`ParameterServer.stop`); a no-op once it has ended."""
        if mode not in ("finish", "abort"):
            raise ConfigError(f"stop mode {mode!r}: expected 'finish' or 'abort'")
        core = self._core
        with core.cond:
            if core.outcome is not None or core.ending:
                return
            core.events.publish("control", action="stop", by=by, mode=mode)
        self._ps.stop(mode)

    def pause(self, *, by: str) -> bool:
        core = self._core
        with core.cond:
            if core.outcome is not None or not core.pause():
                return False
            core.events.publish("control", action="pause", by=by)
        return True

    def resume(self, *, by: str) -> bool:
        core = self._core
        with core.cond:
            if not core.resume():
                return False
            core.events.publish("control", action="resume", by=by)
        return True

    def settings(self) -> dict[str, Any]:
        with self._core.cond:
            config = self._core.config
        return settings_of(config)

    def patch_settings(self, changes: Mapping[str, Any], *, by: str) -> dict[str, Any]:
        """Validates ``changes`` like the job file and applies them from the next round.

        Raises:
            ConfigError: a key that does not exist or may not change while the job runs, a value
                the job file would refuse (naming the dotted key), or ``job.rounds`` below the
                rounds done (or the open round).
        """
        core = self._core
        with core.cond:
            config = core.config
            if not changes:
                return settings_of(config)
            new = patch_config(config, changes, rounds_done=core.next_round - 1,
                               round_open=core.phase in (Phase.TRAINING, Phase.AGGREGATING))
            core.replace_config(new)
            core.events.publish("control", action="config", by=by, changes={key: _get(new, key) for key in changes})
            return settings_of(new)
