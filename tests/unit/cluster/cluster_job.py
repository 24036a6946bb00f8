"""A cluster in one process for the engine tests: real ParameterServers with ClusterEngines, real Workers.

Each server is a full :class:`ParameterServer` on its own thread; each worker
runs ``Worker.run()`` on its own thread and reaches *its* server through an
InMemoryClient, so every update is staged, validated, folded into the server's
partial and accepted by the store through the servers' own code.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from enclavefl.cluster import Store
from enclavefl.cluster.engine import ClusterEngine, cluster_engine
from enclavefl.config import JobConfig, parse_job
from enclavefl.server.ps import ParameterServer
from enclavefl.tensors import ParamSet
from enclavefl.worker import InMemoryClient, Worker, WorkerSettings
from tests.unit.worker.federation import AddTrainer, peer


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


def run_cluster(config: JobConfig, initial: ParamSet, trainers: Sequence[tuple[str, AddTrainer]],
                store_for: Callable[[int], Store], out_dir: Path, *, servers: int,
                timeout_s: float = 60.0) -> ClusterRun:
    """Runs the job on ``servers`` servers (worker i joins server i mod servers) until every thread ends."""
    run = ClusterRun()
    for i in range(servers):
        server_id = f"server-{i}"
        run.servers.append(ParameterServer(config, initial, out_dir=out_dir / server_id,
                                           engine=cluster_engine(store_for(i), server_id, config.cluster,
                                                                 address=f"127.0.0.1:{7000 + i}")))
    stop = threading.Event()
    threads = [_guarded(run.errors, f"server-{i}", ps.run) for i, ps in enumerate(run.servers)]
    for i, (name, trainer) in enumerate(trainers):
        ps, who = run.servers[i % servers], peer(name)
        worker = Worker(lambda ps=ps, who=who: InMemoryClient(ps, who, chunk_bytes=64), trainer,
                        WorkerSettings(name=name, seed=7, poll_s=0.2), stop=stop)
        threads.append(_guarded(run.errors, name, worker.run))
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    stop.set()
    for ps in run.servers:
        ps.stop()
    hung = [t.name for t in threads if t.is_alive()]
    assert not hung, f"still running after {timeout_s}s: {hung}; errors so far: {run.errors}"
    return run
