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
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from enclavefl.cli import add_overrides_option, setup_logging
from enclavefl.cli.stopping import StopSignals, exit_code_for
from enclavefl.config import load_job
from enclavefl.errors import ConfigError

if TYPE_CHECKING:
    from enclavefl.cli.run_cmd import Children

log = logging.getLogger(__name__)

SPAWNED_EXIT_S = 30.0
"""How long the scheduler waits at its end for the servers it started to exit by themselves."""

_SERVER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


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
    p.add_argument("--spawn-dir", type=Path,
                   help="start the servers a scale-up asks for (POST /api/v1/scale) as `enclavefl server` processes "
                        "on this host, each with its directory DIR/<id> and its log in DIR/logs/<id>.log. "
                        "Default: scaling up is the operator's")
    p.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    p.set_defaults(func=run_scheduler)


def _server_spawner(args: argparse.Namespace, directory: Path, scheduler_at: str,
                    audit_path: Path) -> tuple[Callable[[str], None], Children]:
    """Starts ``enclavefl server --id ID`` with this scheduler's job, store, credentials and audit file.

    The servers watch this process (``--parent-pid``): they end with it.
    """
    from enclavefl.cli.run_cmd import Children

    (directory / "logs").mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "enclavefl"] + (["--debug"] if args.debug else []) + [
        "server", "--config", str(args.config.resolve()), "--scheduler", scheduler_at,
        "--audit-file", str(audit_path.resolve()), "--parent-pid", str(os.getpid())]
    for override in args.overrides:
        base += ["--set", override]
    if args.store:
        base += ["--store", args.store]
    if args.tls_dir:
        base += ["--tls-dir", str(args.tls_dir.resolve())]
    children = Children(directory)

    def spawn(server_id: str) -> None:
        if not _SERVER_ID.fullmatch(server_id):
            raise ConfigError(f"server id {server_id!r}: expected letters, digits, '-' or '_'")
        out = directory / server_id
        children.spawn(server_id, [*base, "--id", server_id, "--out", str(out), "--port-file",
                                   str(directory / f"{server_id}.port")])

    return spawn, children


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
        redis_store = RedisStore(settings, job=config.job.name)
        store = SealedStore(redis_store, Sealer(key, job=config.job.name))
        host = config.transport.listen.rpartition(":")[0]
        service = KeyService(credentials, key, listen=config.transport.listen)
        api = None
        spawned: Children | None = None
        try:
            address = f"{host}:{service.port}"
            if args.spawn_dir is not None:
                spawn, spawned = _server_spawner(args, args.spawn_dir, address, audit_path)
            scheduler = Scheduler(config, store, out_dir=out, address=address,
                                  identity=identity_of(credentials.own_identity()),
                                  spawn=None if args.spawn_dir is None else spawn)
            stopper.on_stop(scheduler.stop)
            redis_store.on_outage = scheduler.note_store  # outages its retries bridge reach the feed too
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
            if spawned is not None:
                spawned.wait(SPAWNED_EXIT_S)  # they end once they see the job's end in the store
                spawned.close()
            service.close()
            store.close()
    finally:
        stopper.close()
    if stopper.signum is not None:
        return exit_code_for(stopper.signum)
    return 0 if state in ("finished", "stopped") else 1
