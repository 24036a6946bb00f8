"""Round time and server memory of a cluster of 1, 2 and 4 aggregation servers: real processes on 127.0.0.1.

The job is bench/round_overhead.py's: workers return the parameters plus small
noise, so a round is the cost of moving an 11M-parameter float32 model
(a ResNet-18's shapes) down to every worker and back, validating and folding
the updates, and here also of the cluster's shared state: a server rewrites
its sealed partial (the float64 sum, twice the model) in Redis
(``appendfsync always``) once per group commit, that is with every update
folded while its previous write ran (at most about
``server.max_concurrent_uploads`` per write), and every close reads the
partials, publishes the sealed model and state, which every other server
reads back.
For each server count it prints one line::

    servers=2 workers=40 s_per_round=12.3 max_server_rss_mb=812 redis_in_mb_per_round=7400

``s_per_round`` is the median of the time between consecutive rounds' closes
(rounds 2..R, from the rows' ``time``: open, train, close, publish and pick-up),
``max_server_rss_mb`` the largest peak resident set of any server process
(its rusage), ``redis_in_mb_per_round`` what Redis received per round (its
``total_net_input_bytes`` over the job, divided by the rounds). Worker i uses
the server the cluster places it on and fails over to the others, as ``enclavefl run --servers N``.

On one host every server shares the same cores with Redis and the workers, so
this measures the cluster's overhead, not its speed-up: see docs/cluster.md
for what scales across hosts.

Run: ``.venv/bin/python bench/cluster.py --servers 1 2 4 --workers 40 --rounds 3``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def _wait_port(path: Path, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 120) -> int:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"no port in {path}:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.05)
    return int(path.read_text())


def _redis_input_bytes(url: str) -> int:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return int(client.info("stats")["total_net_input_bytes"])
    finally:
        client.close()


def run_once(servers: int, workers: int, rounds: int, params: int | None, keep: Path | None,
             accumulate: str = "float64") -> tuple[float, float, float, list[float]]:
    """One job on ``servers`` servers; returns (s_per_round, max_server_rss_mb, redis_in_mb_per_round, round times)."""
    from enclavefl.cli.cluster_run import connect_targets
    from enclavefl.cli.redis_process import RedisProcess
    from enclavefl.transport.certs import create_job_certs

    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        root = Path(tmp) if keep is None else keep / f"servers-{servers}"
        root.mkdir(parents=True, exist_ok=keep is None)
        (root / "logs").mkdir(exist_ok=True)
        job = {
            "job": {"name": f"cluster{servers}", "rounds": rounds, "workers": workers},
            "round": {"min_workers": workers, "start_window_s": 600, "update_window_s": 900},
            "task": {"name": "round_overhead:make_task", "params": {} if params is None else {"params": params}},
            "server": {"checkpoint_every": 1000, "max_concurrent_uploads": 4,
                       "aggregator": {"name": "mean", "accumulate": accumulate}},
            "transport": {"chunk_bytes": 2 * 2**20},
            "attestation": {"mode": "none"},
            "cluster": {"servers": servers, "member_ttl_s": 30, "lease_ttl_s": 30},
        }
        (root / "job.yaml").write_text(yaml.safe_dump(job))
        create_job_certs(root / "certs", "bench", workers=workers)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
                   OMP_NUM_THREADS="1")
        base = [sys.executable, "-m", "enclavefl"]
        common = ["--config", str(root / "job.yaml"), "--tls-dir", str(root / "certs")]
        redis = RedisProcess(root / "redis")
        redis.start()
        procs: list[subprocess.Popen[bytes]] = []

        def spawn(name: str, args: list[str]) -> subprocess.Popen[bytes]:
            with (root / "logs" / f"{name}.log").open("wb") as out:
                proc = subprocess.Popen(base + args, stdout=out, stderr=subprocess.STDOUT, env=env,
                                        stdin=subprocess.DEVNULL)
            procs.append(proc)
            return proc

        try:
            scheduler = spawn("scheduler", ["scheduler", *common, "--store", redis.url, "--out",
                                            str(root / "scheduler"), "--port-file", str(root / "scheduler.port")])
            at = _wait_port(root / "scheduler.port", scheduler, root / "logs" / "scheduler.log")
            server_procs = [spawn(f"server-{i}", ["server", *common, "--store", redis.url, "--scheduler",
                                                  f"127.0.0.1:{at}", "--id", f"server-{i}", "--out",
                                                  str(root / f"server-{i}"), "--port-file", str(root / f"{i}.port")])
                            for i in range(servers)]
            ports = [_wait_port(root / f"{i}.port", p, root / "logs" / f"server-{i}.log")
                     for i, p in enumerate(server_procs)]
            for i in range(workers):
                spawn(f"worker-{i}", ["worker", *common, "--connect", connect_targets(i, ports, workers),
                                                  "--index", str(i)])
            if scheduler.wait(3600) != 0:
                raise RuntimeError((root / "logs" / "scheduler.log").read_text(errors="replace")[-3000:])
            rss_kb = 0
            for i, proc in enumerate(server_procs):
                _, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = os.waitstatus_to_exitcode(status)
                if proc.returncode != 0:
                    raise RuntimeError((root / "logs" / f"server-{i}.log").read_text(errors="replace")[-3000:])
                rss_kb = max(rss_kb, usage.ru_maxrss)
            redis_in = _redis_input_bytes(redis.url)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(30)
            redis.stop()
        rows = [json.loads(line) for line in (root / "scheduler" / "metrics.jsonl").read_text().splitlines()]
        closes = [float(r["time"]) for r in rows]
        times = [b - a for a, b in zip(closes, closes[1:], strict=False)]
        return statistics.median(times), rss_kb / 1024, redis_in / 2**20 / rounds, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--workers", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3, help="at least 3: round 1 includes process start")
    parser.add_argument("--params", type=int, help="float32 values of an MLP model (default: ResNet-18's 11.17M)")
    parser.add_argument("--keep", type=Path, help="keep each run's directory (logs, metrics) under this folder")
    parser.add_argument("--accumulate", choices=["float64", "float32"], default="float64",
                        help="the mean's accumulator, so a partial's size: float64 sums (default, order-free) or a "
                             "float32 running mean (half the bytes to Redis)")
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error(f"--rounds {args.rounds}: at least 3 (two round times after the first)")
    for n in args.servers:
        s_per_round, rss_mb, redis_mb, times = run_once(n, args.workers, args.rounds, args.params, args.keep,
                                                        args.accumulate)
        label = ("" if args.params is None else f" params={args.params}") + (
            "" if args.accumulate == "float64" else f" accumulate={args.accumulate}")
        print(f"servers={n} workers={args.workers}{label} s_per_round={s_per_round:.2f} max_server_rss_mb={rss_mb:.0f} "
              f"redis_in_mb_per_round={redis_mb:.0f}", flush=True)
        print(f"  round times after round 1: {' '.join(f'{t:.2f}' for t in times)}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
