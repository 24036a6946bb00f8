"""``enclavefl ps`` and ``enclavefl worker``: one role each, for real deployments.

`enclavefl run` starts these same commands as child processes on 127.0.0.1.
Both are argument parsing over the library: credentials from
:mod:`enclavefl.transport.provisioning`, then :func:`enclavefl.app.build_server`
and :func:`enclavefl.app.serve`, or :func:`enclavefl.app.run_worker`.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from enclavefl.cli import add_overrides_option, setup_logging
from enclavefl.cli.events import EventsFileHandler
from enclavefl.cli.malloc import tune_malloc
from enclavefl.config import load_job
from enclavefl.errors import ConfigError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, type=Path, help="job YAML file")
    add_overrides_option(p)
    p.add_argument("--tls-dir", type=Path, help="directory made by `enclavefl certs` (ca.pem, ps.pem, worker-<i>.pem ...)")
    p.add_argument("--log-file", help="write logs here instead of stderr")
    p.add_argument("--audit-file", type=Path, help="append attestation decisions here as JSON lines")


def add_ps_parser(sub: Any) -> None:
    p = sub.add_parser("ps", help="run the parameter server")
    _common(p)
    p.add_argument("--out", type=Path, default=Path("."), help="run directory (metrics, checkpoints)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    p.add_argument("--events-file", type=Path,
                   help="append warnings here as JSON lines, for a console to show (default OUT/events.jsonl)")
    p.set_defaults(func=run_ps)


def add_worker_parser(sub: Any) -> None:
    p = sub.add_parser("worker", help="run one worker")
    _common(p)
    p.add_argument("--connect", required=True, metavar="HOST:PORT", help="address of the PS")
    p.add_argument("--index", type=int, required=True, help="this worker's index (its data partition)")
    p.add_argument("--of", type=int, help="number of workers the data is split across (default job.workers)")
    p.add_argument("--name", help="name shown in PS logs (default worker-<index>)")
    p.set_defaults(func=run_worker)


def _stop_on_signals(event: threading.Event) -> None:
    def handler(signum: int, frame: object) -> None:
        event.set()

    signal.signal(signal.SIGTERM, handler)


def run_ps(args: argparse.Namespace) -> int:
    from enclavefl.app import build_server, serve
    from enclavefl.tasks import load_task
    from enclavefl.transport.provisioning import make_credentials

    setup_logging(logging.DEBUG if args.debug else logging.INFO, args.log_file)
    logging.getLogger().addHandler(EventsFileHandler(args.events_file or args.out / "events.jsonl"))
    tune_malloc()
    config = load_job(args.config, args.overrides)
    credentials = make_credentials(config, args.tls_dir, "ps", job_dir=args.config.parent,
                                   audit_path=args.audit_file or args.out / "audit.jsonl")
    ps = build_server(config, load_task(config), out_dir=args.out, resume=args.resume)
    serve(ps, credentials, on_listening=functools.partial(_write_port_file, args.port_file) if args.port_file else None)
    return 0


def _write_port_file(path: Path, port: int) -> None:
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
    config = load_job(args.config, args.overrides)
    count = args.of or config.job.workers
    if not 0 <= args.index < count:
        raise ConfigError(f"--index {args.index} is outside 0..{count - 1}")
    credentials = make_credentials(config, args.tls_dir, f"worker-{args.index}", job_dir=args.config.parent,
                                   audit_path=args.audit_file)
    stop = threading.Event()
    _stop_on_signals(stop)
    connect = grpc_client_factory(args.connect, credentials, chunk_bytes=config.transport.chunk_bytes)
    app.run_worker(config, load_task(config), args.index, count, connect, name=args.name, stop=stop)
    return 0
