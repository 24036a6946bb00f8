"""A model of gigabytes, down and up through the real transport: one tensor and the whole over 2 GiB.

A PS process and ``--workers`` worker processes on loopback with TLS, as
``round_overhead.py`` runs them, but with a float32 model of ``--gib`` GiB whose
largest tensor holds ``--largest-gib`` GiB (defaults 3 and 2.25: both past the
2^31 bytes where an int32 length or offset would wrap). The PS builds the
model with ``np.empty`` and fills it a block at a time, so building it takes
the model's memory and no more. It prints one line::

    model_gib=3.00 largest_tensor_gib=2.25 workers=2 s_per_round=… ps_peak_rss_mb=… ps_rss_over_model=… worker_peak_rss_mb=…

``s_per_round`` is the median of the PS's own round times after round 1 (from
metrics.jsonl); ``ps_peak_rss_mb`` the PS process's peak resident set, and
``ps_rss_over_model`` that divided by the model's size.

What is measured is the federation, not training: a worker trains nothing and
pushes the model it downloaded as its "delta" (the values do not matter to the
transport), through an update pipeline of that one step, so it holds one copy
of the model. The PS runs as a job would, with the settings a PS short of
memory takes: ``server.aggregator.accumulate: float32`` (a float64 running sum
would be twice the model) and ``server.max_concurrent_uploads: 1``.

Memory: the PS needs about 3x the model at its peak, each worker 1x: for the
defaults about 16 GiB together. Run it alone. (The bench's own process holds no model.)

Run: ``.venv/bin/python bench/large_model.py [--gib 3 --largest-gib 2.25 --rounds 3]``
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

import numpy as np
import yaml

from enclavefl.config import JobConfig
from enclavefl.messages import UpdateKind
from enclavefl.tensors import ParamSet
from enclavefl.training import FitConfig, FitResult, Trainer
from enclavefl.worker.pipeline import UpdateContext

HERE = Path(__file__).resolve().parent
GIB = 2**30
ROW_VALUES = 1024
FILL_ROWS = 4096  # rows filled per step while building the model: 16 MiB


def model_shapes(gib: float, largest_gib: float) -> list[tuple[str, tuple[int, int]]]:
    """Two float32 tensors of (rows, 1024): the largest of ``largest_gib``, the other the rest of ``gib``."""
    row_bytes = ROW_VALUES * 4
    big = int(largest_gib * GIB) // row_bytes
    rest = int(gib * GIB) // row_bytes - big
    if big < 1 or rest < 1:
        raise SystemExit(f"--gib {gib} must exceed --largest-gib {largest_gib} by at least one 4 KiB row")
    return [("embedding", (big, ROW_VALUES)), ("dense", (rest, ROW_VALUES))]


def filled(shape: tuple[int, int]) -> np.ndarray:
    """A float32 array of ``shape`` filled a block of rows at a time (no model-sized temporary)."""
    out = np.empty(shape, dtype=np.float32)
    pattern = (np.arange(FILL_ROWS * ROW_VALUES, dtype=np.float32) % 1000 - 500) * np.float32(1e-5)
    for start in range(0, shape[0], FILL_ROWS):
        stop = min(start + FILL_ROWS, shape[0])
        out[start:stop] = pattern[: (stop - start) * ROW_VALUES].reshape(stop - start, ROW_VALUES)
    return out


class EchoTrainer:
    """Trains nothing: its parameters are the model it was given, the same arrays.

    It lets go of the model once the worker has read it back after ``fit``: a
    trainer that kept it would make the worker hold two models while the next
    one downloads (a real trainer copies the model into its own tensors).
    """

    def __init__(self, shapes: list[tuple[str, tuple[int, int]]]) -> None:
        # Before the first download only the layout matters (the join compares it): zero-stride views, no memory.
        self._layout = ParamSet((n, np.broadcast_to(np.float32(0), s)) for n, s in shapes)
        self._params = self._layout

    @property
    def num_samples(self) -> int:
        return 100

    def get_parameters(self) -> ParamSet:
        params, self._params = self._params, self._layout
        return params

    def set_parameters(self, params: ParamSet) -> None:
        self._params = params

    def fit(self, config: FitConfig) -> FitResult:
        return FitResult(100, {"loss": 0.0, "accuracy": 0.0})

    def evaluate(self) -> Mapping[str, float]:
        return {}


class PushModel:
    """The update pipeline's one step: push the trained parameters as the delta (no copy)."""

    name = "push-model"
    produces = UpdateKind.DELTA

    def __call__(self, update: ParamSet, context: UpdateContext) -> ParamSet:
        return update


class LargeTask:
    name = "large-model"

    def __init__(self, config: JobConfig) -> None:
        self._shapes = model_shapes(float(config.task.params["gib"]), float(config.task.params["largest_gib"]))

    def initial_parameters(self) -> ParamSet:
        return ParamSet((n, filled(s)) for n, s in self._shapes)

    def worker_trainer(self, index: int, num_workers: int) -> Trainer:
        return EchoTrainer(self._shapes)

    def server_evaluator(self) -> Trainer | None:
        return None


