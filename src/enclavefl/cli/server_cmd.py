"""``enclavefl server``: one aggregation server of a cluster, sharing the job with the others through Redis.

It is ``enclavefl ps`` with a :class:`~enclavefl.cluster.engine.ClusterEngine`:
workers join it and push to it as to a PS; rounds, partial aggregates and
model versions live in the store (``--store redis://HOST:PORT/DB``, or the
job's ``cluster.redis``), sealed under the cluster key (``--cluster-key-file``).
The server holding the leader lease opens and closes the rounds (docs/cluster.md).
SIGINT, SIGTERM or SIGHUP drain it: it leaves the membership, serves its open
round to the end, hands its workers over to the other servers and exits.

``--out`` receives this server's ``logs/server.log``, ``audit.jsonl``,
``metrics.jsonl`` (every round's row, whichever server led it) and the
checkpoints of the rounds it closed.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from enclavefl.cli import add_overrides_option, setup_logging
from enclavefl.cli.malloc import tune_malloc
from enclavefl.cli.stopping import StopSignals, exit_code_for
from enclavefl.config import load_job
from enclavefl.errors import ConfigError

log = logging.getLogger(__name__)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("server", help="run one aggregation server of a cluster (shared state in Redis)")
    p.add_argument("--config", required=True, type=Path, help="job YAML file")
    add_overrides_option(p)
    p.add_argument("--store", metavar="URL",
                   help="redis://HOST:PORT/DB or rediss://... (default: the job's cluster.redis)")
    key = p.add_mutually_exclusive_group(required=True)
    key.add_argument("--scheduler", metavar="HOST:PORT",
                     help="the scheduler, which hands the cluster key to this server once its attestation passes")
    key.add_argument("--cluster-key-file", type=Path,
                     help="the cluster key (64 hex digits) from a file instead (development; no scheduler)")
    p.add_argument("--id", dest="server_id", required=True, help="this server's member id (unique in the cluster)")
    p.add_argument("--out", type=Path, default=Path("."), help="this server's directory (default .)")
    p.add_argument("--tls-dir", type=Path, help="directory made by `enclavefl certs` (ca.pem, ps.pem ...)")
    p.add_argument("--audit-file", type=Path, help="append attestation decisions here (default OUT/audit.jsonl)")
    p.add_argument("--log-file", help="write logs here (default OUT/logs/server.log)")
    p.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    p.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    p.set_defaults(func=run_server)


def run_server(args: argparse.Namespace) -> int:
    from enclavefl.app import build_server, serve
    from enclavefl.cluster import RedisStore, SealedStore, Sealer
    from enclavefl.cluster.engine import ClusterEngine, cluster_engine
    from enclavefl.cluster.keyservice import fetch_cluster_key
    from enclavefl.cluster.settings import check_cluster_job, read_cluster_key, redis_settings, redis_settings_from_url
    from enclavefl.cli.roles import write_port_file
    from enclavefl.tasks import load_task
    from enclavefl.transport.provisioning import make_credentials

    out: Path = args.out
    (out / "logs").mkdir(parents=True, exist_ok=True)
    setup_logging(logging.DEBUG if args.debug else logging.INFO, args.log_file or str(out / "logs" / "server.log"))
    tune_malloc()
    stopper = StopSignals(parent_pid=args.parent_pid)
    try:
        config = load_job(args.config, args.overrides)
        check_cluster_job(config)
        if not args.server_id or len(args.server_id) > 64 or not args.server_id.replace("-", "").isalnum():
            raise ConfigError(f"--id {args.server_id!r}: expected 1-64 letters, digits or '-'")
        settings = redis_settings(config.cluster.redis, base_dir=args.config.parent)
        if args.store:
            settings = redis_settings_from_url(args.store, base=settings)
        credentials = make_credentials(config, args.tls_dir, "ps", job_dir=args.config.parent,
                                       audit_path=args.audit_file or out / "audit.jsonl")
        if args.scheduler:
            key = fetch_cluster_key(args.scheduler, credentials, args.server_id)
            log.info("server %s: cluster key received from the scheduler at %s", args.server_id, args.scheduler)
        else:
            key = read_cluster_key(args.cluster_key_file)
        store = SealedStore(RedisStore(settings, job=config.job.name), Sealer(key, job=config.job.name))
        try:
            ps = build_server(config, load_task(config), out_dir=out,
                              engine=cluster_engine(store, args.server_id, config.cluster))
            engine = ps.engine if isinstance(ps.engine, ClusterEngine) else None
            # A stop signal drains: the open round ends here, the workers move to the other servers (the
            # last server stops as a PS does). A second signal exits at once.
            stopper.on_stop(engine.drain if engine is not None else ps.stop)
            host = config.transport.listen.rpartition(":")[0]
            started = time.monotonic()

            def listening(port: int) -> None:
                if engine is not None:  # registered in the store with this address once the rounds start
                    engine.address = f"{host}:{port}"
                if args.port_file:
                    write_port_file(args.port_file, port)
                log.info("server %s: listening on %s:%d, store %s", args.server_id, host, port, settings.address)

            serve(ps, credentials, on_listening=listening)
            log.info("server %s: done after %.1fs, model version %d", args.server_id, time.monotonic() - started,
                     ps.version)
        finally:
            store.close()
    finally:
        stopper.close()
    return exit_code_for(stopper.signum) if stopper.signum is not None else 0
