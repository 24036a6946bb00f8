"""The store of a cluster: Redis, reached with the ``redis`` client (the ``cluster`` extra).

How this works: every key of a job lives under ``efl:{<job>}:`` (the braces are
a Redis Cluster hash tag: one slot, so scripts may touch any of them). Each
transition that checks before it writes is a Lua script
(:mod:`enclavefl.cluster.redis_scripts`), which Redis runs without interleaving;
plain writes (config, sessions, membership) are single commands or a
MULTI/EXEC pipeline. Leases are ``token:holder`` strings with a PX expiry,
their fencing token an INCR counter that never goes back. The key layout is
listed in docs/cluster.md.

When Redis cannot be reached the client retries with exponential backoff
(``RedisSettings.retries``) and then raises :class:`StoreUnavailable`; the
connection pool reconnects on the next call once Redis is back, and the
scripts are loaded again if the restarted Redis lost them. Every write is
idempotent for identical arguments, so a retried write whose first attempt
did land is answered as done.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, TypeVar, final

from enclavefl.cluster.errors import DuplicateUpdate, LeaseLost, StoreConflict, StoreError, StoreUnavailable
from enclavefl.cluster import redis_scripts as lua
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
    ttl_ms,
)
from enclavefl.errors import ClosedError, ConfigError

if TYPE_CHECKING:
    import redis

__all__ = ["RedisSettings", "RedisStore"]

log = logging.getLogger(__name__)

_JOB: Final = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """Where Redis is and how to reach it. The password never appears in a repr or a message."""

    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    username: str | None = None
    """The ACL user (None: the default user)."""
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ca_file: str | None = None
    """The CA that signed Redis's certificate (TLS); None uses the system's."""
    cert_file: str | None = None
    """A client certificate, when Redis asks for one (``tls-auth-clients``)."""
    key_file: str | None = None
    connect_timeout_s: float = 2.0
    timeout_s: float = 30.0
    """For one command (a script writing a large partial included)."""
    retries: int = 5
    """Retries of a command that found Redis unreachable, before StoreUnavailable."""
    backoff_base_s: float = 0.05
    backoff_cap_s: float = 1.0

    @property
    def address(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}/{self.db}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _bytes(value: Any) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


def _logged_retry(base: Any, settings: RedisSettings, note_down: Callable[[Exception], None]) -> Any:
    """The client's retry policy, logging when Redis stops answering and when it answers again.

    A restart of Redis shorter than the retry budget is otherwise invisible: the
    operator reads here that the cluster waited for it, and for how many retries.
    """

    class LoggedRetry(base):  # type: ignore[misc]
        def call_with_retry(self, do: Callable[[], Any], fail: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            failures = 0

            def noted_fail(error: Exception, *count: Any) -> Any:
                nonlocal failures
                failures += 1
                if failures == 1:
                    log.warning("redis %s: unreachable (%s); retrying with backoff, up to %d times", settings.address,
                                error, settings.retries, extra={"event": "store_retry"})
                    note_down(error)
                return fail(error, *count)

            def noted_do() -> Any:
                result = do()
                if failures:
                    log.warning("redis %s: answers again after %d retries", settings.address, failures,
                                extra={"event": "store_back"})
                return result

            return super().call_with_retry(noted_do, noted_fail, *args, **kwargs)

    return LoggedRetry


@final
class RedisStore(Store):
    """A :class:`Store` in Redis, shared by every server of job ``job``.

    Args:
        settings: where Redis is, TLS and ACL credentials, retry budget.
        job: the job's name; its keys live under ``efl:{job}:``.

    :attr:`on_outage`, when set, hears ``(False, reason)`` when Redis stops answering (its first
    failed attempt, even one a retry then mends) and ``(True, reason)`` when a call succeeds again:
    what the scheduler tells the operator's event feed.

    Raises:
        ConfigError: the ``redis`` client is not installed, or ``job`` is not a valid name.
    """

    def __init__(self, settings: RedisSettings, *, job: str) -> None:
        try:
            import redis
            from redis.backoff import ExponentialBackoff
            from redis.retry import Retry
        except ImportError as exc:
            raise ConfigError("the Redis store needs the redis client: pip install 'enclavefl[cluster]'") from exc
        if not _JOB.match(job):
            raise ConfigError(f"cluster job name {job!r}: expected 1-64 letters, digits, '_', '.' or '-'")
        self._errors = redis.exceptions
        self._settings = settings
        self._prefix = f"efl:{{{job}}}:"
        self._closed = False
        self.on_outage: Callable[[bool, str], None] | None = None
        self._down_since: float | None = None
        self._client = redis.Redis(
            host=settings.host, port=settings.port, db=settings.db, username=settings.username,
            password=settings.password, ssl=settings.tls, ssl_ca_certs=settings.ca_file,
            ssl_certfile=settings.cert_file, ssl_keyfile=settings.key_file,
            socket_connect_timeout=settings.connect_timeout_s, socket_timeout=settings.timeout_s,
            retry=_logged_retry(Retry, settings, self._note_down)(ExponentialBackoff(cap=settings.backoff_cap_s,
                                                                     base=settings.backoff_base_s),
                                                  settings.retries, (redis.ConnectionError, redis.TimeoutError)),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        )
        self._scripts = {name: self._client.register_script(getattr(lua, name)) for name in lua.__all__}

    # -- plumbing ------------------------------------------------------------------------------

    def _key(self, *parts: object) -> str:
        return self._prefix + ":".join(str(p) for p in parts)

    def _note_down(self, error: Exception) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            if self.on_outage is not None:
                self.on_outage(False, f"{self._settings.address}: {error}")

    def _note_up(self) -> None:
        since, self._down_since = self._down_since, None
        if since is not None and self.on_outage is not None:
            self.on_outage(True, f"{self._settings.address} answers again after {time.monotonic() - since:.1f}s")

    def _call(self, what: str, fn: Callable[[], _T]) -> _T:
        """Runs one Redis step, translating the client's errors into the store's."""
        if self._closed:
            raise ClosedError("the store was closed")
        r = self._errors
        where = self._settings.address
        try:
            result = fn()
        except (r.AuthenticationError, r.AuthorizationError) as exc:
            raise StoreError(f"{where}: {what}: Redis refused user {self._settings.username or 'default'}: {exc}") from exc
        except (r.ConnectionError, r.TimeoutError) as exc:
            raise StoreUnavailable(f"{where}: {what}: Redis is unreachable after {self._settings.retries} retries "
                                   f"({exc}); the store is paused until it returns") from exc
        except r.NoScriptError as exc:
            # Redis lost a script (it restarted) and the client's own reload did not cover this call (seen
            # when Redis restarted under a running scheduler): a pause; the next call loads it again.
            raise StoreUnavailable(f"{where}: {what}: Redis lost its scripts (it restarted): {exc}") from exc
        except r.RedisError as exc:
            raise StoreError(f"{where}: {what}: Redis answered an error: {exc}") from exc
        if self._down_since is not None:
            self._note_up()
        return result

    def _run(self, what: str, script: str, keys: Sequence[str], args: Sequence[bytes | str | int]) -> list[Any]:
        """Runs a transition script and raises the refusal it answers."""
        reply: list[Any] = self._call(what, lambda: self._scripts[script](keys=list(keys), args=list(args)))
        status = _text(reply[0]) if reply else "ok"
        if status == "ok":
            return reply[1:]
        message = _text(reply[1])
        if status == "lease":
            raise LeaseLost(message)
        if status == "duplicate":
            raise DuplicateUpdate(message, [_text(x) for x in reply[2:]])
        raise StoreConflict(message)

    def _fence(self, lease: Lease | None) -> tuple[str, list[str | int]]:
        if lease is None:
            return self._key("lease", ""), ["", ""]
        return self._key("lease", lease.name), [str(lease.token), lease.holder]

    # -- membership ----------------------------------------------------------------------------

    def register(self, member: Member, ttl_s: float) -> None:
        body = json.dumps({"member_id": member.member_id, "role": member.role, "address": member.address,
                           "meta": dict(member.meta)})

        def write() -> None:
            with self._client.pipeline(transaction=True) as pipe:
                pipe.set(self._key("member", member.member_id), body, px=ttl_ms(ttl_s))
                pipe.sadd(self._key("members"), member.member_id)
                pipe.execute()

        self._call(f"register {member.member_id}", write)

    def heartbeat(self, member_id: str, ttl_s: float) -> bool:
        ms = ttl_ms(ttl_s)
        return bool(self._call(f"heartbeat {member_id}",
                               lambda: self._client.pexpire(self._key("member", member_id), ms)))

    def deregister(self, member_id: str) -> None:
        def write() -> None:
            with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(self._key("member", member_id))
                pipe.srem(self._key("members"), member_id)
                pipe.execute()

        self._call(f"deregister {member_id}", write)

    def members(self, role: MemberRole | None = None) -> list[Member]:
        bodies = self._run("list members", "LIVE_MEMBERS", [self._key("members")], [self._key("member", "")])
        found = [json.loads(body) for body in bodies]
        return sorted((Member(d["member_id"], d["role"], d["address"], d["meta"]) for d in found
                       if role is None or d["role"] == role), key=lambda m: m.member_id)

    # -- config and model ----------------------------------------------------------------------

    def put_config(self, blob: bytes) -> None:
        self._call("put config", lambda: self._client.set(self._key("config"), bytes(blob)))

    def config(self) -> bytes | None:
        value = self._call("get config", lambda: self._client.get(self._key("config")))
        return None if value is None else _bytes(value)

    def publish_model(self, version: int, blob: bytes, *, strategy_state: bytes | None = None,
                      lease: Lease | None = None) -> None:
        lease_key, fence = self._fence(lease)
        self._run(f"publish model version {version}", "PUBLISH_MODEL",
                  [lease_key, self._key("model", "version"), self._key("strategy"), self._key("round", "current")],
                  [*fence, version, bytes(blob), "1" if strategy_state is not None else "0", strategy_state or b"",
                   self._key("model", ""), self._key("round", "")])

    def model(self, version: int | None = None) -> ModelVersion | None:
        reply = self._run("get model", "GET_MODEL", [self._key("model", "version")],
                          [self._key("model", ""), "" if version is None else version])
        if not reply:
            return None
        return ModelVersion(int(reply[0]), _bytes(reply[1]))

    def strategy_state(self) -> StateBlob | None:
        version, blob = self._call("get strategy state",
                                   lambda: self._client.hmget(self._key("strategy"), ["version", "blob"]))
        if version is None or blob is None:
            return None
        return StateBlob(int(version), _bytes(blob))

    # -- rounds --------------------------------------------------------------------------------

    def open_round(self, number: int, attempt: int, *, model_version: int, sampled: Collection[str],
                   required: int, lease: Lease | None = None) -> RoundState:
        lease_key, fence = self._fence(lease)
        self._run(f"open round {number} attempt {attempt}", "OPEN_ROUND",
                  [lease_key, self._key("round", "current"), self._key("model", "version"), self._key("round", number),
                   self._key("round", number - 1)],
                  [*fence, number, attempt, model_version, json.dumps(sorted(sampled)), required])
        return self._state(number)

    def _state(self, number: int) -> RoundState:
        state = self.round_state(number)
        if state is None:
            raise StoreConflict(f"round {number} vanished right after its transition (another writer?)")
        return state

    def round_state(self, number: int | None = None) -> RoundState | None:
        def read() -> dict[Any, Any] | None:
            wanted = number
            if wanted is None:
                current = self._client.get(self._key("round", "current"))
                if current is None:
                    return None
                wanted = int(current)
            found: dict[Any, Any] = self._client.hgetall(self._key("round", wanted))
            return found or None

        raw = self._call("get round state", read)
        if raw is None:
            return None
        d = {_text(k): _text(v) for k, v in raw.items()}
        counters = {k[2:]: int(v) for k, v in d.items() if k.startswith("c:")}
        return RoundState(int(d["number"]), int(d["attempt"]), RoundPhase(d["phase"]), int(d["model_version"]),
                          frozenset(json.loads(d["sampled"])), int(d["required"]), counters, d.get("reason", ""))

    def _attempt_key(self, number: int, attempt: int, *parts: object) -> str:
        return self._key("round", number, attempt, *parts)

    def _move(self, number: int, attempt: int, to: RoundPhase, reason: str, lease: Lease | None) -> RoundState:
        lease_key, fence = self._fence(lease)
        self._run(f"round {number} attempt {attempt} -> {to.value}", "MOVE_ROUND",
                  [lease_key, self._key("round", "current"), self._key("round", number),
                   self._attempt_key(number, attempt, "partials")],
                  [*fence, number, attempt, to.value, reason, self._attempt_key(number, attempt, "partial", "")])
        return self._state(number)

    def begin_close(self, number: int, attempt: int, *, lease: Lease | None = None) -> RoundState:
        return self._move(number, attempt, RoundPhase.CLOSING, "", lease)

    def fail_round(self, number: int, attempt: int, reason: str, *, lease: Lease | None = None) -> RoundState:
        return self._move(number, attempt, RoundPhase.FAILED, reason, lease)

    def finish_round(self, number: int, attempt: int, *, model: bytes, strategy_state: bytes | None = None,
                     lease: Lease | None = None) -> RoundState:
        lease_key, fence = self._fence(lease)
        self._run(f"finish round {number} attempt {attempt}", "FINISH_ROUND",
                  [lease_key, self._key("round", "current"), self._key("round", number),
                   self._attempt_key(number, attempt, "partials"), self._key("model", "version"),
                   self._key("strategy")],
                  [*fence, number, attempt, bytes(model), "1" if strategy_state is not None else "0",
                   strategy_state or b"", self._attempt_key(number, attempt, "partial", ""), self._key("model", "")])
        return self._state(number)

    # -- accepted updates ------------------------------------------------------------------------

    def accept(self, number: int, attempt: int, server: str, updates: Sequence[UpdateRef], partial: bytes, *,
               generation: int, counts: Mapping[str, int] | None = None) -> int:
        counters = sorted((counts or {}).items())
        args: list[bytes | str | int] = [number, attempt, server, generation, bytes(partial), len(counters)]
        for name, amount in counters:
            args += [name, int(amount)]
        for u in updates:
            args += [u.worker, u.update_id]
        reply = self._run(f"accept {len(updates)} updates of server {server} in round {number}", "ACCEPT",
                          [self._key("round", "current"), self._key("round", number),
                           self._attempt_key(number, attempt, "accepted"), self._attempt_key(number, attempt, "workers"),
                           self._attempt_key(number, attempt, "partial", server),
                           self._attempt_key(number, attempt, "partials")], args)
        return int(reply[0])

    def count(self, number: int, attempt: int, counts: Mapping[str, int]) -> bool:
        args: list[bytes | str | int] = [number, attempt]
        for name, amount in sorted(counts.items()):
            args += [name, int(amount)]
        reply = self._run(f"count {', '.join(sorted(counts))} in round {number}", "COUNT",
                          [self._key("round", "current"), self._key("round", number)], args)
        return int(reply[0]) == 1

    def accepted(self, number: int, attempt: int) -> dict[str, AcceptedUpdate]:
        raw = self._call("get accepted updates",
                         lambda: self._client.hgetall(self._attempt_key(number, attempt, "accepted")))
        out = {}
        for k, v in raw.items():
            uid, d = _text(k), json.loads(v)
            out[uid] = AcceptedUpdate(d["worker"], uid, d["server"])
        return out

    def partials(self, number: int, attempt: int) -> dict[str, Partial]:
        def read() -> dict[str, Partial]:
            servers = sorted(_text(s) for s in self._client.smembers(self._attempt_key(number, attempt, "partials")))
            with self._client.pipeline(transaction=True) as pipe:
                for s in servers:
                    pipe.hmget(self._attempt_key(number, attempt, "partial", s), ["gen", "ids", "blob"])
                rows = pipe.execute() if servers else []
            return {s: Partial(s, int(gen), frozenset(json.loads(ids)), _bytes(blob))
                    for s, (gen, ids, blob) in zip(servers, rows) if gen is not None}

        return self._call("get partials", read)

    def partial(self, number: int, attempt: int, server: str) -> Partial | None:
        gen, ids, blob = self._call(f"get partial of {server}", lambda: self._client.hmget(
            self._attempt_key(number, attempt, "partial", server), ["gen", "ids", "blob"]))
        if gen is None or ids is None or blob is None:
            return None
        return Partial(server, int(gen), frozenset(json.loads(ids)), _bytes(blob))

    # -- sessions --------------------------------------------------------------------------------

    def bind_session(self, session: Session) -> None:
        body = json.dumps({"worker_id": session.worker_id, "fingerprint": session.fingerprint,
                           "server": session.server, "name": session.name})

        def write() -> None:
            with self._client.pipeline(transaction=True) as pipe:
                pipe.set(self._key("session", session.worker_id), body)
                pipe.sadd(self._key("sessions"), session.worker_id)
                pipe.execute()

        self._call(f"bind session {session.worker_id}", write)

    def session(self, worker_id: str) -> Session | None:
        body = self._call(f"get session {worker_id}", lambda: self._client.get(self._key("session", worker_id)))
        return None if body is None else Session(**json.loads(body))

    def drop_session(self, worker_id: str) -> None:
        def write() -> None:
            with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(self._key("session", worker_id))
                pipe.srem(self._key("sessions"), worker_id)
                pipe.execute()

        self._call(f"drop session {worker_id}", write)

    def sessions(self) -> list[Session]:
        def read() -> list[Session]:
            ids = sorted(_text(w) for w in self._client.smembers(self._key("sessions")))
            bodies = self._client.mget([self._key("session", w) for w in ids]) if ids else []
            return [Session(**json.loads(body)) for body in bodies if body is not None]

        return self._call("list sessions", read)

    # -- leases ----------------------------------------------------------------------------------

    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> Lease | None:
        reply = self._call(f"acquire lease {name}", lambda: self._scripts["ACQUIRE_LEASE"](
            keys=[self._key("lease", name), self._key("lease", name, "fence")], args=[holder, ttl_ms(ttl_s)]))
        if _text(reply[0]) != "ok":
            return None
        return Lease(name, holder, int(reply[1]))

    def renew_lease(self, lease: Lease, ttl_s: float) -> None:
        self._run(f"renew lease {lease.name}", "RENEW_LEASE", [self._key("lease", lease.name)],
                  [lease.token, lease.holder, ttl_ms(ttl_s)])

    def release_lease(self, lease: Lease) -> None:
        self._run(f"release lease {lease.name}", "RELEASE_LEASE", [self._key("lease", lease.name)],
                  [lease.token, lease.holder])

    def lease(self, name: str) -> Lease | None:
        held = self._call(f"get lease {name}", lambda: self._client.get(self._key("lease", name)))
        if held is None:
            return None
        token, _, holder = _text(held).partition(":")
        return Lease(name, holder, int(token))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._client.close()
