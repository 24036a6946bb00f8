"""Round overhead of the federation itself: real processes, TLS on loopback, no training.

Workers return the parameters plus small noise, so a round's time is the cost of
moving an 11M-parameter float32 model (a ResNet-18's shapes) down to every
worker and the updates back up, validating and aggregating them. For each
worker count it prints one line::

    workers=10 s_per_round=1.23 ps_peak_rss_mb=456

With ``--aggregator trimmed_mean`` (or median, krum) the PS buffers every
update of a round in a spill file instead of streaming them, and the line
names the aggregator: its memory is bounded by ``server.max_buffered_updates``,
not by the number of workers.

``s_per_round`` is the median over rounds 2..R of the PS's own round time
(wait + train + aggregate, from metrics.jsonl; round 1 includes process start).
``ps_peak_rss_mb`` is the PS process's peak resident set (its rusage).

With ``--management`` each worker count runs twice, alternating, ``--repeat``
times: once with the PS's management API off, once with it on and a client
polling ``GET /api/v1/status`` every 100 ms over HTTPS with the job's token,
on one kept-open connection as a browser does (``--fresh-connections``: a TLS
handshake per poll). It prints both medians and their ratio::

    workers=4 api_off_s_per_round=1.20 api_on_s_per_round=1.21 ratio=1.008 polls=412 poll_errors=0

``--params N`` replaces ResNet-18 with an MLP of exactly N float32 values, and
the line names it: ``workers=100 params=1000000 s_per_round=… ps_peak_rss_mb=…``.

Run: ``.venv/bin/python bench/round_overhead.py --workers 10 40 --rounds 4``
and ``.venv/bin/python bench/round_overhead.py --workers 100 --params 1000000``
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
from enclavefl.tensors import ParamSet
from enclavefl.training import FitConfig, FitResult, Trainer

HERE = Path(__file__).resolve().parent

# The parameter tensors of a CIFAR ResNet-18 (11.17M float32 values).
_RESNET18 = [("stem", (64, 3, 3, 3))]
for _stage, (_cin, _cout) in enumerate([(64, 64), (64, 128), (128, 256), (256, 512)]):
    for _block in range(2):
        _in = _cin if _block == 0 else _cout
        _RESNET18 += [(f"s{_stage}b{_block}.conv1", (_cout, _in, 3, 3)), (f"s{_stage}b{_block}.conv2", (_cout, _cout, 3, 3)),
                      (f"s{_stage}b{_block}.bn1", (_cout,)), (f"s{_stage}b{_block}.bn2", (_cout,))]
        if _block == 0 and _cin != _cout:
            _RESNET18.append((f"s{_stage}b{_block}.short", (_cout, _in, 1, 1)))
_RESNET18.append(("fc", (10, 512)))


def model_shapes(params: int | None) -> list[tuple[str, tuple[int, ...]]]:
    """ResNet-18's tensors (None), or an MLP 784-H-200-10 with H chosen to hold exactly ``params`` values.

    H = (params - 2210) // 985 (784H + H + 200H + 200 + 2000 + 10 values); a flat
    tensor carries the few values left over. 1,000,000 gives H = 1012, close to
    the 784-1000-200-10 MLP other frameworks' benchmarks use for "1M parameters".
    """
    if params is None:
        return list(_RESNET18)
    hidden = (params - 2210) // 985
    if hidden < 1:
        raise SystemExit(f"--params {params}: at least 3195 (an MLP 784-1-200-10)")
    shapes = [("fc1.w", (hidden, 784)), ("fc1.b", (hidden,)), ("fc2.w", (200, hidden)), ("fc2.b", (200,)),
              ("fc3.w", (10, 200)), ("fc3.b", (10,))]
    rest = params - sum(int(np.prod(s)) for _, s in shapes)
    if rest:
        shapes.append(("pad", (rest,)))
    return shapes


class NoiseTrainer:
    """Returns the global parameters plus N(0, 1e-3) noise: the transport is all that is measured."""

    def __init__(self, seed: int, initial: ParamSet) -> None:
        self._rng = np.random.default_rng(seed)
        # The worker checks its model's layout against the PS's before the first round.
        self._params: ParamSet | None = initial
        self._noise: dict[str, np.ndarray] = {}

    @property
    def num_samples(self) -> int:
        return 100

    def get_parameters(self) -> ParamSet:
        assert self._params is not None
        return self._params

    def set_parameters(self, params: ParamSet) -> None:
        self._params = params

    def fit(self, config: FitConfig) -> FitResult:
        assert self._params is not None
        noisy = []
        for name, value in self._params.items():
            assert isinstance(value, np.ndarray)
            # Drawn once per worker: drawing 11M normals each round would cost more
            # than the round itself and measure numpy, not the federation.
            if name not in self._noise:
                self._noise[name] = self._rng.standard_normal(value.shape, dtype=np.float32) * np.float32(1e-3)
            noisy.append((name, value + self._noise[name]))
        self._params = ParamSet(noisy)
        return FitResult(100, {"loss": 0.0, "accuracy": 0.0})

    def evaluate(self) -> Mapping[str, float]:
        return {}


class NoiseTask:
    name = "round-overhead"

    def __init__(self, config: JobConfig) -> None:
        self._seed = config.job.seed
        count = config.task.params.get("params")
        self._shapes = model_shapes(None if count is None else int(count))

    def initial_parameters(self) -> ParamSet:
        rng = np.random.default_rng(self._seed)
        return ParamSet((n, rng.standard_normal(s, dtype=np.float32) * 0.01) for n, s in self._shapes)

    def worker_trainer(self, index: int, num_workers: int) -> Trainer:
        return NoiseTrainer(self._seed + index, self.initial_parameters())

    def server_evaluator(self) -> Trainer | None:
        return None


def make_task(config: JobConfig) -> NoiseTask:
    return NoiseTask(config)


class StatusPoller:
    """Polls the run's ``GET /api/v1/status`` every ``every_s`` on a thread, from when the API is up to :meth:`close`.

    Like a browser, it keeps one HTTPS connection open (``fresh=True``: a new connection, so a new TLS
    handshake, per request, as the CLI's client does). It verifies the API against the run's CA.
    """

    def __init__(self, run_dir: Path, every_s: float = 0.1, *, fresh: bool = False) -> None:
        self._run_dir = run_dir
        self._every_s = every_s
        self._fresh = fresh
        self._stop = threading.Event()
        self.polls = 0
        self.errors = 0
        self.last_error = ""
        self._thread = threading.Thread(target=self._run, name="status-poller", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import http.client
        import ssl
        from urllib.parse import urlsplit

        from enclavefl.management.auth import read_token
        from enclavefl.management.runfiles import read_management_info

        while not (self._run_dir / "management.json").exists():
            if self._stop.wait(0.05):
                return
        info = read_management_info(self._run_dir)
        url = urlsplit(info.url)
        context = ssl.create_default_context(cafile=str(info.ca))
        headers = {"Authorization": f"Bearer {read_token(info.token_file)}", "Accept": "application/json"}
        conn: http.client.HTTPSConnection | None = None
        next_at = time.monotonic()
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            next_at += self._every_s  # a fixed rate: a slow answer does not stretch the period
            try:
                if conn is None:
                    conn = http.client.HTTPSConnection(url.hostname or "", url.port, context=context, timeout=5)
                conn.request("GET", "/api/v1/status", headers=headers)
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    raise OSError(f"HTTP {response.status}")
                self.polls += 1
            except (OSError, http.client.HTTPException) as exc:
                self.errors += 1  # the API going away at the job's end costs a failed poll or two
                self.last_error = str(exc)
                if conn is not None:
                    conn.close()
                conn = None
            if self._fresh and conn is not None:
                conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


def run_once(workers: int, rounds: int, chunk_bytes: int, uploads: int, keep: Path | None = None,
             aggregator: str = "mean", *, management: bool = False, fresh_connections: bool = False,
             polls: list[int] | None = None, params: int | None = None) -> tuple[float, float, list[float]]:
    """One job; with ``management`` the API is on and polled, and ``polls`` receives (polls, errors)."""
    with tempfile.TemporaryDirectory(prefix="round-overhead-") as tmp:
        name = f"workers-{workers}" + ("-api" if management else "")
        root = Path(tmp) if keep is None else keep / name
        root.mkdir(parents=True, exist_ok=keep is None)
        job = {
            "job": {"name": f"overhead{workers}", "rounds": rounds, "workers": workers},
            "round": {"min_workers": workers, "start_window_s": 300, "update_window_s": 600},
            "task": {"name": "round_overhead:make_task", "params": {} if params is None else {"params": params}},
            "server": {"checkpoint_every": 1000, "max_concurrent_uploads": uploads, "aggregator": aggregator,
                       "max_buffered_updates": max(workers, 1)},
            "transport": {"chunk_bytes": chunk_bytes},
            "attestation": {"mode": "none"},
            "management": {"enabled": management},
        }
        (root / "job.yaml").write_text(yaml.safe_dump(job))
        from enclavefl.transport.certs import create_job_certs

        create_job_certs(root / "certs", "bench", workers=workers)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
                   OMP_NUM_THREADS="1")
        base = [sys.executable, "-m", "enclavefl"]
        common = ["--config", str(root / "job.yaml"), "--tls-dir", str(root / "certs")]
        port_file = root / "ps.port"
        ps_log = (root / "ps.log").open("wb")
        ps = subprocess.Popen(base + ["ps", *common, "--out", str(root), "--port-file", str(port_file)],
                              stdout=ps_log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while not port_file.exists():
            if ps.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((root / "ps.log").read_text())
            time.sleep(0.05)
        port = port_file.read_text()
        poller = StatusPoller(root, fresh=fresh_connections) if management else None
        procs = [
            subprocess.Popen(base + ["worker", *common, "--connect", f"127.0.0.1:{port}", "--index", str(i)]
                             + (["--log-file", str(root / f"worker-{i}.log")] if keep else []),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
            for i in range(workers)
        ]
        _, status, usage = os.wait4(ps.pid, 0)
        ps.returncode = os.waitstatus_to_exitcode(status)
        for p in procs:
            p.wait(60)
        ps_log.close()
        if poller is not None:
            poller.close()
            if polls is not None:
                polls += [poller.polls, poller.errors]
            if poller.errors:
                print(f"  {poller.errors} failed polls, the last: {poller.last_error}", file=sys.stderr, flush=True)
        if ps.returncode != 0:
            raise RuntimeError((root / "ps.log").read_text()[-3000:])
        rows = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
        times = [r["seconds_wait"] + r["seconds_train"] + r["seconds_aggregate"] for r in rows]
        return statistics.median(times[1:]), usage.ru_maxrss / 1024, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[10, 40])
    parser.add_argument("--params", type=int, help="float32 values of an MLP model (default: ResNet-18's 11.17M)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--chunk-bytes", type=int, default=2 * 2**20)
    parser.add_argument("--uploads", type=int, default=4, help="server.max_concurrent_uploads")
    parser.add_argument("--keep", type=Path, help="keep each run's directory (logs, metrics) under this folder")
    parser.add_argument("--aggregator", default="mean", choices=["mean", "median", "trimmed_mean", "krum"],
                        help="server.aggregator (the buffering ones spill updates to a file)")
    parser.add_argument("--management", action="store_true",
                        help="compare the round with the management API off and on (polled every 100 ms)")
    parser.add_argument("--repeat", type=int, default=1, help="with --management: off/on pairs per worker count")
    parser.add_argument("--fresh-connections", action="store_true",
                        help="with --management: a new HTTPS connection per poll (default: one kept open)")
    args = parser.parse_args()
    if args.management:
        compare_management(args)
        return
    for n in args.workers:
        s_per_round, rss_mb, times = run_once(n, args.rounds, args.chunk_bytes, args.uploads, args.keep,
                                              args.aggregator, params=args.params)
        label = "" if args.params is None else f" params={args.params}"
        label += "" if args.aggregator == "mean" else f" aggregator={args.aggregator}"
        print(f"workers={n}{label} s_per_round={s_per_round:.2f} ps_peak_rss_mb={rss_mb:.0f}", flush=True)
        print(f"  rounds: {' '.join(f'{t:.2f}' for t in times)}", file=sys.stderr, flush=True)


def compare_management(args: argparse.Namespace) -> None:
    """The same job with the API off and on (polled), alternating which runs first, medians of both."""
    for n in args.workers:
        off: list[float] = []
        on: list[float] = []
        polls: list[int] = []
        for i in range(args.repeat):
            for management in ((False, True) if i % 2 == 0 else (True, False)):
                keep = args.keep / f"pass-{i}" if args.keep else None
                _, _, times = run_once(n, args.rounds, args.chunk_bytes, args.uploads, keep, args.aggregator,
                                       management=management, fresh_connections=args.fresh_connections,
                                       polls=polls)
                (on if management else off).extend(times[1:])  # round 1 includes process start
                print(f"  api {'on ' if management else 'off'}: {' '.join(f'{t:.2f}' for t in times)}",
                      file=sys.stderr, flush=True)
        s_off, s_on = statistics.median(off), statistics.median(on)
        print(f"workers={n} api_off_s_per_round={s_off:.3f} api_on_s_per_round={s_on:.3f} "
              f"ratio={s_on / s_off:.3f} polls={sum(polls[0::2])} poll_errors={sum(polls[1::2])}", flush=True)


if __name__ == "__main__":
    main()
