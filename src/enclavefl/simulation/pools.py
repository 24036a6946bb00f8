"""Where simulated clients train: in this process, in a local process pool, or on Ray (:mod:`.ray_pool`).

How this works: the driver hands a :class:`ClientPool` one
:class:`~enclavefl.simulation.client.ClientJob` per sampled client with the
model it trains on, never more than :attr:`ClientPool.capacity` at a time,
and collects the :class:`~enclavefl.simulation.client.ClientOutcome` of each
as it finishes (:meth:`ClientPool.wait`), to push it to the server at once.
The capacity bounds what is in flight, and so the memory of the driver and
of the pool's queues: at most ``capacity`` updates wait for their push,
whatever the number of clients.

A pool sends each model version to its processes once, not once per client:
:class:`ProcessPool` writes it to a tensor file the processes read (each keeps
the newest version it read), and the Ray pool puts it in Ray's object store.
Updates come back the same way: a pool process writes each to a file and
sends its name, the driver reads it and removes it. A 4 MB update through a
pipe takes dozens of hand-overs between the two processes, each a wait for the
scheduler on a busy machine; a file in shared memory (``/dev/shm`` where there
is one) takes one write and one read.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
from abc import ABC, abstractmethod
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, final

from enclavefl.errors import ConfigError, RoundError
from enclavefl.simulation.client import ClientHost, ClientJob, ClientOutcome, TrainerFactory
from enclavefl.tensors import CodecLimits, ParamSet, read_params, write_params

if TYPE_CHECKING:
    from enclavefl.config import JobConfig

__all__ = ["ClientPool", "InlinePool", "ProcessPool", "default_processes"]

log = logging.getLogger(__name__)

VERSIONS_KEPT = 4
"""Model versions a pool keeps ready (async rounds hand out a few versions at once)."""


def default_processes() -> int:
    """One process per core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _failed(job: ClientJob, exc: BaseException) -> RoundError:
    return RoundError(f"simulated client {job.index} (worker-{job.index}) failed in round {job.round}: "
                      f"{type(exc).__name__}: {exc}")


class ClientPool(ABC):
    """Runs client jobs somewhere and hands back their outcomes as they finish.

    Used by one driver thread. After an error the pool is unusable; :meth:`close` it.
    """

    @property
    @abstractmethod
    def capacity(self) -> int:
        """How many jobs may be in flight (submitted, outcome not yet returned by :meth:`wait`)."""

    @abstractmethod
    def num_samples(self, num_clients: int) -> list[int]:
        """Every client's training examples, by index (what each declares when it joins).

        Raises:
            RoundError: a client's trainer could not be built.
        """

    @abstractmethod
    def submit(self, job: ClientJob, download: ParamSet) -> None:
        """Starts ``job`` on ``download`` (the model version ``job.model_version``); does not block.

        The caller keeps at most :attr:`capacity` jobs in flight.
        """

    @abstractmethod
    def wait(self, timeout_s: float) -> list[ClientOutcome]:
        """The outcomes finished since the last call, waiting up to ``timeout_s`` for one.

        Raises:
            RoundError: a client's job raised (its error is in the message and the cause).
        """

    @abstractmethod
    def close(self) -> None:
        """Stops the pool's processes (jobs in flight are abandoned). Idempotent."""


@final
class InlinePool(ClientPool):
    """Runs each job in the calling thread, during :meth:`wait`: no processes, for tests and small jobs.

    It uses the trainers of ``make_trainer`` directly, so it takes any task, picklable or not.
    """

    def __init__(self, config: JobConfig, make_trainer: TrainerFactory, *, trainers_kept: int = 4) -> None:
        self._host = ClientHost(config, make_trainer, trainers_kept=trainers_kept)
        self._queue: deque[tuple[ClientJob, ParamSet]] = deque()

    @property
    def capacity(self) -> int:
        return 1

    def num_samples(self, num_clients: int) -> list[int]:
        try:
            return [self._host.num_samples(i, num_clients) for i in range(num_clients)]
        except Exception as exc:
            raise RoundError(f"simulated clients: cannot build a trainer: {exc}") from exc

    def submit(self, job: ClientJob, download: ParamSet) -> None:
        self._queue.append((job, download))

    def wait(self, timeout_s: float) -> list[ClientOutcome]:
        if not self._queue:
            return []
        job, download = self._queue.popleft()
        try:
            return [self._host.run(job, download)]
        except Exception as exc:
            raise _failed(job, exc) from exc

    def close(self) -> None:
        self._queue.clear()


# ------------------------------------------------------------------ process pool
# What one pool process holds: its host, and the newest model version it read.
_HOST: ClientHost | None = None
_MODEL: tuple[int, ParamSet] | None = None


def _start_process(config: JobConfig, make_trainer: TrainerFactory, trainers_kept: int, threads: int) -> None:
    """Initialises a pool process: one host; the ML framework on ``threads`` threads.

    Ctrl-C is the parent's to handle (it closes the pool): a process that died of it
    would leave the pool broken while the parent checkpoints and stops.
    """
    global _HOST
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    _HOST = ClientHost(config, make_trainer, trainers_kept=trainers_kept)
    _set_framework_threads(threads)


def _set_framework_threads(threads: int) -> None:
    """Caps torch's threads if the task loaded it (the simulation itself does not import it)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _host() -> ClientHost:
    if _HOST is None:
        raise RuntimeError("simulation pool process used before its initializer ran")
    return _HOST


def _count_in_process(indices: list[int], num_clients: int) -> list[int]:
    counts = [_host().num_samples(i, num_clients) for i in indices]
    _set_framework_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))  # a task may load torch late
    return counts


_LIMITS = CodecLimits(max_total_bytes=1 << 62)
"""The pool's own files: written by the pool, any size."""


