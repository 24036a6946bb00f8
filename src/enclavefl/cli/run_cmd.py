"""``enclavefl run``: one PS and N workers as OS processes on 127.0.0.1.

The parent makes the run directory (resolved configuration, certificates,
logs), starts the PS, waits for the port it bound, starts the workers, follows
``metrics.jsonl`` to show progress, and tears everything down at the end or on
Ctrl-C, SIGTERM or SIGHUP (the PS first, so that it checkpoints its last
completed round and tells the workers to finish). It exits non-zero when the
PS did, and 128 + the signal number when a signal stopped it; either way it
then prints the command that resumes the job from its last checkpoint. The
children watch this process and stop when it is gone, even after a SIGKILL
(:mod:`enclavefl.cli.stopping`).

``--resume`` continues the run in ``--out`` with that run's own ``config.yaml``
(the job file is not read again) from its newest checkpoint; see
:func:`enclavefl.cli.runs.plan_resume` for what ``--set`` may still change.

While the job runs it also follows ``events.jsonl``, where the PS appends its
warnings (:mod:`enclavefl.cli.events`): retries, dropped workers, refused joins
and rejected updates show on the console, one rate-limited line each. Crashed
workers are started again with backoff (:mod:`enclavefl.cli.supervisor`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from rich.console import Console

from enclavefl.cli import add_overrides_option
from enclavefl.cli.events import EventFeed
from enclavefl.cli.partition_table import print_partition_table
from enclavefl.cli.runs import (
    CONFIG_FILE,
    RESUMABLE_KEYS,
    ResumePlan,
    RoundProgress,
    choose_run_dir,
    claim_run_dir,
    plan_resume,
    print_summary,
    write_config,
)
from enclavefl.cli.stopping import exit_code_for, raise_on_stop_signals
from enclavefl.cli.supervisor import MAX_RESTARTS, WorkerSupervisor
from enclavefl.config import JobConfig, load_job, parse_job
from enclavefl.errors import ConfigError, RoundError
from enclavefl.management.runfiles import MANAGEMENT_FILE, read_management_info
from enclavefl.transport.certs import create_job_certs

PORT_TIMEOUT_S = 120.0
WORKER_EXIT_TIMEOUT_S = 20.0
PS_STOP_GRACE_S = 20.0
"""How long a stopped PS gets to checkpoint and tell the workers to finish before it is killed."""
EVENTS_FILE = "events.jsonl"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("run", help="run a whole job locally: 1 PS + N workers as separate processes")
    p.add_argument("job", type=Path, nargs="?", help="job YAML file (not read with --resume)")
    add_overrides_option(p)
    p.add_argument("--out", type=Path, help="run directory (default runs/<job name>-<timestamp>)")
    p.add_argument("--workers", type=int, help="number of workers (default job.workers; the same as --set job.workers=N)")
    p.add_argument("--resume", action="store_true",
                   help=f"continue the run in --out from its newest checkpoint, with the run's own {CONFIG_FILE}; "
                        f"--set may change only {', '.join(RESUMABLE_KEYS)}")
    p.add_argument("--resume-or-start", action="store_true",
                   help="like --resume, but start at round 1 when --out holds no checkpoint, or start JOB there "
                        "when it holds no run")
    p.add_argument("--quiet", action="store_true", help="no progress bar, only the summary (and warnings)")
    p.add_argument("--restart-workers", action=argparse.BooleanOptionalAction, default=True,
                   help="start a crashed worker again, with backoff (default: on)")
    p.add_argument("--max-restarts", type=int, default=MAX_RESTARTS, metavar="N",
                   help=f"restarts per worker (default {MAX_RESTARTS})")
    p.add_argument("--servers", type=int, metavar="N",
                   help="run a cluster instead of one PS: redis-server and N aggregation servers (docs/cluster.md)")
    p.set_defaults(func=run)


@dataclass
class Child:
    """One process a command started, with its log."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes] = field(repr=False)


