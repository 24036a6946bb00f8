"""The worker: join, long-poll, pull, train locally, push the update; repeat.

How this works: :class:`Worker` talks to the PS through a
:class:`~enclavefl.messages.WorkerClient` it builds with a factory (the gRPC
client in a deployment, :class:`~enclavefl.worker.inmemory.InMemoryClient` in a
simulation or a test). Each train task carries the PS's
:class:`~enclavefl.messages.ClientSettings`, and the worker trains with those
alone: epochs, batch size, learning rate, optimizer, momentum, weight decay and
the client algorithm all come from the PS, so a worker with a stale job file
trains exactly as the PS says. Around local training it runs the algorithm's
client side: FedProx's proximal ``mu``, or SCAFFOLD's control variates (the
server variate arrives as ``scaffold.c/`` tensors after the model; the worker
keeps its own variate across rounds and re-joins, and sends its change as
``scaffold.dc/`` tensors; when the PS does not accept the update the variate
goes back to where it was, as the server did not count the change). The
trained model then goes through the update pipeline
(:mod:`enclavefl.worker.pipeline`), is encoded as the task's upload compression
says (:mod:`enclavefl.worker.compression`, which keeps top-k's residual across
rounds and re-joins), and is pushed. The steps between the pull and the push
are :mod:`enclavefl.worker.local_round`'s, which a simulated client runs too.

It keeps the PS told that it is alive: each long-poll lasts at most the
``heartbeat_s`` the PS gave at join, and while it pulls, trains and pushes a
:class:`~enclavefl.worker.heartbeat.Heartbeat` thread says so as often; the PS
drops a worker it has not heard from for ``round.worker_timeout_s``.

In a cluster it is given several servers (its own, then alternatives): a
server that is unreachable, or no longer knows this worker (it drains), makes
the next connection go to the next server, and an update whose push found the
server gone is sent once more there (:meth:`Worker._push`).

It survives a PS restart: an unreachable PS is retried with exponential
backoff (bounded by ``give_up_s``), and a PS that no longer knows this worker
(new instance, or it dropped us) is joined again. After the PS was unreachable
the client is rebuilt and the worker joins again, so the credentials check the
(possibly new) PS certificate afresh before anything is sent. A join the PS
refuses for its nonce (late, or from a connection that was replaced) is tried
again, at most ``join_attempts`` times, with the same backoff; a refusal of the
evidence itself (measurement, signer, TCB) is a verdict that another try would
not change, and ends the worker at once.
"""

from __future__ import annotations

import functools
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, final

from enclavefl.errors import (
    ConfigError,
    DeadlineExceeded,
    ProtocolError,
    RoundError,
    StaleSession,
    TransportError,
    Unavailable,
    VerificationError,
)
from enclavefl.messages import (
    CLUSTER_SERVERS_KEY,
    JoinInfo,
    PushResult,
    TaskInfo,
    TaskKind,
    UpdateKind,
    WorkerClient,
)
from enclavefl.tensors import EncodedUpdate, ParamSet, StreamHeader
from enclavefl.training import Trainer
from enclavefl.worker.compression import UploadCompressor
from enclavefl.worker.control import ScaffoldClient
from enclavefl.worker.faults import Slowdown
from enclavefl.worker.heartbeat import Heartbeat
from enclavefl.worker.local_round import LocalUpdate, check_settings, split_download, train_local_round
from enclavefl.worker.model_cache import ModelCache
from enclavefl.worker.pipeline import UpdateTransform, compute_delta, default_transforms, sparsify_rows
from enclavefl.worker.servers import ServerList, parse_servers

if TYPE_CHECKING:
    from enclavefl.transport.credentials import Credentials
    from enclavefl.worker.secagg import SecAggRound

# compute_delta and sparsify_rows live in the pipeline; importable from here as before.
__all__ = ["Worker", "WorkerSettings", "compute_delta", "grpc_client_factory", "sparsify_rows"]

log = logging.getLogger(__name__)

