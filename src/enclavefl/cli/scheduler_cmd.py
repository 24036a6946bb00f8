"""``enclavefl scheduler``: owns a cluster's job, hands the cluster key to attested servers, serves the API.

It makes the cluster key in memory (never written), writes the job into the
store (sealed under that key), serves the key to servers whose attestation
passes the job's policy (:mod:`enclavefl.cluster.keyservice`, on
``transport.listen``), and serves the management API and dashboard for the
whole cluster (with the cloud ``/state`` listing every server and worker).
It ends when the job's last round is closed.

``--out`` receives ``logs/scheduler.log``, ``audit.jsonl`` (every key
decision), ``metrics.jsonl`` (every round) and the management files.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from enclavefl.cli import add_overrides_option, setup_logging
from enclavefl.cli.stopping import StopSignals, exit_code_for
from enclavefl.config import load_job

log = logging.getLogger(__name__)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("scheduler", help="own a cluster's job: hand the key to attested servers, serve the API")
    p.add_argument("--config", required=True, type=Path, help="job YAML file")
    add_overrides_option(p)
    p.add_argument("--store", metavar="URL",
                   help="redis://HOST:PORT/DB or rediss://... (default: the job's cluster.redis)")
    p.add_argument("--out", type=Path, default=Path("."), help="the scheduler's directory (default .)")
    p.add_argument("--tls-dir", type=Path, help="directory made by `enclavefl certs` (ca.pem, ps.pem ...)")
    p.add_argument("--audit-file", type=Path, help="append attestation decisions here (default OUT/audit.jsonl)")
    p.add_argument("--log-file", help="write logs here (default OUT/logs/scheduler.log)")
    p.add_argument("--port-file", type=Path, help="write the key service's port here once listening")
    p.add_argument("--cluster-key-file", type=Path,
                   help="keep the cluster key here (made if missing, mode 0600), so a restarted scheduler can read "
                        "the job's store; in a TEE, a path on an encrypted (sealed) mount. Default: memory only")
    p.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    p.set_defaults(func=run_scheduler)


def run_scheduler(args: argparse.Namespace) -> int:
    from enclavefl.cli.roles import write_port_file
    from enclavefl.cluster import RedisStore, SealedStore, Sealer
    from enclavefl.cluster.keyservice import KEY_BYTES, KeyService
    from enclavefl.cluster.scheduler import ClusterHandle, Scheduler
    from enclavefl.cluster.settings import (
        check_cluster_job,
        read_cluster_key,
        redis_settings,
        redis_settings_from_url,
        write_cluster_key,
    )
    from enclavefl.server.handle import identity_of
    from enclavefl.transport.provisioning import make_credentials

    out: Path = args.out
    (out / "logs").mkdir(parents=True, exist_ok=True)
    setup_logging(logging.DEBUG if args.debug else logging.INFO, args.log_file or str(out / "logs" / "scheduler.log"))
    stopper = StopSignals(parent_pid=args.parent_pid)
    try:
        config = load_job(args.config, args.overrides)
        check_cluster_job(config)
        settings = redis_settings(config.cluster.redis, base_dir=args.config.parent)
        if args.store:
            settings = redis_settings_from_url(args.store, base=settings)
        audit_path = args.audit_file or out / "audit.jsonl"
        credentials = make_credentials(config, args.tls_dir, "ps", job_dir=args.config.parent, audit_path=audit_path)
        if args.cluster_key_file is None:
            key = os.urandom(KEY_BYTES)  # in memory only: a restarted scheduler cannot read the job's store
        elif args.cluster_key_file.exists():
            key = read_cluster_key(args.cluster_key_file)
            log.info("scheduler: cluster key read from %s (a restart)", args.cluster_key_file)
        else:
            key = write_cluster_key(args.cluster_key_file)
        store = SealedStore(RedisStore(settings, job=config.job.name), Sealer(key, job=config.job.name))
        host = config.transport.listen.rpartition(":")[0]
        service = KeyService(credentials, key, listen=config.transport.listen)
        api = None
        try:
            address = f"{host}:{service.port}"
            scheduler = Scheduler(config, store, out_dir=out, address=address,
                                  identity=identity_of(credentials.own_identity()))
            stopper.on_stop(scheduler.stop)
            if config.management.enabled:
                from enclavefl.cluster import routes
                from enclavefl.management import dashboard, prometheus
                from enclavefl.management.serve import ManagementServer

                api = ManagementServer.start(ClusterHandle(scheduler), config.management, out, job_name=config.job.name,
                                             tls_dir=args.tls_dir, server_address=address, audit_path=audit_path,
                                             mounts=(dashboard.mount, prometheus.mount, routes.mount))
                log.info("scheduler: management API %s (token in %s)", api.url, api.token_file)
            if args.port_file:
                write_port_file(args.port_file, service.port)
            log.info("scheduler: key service on %s, store %s, job %s", address, settings.address, config.job.name)
            state = scheduler.run()
            log.info("scheduler: job %s %s", config.job.name, state)
        finally:
            if api is not None:
                api.close()
            service.close()
            store.close()
    finally:
        stopper.close()
    if stopper.signum is not None:
        return exit_code_for(stopper.signum)
    return 0 if state == "finished" else 1