class Children:
    """The child processes of one run; close() terminates whatever is left."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.children: list[Child] = []
        self._argv: dict[str, list[str]] = {}

    def respawn(self, name: str) -> subprocess.Popen[bytes]:
        """Starts child ``name`` again with the same command line (its log is appended to)."""
        return self.spawn(name, self._argv[name]).proc

    def spawn(self, name: str, argv: list[str]) -> Child:
        log_path = self.run_dir / "logs" / f"{name}.log"
        log_file = log_path.open("ab")
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        # One thread per process: N workers share the cores, oversubscribing makes all slower.
        env.setdefault("OMP_NUM_THREADS", "1")
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
        child = Child(name, proc, log_path, log_file)
        self.children.append(child)
        self._argv[name] = argv
        return child

    def wait(self, timeout_s: float) -> None:
        """Waits up to ``timeout_s`` in all for every child to exit by itself."""
        deadline = time.monotonic() + timeout_s
        for c in self.children:
            try:
                c.proc.wait(max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                pass

    def close(self, grace_s: float = 5.0) -> None:
        """Stops the PS first (it checkpoints and tells the workers to finish), then whatever is left."""
        self._stop([c for c in self.children if c.name == "ps"], PS_STOP_GRACE_S)
        self._stop([c for c in self.children if c.name != "ps"], grace_s)
        for c in self.children:
            c.log_file.close()

    @staticmethod
    def _stop(children: list[Child], grace_s: float) -> None:
        alive = [c for c in children if c.proc.poll() is None]
        for c in alive:
            c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for c in alive:
            try:
                c.proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait(5)


def _tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _worker_error(path: Path) -> str:
    """A failed worker's one-line error (or its traceback's last line) from its log, or ''."""
    lines = [line.strip() for line in _tail(path, 30).splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("enclavefl worker: error:"):
            return line
    if any(line.startswith("Traceback") for line in lines):
        return lines[-1]
    return ""


def _ps_failure(path: Path) -> str:
    """Why the PS failed: its one-line error if it printed one, else the end of its log."""
    for line in reversed(_tail(path, 20).splitlines()):
        if line.startswith("enclavefl ps: error:"):
            return line
    return _tail(path)


def _resume_hint(run_dir: Path, config: JobConfig) -> str:
    """The exact command that continues this run, and from which round.

    A resumed run reads the run directory's own ``config.yaml``, not the job
    file, so the command needs no job file and no ``--set`` it was started with.
    """
    base = ["enclavefl", "run", "--resume", "--out", str(run_dir)]
    rounds = [int(m.group(1)) for p in (run_dir / config.server.checkpoint_dir).glob("round-*.ckpt")
              if (m := re.fullmatch(r"round-(\d+)\.ckpt", p.name))]
    if not rounds:
        argv = ["enclavefl", "run", "--resume-or-start", "--out", str(run_dir)]
        return f"no round was completed (no checkpoint); start again with: {shlex.join(argv)}"
    last = max(rounds)
    if last >= config.job.rounds:
        return (f"all {config.job.rounds} rounds are checkpointed; run more with: "
                f"{shlex.join(base)} --set job.rounds=N")
    return f"round {last} is checkpointed; resume with: {shlex.join(base)}"


def _attestation_setup(console: Console, config: JobConfig, job_file: Path, run_dir: Path) -> JobConfig:
    """Makes the run's attestation material; paths in the run's config.yaml are relative to ``run_dir``.

    Simulated mode without a policy of its own (the default) gets a fresh sim
    root, a code measurement and a policy that allows exactly that code.
    """
    att = config.attestation
    if att.mode == "none":
        return config
    from enclavefl.transport.provisioning import prepare_simulated_attestation

    doc = config.to_dict()
    if att.mode == "simulated" and not att.policy and not att.sim_root:
        sim_root, policy, measurement, mr_signer = prepare_simulated_attestation(run_dir, config)
        doc["attestation"].update(policy=policy, sim_root=sim_root)
        console.print("[yellow]attestation: SIMULATED evidence (development only, NOT A REAL TEE)[/]; "
                      f"mr_enclave {measurement.mr_enclave.hex()[:16]}... mr_signer {mr_signer.hex()[:16]}...; "
                      f"policy {run_dir / policy}; set attestation.mode to gramine on SGX hardware")
    else:
        for key in ("policy", "sim_root", "collateral"):
            value = doc["attestation"].get(key)
            if value and not Path(value).is_absolute():
                doc["attestation"][key] = str((job_file.parent / value).resolve())
        console.print(f"attestation: {att.mode} evidence, policy {doc['attestation'].get('policy')}"
                      + (" (SIMULATED, NOT A REAL TEE)" if att.mode == "simulated" else ""))
    return parse_job(doc, source=str(job_file))


def _plan(console: Console, args: argparse.Namespace, overrides: list[str]) -> ResumePlan | None:
    """The resume plan for ``--resume``/``--resume-or-start``, or None for a new run.

    Raises:
        ConfigError: no --out, no earlier run there (or no checkpoint) where one is required,
            or no job file for a new run.
    """
    if not (args.resume or args.resume_or_start):
        if args.job is None:
            raise ConfigError("a job file is required (or --resume --out RUN_DIR to continue a run)")
        return None
    flag = "--resume-or-start" if args.resume_or_start else "--resume"
    if args.out is None:
        raise ConfigError(f"{flag} needs --out RUN_DIR, the run to continue")
    if args.resume_or_start and not (args.out / CONFIG_FILE).is_file():
        if args.job is None:
            raise ConfigError(f"{flag}: {args.out} holds no earlier run, and no job file was given to start one")
        console.print(f"{flag}: {args.out} holds no earlier run: starting {args.job} there")
        return None
    plan = plan_resume(args.out, overrides, allow_start=args.resume_or_start)
    if args.job is not None:
        console.print(f"resume: the run's configuration is {args.out / CONFIG_FILE}; {args.job} is not read "
                      f"(--set job.rounds=N extends the job)")
    return plan


def run(args: argparse.Namespace) -> int:
    with raise_on_stop_signals():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    console = Console(stderr=False, highlight=False)
    overrides = list(args.overrides)
    if args.workers is not None:
        overrides.append(f"job.workers={args.workers}")
    if args.servers is not None:
        from enclavefl.cli.cluster_run import run_cluster

        return run_cluster(args, overrides)
    plan = _plan(console, args, overrides)
    if plan is None:
        config = load_job(args.job, overrides)
        run_dir = choose_run_dir(config, args.out)
    else:
        config, run_dir = plan.config, args.out
    claim_run_dir(run_dir, resume=plan is not None)
    console.print(f"enclavefl run: job [bold]{config.job.name}[/], {config.job.workers} workers, "
                  f"{config.job.rounds} rounds, task {config.task.name}")
    console.print(f"run directory: {run_dir}")
    print_partition_table(console, config)
    if plan is None:
        config = _attestation_setup(console, config, args.job, run_dir)
        config_path = write_config(run_dir, config)
    else:
        # The run's config.yaml is already resolved (attestation paths included): changed only where --set asked.
        config_path = run_dir / CONFIG_FILE
        for key, old, new in plan.changes:
            console.print(f"resume: {key} {old!r} -> {new!r}")
        if plan.changes:
            write_config(run_dir, config)
            console.print(f"resume: {config_path} updated")
        if plan.checkpoint_round is None:
            console.print(f"[yellow]resume: no checkpoint in {run_dir / config.server.checkpoint_dir}; "
                          "starting at round 1 (--resume-or-start)[/]")
    certs_dir = run_dir / "certs"
    tls_args: list[str] = []
    if config.attestation.mode == "none":
        if not (certs_dir / "ca.pem").exists():
            create_job_certs(certs_dir, config.job.name, workers=config.job.workers)
        console.print(f"transport: mutual TLS under a per-job CA ({certs_dir}), no attestation")
        tls_args = ["--tls-dir", str(certs_dir)]
    audit_args = ["--audit-file", str(run_dir / "audit.jsonl")]

    python = [sys.executable, "-m", "enclavefl"] + (["--debug"] if args.debug else [])
    watch_args = ["--parent-pid", str(os.getpid())]
    cluster = Children(run_dir)
    started, started_wall = time.monotonic(), time.time()
    port_file = run_dir / "ps.port"
    port_file.unlink(missing_ok=True)
    (run_dir / MANAGEMENT_FILE).unlink(missing_ok=True)  # a PS killed earlier may have left its record
    metrics_path = run_dir / config.summary.metrics_file
    events = EventFeed(run_dir / EVENTS_FILE, functools.partial(_show_event, console, started_wall, args.quiet))
    supervisor = WorkerSupervisor(cluster.respawn, lambda line: console.print(line, style="yellow", markup=False),
                                  restart=args.restart_workers, min_workers=config.round.min_workers,
                                  max_restarts=max(args.max_restarts, 0),
                                  why_exit=lambda name: _worker_error(run_dir / "logs" / f"{name}.log"))
    rows: list[dict[str, Any]] = []
    try:
        ps_argv = python + ["ps", "--config", str(config_path), "--out", str(run_dir), *tls_args, *audit_args,
                            "--port-file", str(port_file), "--events-file", str(run_dir / EVENTS_FILE), "--quiet",
                            *watch_args]
        if plan is not None and plan.checkpoint_round is not None:
            ps_argv.append("--resume")
        ps = cluster.spawn("ps", ps_argv)
        deadline = time.monotonic() + PORT_TIMEOUT_S
        while not port_file.exists():
            if ps.proc.poll() is not None:
                raise RoundError(f"the PS exited with code {ps.proc.returncode} before listening:\n{_tail(ps.log_path)}")
            if time.monotonic() > deadline:
                raise RoundError(f"the PS did not listen within {PORT_TIMEOUT_S:.0f}s:\n{_tail(ps.log_path)}")
            time.sleep(0.05)
        port = int(port_file.read_text())
        for i in range(config.job.workers):
            # The argv kept for a restart includes --parent-pid: a restarted worker also follows this process.
            worker = cluster.spawn(f"worker-{i}", python + ["worker", "--config", str(config_path), *tls_args,
                                                             *audit_args, "--connect", f"127.0.0.1:{port}",
                                                             "--index", str(i), *watch_args])
            supervisor.watch(worker.name, worker.proc)
        console.print(f"PS listening on 127.0.0.1:{port}; logs in {run_dir / 'logs'}; "
                      f"waiting for {config.round.min_workers} of {config.job.workers} workers to join")
        if config.management.enabled:
            _print_management(console, run_dir)
        if plan is not None and plan.checkpoint_round is not None:
            console.print(f"resumed from round {plan.checkpoint_round} ({plan.checkpoint_path}); "
                          f"rounds {plan.checkpoint_round + 1}..{config.job.rounds} to go")

        def tick() -> None:
            events.poll()
            supervisor.poll()

        rows = _follow(console, ps, metrics_path, config, quiet=args.quiet, tick=tick)
        events.poll()
        events.flush()
        code = ps.proc.returncode
        workers = [c for c in cluster.children if c.name.startswith("worker")]
        end = time.monotonic() + WORKER_EXIT_TIMEOUT_S
        for w in workers:
            try:
                w.proc.wait(max(end - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        console.print(f"[yellow]{'interrupted' if signum == signal.SIGINT else exc}: stopping the PS and the workers[/]")
        cluster.close()
        console.print(f"run directory: {run_dir}")
        console.print(_resume_hint(run_dir, config), markup=False)
        return exit_code_for(signum)
    finally:
        cluster.close()
    wall = time.monotonic() - started
    print_summary(console, rows, wall, title="enclavefl run summary")
    console.print(f"run directory: {run_dir}")
    if code != 0:
        console.print(f"[red]the PS failed (exit {code}):[/]")
        console.print(_ps_failure(ps.log_path), markup=False)
        console.print(_resume_hint(run_dir, config), markup=False)
        return 1
    return 0


def _print_management(console: Console, run_dir: Path) -> None:
    """The PS's management API line (the PS records it before it reports its port)."""
    try:
        info = read_management_info(run_dir)
    except ConfigError as exc:
        console.print(f"[yellow]management API: {exc}[/]")
        return
    console.print(f"management API {info.url} (token in {info.token_file}); `enclavefl status {run_dir}`",
                  markup=False, soft_wrap=True)


