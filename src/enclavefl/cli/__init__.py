"""The ``enclavefl`` command: one function per subcommand, wired here.

A failure prints one line to stderr and returns an exit code: 2 for usage and
configuration errors (a missing optional extra among them), 3 for
attestation, 4 for the network, 1 for anything else; ``--debug`` shows the
traceback. A command stopped by SIGINT, SIGTERM or SIGHUP exits with 128 + the
signal number (130, 143, 129).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence

from enclavefl import __version__
from enclavefl.errors import AttestationError, ConfigError, DataError, EnclaveFLError, TransportError

__all__ = ["EXTRAS", "add_overrides_option", "exit_code", "main", "missing_extra", "setup_logging"]

EXTRAS: Mapping[str, str] = {
    "torch": "ml",
    "sklearn": "ml",
    "matplotlib": "report",
    "keras": "ml,keras",
}
"""Optional packages by top-level module, and the extras of ``enclavefl`` that install them."""


def exit_code(exc: BaseException) -> int:
    """The process exit code for an error family."""
    if isinstance(exc, ConfigError | DataError):
        return 2
    if isinstance(exc, AttestationError):
        return 3
    if isinstance(exc, TransportError):
        return 4
    return 1


def missing_extra(exc: ImportError) -> str | None:
    """What to install when ``exc`` is an optional package that is not installed; None for other import errors."""
    name = getattr(exc, "name", None) or ""
    extra = EXTRAS.get(name.partition(".")[0])
    if not isinstance(exc, ModuleNotFoundError) or extra is None:
        return None
    return f"this needs {name.partition('.')[0]}, which is not installed: pip install 'enclavefl[{extra}]'"


def _parser() -> argparse.ArgumentParser:
    from enclavefl.cli import (attest_cmd, baseline_cmd, certs_cmd, export_cmd, manage_cmd, predict_cmd, report_cmd,
                               roles, run_cmd, scheduler_cmd, server_cmd, simulate_cmd)

    parser = argparse.ArgumentParser(prog="enclavefl", description="Federated learning with attested TLS.")
    parser.add_argument("--version", action="version", version=f"enclavefl {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run_cmd.add_parser(sub)
    simulate_cmd.add_parser(sub)
    roles.add_ps_parser(sub)
    roles.add_worker_parser(sub)
    scheduler_cmd.add_parser(sub)
    server_cmd.add_parser(sub)
    certs_cmd.add_parser(sub)
    attest_cmd.add_parser(sub)
    baseline_cmd.add_parser(sub)
    report_cmd.add_parser(sub)
    predict_cmd.add_parser(sub)
    export_cmd.add_parser(sub)
    manage_cmd.add_parsers(sub)
    return parser


def add_overrides_option(parser: argparse.ArgumentParser) -> None:
    """``--set SECTION.KEY=VALUE`` (repeatable), the same on every command that reads a job file."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a configuration key (repeatable)")


def setup_logging(level: int, path: str | None = None) -> logging.Handler:
    """One line per event, to ``path`` or stderr; only the CLI configures logging.

    Returns:
        The handler, for a command that must close its log file before it returns.
    """
    handler: logging.Handler = logging.FileHandler(path) if path else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    return handler


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (tests call it directly)."""
    arguments = list(argv) if argv is not None else sys.argv[1:]
    if "--debug" not in arguments:
        # gRPC's core logs a line of its own for events we report in ours (a failed TLS handshake):
        # only its errors, unless --debug. Read once, when gRPC loads (the parser's imports load it).
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    parser = _parser()
    args = parser.parse_args(arguments)
    try:
        result: int = args.func(args)
        return result
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"enclavefl {args.command}: {'interrupted' if signum == signal.SIGINT else exc}", file=sys.stderr)
        return 128 + signum
    except EnclaveFLError as exc:
        if args.debug:
            raise
        print(f"enclavefl {args.command}: error: {exc}", file=sys.stderr)
        return exit_code(exc)
    except ModuleNotFoundError as exc:
        hint = missing_extra(exc)
        if hint is None or args.debug:
            raise
        print(f"enclavefl {args.command}: error: {hint}", file=sys.stderr)
        return 2
