"""The simulation driver: N virtual clients of one real parameter server, run on a bounded pool.

How this works: the driver joins every client to the PS through the handler
contract (as ``worker-<i>``, with the identity the in-process simulation gives
it), so the PS samples, counts, drops and reports them as it does real
workers. Then one thread does, in a loop, what N worker runtimes would do:

1. it asks the PS for a task on behalf of each idle client (``wait_task`` with
   no wait), whenever the phase, round or model version changed and at least
   every ``poll_s``: only the clients the sampler picked get a TRAIN task;
2. for each of those it pulls the model (``model_for``, so the PS accounts the
   download; a full one, as a client holds no model between rounds, decoded
   once per version under download quantization) and queues a
   :class:`~enclavefl.simulation.client.ClientJob`;
3. it keeps at most the pool's capacity of jobs in flight, loading a client's
   state (SCAFFOLD's variate, top-k's error-feedback residual) from the
   :class:`~enclavefl.simulation.state.ClientStateStore` only when its job starts;
4. it pushes each outcome as it arrives, in chunks, through the same
   ``open_update``/``feed``/``commit`` path as a gRPC upload
   (:class:`~enclavefl.worker.inmemory.InMemoryClient`), so the server folds
   it into its streaming aggregate at once and its memory does not grow with
   the number of clients; the state is stored only if the PS accepted;
5. it heartbeats the clients whose jobs are queued or running, so the PS's
   liveness check sees them as training workers.

Once the PS has finished, every client is told FINISH and the driver returns.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, final

from enclavefl.download_codec import NO_MODEL, resolve_download
from enclavefl.errors import ConfigError, EnclaveFLError, StaleSession
from enclavefl.messages import COMPRESSION_TYPE_KEY, ConfigValue, PeerIdentity, TaskInfo, TaskKind
from enclavefl.server.phases import Phase
from enclavefl.simulation.client import ClientJob, ClientOutcome
from enclavefl.worker.inmemory import InMemoryClient

if TYPE_CHECKING:
    from enclavefl.server.ps import ParameterServer
    from enclavefl.simulation.pools import ClientPool
    from enclavefl.simulation.state import ClientStateStore
    from enclavefl.tensors import ParamSet

__all__ = ["Driver", "simulated_peer"]

log = logging.getLogger(__name__)

BEAT_EVERY_S = 1.0
"""How often the driver heartbeats the clients whose jobs are queued or running (at most ``round.heartbeat_s``)."""


def simulated_peer(index: int) -> PeerIdentity:
    """Client ``index``'s identity at the PS: what its certificate would be in a deployment."""
    return PeerIdentity(fingerprint=f"simulated-{index:08d}", label=f"worker-{index} (simulated)")


def _keeps_state(algorithm: str, task_config: Mapping[str, ConfigValue]) -> bool:
    """Whether a client of this task keeps state between rounds (SCAFFOLD's variate, top-k's residual)."""
    compression = task_config.get(COMPRESSION_TYPE_KEY, "none")
    return algorithm == "scaffold" or compression in ("topk", "topk_quantize")


@dataclass(slots=True)
class _Client:
    index: int
    connection: InMemoryClient
    worker_id: str = ""
    num_samples: int = 0
    status: Literal["idle", "busy", "finished"] = "idle"


@dataclass(frozen=True, slots=True)
class _Pending:
    client: _Client
    task: TaskInfo
    version: int
    download: ParamSet


