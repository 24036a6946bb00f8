"""``enclavefl ps`` and ``enclavefl worker``: one role each, for real deployments.

`enclavefl run` starts these same commands as child processes on 127.0.0.1.
Both are argument parsing over the library: credentials from
:mod:`enclavefl.transport.provisioning`, then :func:`enclavefl.app.build_server`
and :func:`enclavefl.app.serve`, or :func:`enclavefl.app.run_worker`.

`enclavefl ps` keeps what a run directory holds in ``--out``: the resolved
``config.yaml``, ``logs/ps.log``, ``audit.jsonl``, ``metrics.jsonl`` and the
checkpoints; the console shows warnings, one line per round and the summary.
Both stop cleanly on SIGINT, SIGTERM and SIGHUP (:mod:`enclavefl.cli.stopping`):
the PS checkpoints its last completed round and tells the workers to finish.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from enclavefl.cli import add_overrides_option, setup_logging
from enclavefl.cli.events import EventsFileHandler
from enclavefl.cli.malloc import tune_malloc
from enclavefl.cli.runs import (
    CONFIG_FILE,
    RESUMABLE_KEYS,
    plan_resume,
    print_summary,
    record_config,
    round_line,
    write_config,
)
from enclavefl.cli.stopping import StopSignals, exit_code_for
from enclavefl.config import JobConfig, check_worker_count, load_job, parse_job
from enclavefl.errors import ConfigError, Unavailable

if TYPE_CHECKING:
    from enclavefl.management.api import Mount
    from enclavefl.management.serve import ManagementServer

DEFAULT_CONNECT_TIMEOUT_S = 120.0
"""How long ``enclavefl worker`` retries an unreachable PS before it gives up (exit 4)."""

log = logging.getLogger(__name__)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, type=Path, help="job YAML file")
    add_overrides_option(p)
    p.add_argument("--tls-dir", type=Path, help="directory made by `enclavefl certs` (ca.pem, ps.pem, worker-<i>.pem ...)")
    p.add_argument("--audit-file", type=Path, help="append attestation decisions here as JSON lines")
    # `enclavefl run` passes its pid: the child stops when `run` is gone, however it died.
    p.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)


def add_ps_parser(sub: Any) -> None:
    p = sub.add_parser("ps", help="run the parameter server")
    _common(p)
    p.add_argument("--out", type=Path, default=Path("."),
                   help="run directory: config.yaml, logs/ps.log, audit.jsonl, metrics, checkpoints (default .)")
    p.add_argument("--log-file", help="write logs here (default OUT/logs/ps.log)")
    p.add_argument("--resume", action="store_true",
                   help=f"continue from the newest checkpoint in --out, with the run's own {CONFIG_FILE} (the --config "
                        f"file is not read; --set may change only {', '.join(RESUMABLE_KEYS)})")
    p.add_argument("--resume-or-start", action="store_true",
                   help="like --resume, but start at round 1 when --out holds no checkpoint (or no run)")
    p.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    p.add_argument("--quiet", action="store_true", help="nothing on the console: logs only")
    p.add_argument("--events-file", type=Path,
                   help="append warnings here as JSON lines, for a console to show (default OUT/events.jsonl)")
    p.set_defaults(func=run_ps)


def add_worker_parser(sub: Any) -> None:
    p = sub.add_parser("worker", help="run one worker")
    _common(p)
    p.add_argument("--connect", required=True, metavar="HOST:PORT[,HOST:PORT...]",
                   help="address of the PS; for a cluster, its servers in the order to try them (the worker's "
                        "server, then the alternatives it fails over to)")
    p.add_argument("--index", type=int, required=True, help="this worker's index (its data partition)")
    p.add_argument("--of", type=int, help="number of workers the data is split across (default job.workers)")
    p.add_argument("--name", help="name shown in PS logs (default worker-<index>)")
    p.add_argument("--log-file", help="write logs here instead of stderr")
    p.add_argument("--connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT_S, metavar="S",
                   help=f"give up when the PS stays unreachable this long (default {DEFAULT_CONNECT_TIMEOUT_S:.0f})")
    p.set_defaults(func=run_worker)


def _warnings_on_console(role: str) -> None:
    """Warnings and errors also go to stderr, one line each, while the full log goes to the file."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter(f"enclavefl {role}: %(levelname)s: %(message)s"))
    logging.getLogger().addHandler(handler)