_Payload = ParamSet | EncodedUpdate
"""What a worker pushes: the update, encoded as the task's upload compression says."""


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """How one worker behaves towards the PS (not how it trains: that is the PS's to say).

    Attributes:
        name: shown in the PS's logs.
        seed: the job seed; with the round it fixes the local shuffle.
        poll_s: the longest a task long-poll waits (shorter if the PS asks for a shorter heartbeat).
        backoff_initial_s: the first retry delay after the PS was unreachable.
        backoff_max_s: the longest retry delay.
        give_up_s: how long an unreachable PS is retried before the worker fails.
        slowdown: FOR EXPERIMENTS (the job's ``faults`` section): above 1, the worker
            waits ``(slowdown - 1) x`` each fit's time before pushing, a straggler.
        job_settings: digests of the settings every node must share, sent with each
            join for the PS to compare (:func:`enclavefl.job_digest.job_digests`); empty: none sent.
        join_attempts: how many times a join the PS refuses for its nonce is tried
            before the worker gives up (raising the refusal).
        cache_downloads: keep the last downloaded model between rounds, so that a PS with
            ``transport.sparse_downloads`` sends only the rows changed since
            (:class:`~enclavefl.worker.model_cache.ModelCache`); False: every pull is a full
            download and no model is held between rounds.
    """

    name: str
    seed: int = 0
    poll_s: float = 10.0
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 5.0
    give_up_s: float = 300.0
    slowdown: float = 1.0
    job_settings: Mapping[str, str] = field(default_factory=dict)
    join_attempts: int = 4
    cache_downloads: bool = True


_RETRIED_REFUSAL = "join.nonce"
"""The field named in a PS refusal that a new challenge may mend (the nonce was late, used or from another connection)."""


