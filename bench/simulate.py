"""Simulation overhead at scale: the real PS in this process, N clients on a local process pool, no training.

Every client returns the global parameters plus small noise, so a round's time
is the cost of the simulation itself: handing the sampled clients their jobs,
moving the model to the pool processes once per round, each update back, and
the server validating and folding every update into its streaming mean. For
each client count it prints one line::

    clients=100 params=1000000 s_per_round=1.23 server_peak_rss_mb=456 pool_peak_rss_mb=321

``s_per_round`` is the median over the rounds of the PS's own round time (wait
+ train + aggregate + eval, from metrics.jsonl). ``server_peak_rss_mb`` is this
process's peak resident set (the PS and the driver, with the updates waiting
for their push); ``pool_peak_rss_mb`` the largest pool process's. All clients
train every round (``round.fraction: 1``), as in the peer framework's benchmark
of the same shapes; the model is six tensors shaped like a 784-1000-200-10 MLP,
padded with one more tensor to exactly ``--params`` values.

``--flower-python PY --flower-dir DIR`` also runs the peer framework's
simulation benchmark (``DIR/run_sim.py``, with the interpreter of its own
virtual environment) for the same shapes, and prints its figures line next to
ours. ``--ray`` runs the clients on a local Ray instance instead of the process
pool (``pip install 'enclavefl[simulation]'``).

Run: ``.venv/bin/python bench/simulate.py --clients 100 1000 --rounds 3``
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from enclavefl.app import simulate
from enclavefl.config import JobConfig, parse_job
from enclavefl.simulation import ClientPool, ProcessPool
from enclavefl.tensors import ParamSet
from enclavefl.training import FitConfig, FitResult, Trainer

MLP_SHAPES = [(784, 1000), (1000,), (1000, 200), (200,), (200, 10), (10,)]
"""A 784-1000-200-10 MLP: 987,210 values."""

_NOISE: dict[tuple[int, ...], np.ndarray] = {}


def model_shapes(params: int) -> list[tuple[str, tuple[int, ...]]]:
    """The MLP's tensors, then one tensor of whatever is left to make ``params`` values (or one tensor if fewer)."""
    mlp = sum(int(np.prod(s)) for s in MLP_SHAPES)
    if params < mlp:
        return [("w", (params,))]
    shapes = [(f"layer{i}", s) for i, s in enumerate(MLP_SHAPES)]
    return shapes + ([("pad", (params - mlp,))] if params > mlp else [])


def noise(shape: tuple[int, ...]) -> np.ndarray:
    """N(0, 1e-3) of ``shape``, drawn once per process: drawing a million normals per client measures numpy."""
    if shape not in _NOISE:
        _NOISE[shape] = np.random.default_rng(len(_NOISE)).standard_normal(shape, dtype=np.float32) * np.float32(1e-3)
    return _NOISE[shape]


class NoiseTrainer:
    """Returns the parameters it was given plus noise; holds them only for one round."""

    def __init__(self, shapes: list[tuple[str, tuple[int, ...]]]) -> None:
        self._params = ParamSet((name, np.zeros(shape, dtype=np.float32)) for name, shape in shapes)

    @property
    def num_samples(self) -> int:
        return 100

    def get_parameters(self) -> ParamSet:
        return self._params

    def set_parameters(self, params: ParamSet) -> None:
        self._params = params

    def fit(self, config: FitConfig) -> FitResult:
        self._params = ParamSet((name, value + noise(value.shape)) for name, value in self._params.items()
                                if isinstance(value, np.ndarray))
        return FitResult(100, {"loss": 0.0, "accuracy": 0.0})

    def evaluate(self) -> Mapping[str, float]:
        return {}


class NoiseTrainers:
    """The pool's trainer factory (picklable: it holds the shapes only)."""

    def __init__(self, params: int) -> None:
        self.shapes = model_shapes(params)

    def __call__(self, index: int, num_clients: int) -> Trainer:
        return NoiseTrainer(self.shapes)


