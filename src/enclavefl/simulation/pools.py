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
Updates come back the same way: a pool process writes each raw to a file and
sends its name and layout, and the driver maps the file and pushes from the
mapping, with no copy before the server's own. A 4 MB update through a pipe
takes dozens of hand-overs between the two processes, each a wait for the
scheduler on a busy machine, and two copies; a file in shared memory
(``/dev/shm`` where there is one) takes one write.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import mmap
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field
from multiprocessing import connection as mp_connection
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING, Any, final

import numpy as np

from enclavefl.errors import ConfigError, RoundError
from enclavefl.simulation.client import ClientHost, ClientJob, ClientOutcome, TrainerFactory
from enclavefl.tensors import CodecLimits, EncodedUpdate, ParamSet, read_params, write_params

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
    Nothing heartbeats while a job runs: a job longer than ``round.worker_timeout_s`` gets
    its client dropped by the PS (the driver joins it again).
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
# A pool process runs _serve: it answers each request on its pipe, in order.
# Requests: ("count", indices, num_clients) -> counts; ("run", job, model_file) -> (outcome, update_file,
# state_file); None -> exit. Replies: ("ok", value) or ("error", "Type: message").

_LIMITS = CodecLimits(max_total_bytes=1 << 62)
"""The pool's own files: written by the pool, any size."""

_Reply = tuple[str, Any]


def set_framework_threads(threads: int) -> None:
    """Caps torch's threads if the task loaded it (the simulation itself does not import it)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _write_file(path: Path, params: ParamSet) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        write_params(f, params)
    os.replace(tmp, path)


def _read_file(path: Path) -> ParamSet:
    with path.open("rb") as f:
        return read_params(f, _LIMITS)


class _Server:
    """What one pool process holds: its host, and the newest model version it read."""

    def __init__(self, host: ClientHost, threads: int) -> None:
        self.host = host
        self.threads = threads
        self.model: tuple[int, ParamSet] | None = None

    def count(self, indices: list[int], num_clients: int) -> list[int]:
        counts = [self.host.num_samples(i, num_clients) for i in indices]
        set_framework_threads(self.threads)  # the task may have loaded torch just now
        return counts

    def run(self, job: ClientJob, model_file: str) -> tuple[ClientOutcome, _Shipped, _Shipped]:
        """Runs ``job``; its update and state go back in files next to the model, the rest through the pipe."""
        if self.model is None or self.model[0] != job.model_version:
            self.model = (job.model_version, _read_file(Path(model_file)))
        outcome = self.host.run(job, self.model[1])
        base = Path(model_file).with_name(f"r{job.round}-c{job.index}-p{os.getpid()}")
        update = _ship(outcome.update, base.with_suffix(".update"))
        state = _ship(outcome.state, base.with_suffix(".state")) if outcome.state is not None else None
        return dataclasses.replace(outcome, update=ParamSet(), state=None), update, state


_Layout = list[tuple[str, str, tuple[int, ...], int]]
"""(name, dtype, shape, byte offset) of each tensor in a shipped file."""
_Shipped = tuple[str, _Layout] | ParamSet | EncodedUpdate | None
"""Tensors on their way back: a file and its layout, or (with sparse or compressed tensors) the tensors themselves."""

_ALIGN = 64


def _ship(params: ParamSet | EncodedUpdate, path: Path) -> _Shipped:
    """Writes dense ``params`` raw to ``path`` for the driver to map; sparse or compressed ones travel through the pipe."""
    if isinstance(params, EncodedUpdate):
        return params
    dense = [(name, value) for name, value in params.items() if isinstance(value, np.ndarray)]
    if len(dense) != len(params):
        return params
    layout: _Layout = []
    offset = 0
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        for name, value in dense:
            arr = np.ascontiguousarray(value).reshape(value.shape)
            pad = -offset % _ALIGN
            f.write(b"\0" * pad)
            offset += pad
            f.write(arr.reshape(-1).view(np.uint8).data)
            layout.append((name, arr.dtype.str, tuple(arr.shape), offset))
            offset += arr.nbytes
    os.replace(tmp, path)
    return str(path), layout


def _unship(shipped: _Shipped) -> ParamSet | EncodedUpdate | None:
    """The tensors :func:`_ship` sent, mapped read-only from their file (no copy); the file is removed."""
    if shipped is None or isinstance(shipped, ParamSet | EncodedUpdate):
        return shipped
    name, layout = shipped
    path = Path(name)
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            mapped = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) if size else None
    finally:
        path.unlink(missing_ok=True)  # the mapping keeps the data while the arrays live
    tensors = []
    for tensor, dtype, shape, offset in layout:
        count = math.prod(shape)
        if mapped is None or count == 0:
            tensors.append((tensor, np.zeros(shape, dtype=np.dtype(dtype))))
        else:
            tensors.append((tensor, np.frombuffer(mapped, dtype=np.dtype(dtype), count=count, offset=offset)
                            .reshape(shape)))
    return ParamSet(tensors)


def _serve(conn: Connection, config: JobConfig, make_trainer: TrainerFactory, trainers_kept: int,
           threads: int) -> None:
    """A pool process's main loop.

    Ctrl-C is the parent's to handle (it closes the pool): a process that died of it
    would break the pool while the parent checkpoints and stops.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    server = _Server(ClientHost(config, make_trainer, trainers_kept=trainers_kept), threads)
    set_framework_threads(threads)
    while True:
        try:
            request = conn.recv()
        except EOFError:  # the parent is gone
            return
        if request is None:
            return
        try:
            kind, *args = request
            value = server.count(*args) if kind == "count" else server.run(*args)
            conn.send(("ok", value))
        except Exception as exc:  # reported to the parent, which fails the simulation with it
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


