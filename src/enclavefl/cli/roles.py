"""``enclavefl ps`` and ``enclavefl worker``: one role each, for real deployments.

`enclavefl run` starts these same commands as child processes on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from enclavefl.cli import add_overrides_option, setup_logging
from enclavefl.cli.malloc import tune_malloc
from enclavefl.config import JobConfig, load_job
from enclavefl.errors import ConfigError
from enclavefl.transport.credentials import CaCredentials, Credentials

log = logging.getLogger("enclavefl.cli")


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
    p.set_defaults(func=run_ps)


def add_worker_parser(sub: Any) -> None:
    p = sub.add_parser("worker", help="run one worker")
    _common(p)
    p.add_argument("--connect", required=True, metavar="HOST:PORT", help="address of the PS")
    p.add_argument("--index", type=int, required=True, help="this worker's index (its data partition)")
    p.add_argument("--of", type=int, help="number of workers the data is split across (default job.workers)")
    p.add_argument("--name", help="name shown in PS logs (default worker-<index>)")
    p.set_defaults(func=run_worker)


def make_credentials(config: JobConfig, tls_dir: Path | None, role: str, *, job_dir: Path = Path("."),
                     audit_path: Path | None = None) -> Credentials:
    """Credentials for ``role`` (``ps`` or ``worker-<i>``).

    With ``attestation.mode`` simulated or gramine: attested RA-TLS credentials
    (policy and sim root relative to ``job_dir``, the job file's folder).
    With ``none``: mutual TLS under the per-job CA from --tls-dir or transport.tls.

    Raises:
        ConfigError: no certificate source was given, or a file is unreadable.
    """
    if config.attestation.mode != "none":
        from enclavefl.cli.attest_cmd import make_attested_credentials

        return make_attested_credentials(config, job_dir=job_dir, role=role, node=role, audit_path=audit_path)
    tls = config.transport.tls
    if tls_dir is not None:
        return CaCredentials.from_files(tls_dir / "ca.pem", tls_dir / f"{role}.pem", tls_dir / f"{role}.key",
                                        server_name=tls.server_name)
    if tls.ca_cert and tls.cert and tls.key:
        return CaCredentials.from_files(tls.ca_cert, tls.cert, tls.key, server_name=tls.server_name)
    raise ConfigError("TLS is always on: give --tls-dir or transport.tls.{ca_cert,cert,key} (make them with `enclavefl certs`)")


def _stop_on_signals(event: threading.Event) -> None:
    def handler(signum: int, frame: object) -> None:
        event.set()

    signal.signal(signal.SIGTERM, handler)


def run_ps(args: argparse.Namespace) -> int:
    from enclavefl.tasks import load_task
    from enclavefl.server.checkpoint import latest_checkpoint
    from enclavefl.server.ps import ParameterServer
    from enclavefl.transport.service import FederationServer

    setup_logging(logging.DEBUG if args.debug else logging.INFO, args.log_file)
    tune_malloc()
    config = load_job(args.config, args.overrides)
    credentials = make_credentials(config, args.tls_dir, "ps", job_dir=args.config.parent,
                                   audit_path=args.audit_file or args.out / "audit.jsonl")
    task = load_task(config)
    initial = task.initial_parameters()
    resume = None
    if args.resume:
        resume = latest_checkpoint(args.out / config.server.checkpoint_dir)
        if resume is None:
            log.warning("ps: --resume given but no checkpoint in %s; starting at round 1", args.out / config.server.checkpoint_dir)
    evaluator_trainer = task.server_evaluator()

    def evaluate(params: Any) -> Any:
        assert evaluator_trainer is not None
        evaluator_trainer.set_parameters(params)
        return evaluator_trainer.evaluate()

    ps = ParameterServer(config, initial, out_dir=args.out, evaluator=evaluate if evaluator_trainer else None, resume_from=resume)
    server = FederationServer.start(ps, credentials, listen=config.transport.listen, chunk_bytes=config.transport.chunk_bytes,
                                    max_downloads=config.server.max_concurrent_downloads)
    log.info("ps %s: listening on port %d, job %s, %d rounds, model %d tensors / %d bytes",
             ps.instance, server.port, config.job.name, config.job.rounds, len(initial), initial.nbytes)
    if args.port_file:
        tmp = args.port_file.with_suffix(".tmp")
        tmp.write_text(str(server.port))
        os.replace(tmp, args.port_file)
    try:
        ps.run()
    finally:
        server.stop()
    log.info("ps %s: job %s finished", ps.instance, config.job.name)
    return 0


def run_worker(args: argparse.Namespace) -> int:
    from enclavefl.tasks import load_task
    from enclavefl.worker.faults import faults_for
    from enclavefl.worker.pipeline import default_transforms
    from enclavefl.worker.runtime import Worker, WorkerSettings, grpc_client_factory

    setup_logging(logging.DEBUG if args.debug else logging.INFO, args.log_file)
    tune_malloc()
    config = load_job(args.config, args.overrides)
    count = args.of or config.job.workers
    if not 0 <= args.index < count:
        raise ConfigError(f"--index {args.index} is outside 0..{count - 1}")
    credentials = make_credentials(config, args.tls_dir, f"worker-{args.index}", job_dir=args.config.parent,
                                   audit_path=args.audit_file)
    trainer = load_task(config).worker_trainer(args.index, count)
    stop = threading.Event()
    _stop_on_signals(stop)
    attacks, slowdown = faults_for(config, args.index, count)  # experiments only; none by default
    settings = WorkerSettings(name=args.name or f"worker-{args.index}", seed=config.job.seed, slowdown=slowdown)
    connect = grpc_client_factory(args.connect, credentials, chunk_bytes=config.transport.chunk_bytes)
    Worker(connect, trainer, settings, stop=stop, transforms=[*default_transforms(trainer), *attacks]).run()
    return 0
