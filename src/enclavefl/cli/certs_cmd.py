"""``enclavefl certs``: a per-job CA and node certificates for multi-host use.

``enclavefl certs --out CERTS --workers N`` makes the CA, the PS's and N
workers' certificates, and keeps the CA key in a directory of its own
(``--ca-dir``, default ``CERTS-ca``) that is never copied to a host.
``enclavefl certs add-worker --index I`` issues one more worker certificate
from that kept key, for a site that joins later.
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path
from typing import Any

from enclavefl.errors import ConfigError
from enclavefl.transport.certs import CA_KEY_FILE, add_worker_cert, create_job_certs


def add_parser(sub: Any) -> None:
    p = sub.add_parser("certs", help="create a job CA and certificates for the PS and N workers (or add a worker)")
    p.add_argument("--out", type=Path, help="directory to create (must not hold certificates)")
    p.add_argument("--workers", type=int, help="number of worker certificates")
    p.add_argument("--job", default="job", help="job name written into the CA's subject")
    p.add_argument("--server-name", action="append", default=[],
                   help="DNS name or IP the PS is reached at (repeatable; enclavefl-ps, localhost and 127.0.0.1 are always added)")
    p.add_argument("--ca-dir", type=Path, help="where the CA key is kept, apart from --out (default OUT-ca)")
    p.add_argument("--days", type=int, default=30, help="validity in days")
    p.set_defaults(func=run)
    actions = p.add_subparsers(dest="certs_action", metavar="ACTION")
    add = actions.add_parser("add-worker", help="issue one more worker certificate with the kept CA key")
    add.add_argument("--ca-dir", dest="add_ca_dir", type=Path, required=True,
                     help="the CA directory `enclavefl certs` kept")
    add.add_argument("--out", dest="add_out", type=Path, required=True,
                     help="where worker-<index>.pem/.key go (with ca.pem if missing)")
    add.add_argument("--index", type=int, required=True, help="the new worker's index (its --index)")
    add.add_argument("--days", dest="add_days", type=int, default=30, help="validity in days")
    add.set_defaults(func=run_add_worker)


def _validity(days: int) -> dt.timedelta:
    if days < 1:
        raise ConfigError(f"--days {days}: must be >= 1")
    return dt.timedelta(days=days)


def run(args: argparse.Namespace) -> int:
    if args.out is None or args.workers is None:
        raise ConfigError("enclavefl certs needs --out CERTS and --workers N (or the action add-worker)")
    if args.workers < 0:
        raise ConfigError(f"--workers {args.workers}: must be >= 0")
    ca_dir: Path = args.ca_dir or args.out.with_name(f"{args.out.name}-ca")
    names = tuple(dict.fromkeys(["enclavefl-ps", "localhost", "127.0.0.1", *args.server_name]))
    paths = create_job_certs(args.out, args.job, workers=args.workers, server_names=names,
                             validity=_validity(args.days), ca_dir=ca_dir)
    print(f"wrote {len(paths)} certificates to {args.out} (keys are 0600; copy ca.pem to every host, "
          f"ps.pem/ps.key to the PS host, worker-<i>.pem/.key to worker i)")
    print(f"kept the CA key in {ca_dir / CA_KEY_FILE} (0600): keep it off the hosts; add a site later with "
          f"`enclavefl certs add-worker --ca-dir {ca_dir} --out {args.out} --index {args.workers}`")
    return 0


def run_add_worker(args: argparse.Namespace) -> int:
    path = add_worker_cert(args.add_ca_dir, args.add_out, args.index, validity=_validity(args.add_days))
    print(f"wrote {path} and {path.with_suffix('.key')} (0600): copy them and ca.pem to the new worker's host, "
          f"which runs `enclavefl worker ... --index {args.index}`")
    return 0