@final
class Worker:
    """Runs one worker until the PS says the job is finished."""

    def __init__(
        self,
        client_factory: Callable[[], WorkerClient],
        trainer: Trainer,
        settings: WorkerSettings,
        *,
        stop: threading.Event | None = None,
        transforms: Sequence[UpdateTransform] | None = None,
        compressor: UploadCompressor | None = None,
    ) -> None:
        """Prepares the worker; nothing is sent until :meth:`run`.

        Args:
            client_factory: opens a connection to the PS. Called again after the
                PS was unreachable, so each call must verify the PS afresh.
            trainer: the local model and data.
            settings: this worker's name, seed, polling and backoff.
            stop: set it to make :meth:`run` return at its next wait.
            transforms: the update pipeline; default
                :func:`~enclavefl.worker.pipeline.default_transforms` of ``trainer``.
                For SCAFFOLD it must append the control delta
                (:class:`~enclavefl.worker.pipeline.ControlDelta`).
            compressor: encodes the pipeline's output as the task's
                ``privacy.compression.upload`` says; it keeps top-k's residual for the
                worker's lifetime. Default: a fresh one.
        """
        self._client_factory = client_factory
        self._trainer = trainer
        self._settings = settings
        self._stop = stop or threading.Event()
        self._transforms: tuple[UpdateTransform, ...] = tuple(
            default_transforms(trainer) if transforms is None else transforms
        )
        self._compressor = compressor if compressor is not None else UploadCompressor()
        self._client: WorkerClient | None = None
        self._scaffold: ScaffoldClient | None = None  # c_i, kept across rounds and re-joins
        self._models = ModelCache(settings.cache_downloads)  # the last download, for changed-rows pulls
        self._slowdown = Slowdown(settings.slowdown, self._stop) if settings.slowdown != 1.0 else None
        self.rounds_done = 0

    @property
    def transforms(self) -> tuple[UpdateTransform, ...]:
        """The update pipeline, in the order it runs."""
        return self._transforms

    def _delay(self, attempt: int) -> float:
        s = self._settings
        return min(s.backoff_max_s, s.backoff_initial_s * 2.0**attempt) * (0.5 + random.random() / 2)

    def _backoff(self, started: float, attempt: int, why: Exception) -> None:
        s = self._settings
        if time.monotonic() - started > s.give_up_s:
            raise Unavailable(f"worker {s.name}: PS unreachable for {s.give_up_s:.0f}s: {why}") from why
        delay = self._delay(attempt)
        log.info("worker %s: PS unreachable (%s), retry in %.1fs", s.name, why, delay)
        self._stop.wait(delay)

    def _refused_join(self, refused: int, exc: VerificationError) -> None:
        """Waits before another join after the PS refused one for its nonce; re-raises other refusals and the last one."""
        s = self._settings
        if _RETRIED_REFUSAL not in str(exc) or refused >= s.join_attempts:
            raise exc
        delay = self._delay(refused - 1)
        log.info("worker %s: join refused (%s), attempt %d of %d, retry in %.1fs", s.name, exc, refused,
                 s.join_attempts, delay)
        self._stop.wait(delay)

    def _connect(self) -> tuple[WorkerClient, JoinInfo]:
        started, attempt, refused = time.monotonic(), 0, 0
        while not self._stop.is_set():
            try:
                if self._client is None:
                    self._client = self._client_factory()
                settings = self._settings.job_settings
                info = (self._client.join(self._settings.name, self._trainer.num_samples, job_settings=settings)
                        if settings else self._client.join(self._settings.name, self._trainer.num_samples))
                log.info("worker %s: joined job %s as %s (PS instance %s)", self._settings.name, info.job_name,
                         info.worker_id, info.ps_instance)
                return self._client, info
            except (Unavailable, DeadlineExceeded) as exc:
                self.close()  # the next client re-verifies the PS (it may have restarted with a new key)
                self._backoff(started, attempt, exc)
                attempt += 1
            except VerificationError as exc:
                refused += 1
                self._refused_join(refused, exc)
        raise Unavailable(f"worker {self._settings.name}: stopped before joining")

    def run(self) -> None:
        """Blocks until FINISH (returns), ``stop`` is set (returns) or an unrecoverable error (raises).

        Raises:
            Unavailable: the PS stayed unreachable for ``give_up_s``.
            VerificationError: the PS (or we, for the PS) failed verification.
            ProtocolError: the PS sent a task or model this worker cannot follow
                (an unknown client algorithm, a malformed SCAFFOLD variate).
            ConfigError: the PS runs secure aggregation and this worker's connection holds no
                key to sign its keys with, the update transforms do not produce what the task needs, the
                TLS handshake refused the PS certificate, or the PS refused this worker's
                job settings (they differ from its own).
        """
        s = self._settings
        try:
            client, join = self._connect()
            started, attempt = time.monotonic(), 0
            while not self._stop.is_set():
                poll_s = min(s.poll_s, join.heartbeat_s) if join.heartbeat_s > 0 else s.poll_s
                try:
                    task = client.wait_task(join.worker_id, poll_s)
                    attempt = 0
                    started = time.monotonic()
                except StaleSession as exc:
                    # A new connection: with several servers, the next one (this one may be draining).
                    log.info("worker %s: %s; joining again", s.name, exc)
                    self.close()
                    client, join = self._connect()
                    continue
                except Unavailable as exc:
                    self._backoff(started, attempt, exc)
                    self.close()  # rebuild the client: the PS is verified again before we rejoin
                    client, join = self._connect()
                    attempt = 0
                    started = time.monotonic()
                    continue
                except DeadlineExceeded as exc:
                    self._backoff(started, attempt, exc)
                    attempt += 1
                    continue
                if task.ps_instance != join.ps_instance:
                    log.info("worker %s: PS restarted (instance %s); joining again", s.name, task.ps_instance)
                    client, join = self._connect()
                    continue
                if task.kind is TaskKind.WAIT and self._moves(client, join, task):
                    client, join = self._connect()
                    continue
                if task.kind is TaskKind.FINISH:
                    log.info("worker %s: job finished after %d rounds here (%s)", s.name, self.rounds_done, task.message)
                    return
                if task.kind is TaskKind.TRAIN:
                    trained_on = client
                    try:
                        beat = functools.partial(client.heartbeat, join.worker_id)
                        with Heartbeat(beat, join.heartbeat_s, name=s.name):
                            client, join = self._train_round(client, join, task)
                    except StaleSession as exc:
                        log.info("worker %s round %d: %s; joining again", s.name, task.round, exc)
                        self.close()
                        client, join = self._connect()
                    except TransportError as exc:
                        log.warning("worker %s round %d: round lost: %s", s.name, task.round, exc)
                        if self._client is None:  # closed by a failover that found no server: try again
                            client, join = self._connect()
                    else:
                        # A cluster moves a worker between rounds: after this round's push, on the server
                        # that sent the task (a worker that failed over meanwhile hears the new one's order).
                        if client is trained_on and self._moves(client, join, task):
                            client, join = self._connect()
        finally:
            self.close()

    def _moves(self, client: WorkerClient, join: JoinInfo, task: TaskInfo) -> bool:
        """Follows the cluster's order of this worker's servers; True once it left its server for the first.

        Only a worker made with a :class:`~enclavefl.worker.servers.ServerList` follows; a malformed list is
        logged and ignored (the worker stays where it is).
        """
        servers = self._client_factory
        if not isinstance(servers, ServerList) or CLUSTER_SERVERS_KEY not in task.config:
            return False
        try:
            addresses = parse_servers(str(task.config[CLUSTER_SERVERS_KEY]))
        except ProtocolError as exc:
            log.warning("worker %s: ignoring the server's list of servers: %s", self._settings.name, exc)
            return False
        if not servers.follow(addresses):
            return False
        log.info("worker %s: the cluster moves this worker from server %s to %s", self._settings.name,
                 servers.current, addresses[0], extra={"event": "moved"})
        try:
            client.leave(join.worker_id, f"moved to server {addresses[0]}")
        except TransportError as exc:  # the old server forgets it anyway once it stops calling
            log.info("worker %s: could not say goodbye to server %s: %s", self._settings.name, servers.current, exc)
        self.close()
        return True

    def _train_round(self, client: WorkerClient, join: JoinInfo, task: TaskInfo) -> tuple[WorkerClient, JoinInfo]:
        """Pulls, trains and pushes one round; returns the connection in use after it (see :meth:`_push`)."""
        s = self._settings
        round_ = task.round
        c = task.client
        if c is None:
            raise TransportError(f"round {round_}: the PS sent a train task without client settings")
        check_settings(c, round_)
        t0 = time.monotonic()
        # The version announced is the one this worker holds (-1: none): a PS may send only what changed since.
        held = self._models.held_version(join.ps_instance)
        got_version, download, nbytes = client.pull_model(join.worker_id, held)
        download = self._models.resolve(join.ps_instance, held, got_version, download)
        t1 = time.monotonic()
        log.info("worker %s round %d: training on model version %d (%d B pulled in %.2fs)",
                 s.name, round_, got_version, nbytes, t1 - t0)
        global_params, server_control = split_download(download, c, round_)
        secagg = self._secure_aggregation(client, join, task)
        if secagg is not None:
            try:
                secagg.keys()  # before training: a worker that drops later is unmasked from its shares
            except (ProtocolError, RoundError) as exc:  # refused, or the PS ended the attempt
                log.warning("worker %s round %d: secure aggregation: round abandoned here: %s", s.name, round_, exc)
                return client, join
        scaffold_client: ScaffoldClient | None = None
        if c.algorithm == "scaffold":
            if self._scaffold is None:
                self._scaffold = ScaffoldClient(global_params)
                if c.optimizer != "sgd" or c.momentum:
                    log.warning("worker %s: SCAFFOLD's option II assumes plain SGD, but the PS asks for %s with "
                                "momentum %g: the control variate will be off", s.name, c.optimizer, c.momentum)
            scaffold_client = self._scaffold
        after_fit = self._slowdown.after_fit if self._slowdown is not None else None
        accepted = False
        local: LocalUpdate | None = None
        try:
            local = train_local_round(self._trainer, self._transforms, self._compressor, c, round_, global_params,
                                      server_control, seed=s.seed, variate=scaffold_client, task_config=task.config,
                                      name=s.name, after_fit=after_fit)
            if local is None:
                log.info("worker %s round %d: stopped while slowed down; round abandoned", s.name, round_)
                return client, join
            t2 = time.monotonic()
            payload, kind = local.payload, local.kind
            metrics = dict(local.result.metrics)
            metrics["seconds_fit"] = local.fit_s
            num_samples = local.result.num_samples
            if secagg is not None:  # the weight travels masked; the header claims 1
                payload, kind = secagg.mask(local.update, StreamHeader.of(global_params), local.result.num_samples)
                num_samples = 1
            if secagg is None:
                client, join, reply = self._push(client, join, round_, got_version, payload, num_samples, metrics,
                                                 kind)
            else:  # the masks are agreed with this server's other workers: no other server can unmask it
                reply = client.push_update(join.worker_id, round_, got_version, payload, num_samples, metrics,
                                           kind=kind)
            accepted = reply.accepted
            if accepted:
                self.rounds_done += 1
            self._log_push(round_, reply, kind, local.fit_s, metrics, time.monotonic() - t2)
            if accepted and secagg is not None:
                try:
                    secagg.unmask()
                except (ProtocolError, RoundError) as exc:
                    log.warning("worker %s round %d: secure aggregation: unmask not answered: %s", s.name, round_, exc)
        finally:
            self._compressor.settle(accepted)
            if not accepted and scaffold_client is not None and local is not None and local.control_before is not None:
                # The PS did not count this delta c_i, so c_i must not move either (eq. 5 keeps c = mean c_i).
                scaffold_client.load_state(local.control_before)
        return client, join

    def _push(self, client: WorkerClient, join: JoinInfo, round_: int, version: int, payload: _Payload,
              num_samples: int, metrics: Mapping[str, float],
              kind: UpdateKind) -> tuple[WorkerClient, JoinInfo, PushResult]:
        """Pushes the update; if the server is unreachable, joins the next server and sends the same update there.

        In a cluster (several ``--connect`` targets) a worker whose server died re-sends what it trained to
        an alternative, which serves the same round on the same model version. The cluster's ledger counts
        an update once, whichever server it reached first: a re-send of an update that already landed is
        refused as already counted, which is not an error here. One failover per push: a second unreachable
        server loses the round (the next long-poll goes on failing over).
        """
        try:
            return client, join, client.push_update(join.worker_id, round_, version, payload, num_samples, metrics,
                                                    kind=kind)
        except Unavailable as exc:
            if self._stop.is_set():
                raise
            log.warning("worker %s round %d: server unreachable during the push (%s); re-sending to the next server",
                        self._settings.name, round_, exc, extra={"event": "failover"})
        self.close()
        client, join = self._connect()
        return client, join, client.push_update(join.worker_id, round_, version, payload, num_samples, metrics,
                                                kind=kind)

    def _secure_aggregation(self, client: WorkerClient, join: JoinInfo, task: TaskInfo) -> SecAggRound | None:
        """This round's secure-aggregation part if the task asks for it (its stages import cryptography)."""
        from enclavefl.privacy.secagg.stages import NONCE_KEY, SecAggChannel

        if NONCE_KEY not in task.config:
            return None
        if not isinstance(client, SecAggChannel):
            raise ProtocolError(f"round {task.round}: the PS runs secure aggregation, which this worker's "
                                f"connection ({type(client).__name__}) cannot do")
        from enclavefl.worker.secagg import SecAggRound

        return SecAggRound(client, join.worker_id, task, name=self._settings.name, stop=self._stop)

    def _log_push(self, round_: int, reply: PushResult, kind: UpdateKind, fit_s: float,
                  metrics: Mapping[str, float], push_s: float) -> None:
        s = self._settings
        if reply.accepted:
            log.info("worker %s round %d: trained %.2fs (loss %.4f), pushed %s %d B in %.2fs, accepted",
                     s.name, round_, fit_s, metrics.get("loss", float("nan")), kind.value, reply.bytes_sent, push_s)
        else:
            log.warning("worker %s round %d: update refused by the PS: %s", s.name, round_, reply.reason)

    def close(self) -> None:
        """Closes the client. Idempotent."""
        if self._client is not None:
            client, self._client = self._client, None
            client.close()


def grpc_client_factory(target: str | Sequence[str], credentials: Credentials, *,
                        chunk_bytes: int) -> ServerList:
    """The factory a deployed worker hands to :class:`Worker`: a fresh TLS channel per call.

    Each call opens a new channel, so the credentials verify the PS again
    (after a restart it may have a new key). gRPC is imported on the first
    call: the worker runtime itself loads without it.

    ``target`` may list several servers of a cluster, in the order the worker
    should try them (its server first, then the alternatives of
    ``GET /api/v1/cluster/assignment/<worker>``); the cluster's servers update
    the list as servers come and go (:class:`~enclavefl.worker.servers.ServerList`).

    Raises:
        ConfigError: ``target`` lists no address, or a malformed one.
    """
    targets = [target] if isinstance(target, str) else list(target)

    def connect(address: str) -> WorkerClient:
        from enclavefl.transport.client import FederationClient

        return FederationClient(address, credentials, chunk_bytes=chunk_bytes)

    return ServerList(targets, connect)
