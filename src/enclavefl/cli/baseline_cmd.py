"""``enclavefl baseline JOB.yaml``: the centralized reference a federated run is judged against.

The training is :func:`enclavefl.ml.baseline.train_baseline`; this command
parses the arguments, picks the run directory and prints the outcome.
"""

from __future__ import annotations

import argparse
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

from enclavefl.cli import add_overrides_option, setup_logging
from enclavefl.config import load_job
from enclavefl.ml.baseline import BASELINE_FILE, train_baseline
from enclavefl.tasks import load_task

__all__ = ["add_parser", "run_baseline"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("baseline", help="train the job's model centrally on the pooled data (the reference)")
    p.add_argument("job", type=Path, help="job YAML file")
    add_overrides_option(p)
    p.add_argument("--out", type=Path, help="run directory (default runs/<job name>-baseline-<timestamp>)")
    p.set_defaults(func=run_baseline)


def run_baseline(args: argparse.Namespace) -> int:
    # A centralized run can take an hour: its per-round and progress lines go to stderr.
    setup_logging(logging.DEBUG if args.debug else logging.INFO)
    config = load_job(args.job, args.overrides)
    out = args.out or Path("runs") / f"{config.job.name}-baseline-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    print(f"enclavefl baseline: job {config.job.name}, task {config.task.name}, {config.job.rounds} rounds "
          f"x {config.client.epochs} epochs on the pooled data")
    rows = train_baseline(load_task(config), config, out)
    last = rows[-1] if rows else {}
    auc = f" eval_auc {last['eval_auc']:.4f}" if last.get("eval_auc") is not None else ""
    acc = last.get("eval_accuracy")
    print(f"baseline done: {len(rows)} rounds, eval_accuracy {acc if acc is None else round(acc, 4)}{auc}, "
          f"{last.get('seconds_total', 0.0):.1f}s; wrote {out / BASELINE_FILE}")
    return 0
