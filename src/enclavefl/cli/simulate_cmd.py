"""``enclavefl simulate JOB.yaml``: a whole job in this process, for research and quick experiments.

The real PS (engine, strategy, staging, close pipeline) and N worker runtimes
run on threads of this process and talk through in-memory clients
(:func:`enclavefl.app.simulate`): no processes, no sockets, no TLS and no
attestation. The run directory, the round lines, the summary and the exit
codes are those of ``enclavefl run``; the logs of the PS and every worker go to
one file, ``logs/simulate.log``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from enclavefl.cli import add_overrides_option, setup_logging
from enclavefl.cli.partition_table import print_partition_table
from enclavefl.cli.runs import RoundProgress, choose_run_dir, claim_run_dir, print_summary, write_config
from enclavefl.config import JobConfig, load_job
from enclavefl.errors import EnclaveFLError

__all__ = ["add_parser", "run_simulate"]

LOG_FILE = "logs/simulate.log"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "simulate",
        help="run a whole job in this process: the PS and N workers on threads (no TLS, no attestation, no processes)",
        description="Runs the job's real PS and N workers on threads of this process, connected in memory: "
                    "no processes, no network, no TLS and no attestation. For research and quick experiments; "
                    "use `enclavefl run` to exercise the deployed path.",
    )
    p.add_argument("job", type=Path, help="job YAML file")
    add_overrides_option(p)
    p.add_argument("--workers", type=int, help="number of workers (default job.workers)")
    p.add_argument("--out", type=Path, help="run directory (default runs/<job name>-<timestamp>)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, only the summary")
    p.set_defaults(func=run_simulate)


def run_simulate(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.workers is not None:
        overrides.append(f"job.workers={args.workers}")
    config = load_job(args.job, overrides)
    run_dir = choose_run_dir(config, args.out)
    claim_run_dir(run_dir, resume=False)
    # Every worker logs every round: the lines go to the run's log file, the console shows rounds.
    handler = setup_logging(logging.DEBUG if args.debug else logging.INFO, str(run_dir / LOG_FILE))
    try:
        return _simulate(args, config, run_dir)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def _simulate(args: argparse.Namespace, config: JobConfig, run_dir: Path) -> int:
    from enclavefl.app import simulate
    from enclavefl.tasks import load_task

    console = Console(stderr=False, highlight=False)
    console.print(f"enclavefl simulate: job [bold]{config.job.name}[/], {config.job.workers} workers, "
                  f"{config.job.rounds} rounds, task {config.task.name}")
    console.print(f"run directory: {run_dir}")
    console.print("[yellow]in-process simulation (threads): no processes, no TLS, no attestation[/]")
    task = load_task(config)
    print_partition_table(console, config, task)
    write_config(run_dir, config)
    console.print(f"logs in {run_dir / LOG_FILE}")
    started = time.monotonic()
    progress = RoundProgress(console, config.job.rounds, quiet=args.quiet)
    failure: EnclaveFLError | None = None
    try:
        with progress:
            simulate(task, config, workers=config.job.workers, out_dir=run_dir, on_round=progress.add)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: the workers are stopped[/]")
        console.print(f"run directory: {run_dir}")
        return 130
    except EnclaveFLError as exc:
        failure = exc
    print_summary(console, progress.rows, time.monotonic() - started, title="enclavefl simulate summary")
    console.print(f"run directory: {run_dir}")
    if failure is not None:
        if args.debug:
            raise failure
        console.print(f"[red]the job failed:[/] {escape(str(failure))}")
        return 1
    return 0