def _collect(result: tuple[ClientOutcome, _Shipped, _Shipped]) -> ClientOutcome:
    """The outcome with its update (and state) as a pool process shipped them."""
    outcome, update, state = result
    try:
        kept = _unship(state)  # a state is dense tensors: shipped as a file or as they are, never encoded
        return dataclasses.replace(outcome, update=_unship(update) or ParamSet(),
                                   state=kept if isinstance(kept, ParamSet) else None)
    finally:
        for shipped in (update, state):  # a failed read leaves no file behind
            if isinstance(shipped, tuple):
                Path(shipped[0]).unlink(missing_ok=True)


def _scratch_dir() -> Path:
    """A new directory for the pool's files: in shared memory where there is some (they are read at once)."""
    shm = Path("/dev/shm")
    parent = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="enclavefl-sim-", dir=parent))


@dataclass(slots=True)
class _Worker:
    process: BaseProcess
    conn: Connection
    jobs: deque[ClientJob] = field(default_factory=deque)
    """Jobs sent to it and not yet answered, in the order it answers them."""


@final
class ProcessPool(ClientPool):
    """Runs jobs in ``processes`` local processes, started fresh (``spawn``: safe with threads and torch).

    Each process builds the task from the job itself (``make_trainer`` is pickled
    to it: the default :class:`~enclavefl.simulation.client.TaskTrainers` loads
    ``task.name`` as a deployed worker does), and trains with ``threads_per_client``
    threads, one by default, as ``enclavefl run`` starts its worker processes.
    The driver talks to each process over one pipe, with no thread of its own in
    between: a job costs one small message each way.
    """

    def __init__(self, config: JobConfig, make_trainer: TrainerFactory, *, processes: int | None = None,
                 threads_per_client: int = 1, trainers_kept: int = 4, model_dir: Path | None = None) -> None:
        """Starts the processes (they build nothing until the first job).

        Args:
            processes: how many; default one per core.
            model_dir: where the model and update files go; default a new temporary directory
                (in shared memory where there is some), removed by :meth:`close`.

        Raises:
            ConfigError: ``processes`` or ``threads_per_client`` is below 1.
        """
        n = default_processes() if processes is None else processes
        if n < 1 or threads_per_client < 1:
            raise ConfigError(f"process pool: processes and threads_per_client must be >= 1, "
                              f"got {n} and {threads_per_client}")
        self._own_dir = model_dir is None
        self._dir = _scratch_dir() if model_dir is None else model_dir
        self._dir.mkdir(parents=True, exist_ok=True)
        self._files: dict[int, Path] = {}
        self._closed = False
        context = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []
        try:
            for i in range(n):
                parent, child = context.Pipe()
                process = context.Process(target=_serve, name=f"enclavefl-sim-{i}", daemon=True,
                                          args=(child, config, make_trainer, trainers_kept, threads_per_client))
                process.start()
                child.close()
                self._workers.append(_Worker(process, parent))
        except BaseException:
            self.close()
            raise

    @property
    def capacity(self) -> int:
        return 2 * len(self._workers)  # one running and one queued per process: no process waits for the driver

    def _receive(self, worker: _Worker) -> _Reply:
        try:
            reply: _Reply = worker.conn.recv()
        except (EOFError, OSError) as exc:
            worker.process.join(1.0)
            raise RoundError(f"simulation pool process {worker.process.name} died "
                             f"(exit code {worker.process.exitcode})") from exc
        return reply

    def num_samples(self, num_clients: int) -> list[int]:
        step = -(-num_clients // len(self._workers))
        parts = [list(range(start, min(start + step, num_clients))) for start in range(0, num_clients, step)]
        for worker, part in zip(self._workers, parts, strict=False):
            worker.conn.send(("count", part, num_clients))
        counts: list[int] = []
        for worker, _ in zip(self._workers, parts, strict=False):
            status, value = self._receive(worker)
            if status != "ok":
                raise RoundError(f"simulated clients: cannot build a trainer: {value}")
            counts += value
        return counts

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
        worker = min(self._workers, key=lambda w: len(w.jobs))
        worker.conn.send(("run", job, str(path)))
        worker.jobs.append(job)

    def wait(self, timeout_s: float) -> list[ClientOutcome]:
        busy = {w.conn: w for w in self._workers if w.jobs}
        if not busy:
            return []
        outcomes = []
        for conn in mp_connection.wait(list(busy), timeout=timeout_s):
            worker = busy[conn]  # type: ignore[index]
            while worker.jobs and worker.conn.poll():
                status, value = self._receive(worker)
                job = worker.jobs.popleft()
                if status != "ok":
                    raise RoundError(f"simulated client {job.index} (worker-{job.index}) failed in round "
                                     f"{job.round}: {value}")
                try:
                    outcomes.append(_collect(value))
                except Exception as exc:
                    raise _failed(job, exc) from exc
        return outcomes

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except OSError:
                pass  # already gone
        for worker in self._workers:
            worker.process.join(5.0)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(5.0)
            worker.conn.close()
        if self._own_dir:
            shutil.rmtree(self._dir, ignore_errors=True)