class NoiseTask:
    """The server's side of the task: the initial model, no evaluation."""

    name = "simulate-overhead"

    def __init__(self, params: int) -> None:
        self._shapes = model_shapes(params)

    def initial_parameters(self) -> ParamSet:
        rng = np.random.default_rng(0)
        return ParamSet((n, rng.standard_normal(s, dtype=np.float32) * np.float32(0.01)) for n, s in self._shapes)

    def worker_trainer(self, index: int, num_workers: int) -> Trainer:
        return NoiseTrainer(self._shapes)

    def server_evaluator(self) -> Trainer | None:
        return None


def job(clients: int, rounds: int) -> JobConfig:
    return parse_job({
        "job": {"name": f"simulate-{clients}", "rounds": rounds, "workers": clients},
        "round": {"min_workers": clients, "fraction": 1.0, "start_window_s": 600, "update_window_s": 3600,
                  "worker_timeout_s": 600},
        "server": {"checkpoint_every": 1000},
        "management": {"enabled": False},
        "attestation": {"mode": "none"},
    })


def open_pool(config: JobConfig, params: int, args: argparse.Namespace) -> ClientPool:
    if args.ray:
        from enclavefl.simulation import RayPool

        return RayPool(config, NoiseTrainers(params), actors=args.concurrency)
    return ProcessPool(config, NoiseTrainers(params), processes=args.concurrency)


def run_once(clients: int, params: int, rounds: int, args: argparse.Namespace) -> dict[str, Any]:
    config = job(clients, rounds)
    pool = open_pool(config, params, args)
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-simulate-") as tmp:
            result = simulate(NoiseTask(params), config, out_dir=Path(tmp), pool=pool)
    finally:
        pool.close()
    rows = result.history
    per_round = [sum(float(r.get(k, 0.0)) for k in ("seconds_wait", "seconds_train", "seconds_aggregate",
                                                   "seconds_eval")) for r in rows]
    return {
        "clients": clients,
        "params": sum(int(np.prod(s)) for _, s in model_shapes(params)),
        "s_per_round": statistics.median(per_round),
        "server_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "pool_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "participants": [r["participants"] for r in rows],
        "wall_s": time.monotonic() - started,
    }


def run_flower(python: str, flower_dir: Path, clients: int, rounds: int) -> str:
    """The peer's FIGURES line for the same shapes, or why there is none."""
    proc = subprocess.run([python, str(flower_dir / "run_sim.py"), "--clients", str(clients), "--model", "mlp1m",
                           "--rounds", str(rounds)], capture_output=True, text=True, cwd=flower_dir)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("FIGURES")]
    return lines[-1] if lines else f"flower: no FIGURES line (exit {proc.returncode}): {proc.stderr[-300:]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, help="pool processes (default: one per core)")
    parser.add_argument("--ray", action="store_true", help="clients on a local Ray instance")
    parser.add_argument("--flower-python", help="the peer framework's virtual environment's python")
    parser.add_argument("--flower-dir", type=Path, help="the peer framework's benchmark scripts (run_sim.py)")
    args = parser.parse_args()
    for clients in args.clients:
        # One process per size: the peak RSS of a process never goes down.
        if len(args.clients) > 1:
            argv = [sys.executable, __file__, "--clients", str(clients), "--params", str(args.params),
                    "--rounds", str(args.rounds)]
            argv += (["--concurrency", str(args.concurrency)] if args.concurrency else []) + (["--ray"] if args.ray else [])
            subprocess.run(argv, check=True)
        else:
            fig = run_once(clients, args.params, args.rounds, args)
            print(f"clients={fig['clients']} params={fig['params']} s_per_round={fig['s_per_round']:.2f} "
                  f"server_peak_rss_mb={fig['server_peak_rss_mb']:.0f} pool_peak_rss_mb={fig['pool_peak_rss_mb']:.0f} "
                  f"participants={fig['participants']} wall_s={fig['wall_s']:.1f}", flush=True)
        if args.flower_python and args.flower_dir:
            print(run_flower(args.flower_python, args.flower_dir, clients, args.rounds), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
