"""``enclavefl certs``: a per-job CA and node certificates for multi-host use."""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path
from typing import Any

from enclavefl.transport.certs import create_job_certs


def add_parser(sub: Any) -> None:
    p = sub.add_parser("certs", help="create a job CA and certificates for the PS and N workers")
    p.add_argument("--out", required=True, type=Path, help="directory to create (must not hold certificates)")
    p.add_argument("--workers", type=int, required=True, help="number of worker certificates")
    p.add_argument("--job", default="job", help="job name written into the CA's subject")
    p.add_argument("--server-name", action="append", default=[],
                   help="DNS name or IP the PS is reached at (repeatable; enclavefl-ps, localhost and 127.0.0.1 are always added)")
    p.add_argument("--days", type=int, default=30, help="validity in days")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    names = tuple(dict.fromkeys(["enclavefl-ps", "localhost", "127.0.0.1", *args.server_name]))
    paths = create_job_certs(args.out, args.job, workers=args.workers, server_names=names,
                             validity=dt.timedelta(days=args.days))
    print(f"wrote {len(paths)} certificates to {args.out} (keys are 0600; copy ca.pem to every host, "
          f"ps.pem/ps.key to the PS host, worker-<i>.pem/.key to worker i)")
    return 0