def _write_file(path: Path, params: ParamSet) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        write_params(f, params)
    os.replace(tmp, path)


def _read_file(path: Path) -> ParamSet:
    with path.open("rb") as f:
        return read_params(f, _LIMITS)


def _run_in_process(job: ClientJob, model_file: str) -> tuple[ClientOutcome, str, str]:
    """Runs ``job``; its update and state go back as files next to the model, the rest through the pipe."""
    global _MODEL
    if _MODEL is None or _MODEL[0] != job.model_version:
        _MODEL = (job.model_version, _read_file(Path(model_file)))
    outcome = _host().run(job, _MODEL[1])
    base = Path(model_file).with_name(f"r{job.round}-c{job.index}-p{os.getpid()}")
    update_file, state_file = base.with_suffix(".update"), base.with_suffix(".state")
    _write_file(update_file, outcome.update)
    if outcome.state is not None:
        _write_file(state_file, outcome.state)
    return (dataclasses.replace(outcome, update=ParamSet(), state=None), str(update_file),
            str(state_file) if outcome.state is not None else "")


def _collect(result: tuple[ClientOutcome, str, str]) -> ClientOutcome:
    """The outcome with its update (and state) read back from the files a pool process wrote; removes them."""
    outcome, update_file, state_file = result
    try:
        update = _read_file(Path(update_file))
        state = _read_file(Path(state_file)) if state_file else None
    finally:
        Path(update_file).unlink(missing_ok=True)
        if state_file:
            Path(state_file).unlink(missing_ok=True)
    return dataclasses.replace(outcome, update=update, state=state)


def _scratch_dir() -> Path:
    """A new directory for the pool's files: in shared memory where there is some (they are read at once)."""
    shm = Path("/dev/shm")
    parent = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="enclavefl-sim-", dir=parent))


@final
class ProcessPool(ClientPool):
    """Runs jobs in ``processes`` local processes, started fresh (``spawn``: safe with threads and torch).

    Each process builds the task from the job itself (``make_trainer`` is pickled
    to it: the default :class:`~enclavefl.simulation.client.TaskTrainers` loads
    ``task.name`` as a deployed worker does), and trains with ``threads_per_client``
    threads, one by default, as ``enclavefl run`` starts its worker processes.
    """

    def __init__(self, config: JobConfig, make_trainer: TrainerFactory, *, processes: int | None = None,
                 threads_per_client: int = 1, trainers_kept: int = 4, model_dir: Path | None = None) -> None:
        """Starts the processes (they build nothing until the first job).

        Args:
            processes: how many; default one per core.
            model_dir: where the model files go; default a new temporary directory, removed by :meth:`close`.

        Raises:
            ConfigError: ``processes`` or ``threads_per_client`` is below 1.
        """
        n = default_processes() if processes is None else processes
        if n < 1 or threads_per_client < 1:
            raise ConfigError(f"process pool: processes and threads_per_client must be >= 1, "
                              f"got {n} and {threads_per_client}")
        self._processes = n
        self._own_dir = model_dir is None
        self._dir = _scratch_dir() if model_dir is None else model_dir
        self._dir.mkdir(parents=True, exist_ok=True)
        self._files: dict[int, Path] = {}
        self._futures: dict[cf.Future[tuple[ClientOutcome, str, str]], ClientJob] = {}
        self._executor = cf.ProcessPoolExecutor(
            max_workers=n, mp_context=multiprocessing.get_context("spawn"), initializer=_start_process,
            initargs=(config, make_trainer, trainers_kept, threads_per_client))
        self._closed = False

    @property
    def capacity(self) -> int:
        return 2 * self._processes  # one running and one queued per process: no process waits for the driver

    def num_samples(self, num_clients: int) -> list[int]:
        step = -(-num_clients // self._processes)
        parts = [list(range(start, min(start + step, num_clients))) for start in range(0, num_clients, step)]
        try:
            futures = [self._executor.submit(_count_in_process, part, num_clients) for part in parts]
            return [count for future in futures for count in future.result()]
        except Exception as exc:
            raise RoundError(f"simulated clients: cannot build a trainer: {type(exc).__name__}: {exc}") from exc

    def _model_file(self, version: int, download: ParamSet) -> Path:
        path = self._files.get(version)
        if path is None:
            path = self._dir / f"model-v{version}.params"
            _write_file(path, download)
            self._files[version] = path
            for old in sorted(self._files)[:-VERSIONS_KEPT]:
                self._files.pop(old).unlink(missing_ok=True)  # a process still reading it keeps its open file
        return path

    def submit(self, job: ClientJob, download: ParamSet) -> None:
        path = self._model_file(job.model_version, download)
        self._futures[self._executor.submit(_run_in_process, job, str(path))] = job

    def wait(self, timeout_s: float) -> list[ClientOutcome]:
        if not self._futures:
            return []
        done, _ = cf.wait(self._futures, timeout=timeout_s, return_when=cf.FIRST_COMPLETED)
        outcomes = []
        for future in done:
            job = self._futures.pop(future)
            try:
                outcomes.append(_collect(future.result()))
            except Exception as exc:
                raise _failed(job, exc) from exc
        return outcomes

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._futures.clear()
        if self._own_dir:
            shutil.rmtree(self._dir, ignore_errors=True)
