"""A cluster in one process for the engine tests: real ParameterServers with ClusterEngines, real Workers.

Each server is a full :class:`ParameterServer` on its own thread; each worker
runs ``Worker.run()`` on its own thread and reaches *its* server through an
InMemoryClient, so every update is staged, validated, folded into the server's
partial and accepted by the store through the servers' own code.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from enclavefl.cluster import RoundPhase, Store, StoreUnavailable
from enclavefl.cluster.engine import ClusterEngine, cluster_engine
from enclavefl.cluster.scheduler import Scheduler
from enclavefl.config import JobConfig, parse_job
from enclavefl.messages import PeerIdentity
from enclavefl.server.ps import ParameterServer
from enclavefl.tensors import ParamSet
from enclavefl.worker import InMemoryClient, Worker, WorkerSettings
from enclavefl.worker.servers import ServerList
from tests.unit.worker.federation import AddTrainer, peer


FAST_LEASES: dict[str, float] = {"poll_s": 0.02, "heartbeat_s": 0.1, "member_ttl_s": 5, "lease_ttl_s": 5}
"""A ``cluster`` section whose servers heartbeat every 0.1 s (membership, settings, stop and drain leases)."""


def after_version(store: Store, version: int, action: Callable[[], None], timeout_s: float = 30.0) -> threading.Thread:
    """Runs ``action`` on a thread once the store has published model ``version`` (or ``timeout_s`` passed)."""

    def wait_then_act() -> None:
        deadline = time.monotonic() + timeout_s
        while _reachable_version(store) < version and time.monotonic() < deadline:
            time.sleep(0.005)
        action()

    thread = threading.Thread(target=wait_then_act, name=f"after-version-{version}", daemon=True)
    thread.start()
    return thread


def _reachable_version(store: Store) -> int:
    """:func:`_published`, or -1 while the store cannot be reached (a Redis restarting)."""
    try:
        return _published(store)
    except StoreUnavailable:
        return -1


def start_scheduler(scheduler: Scheduler) -> tuple[threading.Thread, list[str]]:
    """``scheduler.run()`` on a thread; the list receives how the job ended."""
    ended: list[str] = []
    thread = threading.Thread(target=lambda: ended.append(scheduler.run()), name="scheduler", daemon=True)
    thread.start()
    return thread, ended


def cluster_job(*, rounds: int, workers: int, **sections: Any) -> JobConfig:
    """A job whose rounds close once every sampled worker pushed; servers poll the store every 20 ms."""
    doc: dict[str, Any] = {
        "job": {"rounds": rounds, "workers": workers},
        "round": {"min_workers": workers, "start_window_s": 20, "update_window_s": 20, "max_retries": 0},
        "client": {"epochs": 1, "batch_size": 4, "lr": 0.5},
        "attestation": {"mode": "none"},
        "cluster": {"poll_s": 0.02},
    }
    doc.update(sections)
    return parse_job(doc)


@dataclass
class ClusterRun:
    servers: list[ParameterServer] = field(default_factory=list)
    errors: dict[str, BaseException] = field(default_factory=dict)

    def engine(self, index: int) -> ClusterEngine:
        engine = self.servers[index].engine
        assert isinstance(engine, ClusterEngine)
        return engine


def _guarded(errors: dict[str, BaseException], name: str, target: Callable[[], None]) -> threading.Thread:
    def body() -> None:
        try:
            target()
        except BaseException as exc:  # reported by the caller
            errors[name] = exc

    thread = threading.Thread(target=body, name=name, daemon=True)
    thread.start()
    return thread


def _published(store: Store) -> int:
    """The store's current model version (0 before the first round closes)."""
    state = store.round_state()
    if state is None:
        return 0
    return state.model_version + (1 if state.phase is RoundPhase.CLOSED else 0)


def _rotating(order: Sequence[ParameterServer], who: PeerIdentity) -> Callable[[], InMemoryClient]:
    """A client factory that moves to the next server on each call after the first (as a deployed worker's)."""
    calls = itertools.count()
    return lambda: InMemoryClient(order[next(calls) % len(order)], who, chunk_bytes=64)


def _following(servers: Sequence[ParameterServer], index: int, who: PeerIdentity) -> ServerList:
    """A worker's ServerList over the servers' addresses (server ``index`` mod N first)."""
    by_address = {f"127.0.0.1:{7000 + k}": ps for k, ps in enumerate(servers)}
    first = [f"127.0.0.1:{7000 + (index + k) % len(servers)}" for k in range(len(servers))]
    return ServerList(first, lambda address: InMemoryClient(by_address[address], who, chunk_bytes=64))


def run_cluster(config: JobConfig, initial: ParamSet, trainers: Sequence[tuple[str, AddTrainer]],
                store_for: Callable[[int], Store], out_dir: Path, *, servers: int,
                timeout_s: float = 60.0, late: Mapping[int, int] | None = None,
                drain: Mapping[int, int] | None = None, follow: bool = False) -> ClusterRun:
    """Runs the job on ``servers`` servers (worker i joins server i mod servers) until every thread ends.

    Args:
        late: server index -> model version: that server (and its workers) starts only once the
            store has published that version (a server added while the job runs).
        drain: server index -> model version: that server is asked to drain once the store has
            published that version. Every worker then gets its servers in failover order (server
            i mod servers, then the next ones), as a deployed worker with several ``--connect`` targets.
        follow: every worker reaches its servers through a :class:`ServerList` (server i mod servers
            first), as a deployed worker does, so it follows the order the servers' WAIT answers give.
    """
    run = ClusterRun()
    for i in range(servers):
        server_id = f"server-{i}"
        run.servers.append(ParameterServer(config, initial, out_dir=out_dir / server_id,
                                           engine=cluster_engine(store_for(i), server_id, config.cluster,
                                                                 address=f"127.0.0.1:{7000 + i}")))
    stop = threading.Event()
    late = dict(late or {})

    def after(index: int, target: Callable[[], None]) -> Callable[[], None]:
        if index not in late:
            return target

        def waiting() -> None:
            deadline = time.monotonic() + timeout_s
            while _published(store_for(index)) < late[index] and time.monotonic() < deadline:
                time.sleep(0.005)
            target()

        return waiting

    threads = [_guarded(run.errors, f"server-{i}", after(i, ps.run)) for i, ps in enumerate(run.servers)]
    for i, (name, trainer) in enumerate(trainers):
        order = [run.servers[(i + k) % servers] for k in range(servers if drain else 1)]
        factory: Callable[[], InMemoryClient] | ServerList = _rotating(order, peer(name))
        if follow:
            factory = _following(run.servers, i, peer(name))
        worker = Worker(factory, trainer, WorkerSettings(name=name, seed=7, poll_s=0.2), stop=stop)
        threads.append(_guarded(run.errors, name, after(i % servers, worker.run)))
    for index, version in (drain or {}).items():
        def draining(index: int = index, version: int = version) -> None:
            deadline = time.monotonic() + timeout_s
            while _published(store_for(index)) < version and time.monotonic() < deadline:
                time.sleep(0.005)
            run.engine(index).drain()

        threads.append(_guarded(run.errors, f"drain-{index}", draining))
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    stop.set()
    for ps in run.servers:
        ps.stop()
    hung = [t.name for t in threads if t.is_alive()]
    assert not hung, f"still running after {timeout_s}s: {hung}; errors so far: {run.errors}"
    return run
