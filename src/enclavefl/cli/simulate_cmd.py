"""``enclavefl simulate JOB.yaml``: a whole job in this process's server, for research and experiments at scale.

The real PS (engine, strategy, streaming aggregation, close pipeline) runs
here (:func:`enclavefl.app.simulate`), and its clients train where
``--backend`` says: ``processes`` (the default), a local process pool where
only the clients sampled for a round train, so ``--clients 1000`` costs what
the sampled ones cost; ``threads``, one worker runtime per client on threads
of this process (small jobs); or Ray with ``--ray ADDRESS`` (``local`` starts
a Ray instance on 127.0.0.1; ``pip install 'enclavefl[simulation]'``). No
sockets between the PS and its clients, no TLS, no attestation. The run
directory, the round lines, the summary, ``--resume``, the management API and
dashboard, and the exit codes are those of ``enclavefl run``; the logs go to
one file, ``logs/simulate.log``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape

from enclavefl.cli import add_overrides_option, setup_logging
from enclavefl.cli.partition_table import print_partition_table
from enclavefl.cli.runs import (
    CONFIG_FILE,
    RESUMABLE_KEYS,
    RoundProgress,
    choose_run_dir,
    claim_run_dir,
    plan_resume,
    print_summary,
    write_config,
)
from enclavefl.config import JobConfig, load_job
from enclavefl.errors import ConfigError, EnclaveFLError

if TYPE_CHECKING:
    from enclavefl.simulation import ClientPool

__all__ = ["add_parser", "run_simulate"]

LOG_FILE = "logs/simulate.log"
TABLE_MAX_CLIENTS = 64
"""Above this many clients the partition table is not printed (a thousand rows help no one)."""
BACKENDS = ("processes", "threads")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "simulate",
        help="run a whole job with its real PS and N simulated clients (a process pool, threads or Ray; no TLS)",
        description="Runs the job's real PS in this process and N simulated clients connected to it in memory: "
                    "no network between them, no TLS and no attestation. By default the clients sampled for each "
                    "round train in a pool of local processes, so a thousand clients cost what the sampled ones "
                    "cost; use `enclavefl run` to exercise the deployed path.",
    )
    p.add_argument("job", type=Path, nargs="?", help="job YAML file (not read with --resume)")
    add_overrides_option(p)
    p.add_argument("--clients", type=int, metavar="N", help="number of simulated clients (default job.workers)")
    p.add_argument("--workers", type=int, metavar="N", help="the same as --clients")
    p.add_argument("--backend", choices=BACKENDS, default="processes",
                   help="where clients train: processes (default; only sampled clients train, on a bounded pool) "
                        "or threads (one worker runtime per client, for small jobs)")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="train clients on Ray actors: 'local' starts Ray on this machine (127.0.0.1 only), else "
                        "the address of a running cluster's head; needs pip install 'enclavefl[simulation]'")
    p.add_argument("--concurrency", type=int, metavar="N",
                   help="processes or Ray actors that train clients (default: one per core)")
    p.add_argument("--cpus-per-client", type=float, default=1.0, metavar="CPUS",
                   help="CPUs Ray reserves for each actor (default 1)")
    p.add_argument("--out", type=Path, help="run directory (default runs/<job name>-<timestamp>)")
    p.add_argument("--resume", action="store_true",
                   help=f"continue the run in --out from its newest checkpoint, with the run's own {CONFIG_FILE}; "
                        f"--set may change only {', '.join(RESUMABLE_KEYS)}")
    p.add_argument("--quiet", action="store_true", help="no progress bar, only the summary")
    p.set_defaults(func=run_simulate)


def run_simulate(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    for flag in ("workers", "clients"):
        if getattr(args, flag) is not None:
            overrides.append(f"job.workers={getattr(args, flag)}")
    if args.resume:
        if args.out is None:
            raise ConfigError("--resume needs --out RUN_DIR, the run to continue")
        config = plan_resume(args.out, overrides).config
        run_dir = args.out
    else:
        if args.job is None:
            raise ConfigError("a job file is required (or --resume --out RUN_DIR to continue a run)")
        config = load_job(args.job, overrides)
        run_dir = choose_run_dir(config, args.out)
    claim_run_dir(run_dir, resume=args.resume)
    # Every client logs every round: the lines go to the run's log file, the console shows rounds.
    handler = setup_logging(logging.DEBUG if args.debug else logging.INFO, str(run_dir / LOG_FILE))
    try:
        return _simulate(args, config, run_dir)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def _open_pool(args: argparse.Namespace, config: JobConfig) -> ClientPool | None:
    """The pool ``--backend``/``--ray`` ask for; None for threads."""
    from enclavefl.simulation import ProcessPool, RayPool, TaskTrainers

    if args.concurrency is not None and args.concurrency < 1:
        raise ConfigError(f"--concurrency must be >= 1, got {args.concurrency}")
    if args.ray is not None:
        address = None if args.ray == "local" else args.ray
        return RayPool(config, TaskTrainers(config), address=address, actors=args.concurrency,
                       cpus_per_client=args.cpus_per_client)
    if args.backend == "threads":
        return None
    return ProcessPool(config, TaskTrainers(config), processes=args.concurrency)


def _management(console: Console, run_dir: Path) -> Any:
    from enclavefl.app import ManagementSetup
    from enclavefl.management import dashboard, prometheus

    def started(api: Any) -> None:
        console.print(f"management API {api.url} (token in {api.token_file}); `enclavefl status {run_dir}`",
                      markup=False, soft_wrap=True)

    return ManagementSetup(run_dir=run_dir, audit_path=run_dir / "audit.jsonl",
                           mounts=(dashboard.mount, prometheus.mount), on_start=started)


def _simulate(args: argparse.Namespace, config: JobConfig, run_dir: Path) -> int:
    from enclavefl.app import simulate
    from enclavefl.tasks import load_task

    console = Console(stderr=False, highlight=False)
    n = config.job.workers
    where = f"Ray ({args.ray})" if args.ray is not None else args.backend
    console.print(f"enclavefl simulate: job [bold]{config.job.name}[/], {n} clients, "
                  f"{config.job.rounds} rounds, task {config.task.name}, clients on {where}")
    console.print(f"run directory: {run_dir}")
    console.print("[yellow]in-memory simulation: no network, no TLS, no attestation[/]")
    task = load_task(config)
    if n <= TABLE_MAX_CLIENTS:
        print_partition_table(console, config, task)
    else:
        console.print(f"partition: {config.task.partition}, {n} clients (no table above {TABLE_MAX_CLIENTS})")
    if not args.resume:
        write_config(run_dir, config)
    console.print(f"logs in {run_dir / LOG_FILE}")
    started = time.monotonic()
    progress = RoundProgress(console, config.job.rounds, quiet=args.quiet)
    failure: EnclaveFLError | None = None
    pool = _open_pool(args, config)
    try:
        with progress:
            simulate(task, config, workers=n, out_dir=run_dir, on_round=progress.add, pool=pool,
                     resume=args.resume, management=_management(console, run_dir))
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: the clients are stopped[/]")
        console.print(f"run directory: {run_dir}")
        return 130
    except EnclaveFLError as exc:
        failure = exc
    finally:
        if pool is not None:
            pool.close()
    print_summary(console, progress.rows, time.monotonic() - started, title="enclavefl simulate summary")
    console.print(f"run directory: {run_dir}")
    if failure is not None:
        if args.debug:
            raise failure
        console.print(f"[red]the job failed:[/] {escape(str(failure))}")
        return 1
    return 0
