"""Simulated clients on Ray: actors that each host many virtual clients, on one machine or a cluster.

How this works: :class:`RayPool` starts ``actors`` Ray actors, each with
``cpus_per_client`` CPUs reserved and one
:class:`~enclavefl.simulation.client.ClientHost` inside, which builds the task
from the job where the actor runs and serves whichever client it is handed.
A model version is put in Ray's object store once and every job of that
version refers to it, so each node reads it once. An actor is handed at most
two jobs at a time (one running, one queued), which bounds the updates
waiting in the object store for the driver to push.

Ray is optional (``pip install enclavefl[simulation]``) and imported only
when a pool is made. A pool that starts its own Ray instance keeps it on this
machine: every Ray process binds 127.0.0.1, there is no dashboard and no
usage reporting (``RAY_USAGE_STATS_ENABLED=0``), and it is shut down on
:meth:`RayPool.close`. With ``address`` the pool joins an existing cluster
(``ray start --head`` on the head node) instead; that cluster's own settings
apply there.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, final

from enclavefl.errors import ConfigError, RoundError
from enclavefl.simulation.client import ClientHost, ClientJob, ClientOutcome, TrainerFactory
from enclavefl.simulation.pools import VERSIONS_KEPT, ClientPool, _failed, default_processes, set_framework_threads

if TYPE_CHECKING:
    from enclavefl.config import JobConfig
    from enclavefl.tensors import ParamSet

__all__ = ["RayPool", "import_ray"]

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'enclavefl[simulation]'"

LOCAL_RAY_ENV = {
    # Ray's "local only" mode: the node's address is 127.0.0.1 and every Ray server binds it.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # No usage reporting to the Ray project.
    "RAY_USAGE_STATS_ENABLED": "0",
}
"""Environment a pool sets (unless already set) before it starts a Ray instance of its own."""


def import_ray() -> Any:
    """The ``ray`` module.

    Raises:
        ConfigError: Ray is not installed; the message names the extra to install.
    """
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(f"simulation on Ray needs the ray package: {INSTALL_HINT}") from exc
    return ray


class _ClientActor:
    """A Ray actor's body: one client host, the ML framework on ``threads`` threads."""

    def __init__(self, config: JobConfig, make_trainer: TrainerFactory, trainers_kept: int, threads: int) -> None:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(threads)
        self._threads = threads
        self._host = ClientHost(config, make_trainer, trainers_kept=trainers_kept)

    def num_samples(self, indices: list[int], num_clients: int) -> list[int]:
        counts = [self._host.num_samples(i, num_clients) for i in indices]
        set_framework_threads(self._threads)
        return counts

    def run(self, job: ClientJob, download: ParamSet) -> ClientOutcome:
        set_framework_threads(self._threads)
        return self._host.run(job, download)


@final
class RayPool(ClientPool):
    """Runs jobs on ``actors`` Ray actors (see the module docstring)."""

    def __init__(self, config: JobConfig, make_trainer: TrainerFactory, *, address: str | None = None,
                 actors: int | None = None, cpus_per_client: float = 1.0, threads_per_client: int = 1,
                 trainers_kept: int = 4) -> None:
        """Starts Ray (or joins ``address``) and the actors.

        Args:
            address: an existing cluster (``host:port`` of its head, or ``auto``); None starts a
                Ray instance of ``actors`` CPUs on this machine, on 127.0.0.1 only.
            actors: how many; default one per core here, or the cluster's CPUs / ``cpus_per_client``.
            cpus_per_client: the CPUs Ray reserves for each actor (one client trains at a time in each).

        Raises:
            ConfigError: Ray is not installed, or a count is below its minimum.
        """
        if actors is not None and actors < 1 or cpus_per_client <= 0 or threads_per_client < 1:
            raise ConfigError(f"Ray pool: actors and threads_per_client must be >= 1 and cpus_per_client > 0, "
                              f"got {actors}, {threads_per_client} and {cpus_per_client}")
        if address is None:
            for var, value in LOCAL_RAY_ENV.items():
                os.environ.setdefault(var, value)  # read when ray is imported, and by every Ray process
        ray = import_ray()
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            if address is None:
                if ray._private.ray_constants.ENABLE_RAY_CLUSTER:
                    log.warning("simulation: ray was imported before the pool could keep it on 127.0.0.1; "
                                "its processes may listen on every interface")
                cpus = actors if actors is not None else default_processes()
                ray.init(num_cpus=max(1, int(cpus * cpus_per_client + 0.999)), include_dashboard=False,
                         _node_ip_address="127.0.0.1", logging_level=logging.WARNING, log_to_driver=False,
                         configure_logging=False)
            else:
                ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False,
                         configure_logging=False)
            self._started = True
        if actors is None:
            actors = max(1, int(ray.cluster_resources().get("CPU", 1) // cpus_per_client))
        remote = ray.remote(_ClientActor).options(num_cpus=cpus_per_client)
        self._actors = [remote.remote(config, make_trainer, trainers_kept, threads_per_client) for _ in range(actors)]
        self._load = [0] * actors
        self._models: dict[int, Any] = {}
        self._refs: dict[Any, tuple[ClientJob, int]] = {}
        self._closed = False
        log.info("simulation: %d Ray actors, %g CPUs each (%s)", actors, cpus_per_client,
                 "a local Ray instance on 127.0.0.1" if address is None else f"cluster {address}")

    @property
    def capacity(self) -> int:
        return 2 * len(self._actors)

    def _get(self, refs: list[Any]) -> list[Any]:
        try:
            return list(self._ray.get(refs))
        except self._ray.exceptions.RayError as exc:
            cause = getattr(exc, "cause", None) or exc
            raise RoundError(f"simulated clients: {type(cause).__name__}: {cause}") from exc

    def num_samples(self, num_clients: int) -> list[int]:
        step = -(-num_clients // len(self._actors))
        refs = [actor.num_samples.remote(list(range(start, min(start + step, num_clients))), num_clients)
                for actor, start in zip(self._actors, range(0, num_clients, step), strict=False)]
        return [count for part in self._get(refs) for count in part]

    def submit(self, job: ClientJob, download: ParamSet) -> None:
        model = self._models.get(job.model_version)
        if model is None:
            model = self._models[job.model_version] = self._ray.put(download)
            for old in sorted(self._models)[:-VERSIONS_KEPT]:
                del self._models[old]  # the store frees it once no job refers to it
        slot = min(range(len(self._actors)), key=self._load.__getitem__)
        self._load[slot] += 1
        self._refs[self._actors[slot].run.remote(job, model)] = (job, slot)

    def wait(self, timeout_s: float) -> list[ClientOutcome]:
        if not self._refs:
            return []
        done, rest = self._ray.wait(list(self._refs), num_returns=1, timeout=timeout_s)
        if done and rest:  # and whatever else has finished meanwhile
            more, _ = self._ray.wait(rest, num_returns=len(rest), timeout=0)
            done = [*done, *more]
        outcomes = []
        for ref in done:
            job, slot = self._refs.pop(ref)
            self._load[slot] -= 1
            try:
                outcomes.append(self._ray.get(ref))
            except self._ray.exceptions.RayError as exc:
                cause = getattr(exc, "cause", None) or exc
                raise _failed(job, cause) from exc
        return outcomes

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._refs.clear()
        self._models.clear()
        for actor in self._actors:
            self._ray.kill(actor)
        if self._started:
            self._ray.shutdown()
