"""``enclavefl status|stop|pause|resume RUN_DIR|URL``: a running job, through its management API.

Given a run directory, the commands read the API's URL, CA file and token
from it (``management.json``, ``management.token``); given an ``https://``
URL, they take the token and CA from ``--token-file`` and ``--ca-file``. They
make exactly the one request asked for (two for ``status``: the status and
the worker table).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from enclavefl.errors import ConfigError
from enclavefl.management.client import ManagementClient

__all__ = ["add_parsers", "client_for", "render_status"]


def _target(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="RUN_DIR|URL", help="the job's run directory, or its API's https:// URL")
    p.add_argument("--token-file", type=Path, help="with a URL: the job's management.token")
    p.add_argument("--ca-file", type=Path, help="with a URL: the CA to verify the API against (default: system CAs)")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S", help="seconds to wait for an answer")


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("status", help="show a running job's status and workers")
    _target(p)
    p.add_argument("--json", action="store_true", help="print the raw JSON (status and workers)")
    p.set_defaults(func=run_status)
    p = sub.add_parser("stop", help="stop a running job (the open round finishes, unless --abort)")
    _target(p)
    p.add_argument("--abort", action="store_true", help="abandon the open round; the last completed one is kept")
    p.set_defaults(func=run_stop)
    p = sub.add_parser("pause", help="pause a running job: no new round opens until `enclavefl resume`")
    _target(p)
    p.set_defaults(func=run_pause)
    p = sub.add_parser("resume", help="resume a paused job")
    _target(p)
    p.set_defaults(func=run_resume)


def client_for(args: argparse.Namespace) -> ManagementClient:
    """The client of the job ``args.target`` names (a run directory or a URL).

    Raises:
        ConfigError: no API runs in that directory, a file is unreadable, or the target is neither.
    """
    target: str = args.target
    if target.startswith(("https://", "http://")):
        if args.token_file is None:
            raise ConfigError(f"{target}: a URL needs --token-file (the job's management.token)")
        return ManagementClient.for_url(target, token_file=args.token_file, ca_file=args.ca_file,
                                        timeout_s=args.timeout)
    run_dir = Path(target)
    if not run_dir.is_dir():
        raise ConfigError(f"{target}: neither a run directory nor an https:// URL")
    if args.token_file is not None or args.ca_file is not None:
        raise ConfigError("--token-file and --ca-file go with a URL; a run directory has its own")
    return ManagementClient.for_run(run_dir, timeout_s=args.timeout)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _short(value: str | None, n: int = 16) -> str:
    return (value[:n] + "...") if value and len(value) > n else (value or "-")


def _identity(identity: dict[str, Any]) -> str:
    evidence = identity.get("evidence", "none")
    if evidence == "none":
        return "none"
    text = f"{evidence} {_short(identity.get('mr_enclave'), 12)}"
    if identity.get("tcb_status"):
        text += f" {identity['tcb_status']}"
    if identity.get("weaker"):
        text += f" (weaker: {', '.join(identity['weaker'])})"
    return text


def render_status(console: Console, status: dict[str, Any], workers: list[dict[str, Any]]) -> None:
    """One screen: the job's header lines, then one row per worker."""
    state = status["state"]
    colour = {"running": "green", "paused": "yellow", "failed": "red"}.get(state, "bold")
    console.print(f"job [bold]{status['job']}[/] ({status['instance']}): [{colour}]{state}[/], phase {status['phase']}, "
                  f"round {status['round']} of {status['rounds']} ({status['rounds_done']} done, "
                  f"{status['rounds_left']} left), model version {status['model_version']}")
    console.print(f"participants {status['participants']}, updates {status['updates']}, workers joined "
                  f"{status['workers_joined']}; up {_duration(status['uptime_s'])}, ETA {_duration(status['eta_s'])}")
    identity = status["identity"]
    mode = status["attestation_mode"]
    note = " (SIMULATED, NOT A REAL TEE)" if mode == "simulated" else ""
    console.print(f"attestation {mode}{note}; PS identity {_identity(identity)}, mr_signer "
                  f"{_short(identity.get('mr_signer'), 12)}", markup=False)
    if status.get("failure"):
        console.print(f"[red]failure: {status['failure']}[/]")
    table = Table(title=f"{len(workers)} worker(s)", title_justify="left")
    for column in ("worker", "state", "last seen", "rounds", "bytes in", "bytes out", "attestation", "reason"):
        table.add_column(column, justify="right" if column in ("rounds", "bytes in", "bytes out") else "left")
    for w in workers:
        table.add_row(f"{w['name']} ({_short(w['worker_id'], 8)})", w["state"], f"{w['last_seen_s']:.1f}s ago",
                      str(w["rounds_contributed"]), str(w["bytes_in"]), str(w["bytes_out"]),
                      _identity(w["identity"]), w.get("reason") or "")
    console.print(table)


def run_status(args: argparse.Namespace) -> int:
    client = client_for(args)
    status = client.get("/api/v1/status")
    workers = client.get("/api/v1/workers")
    if args.json:
        print(json.dumps({"status": status, "workers": workers}, indent=2))
        return 0
    render_status(Console(highlight=False), status, workers)
    return 0


def run_stop(args: argparse.Namespace) -> int:
    mode = "abort" if args.abort else "finish"
    client_for(args).post("/api/v1/stop", {"mode": mode})
    what = "abandons the open round" if args.abort else "finishes the open round"
    print(f"enclavefl stop: asked at {time.strftime('%H:%M:%S')}; the job {what}, checkpoints and exits")
    return 0


def run_pause(args: argparse.Namespace) -> int:
    answer = client_for(args).post("/api/v1/pause")
    print("enclavefl pause: " + ("paused: the open round runs on, no new round opens" if answer.get("changed")
                                 else "the job was already paused"))
    return 0


def run_resume(args: argparse.Namespace) -> int:
    answer = client_for(args).post("/api/v1/resume")
    print("enclavefl resume: " + ("resumed: rounds open again" if answer.get("changed")
                                  else "the job was not paused"))
    return 0
