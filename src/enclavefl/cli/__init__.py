"""The ``enclavefl`` command: one function per subcommand, wired here.

A failure prints one line to stderr and returns an exit code: 2 for usage and
configuration errors, 3 for attestation, 4 for the network, 1 for anything
else; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from enclavefl import __version__
from enclavefl.errors import AttestationError, ConfigError, DataError, EnclaveFLError, TransportError

__all__ = ["add_overrides_option", "exit_code", "main", "setup_logging"]


def exit_code(exc: BaseException) -> int:
    """The process exit code for an error family."""
    if isinstance(exc, ConfigError | DataError):
        return 2
    if isinstance(exc, AttestationError):
        return 3
    if isinstance(exc, TransportError):
        return 4
    return 1


def _parser() -> argparse.ArgumentParser:
    from enclavefl.cli import (attest_cmd, baseline_cmd, certs_cmd, export_cmd, predict_cmd, report_cmd, roles,
                               run_cmd, simulate_cmd)

    parser = argparse.ArgumentParser(prog="enclavefl", description="Federated learning with attested TLS.")
    parser.add_argument("--version", action="version", version=f"enclavefl {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run_cmd.add_parser(sub)
    simulate_cmd.add_parser(sub)
    roles.add_ps_parser(sub)
    roles.add_worker_parser(sub)
    certs_cmd.add_parser(sub)
    attest_cmd.add_parser(sub)
    baseline_cmd.add_parser(sub)
    report_cmd.add_parser(sub)
    predict_cmd.add_parser(sub)
    export_cmd.add_parser(sub)
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
    parser = _parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        result: int = args.func(args)
        return result
    except KeyboardInterrupt:
        print("enclavefl: interrupted", file=sys.stderr)
        return 130
    except EnclaveFLError as exc:
        if args.debug:
            raise
        print(f"enclavefl {args.command}: error: {exc}", file=sys.stderr)
        return exit_code(exc)