@final
class Driver:
    """Runs ``num_clients`` simulated clients of ``ps`` on ``pool`` (see the module docstring)."""

    def __init__(self, ps: ParameterServer, pool: ClientPool, *, num_clients: int,
                 store: ClientStateStore | None = None, chunk_bytes: int = 1 << 20, poll_s: float = 1.0) -> None:
        """Binds the driver; nothing is sent to the PS until :meth:`join`.

        Args:
            store: where the clients' state is kept between rounds (SCAFFOLD variates, top-k
                residuals); required for a SCAFFOLD job and for top-k upload compression.
            chunk_bytes: the size of the chunks an update is fed in.
            poll_s: the longest between two task polls of the idle clients (a poll also tells the PS
                they are alive; at most ``round.heartbeat_s``). A change of phase, round or model
                version makes the driver poll at once.

        Raises:
            ConfigError: the job runs secure aggregation, whose stages a pool's clients cannot answer
                (they live only while they train).
        """
        if ps.config.privacy.secure_aggregation.enabled:
            raise ConfigError("privacy.secure_aggregation.enabled: a simulation driver's clients live only while "
                              "they train and cannot answer its key stages; run the job's workers on threads")
        self._ps = ps
        self._pool = pool
        self._n = num_clients
        self._store = store
        self._poll_s = min(poll_s, ps.config.round.heartbeat_s)
        self._beat_s = min(BEAT_EVERY_S, ps.config.round.heartbeat_s)
        self._clients = [_Client(i, InMemoryClient(ps, simulated_peer(i), chunk_bytes=chunk_bytes))
                         for i in range(num_clients)]
        self._pending: deque[_Pending] = deque()
        self._running: dict[int, _Client] = {}
        self._model: tuple[int, ParamSet] | None = None  # the newest version pulled, decoded
        self._stop = threading.Event()
        self.updates_accepted = 0
        self.updates_refused = 0

    def join(self, counts: Sequence[int] | None = None) -> None:
        """Joins every client to the PS (before it runs), declaring each one's training examples.

        Args:
            counts: each client's training examples, by index, if the caller knows them
                (a task's partition summary); default: the pool builds every trainer to count.

        Raises:
            RoundError: a client's trainer could not be built (to count its examples).
            ValueError: ``counts`` does not have one entry per client.
        """
        if counts is None:
            counts = self._pool.num_samples(self._n)
        if len(counts) != self._n:
            raise ValueError(f"simulation: {len(counts)} sample counts for {self._n} clients")
        for client, count in zip(self._clients, counts, strict=True):
            client.num_samples = count
            self._join(client)
        log.info("simulation: %d clients joined, %d examples in all", self._n, sum(counts))

    def _join(self, client: _Client) -> None:
        client.worker_id = client.connection.join(f"worker-{client.index}", client.num_samples).worker_id
        client.status = "idle"

    def stop(self) -> None:
        """Makes :meth:`run` return at its next pass (from any thread)."""
        self._stop.set()

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        """Drives the clients until the PS has told each FINISH, or :meth:`stop`.

        Raises:
            RoundError: a client's job failed in the pool.
            EnclaveFLError: the PS refused something the driver cannot recover from.
        """
        core = self._ps.core
        last: tuple[Phase, int, int] | None = None
        last_poll = last_beat = 0.0
        while not self._stop.is_set():
            with core.cond:
                snapshot = (core.phase, core.next_round, core.version)
            now = time.monotonic()
            if snapshot != last or now - last_poll >= self._poll_s:
                self._poll(finishing=snapshot[0] is Phase.FINISHED)
                last, last_poll = snapshot, now
                if all(c.status == "finished" for c in self._clients):
                    return
            self._start_jobs()
            if now - last_beat >= self._beat_s:
                self._heartbeat()
                last_beat = now
            if self._running:
                for outcome in self._pool.wait(0.05):
                    self._push(outcome)
            else:
                with core.cond:
                    if (core.phase, core.next_round, core.version) == snapshot:
                        core.cond.wait(self._poll_s)

    def _poll(self, *, finishing: bool) -> None:
        """Asks the PS for a task for each idle client (each one, once the job has finished)."""
        for client in self._clients:
            if client.status == "finished" or (client.status == "busy" and not finishing):
                continue
            try:
                task = self._ps.wait_task(client.connection.peer, client.worker_id, 0.0)
            except StaleSession:  # dropped (late in a round, or silent): joins again, as a worker does
                self._join(client)
                continue
            if task.kind is TaskKind.FINISH:
                client.status = "finished"
            elif task.kind is TaskKind.TRAIN:
                version, download = self._pull(client)
                client.status = "busy"
                self._pending.append(_Pending(client, task, version, download))

    def _pull(self, client: _Client) -> tuple[int, ParamSet]:
        """The model for ``client``'s job, dense: a client holds no model between rounds, so it asks for a full one.

        The PS accounts the download as it sends it (quantized under download compression); the
        dense model each client trains from is decoded once per version.
        """
        version, download = self._ps.model_for(client.connection.peer, client.worker_id, NO_MODEL)
        if self._model is None or self._model[0] != version:
            self._model = (version, resolve_download(download, None, NO_MODEL))
        return self._model

    def _start_jobs(self) -> None:
        while self._pending and len(self._running) < self._pool.capacity:
            p = self._pending.popleft()
            if p.client.status != "busy":
                continue  # told FINISH meanwhile
            settings = p.task.client
            if settings is None:
                raise EnclaveFLError(f"round {p.task.round}: the PS sent a train task without client settings")
            if self._store is None and _keeps_state(settings.algorithm, p.task.config):
                raise EnclaveFLError("a SCAFFOLD job, or one with top-k upload compression, needs a client state "
                                     "store for what its clients keep between rounds")
            state = self._store.load(p.client.index) if self._store is not None else None
            job = ClientJob(p.client.index, self._n, p.task.round, p.version, settings, dict(p.task.config), state)
            self._pool.submit(job, p.download)
            self._running[p.client.index] = p.client

    def _push(self, outcome: ClientOutcome) -> None:
        client = self._running.pop(outcome.index)
        if client.status != "busy":
            return  # the job ended meanwhile
        client.status = "idle"
        try:
            reply = client.connection.push_update(client.worker_id, outcome.round, outcome.model_version,
                                                  outcome.update, outcome.num_samples, outcome.metrics,
                                                  kind=outcome.kind)
        except StaleSession as exc:
            log.info("simulated worker-%d round %d: %s; joining again", client.index, outcome.round, exc)
            self._join(client)
            return
        if reply.accepted:
            self.updates_accepted += 1
            if outcome.state is not None and self._store is not None:
                self._store.save(client.index, outcome.state)
            log.info("simulated worker-%d round %d: trained %.2fs (loss %.4f), pushed %s %d B, accepted",
                     client.index, outcome.round, outcome.fit_s, outcome.metrics.get("loss", float("nan")),
                     outcome.kind.value, reply.bytes_sent)
        else:
            self.updates_refused += 1
            log.warning("simulated worker-%d round %d: update refused by the PS: %s", client.index, outcome.round,
                        reply.reason)

    def _heartbeat(self) -> None:
        for client in self._clients:
            if client.status == "busy":
                try:
                    self._ps.heartbeat(client.connection.peer, client.worker_id)
                except StaleSession:
                    pass  # its push or the next poll joins it again
