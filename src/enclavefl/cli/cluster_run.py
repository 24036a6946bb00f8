"""``enclavefl run JOB.yaml --servers N``: redis-server, N aggregation servers and the workers on 127.0.0.1.

Like the single-PS ``run`` (:mod:`enclavefl.cli.run_cmd`), with a cluster in
the PS's place: it starts ``redis-server`` from PATH (with a clear error
naming the package when it is missing), then ``enclavefl scheduler``
(``scheduler/``: the job's metrics, the management API), then ``enclavefl
server`` N times (``server-<i>/`` each: log, metrics, checkpoints of the rounds
it led), which get the cluster key from the scheduler once their attestation
passes, and the workers, each connecting to the server the cluster places it on and failing
over to the others. It follows the scheduler's metrics and stops everything when the job is done.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from enclavefl.cli.redis_process import RedisProcess
from enclavefl.cli.run_cmd import (
    PORT_TIMEOUT_S,
    WORKER_EXIT_TIMEOUT_S,
    Child,
    Children,
    _attestation_setup,
    _follow,
    _tail,
)
from enclavefl.cli.runs import choose_run_dir, claim_run_dir, print_summary, write_config
from enclavefl.cluster.assignment import balance
from enclavefl.cluster.settings import check_cluster_job
from enclavefl.cluster.store import Member
from enclavefl.config import load_job
from enclavefl.errors import ConfigError, RoundError
from enclavefl.transport.certs import create_job_certs

__all__ = ["connect_targets", "run_cluster"]

MAX_SERVERS = 64


def _wait_ports(servers: list[tuple[Child, Path]]) -> list[int]:
    deadline = time.monotonic() + PORT_TIMEOUT_S
    ports: list[int] = []
    for child, port_file in servers:
        while not port_file.exists():
            if child.proc.poll() is not None:
                raise RoundError(f"{child.name} exited with code {child.proc.returncode} before listening:\n"
                                 f"{_tail(child.log_path)}")
            if time.monotonic() > deadline:
                raise RoundError(f"{child.name} did not listen within {PORT_TIMEOUT_S:.0f}s:\n{_tail(child.log_path)}")
            time.sleep(0.05)
        ports.append(int(port_file.read_text()))
    return ports


def connect_targets(i: int, ports: list[int], workers: int) -> str:
    """Worker ``i``'s ``--connect``: its server, then the others in its failover order.

    The placement is the servers' own (:func:`~enclavefl.cluster.assignment.balance` over the job's
    worker names), so the servers do not move anyone once round 1 opens, and when a server leaves its
    workers spread over the rest.
    """
    members = [Member(f"server-{k}", "server", f"127.0.0.1:{port}") for k, port in enumerate(ports)]
    order = balance([f"worker-{k}" for k in range(workers)], members)[f"worker-{i}"]
    return ",".join(m.address for m in order)


def run_cluster(args: argparse.Namespace, overrides: list[str]) -> int:
    """Runs the job on ``args.servers`` servers; returns the exit code (1 if a server failed).

    Raises:
        ConfigError: --resume was asked for, --servers is out of range, the job cannot be split
            (aggregator, async, DP) or redis-server is missing.
    """
    console = Console(stderr=False, highlight=False)
    n: int = args.servers
    if not 1 <= n <= MAX_SERVERS:
        raise ConfigError(f"--servers {n}: expected 1..{MAX_SERVERS}")
    if args.resume or args.resume_or_start:
        raise ConfigError("--servers does not support --resume yet (a cluster restores from the store)")
    if args.job is None:
        raise ConfigError("a job file is required")
    config = load_job(args.job, [*overrides, f"cluster.servers={n}"])
    check_cluster_job(config)
    run_dir = choose_run_dir(config, args.out)
    claim_run_dir(run_dir, resume=False)
    console.print(f"enclavefl run: job [bold]{config.job.name}[/], {n} servers, {config.job.workers} workers, "
                  f"{config.job.rounds} rounds, task {config.task.name}")
    console.print(f"run directory: {run_dir}")
    config = _attestation_setup(console, config, args.job, run_dir)
    config_path = write_config(run_dir, config)
    tls_args: list[str] = []
    if config.attestation.mode == "none":
        create_job_certs(run_dir / "certs", config.job.name, workers=config.job.workers)
        tls_args = ["--tls-dir", str(run_dir / "certs")]
    audit_args = ["--audit-file", str(run_dir / "audit.jsonl")]
    python = [sys.executable, "-m", "enclavefl"] + (["--debug"] if args.debug else [])
    watch_args = ["--parent-pid", str(os.getpid())]
    redis = RedisProcess(run_dir / "redis", stop_with_parent=True)  # even a SIGKILLed run leaves none behind
    children = Children(run_dir)
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    try:
        redis.start()
        console.print(f"redis-server on 127.0.0.1:{redis.port} (append-only file in {redis.directory}); what it holds is sealed "
                      "under a cluster key only the scheduler and attested servers hold")
        scheduler_port = run_dir / "scheduler.port"
        scheduler = children.spawn("scheduler", python + [
            "scheduler", "--config", str(config_path), "--store", redis.url, "--out", str(run_dir / "scheduler"),
            "--port-file", str(scheduler_port), "--spawn-dir", str(run_dir), *tls_args, *audit_args, *watch_args])
        (scheduler_at,) = _wait_ports([(scheduler, scheduler_port)])
        if config.management.enabled:
            console.print(f"management API and dashboard: see {run_dir / 'scheduler' / 'management.json'}")
        servers: list[tuple[Child, Path]] = []
        for i in range(n):
            out, port_file = run_dir / f"server-{i}", run_dir / f"server-{i}.port"
            child = children.spawn(f"server-{i}", python + [
                "server", "--config", str(config_path), "--store", redis.url, "--scheduler",
                f"127.0.0.1:{scheduler_at}", "--id", f"server-{i}", "--out", str(out), "--port-file", str(port_file),
                *tls_args, *audit_args, *watch_args])
            servers.append((child, port_file))
        ports = _wait_ports(servers)
        for i in range(config.job.workers):
            children.spawn(f"worker-{i}", python + ["worker", "--config", str(config_path), *tls_args, *audit_args,
                                                    "--connect", connect_targets(i, ports, config.job.workers),
                                                    "--index", str(i), *watch_args])
        console.print(f"servers listening on {', '.join(f'127.0.0.1:{p}' for p in ports)}; logs in {run_dir / 'logs'}")
        rows = _follow(console, scheduler, run_dir / "scheduler" / config.summary.metrics_file, config,
                       quiet=args.quiet)
        children.wait(WORKER_EXIT_TIMEOUT_S)
        failed = [c for c in [scheduler, *(c for c, _ in servers)] if c.proc.returncode not in (0, None)]
    finally:
        children.close()
        redis.stop()
    print_summary(console, rows, time.monotonic() - started, title="enclavefl run summary (cluster)")
    console.print(f"run directory: {run_dir}")
    if failed:
        for child in failed:
            console.print(f"[red]{child.name} failed (exit {child.proc.returncode}):[/]")
            console.print(_tail(child.log_path), markup=False)
        return 1
    return 0
