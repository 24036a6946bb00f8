"""Simulation at scale: many virtual clients of one real parameter server, trained on a bounded pool.

:func:`enclavefl.app.simulate` with a :class:`ClientPool` runs the job's real
server (strategy, streaming aggregation, metrics, checkpoints) and a
:class:`Driver` that plays every client: only the clients sampled for a round
train, as jobs on the pool (this process, local processes, or Ray actors),
and their updates are pushed to the server as they finish. Without a pool,
``simulate`` keeps its one-thread-per-worker mode (the worker runtime itself).
"""

from enclavefl.simulation.client import ClientHost, ClientJob, ClientOutcome, TaskTrainers, TrainerFactory, fit_client
from enclavefl.simulation.driver import Driver, simulated_peer
from enclavefl.simulation.pools import ClientPool, InlinePool, ProcessPool, default_processes
from enclavefl.simulation.ray_pool import RayPool
from enclavefl.simulation.state import ClientStateStore

__all__ = [
    "ClientHost",
    "ClientJob",
    "ClientOutcome",
    "ClientPool",
    "ClientStateStore",
    "Driver",
    "InlinePool",
    "ProcessPool",
    "RayPool",
    "TaskTrainers",
    "TrainerFactory",
    "default_processes",
    "fit_client",
    "simulated_peer",
]
