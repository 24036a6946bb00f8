"""Benchmark: the cost of secure aggregation (SecAgg+) against a plain round, same workers and model.

In-process simulation (the default): the real ParameterServer and 100 real worker
runtimes on threads of one process, reaching it through in-memory clients (no
gRPC), with a 1M-parameter float32 model and workers that return the model plus
fixed noise (no training: only the federation is measured). The same job runs
twice, plain and with ``privacy.secure_aggregation`` (SecAgg+, 3 log2 n
neighbours, every key signed and checked, masks expanded with AES-CTR). It prints::

    mode=in-process-simulation workers=100 params=1000000 plain_s=... secagg_s=... ratio=... plain_cpu_s=... secagg_cpu_s=...

``*_s`` is the median time per round over rounds 2..R (the time between
consecutive metrics rows: stages, uploads, unmasking, the step); ``*_cpu_s`` is
the process's CPU seconds over the same intervals (all threads), the work a
round costs whatever else runs on the machine. In one process
every worker's work (masking included) runs on the same two cores, one after
the other; in a deployment the workers mask in parallel on their own machines,
so this ratio is an upper bound for the PS's round time.

Per node (always printed after the simulation): one protocol round run by
calling the library directly, timing each worker's own work (sign and check
keys, share, quantize and mask, answer the unmask) and the PS's (check keys,
relay, fold the masked uploads modulo 2**32, unmask) against the PS folding the
same number of float32 updates into its streaming weighted mean::

    mode=per-node workers=100 params=1000000 worker_secagg_s=... ps_plain_fold_s=... ps_secagg_s=...

(CPU seconds of the one thread that makes every call, so a busy machine does not inflate them.)
In a deployment the workers mask in parallel, so a round costs one worker's
``worker_secagg_s`` (plus the two key stages' round trips) more, and the PS spends
``ps_secagg_s`` where a plain round spends ``ps_plain_fold_s``.

Real processes (``--real N``): ``enclavefl run`` with N worker processes on
127.0.0.1 (TLS, simulated attestation: each worker checks its neighbours' RA-TLS
certificates), the same ``--params`` and no training, plain then secure::

    mode=processes workers=100 params=1000000 plain_s=... secagg_s=... ratio=...

and then each round's seconds (rounds 2..R)::

    mode=processes-per-round plain_s=2.04,1.98,... secagg_s=5.29,4.81,...

On two cores the N processes take turns, so every worker's secure-aggregation
work adds to the round as in the in-process simulation. A worker checks each
neighbour's RA-TLS certificate once per job and the neighbours change every
round, so the first rounds carry most of those checks: give ``--rounds 12`` or
more to see the rounds after them.

For scale: the peer framework's SecAgg+ takes 21.65 s per round against 1.91 s
for its plain round with 100 clients x 1M parameters in its simulation runtime
on this machine (11.3x); its script needs a virtual environment built from the
network, which this benchmark does not do.

Run: ``.venv/bin/python bench/secagg.py --workers 100 --params 1000000 --rounds 4``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from enclavefl.config import JobConfig, parse_job
from enclavefl.server.ps import ParameterServer
from enclavefl.simulation.identity import SimulatedIdentity
from enclavefl.tensors import ParamSet, StreamHeader
from enclavefl.training import FitConfig, FitResult
from enclavefl.worker import InMemoryClient, Worker, WorkerSettings

HERE = Path(__file__).resolve().parent


class NoiseTrainer:
    """The global parameters plus fixed N(0, 1e-3) noise (drawn once): no training cost."""

    def __init__(self, seed: int, initial: ParamSet) -> None:
        rng = np.random.default_rng(seed)
        self._noise = {n: rng.standard_normal(v.shape, dtype=np.float32) * np.float32(1e-3) for n, v in initial.items()}
        self._params = initial

    @property
    def num_samples(self) -> int:
        return 100

    def get_parameters(self) -> ParamSet:
        return self._params

    def set_parameters(self, params: ParamSet) -> None:
        self._params = params

    def fit(self, config: FitConfig) -> FitResult:
        self._params = ParamSet((n, v + self._noise[n]) for n, v in self._params.items())
        return FitResult(100, {"loss": 0.0})

    def evaluate(self) -> Mapping[str, float]:
        return {}


def job(workers: int, rounds: int, secagg: bool) -> JobConfig:
    return parse_job({
        "job": {"rounds": rounds, "workers": workers},
        "round": {"min_workers": workers, "start_window_s": 600, "update_window_s": 600, "heartbeat_s": 5,
                  "worker_timeout_s": 600},
        "attestation": {"mode": "none"},
        "server": {"checkpoint_every": 1000},
        "privacy": {"secure_aggregation": {"enabled": secagg, "weight_cap": 100, "stage_timeout_s": 600}},
    })


class CpuClock:
    """Samples (wall time, process CPU seconds) every 10 ms, to read the CPU a round used between two rows."""

    def __init__(self) -> None:
        self._samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self._samples.append((time.time(), time.process_time()))

    def __enter__(self) -> CpuClock:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def at(self, wall: float) -> float:
        """Process CPU seconds at wall time ``wall`` (linear between the two nearest samples)."""
        walls, cpus = zip(*self._samples, strict=True)
        return float(np.interp(wall, walls, cpus))


def simulate(workers: int, params: int, rounds: int, secagg: bool) -> tuple[float, float]:
    """(median wall seconds, median process CPU seconds) per round (rounds 2..R) of an in-process job."""
    rng = np.random.default_rng(0)
    initial = ParamSet([("w", rng.standard_normal(params, dtype=np.float32) * np.float32(0.01))])
    with tempfile.TemporaryDirectory() as out:
        ps = ParameterServer(job(workers, rounds, secagg), initial, out_dir=Path(out))
        stop = threading.Event()
        threads = []
        for i in range(workers):
            who = SimulatedIdentity(i)
            worker = Worker(lambda who=who: InMemoryClient(ps, who.peer, chunk_bytes=1 << 20, secagg_signer=who.sign),
                            NoiseTrainer(i, initial), WorkerSettings(name=f"w{i}", poll_s=1.0), stop=stop)
            threads.append(threading.Thread(target=worker.run, daemon=True))
        for t in threads:
            t.start()
        with CpuClock() as clock:
            try:
                ps.run()
            finally:
                stop.set()
        times = [float(r["time"]) for r in ps.metrics.history]
    cpu = [clock.at(t) for t in times]
    return (statistics.median(b - a for a, b in zip(times, times[1:])),
            statistics.median(b - a for a, b in zip(cpu, cpu[1:])))


def per_node(workers: int, params: int) -> tuple[float, float, float]:
    """(median worker's secure-aggregation seconds, PS's plain fold seconds, PS's secure-aggregation seconds).

    CPU seconds of this thread (``time.thread_time``), not wall time: every call runs here one after
    the other, so other jobs on a shared machine do not inflate the figures.
    """
    from enclavefl.privacy.secagg import RoundTag, SecAggClient, SecAggParams, SecAggServer
    from enclavefl.privacy.secagg.identity import verify_with_certificate
    from enclavefl.server.aggregator import WeightedMean

    ids = [f"w{i:03d}" for i in range(workers)]
    who = {u: SimulatedIdentity(i) for i, u in enumerate(ids)}
    certs = {u: who[u].certificate for u in ids}

    def verify(sender: str, payload: bytes, signature: bytes) -> bool:
        return verify_with_certificate(certs[sender], payload, signature)

    tag = RoundTag(1, os.urandom(16))
    setting = SecAggParams(weight_cap=100)
    spent = dict.fromkeys(ids, 0.0)
    ps_spent = 0.0

    def timed(owner: str | None, call: Any) -> Any:
        nonlocal ps_spent
        start = time.thread_time()
        result = call()
        if owner is None:
            ps_spent += time.thread_time() - start
        else:
            spent[owner] += time.thread_time() - start
        return result

    clients = {u: SecAggClient(u, tag, setting, lambda p, u=u: who[u].sign(p)[1], verify) for u in ids}
    server = SecAggServer(tag, setting, ids, verify, params)
    for u, c in clients.items():
        advert = timed(u, c.advertise)
        timed(None, lambda: server.receive_advert(advert))
    roster = timed(None, server.roster)
    for u, c in clients.items():
        packets = timed(u, lambda: c.share(roster))
        timed(None, lambda: server.receive_shares(u, packets))
    inboxes = timed(None, server.inboxes)
    update = np.random.default_rng(0).standard_normal(params, dtype=np.float32) * np.float32(1e-3)
    for u, c in clients.items():
        masked = timed(u, lambda: c.upload(inboxes[u], update, 100))
        timed(None, lambda: server.receive_masked(masked))
    request = timed(None, server.unmask_request)
    for u, c in clients.items():
        reply = timed(u, lambda: c.unmask(request))
        timed(None, lambda: server.receive_unmask(reply))
    timed(None, server.finish)
    plain = WeightedMean(StreamHeader.of(ParamSet([("w", update)])))
    start = time.thread_time()
    for _ in ids:
        plain.add(ParamSet([("w", update)]), 100.0)
    plain.result()
    return statistics.median(spent.values()), time.thread_time() - start, ps_spent


def real(workers: int, params: int, rounds: int, secagg: bool) -> list[float]:
    """Seconds of each round after the first of ``enclavefl run`` with ``workers`` processes.

    The task is round_overhead.py's noise task (an MLP of exactly ``params`` float32
    values, no training); attestation is simulated, so every certificate a worker
    checks is a full RA-TLS verification.
    """
    doc: dict[str, Any] = {
        "job": {"name": "secagg-bench", "rounds": rounds, "workers": workers, "seed": 1},
        "round": {"min_workers": workers, "start_window_s": 600, "update_window_s": 600},
        "task": {"name": "round_overhead:make_task", "params": {"params": params}},
        "server": {"checkpoint_every": 1000},
        "privacy": {"secure_aggregation": {"enabled": secagg, "weight_cap": 100, "stage_timeout_s": 600}},
    }
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "job.yaml"
        path.write_text(yaml.safe_dump(doc))
        subprocess.run([sys.executable, "-m", "enclavefl", "run", str(path), "--out", f"{tmp}/run", "--quiet"],
                       check=True, capture_output=True, timeout=3600, env=env)
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    times = [float(r["time"]) for r in rows]
    return [b - a for a, b in zip(times, times[1:])]


def _seconds(values: list[float]) -> str:
    return ",".join(f"{v:.2f}" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=100)
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--real", type=int, default=0, metavar="N", help="also N worker processes (enclavefl run)")
    args = parser.parse_args()
    plain, plain_cpu = simulate(args.workers, args.params, args.rounds, secagg=False)
    secure, secure_cpu = simulate(args.workers, args.params, args.rounds, secagg=True)
    print(f"mode=in-process-simulation workers={args.workers} params={args.params} plain_s={plain:.2f} "
          f"secagg_s={secure:.2f} ratio={secure / plain:.2f} plain_cpu_s={plain_cpu:.2f} "
          f"secagg_cpu_s={secure_cpu:.2f}", flush=True)
    worker_s, plain_fold_s, ps_s = per_node(args.workers, args.params)
    print(f"mode=per-node workers={args.workers} params={args.params} worker_secagg_s={worker_s:.3f} "
          f"ps_plain_fold_s={plain_fold_s:.3f} ps_secagg_s={ps_s:.3f}", flush=True)
    if args.real:
        plain_rounds = real(args.real, args.params, args.rounds, secagg=False)
        secure_rounds = real(args.real, args.params, args.rounds, secagg=True)
        plain, secure = statistics.median(plain_rounds), statistics.median(secure_rounds)
        print(f"mode=processes workers={args.real} params={args.params} plain_s={plain:.2f} secagg_s={secure:.2f} "
              f"ratio={secure / plain:.2f}", flush=True)
        print(f"mode=processes-per-round plain_s={_seconds(plain_rounds)} secagg_s={_seconds(secure_rounds)}",
              flush=True)


if __name__ == "__main__":
    main()
