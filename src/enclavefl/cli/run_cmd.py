"""``enclavefl run``: one PS and N workers as OS processes on 127.0.0.1.

The parent makes the run directory (resolved configuration, certificates,
logs), starts the PS, waits for the port it bound, starts the workers, follows
``metrics.jsonl`` to show progress, and tears everything down at the end or on
Ctrl-C, SIGTERM or SIGHUP (the PS first, so that it checkpoints its last
completed round and tells the workers to finish). It exits non-zero when the
PS did, and 128 + the signal number when a signal stopped it. The children
watch this process and stop when it is gone, even after a SIGKILL
(:mod:`enclavefl.cli.stopping`).

``--resume`` continues the run in ``--out`` with that run's own ``config.yaml``
(the job file is not read again) from its newest checkpoint; see
:func:`enclavefl.cli.runs.plan_resume` for what ``--set`` may still change.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from rich.console import Console

from enclavefl.cli import add_overrides_option
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
from enclavefl.config import JobConfig, load_job, parse_job
from enclavefl.errors import ConfigError, RoundError
from enclavefl.transport.certs import create_job_certs

PORT_TIMEOUT_S = 120.0
WORKER_EXIT_TIMEOUT_S = 20.0
PS_STOP_GRACE_S = 20.0
"""How long a stopped PS gets to checkpoint and tell the workers to finish before it is killed."""


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
    p.add_argument("--quiet", action="store_true", help="no progress bar, only the summary")
    p.set_defaults(func=run)


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes] = field(repr=False)


class _Cluster:
    """The child processes of one run; close() terminates whatever is left."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.children: list[_Child] = []

    def spawn(self, name: str, argv: list[str]) -> _Child:
        log_path = self.run_dir / "logs" / f"{name}.log"
        log_file = log_path.open("ab")
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        # One thread per process: N workers share the cores, oversubscribing makes all slower.
        env.setdefault("OMP_NUM_THREADS", "1")
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
        child = _Child(name, proc, log_path, log_file)
        self.children.append(child)
        return child

    def close(self, grace_s: float = 5.0) -> None:
        """Stops the PS first (it checkpoints and tells the workers to finish), then whatever is left."""
        self._stop([c for c in self.children if c.name == "ps"], PS_STOP_GRACE_S)
        self._stop([c for c in self.children if c.name != "ps"], grace_s)
        for c in self.children:
            c.log_file.close()

    @staticmethod
    def _stop(children: list[_Child], grace_s: float) -> None:
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
    cluster = _Cluster(run_dir)
    started = time.monotonic()
    port_file = run_dir / "ps.port"
    port_file.unlink(missing_ok=True)
    metrics_path = run_dir / config.summary.metrics_file
    rows: list[dict[str, Any]] = []
    try:
        ps_argv = python + ["ps", "--config", str(config_path), "--out", str(run_dir), *tls_args, *audit_args,
                            "--port-file", str(port_file), "--quiet", *watch_args]
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
            cluster.spawn(f"worker-{i}", python + ["worker", "--config", str(config_path), *tls_args, *audit_args,
                                                    "--connect", f"127.0.0.1:{port}", "--index", str(i), *watch_args])
        console.print(f"PS listening on 127.0.0.1:{port}; logs in {run_dir / 'logs'}")
        if plan is not None and plan.checkpoint_round is not None:
            console.print(f"resumed from round {plan.checkpoint_round} ({plan.checkpoint_path}); "
                          f"rounds {plan.checkpoint_round + 1}..{config.job.rounds} to go")
        rows = _follow(console, ps, metrics_path, config, quiet=args.quiet)
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
        return exit_code_for(signum)
    finally:
        cluster.close()
    wall = time.monotonic() - started
    print_summary(console, rows, wall, title="enclavefl run summary")
    console.print(f"run directory: {run_dir}")
    if code != 0:
        console.print(f"[red]the PS failed (exit {code}):[/]\n{_tail(ps.log_path)}")
        return 1
    return 0


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


def _follow(console: Console, ps: _Child, metrics_path: Path, config: JobConfig, *, quiet: bool) -> list[dict[str, Any]]:
    """Shows the rows the PS appends to ``metrics.jsonl`` until it exits (it is another process: the file is the channel)."""
    offset = 0
    with RoundProgress(console, config.job.rounds, quiet=quiet) as progress:
        while True:
            finished = ps.proc.poll() is not None
            new, offset = _read_rows(metrics_path, offset)
            for row in new:
                progress.add(row)
            if finished:
                return progress.rows
            time.sleep(0.2)