def make_task(config: JobConfig) -> LargeTask:
    return LargeTask(config)


def run_worker(config_path: Path, tls_dir: Path, connect: str, index: int) -> None:
    """One worker process: the deployed worker's setup, with the one-step pipeline above."""
    from enclavefl.cli.malloc import tune_malloc
    from enclavefl.config import load_job
    from enclavefl.job_digest import job_digests
    from enclavefl.tensors import StreamHeader
    from enclavefl.transport.provisioning import make_credentials
    from enclavefl.worker.runtime import Worker, WorkerSettings, grpc_client_factory

    tune_malloc()
    config = load_job(config_path)
    task = LargeTask(config)
    trainer = task.worker_trainer(index, config.job.workers)
    credentials = make_credentials(config, tls_dir, f"worker-{index}", job_dir=config_path.parent)
    settings = WorkerSettings(name=f"worker-{index}", seed=config.job.seed,
                              job_settings=job_digests(config, StreamHeader.of(trainer.get_parameters())))
    connect_to = grpc_client_factory(connect, credentials, chunk_bytes=config.transport.chunk_bytes)
    Worker(connect_to, trainer, settings, transforms=[PushModel()]).run()


def run_job(gib: float, largest_gib: float, workers: int, rounds: int, keep: Path | None) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="large-model-") as tmp:
        root = Path(tmp) if keep is None else keep
        root.mkdir(parents=True, exist_ok=True)
        job = {
            "job": {"name": "large-model", "rounds": rounds, "workers": workers},
            "round": {"min_workers": workers, "start_window_s": 900, "update_window_s": 1800},
            "task": {"name": "large_model:make_task", "params": {"gib": gib, "largest_gib": largest_gib}},
            "server": {"checkpoint_every": 1000, "max_concurrent_uploads": 1,
                       "aggregator": {"name": "mean", "accumulate": "float32"},
                       "max_update_bytes": int(gib * GIB) + GIB},
            "attestation": {"mode": "none"},
            "management": {"enabled": False},
        }
        (root / "job.yaml").write_text(yaml.safe_dump(job))
        from enclavefl.transport.certs import create_job_certs

        create_job_certs(root / "certs", "bench", workers=workers)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
                   OMP_NUM_THREADS="1")
        common = ["--config", str(root / "job.yaml"), "--tls-dir", str(root / "certs")]
        port_file = root / "ps.port"
        with (root / "ps.log").open("wb") as ps_log:
            ps = subprocess.Popen([sys.executable, "-m", "enclavefl", "ps", *common, "--out", str(root),
                                   "--port-file", str(port_file)], stdout=ps_log, stderr=subprocess.STDOUT, env=env)
            deadline = time.monotonic() + 600  # the PS builds the model first
            while not port_file.exists():
                if ps.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((root / "ps.log").read_text()[-3000:])
                time.sleep(0.1)
            procs = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(i), *common,
                                       "--connect", f"127.0.0.1:{port_file.read_text()}"],
                                      stdout=subprocess.DEVNULL, stderr=(root / f"worker-{i}.log").open("wb"), env=env)
                     for i in range(workers)]
            peaks: list[float] = []

            def reap(p: subprocess.Popen[bytes]) -> None:
                _, _, usage = os.wait4(p.pid, 0)
                peaks.append(usage.ru_maxrss / 1024)

            reapers = [threading.Thread(target=reap, args=(p,)) for p in procs]
            for t in reapers:
                t.start()
            _, status, usage = os.wait4(ps.pid, 0)
            for t in reapers:
                t.join(120)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError((root / "ps.log").read_text()[-3000:])
        rows = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
        times = [r["seconds_wait"] + r["seconds_train"] + r["seconds_aggregate"] for r in rows]
        print(f"  rounds: {' '.join(f'{t:.2f}' for t in times)}", file=sys.stderr, flush=True)
        return {"s_per_round": statistics.median(times[1:] or times), "ps_peak_rss_mb": usage.ru_maxrss / 1024,
                "worker_peak_rss_mb": max(peaks, default=0.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=3.0, help="model size, GiB of float32 values")
    parser.add_argument("--largest-gib", type=float, default=2.25, help="size of its largest tensor, GiB")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="keep the run directory (logs, metrics) here")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tls-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--connect", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        run_worker(args.config, args.tls_dir, args.connect, args.worker)
        return
    shapes = model_shapes(args.gib, args.largest_gib)
    model_mb = sum(int(np.prod(s)) for _, s in shapes) * 4 / 2**20
    got = run_job(args.gib, args.largest_gib, args.workers, args.rounds, args.keep)
    print(f"model_gib={model_mb / 1024:.2f} largest_tensor_gib={int(np.prod(shapes[0][1])) * 4 / GIB:.2f} "
          f"workers={args.workers} s_per_round={got['s_per_round']:.2f} ps_peak_rss_mb={got['ps_peak_rss_mb']:.0f} "
          f"ps_rss_over_model={got['ps_peak_rss_mb'] / model_mb:.2f} worker_peak_rss_mb={got['worker_peak_rss_mb']:.0f}",
          flush=True)


if __name__ == "__main__":
    main()