def run_ps(args: argparse.Namespace) -> int:
    from enclavefl.app import ManagementSetup, build_server, serve
    from enclavefl.tasks import load_task
    from enclavefl.transport.provisioning import make_credentials

    out: Path = args.out
    (out / "logs").mkdir(parents=True, exist_ok=True)
    log_path = args.log_file or str(out / "logs" / "ps.log")
    setup_logging(logging.DEBUG if args.debug else logging.INFO, log_path)
    logging.getLogger().addHandler(EventsFileHandler(args.events_file or out / "events.jsonl"))
    if not args.quiet:
        _warnings_on_console("ps")
    tune_malloc()
    console = Console(highlight=False, quiet=args.quiet)
    stopper = StopSignals(parent_pid=args.parent_pid)
    try:
        config, config_path, resume = _ps_config(args)
        console.print(f"enclavefl ps: job {config.job.name}, {config.job.rounds} rounds, task {config.task.name}; "
                      f"run directory {out}, log {log_path}", soft_wrap=True)
        credentials = make_credentials(config, args.tls_dir, "ps", job_dir=config_path.parent,
                                       audit_path=args.audit_file or out / "audit.jsonl")
        ps = build_server(config, load_task(config), out_dir=out, resume=resume)
        stopper.on_stop(ps.stop)
        ps.metrics.subscribe(lambda row: console.print(round_line(row, config.job.rounds)))
        host = config.transport.listen.rpartition(":")[0]
        started: list[float] = []

        def listening(port: int) -> None:
            started.append(time.monotonic())
            if args.port_file:
                write_port_file(args.port_file, port)
            console.print(f"PS listening on {host}:{port}", soft_wrap=True)

        def management_started(api: ManagementServer) -> None:
            console.print(f"management API {api.url} (token in {api.token_file})", soft_wrap=True, markup=False)

        audit_path = args.audit_file or out / "audit.jsonl"
        mounts: tuple[Mount, ...] = ()
        if config.management.enabled:  # the dashboard at / and /metrics, on the API's server
            from enclavefl.management import dashboard, prometheus

            mounts = (dashboard.mount, prometheus.mount)
        setup = ManagementSetup(run_dir=out, tls_dir=args.tls_dir, audit_path=audit_path, mounts=mounts,
                                on_start=management_started)
        try:
            serve(ps, credentials, on_listening=listening, management=setup)
        finally:
            if started:  # a PS that never listened has nothing to sum up
                latest: dict[int, dict[str, Any]] = {row["round"]: row for row in ps.metrics.history}
                print_summary(console, [latest[r] for r in sorted(latest)], time.monotonic() - started[0],
                              title="enclavefl ps summary")
                console.print(f"run directory: {out}")
    finally:
        stopper.close()
    return exit_code_for(stopper.signum) if stopper.signum is not None else 0


def _ps_config(args: argparse.Namespace) -> tuple[JobConfig, Path, bool]:
    """The PS's configuration, the file it came from, and whether to resume from a checkpoint.

    A new run reads ``--config`` and records it as ``--out``/config.yaml; a resumed
    one reads that record back (see :func:`enclavefl.cli.runs.plan_resume`).
    """
    run_config = args.out / CONFIG_FILE
    if not (args.resume or args.resume_or_start) or (args.resume_or_start and not run_config.is_file()):
        config = load_job(args.config, args.overrides)
        return config, record_config(args.out, config, args.config), False
    plan = plan_resume(args.out, args.overrides, allow_start=args.resume_or_start)
    if not (args.config.exists() and run_config.samefile(args.config)):
        log.info("resume: the run's configuration is %s; %s is not read", run_config, args.config)
    for key, old, new in plan.changes:
        log.info("resume: %s %r -> %r (%s updated)", key, old, new, run_config)
    if plan.changes:
        write_config(args.out, plan.config)
    if plan.checkpoint_round is None:
        log.warning("resume: no checkpoint in %s; starting at round 1 (--resume-or-start)", args.out)
    else:
        log.info("resumed from round %d (%s)", plan.checkpoint_round, plan.checkpoint_path)
    return plan.config, run_config, plan.checkpoint_round is not None


def write_port_file(path: Path, port: int) -> None:
    """Written whole or not at all: `enclavefl run` reads it as soon as it exists."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(str(port))
    os.replace(tmp, path)


def run_worker(args: argparse.Namespace) -> int:
    from enclavefl import app
    from enclavefl.tasks import load_task
    from enclavefl.transport.provisioning import make_credentials
    from enclavefl.worker.runtime import grpc_client_factory

    setup_logging(logging.DEBUG if args.debug else logging.INFO, args.log_file)
    tune_malloc()
    if not args.connect_timeout > 0:
        raise ConfigError(f"--connect-timeout {args.connect_timeout:g}: must be > 0 seconds")
    stopper = StopSignals(parent_pid=args.parent_pid)
    try:
        config = load_job(args.config, args.overrides)
        count = args.of or config.job.workers
        if args.of is not None:
            check_worker_count(config, args.of, "--of")  # job.workers was checked with the job
        if not 0 <= args.index < count:
            raise ConfigError(f"--index {args.index} is outside 0..{count - 1}")
        credentials = make_credentials(config, args.tls_dir, f"worker-{args.index}", job_dir=args.config.parent,
                                       audit_path=args.audit_file)
        stop = threading.Event()
        stopper.on_stop(stop.set)
        targets = [t.strip() for t in args.connect.split(",")]
        if not all(t.rpartition(":")[0] and t.rpartition(":")[2].isdigit() for t in targets):
            raise ConfigError(f"--connect {args.connect!r}: expected HOST:PORT, or several separated by commas")
        connect = grpc_client_factory(targets, credentials, chunk_bytes=config.transport.chunk_bytes)
        try:
            app.run_worker(config, load_task(config), args.index, count, connect, name=args.name, stop=stop,
                           connect_timeout_s=args.connect_timeout)
        except Unavailable as exc:
            if stopper.stopped:
                return exit_code_for(stopper.signum or 0)
            raise Unavailable(f"{exc}; is the PS running and reachable at {args.connect}? "
                              f"(--connect-timeout {args.connect_timeout:g}s)") from exc
    finally:
        stopper.close()
    return exit_code_for(stopper.signum) if stopper.signum is not None else 0