def _show_event(console: Console, started_wall: float, quiet: bool, event: dict[str, Any], text: str) -> None:
    """One PS event on the console: warnings always, the start-up line unless ``quiet``."""
    level = event.get("level")
    if event.get("event") == "first_round":
        if not quiet:
            console.print(f"start-up {float(event.get('time', started_wall)) - started_wall:.1f}s: {text}",
                          markup=False)
    elif level in ("warning", "error", "critical"):
        console.print(f"ps: {text}", style="red" if level != "warning" else "yellow", markup=False)


def _read_rows(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    rows = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
    return rows, offset + end


def _follow(console: Console, ps: Child, metrics_path: Path, config: JobConfig, *, quiet: bool,
            tick: Callable[[], None] = lambda: None) -> list[dict[str, Any]]:
    """Shows the rows the PS appends to ``metrics.jsonl`` until it exits (it is another process: the file is the channel).

    Args:
        tick: called every pass (events, worker supervision), while the PS runs.
    """
    offset = 0
    with RoundProgress(console, config.job.rounds, quiet=quiet) as progress:
        while True:
            finished = ps.proc.poll() is not None
            if not finished:
                tick()
            new, offset = _read_rows(metrics_path, offset)
            for row in new:
                progress.add(row)
            if finished:
                return progress.rows
            time.sleep(0.2)
