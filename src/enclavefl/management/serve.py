"""Runs the management API next to the PS: uvicorn over TLS on a thread, and the run directory's files.

How this works: :meth:`ManagementServer.start` makes the job's token
(``<run>/management.token``, 0600), picks the TLS identity
(:mod:`enclavefl.management.tls`), binds ``management.listen`` itself (port 0:
any free port, known at once), and runs uvicorn on a thread of its own with
that socket. uvicorn installs no signal handlers off the main thread, so the
PS keeps its own. Once uvicorn serves, ``<run>/management.json`` records the
URL, port, pid and CA file for the CLI and for ``enclavefl run``.
:meth:`ManagementServer.close` ends open event streams, stops uvicorn within a
short grace period and removes ``management.json`` (the token file stays:
it names a job that no longer runs).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final, final

from enclavefl.config import ManagementConfig
from enclavefl.errors import ConfigError, TransportError
from enclavefl.management.api import Mount, create_app
from enclavefl.management.auth import generate_token, write_token
from enclavefl.management.runfiles import MANAGEMENT_FILE, TOKEN_FILE, write_file
from enclavefl.management.schema import JobHandle
from enclavefl.management.tls import TlsFiles, management_tls
from enclavefl.transport.audit import AuditLog

__all__ = ["ManagementServer", "split_listen"]

log = logging.getLogger(__name__)

_READY_TIMEOUT_S: Final = 15.0
_GRACE_S: Final = 2
_MAX_CONNECTIONS: Final = 64
_CIPHERS: Final = "ECDHE+AESGCM:ECDHE+CHACHA20"


def split_listen(listen: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` as (host, port).

    Raises:
        ConfigError: the port is not a number in 0..65535.
    """
    host, _, port_text = listen.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535 or not host:
        raise ConfigError(f"management.listen: expected host:port with a port in 0..65535, got {listen!r}")
    return host, int(port_text)


def _relative(path: Path, run_dir: Path) -> str:
    try:
        return str(path.resolve().relative_to(run_dir.resolve()))
    except ValueError:
        return str(path.resolve())


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


@final
class ManagementServer:
    """The management API of one job, served over HTTPS on a thread until :meth:`close`."""

    def __init__(self, *, url: str, port: int, run_dir: Path, tls: TlsFiles, token_file: Path,
                 server: Any, thread: threading.Thread, stopping: threading.Event, closers: Sequence[Any]) -> None:
        self.url = url
        self.port = port
        self.run_dir = run_dir
        self.tls = tls
        self.token_file = token_file
        self._server = server
        self._thread = thread
        self._stopping = stopping
        self._closers = list(closers)
        self._closed = False

    @classmethod
    def start(cls, handle: JobHandle, config: ManagementConfig, run_dir: Path, *, job_name: str,
              tls_dir: Path | None = None, server_address: str = "", audit_path: Path | None = None,
              mounts: Sequence[Mount] = ()) -> ManagementServer:
        """Starts serving ``handle`` on ``config.listen`` and writes the run directory's files.

        Args:
            run_dir: receives ``management.token``, ``management.json`` (and ``management-tls/`` without a job CA).
            tls_dir: the job's certificate directory, if it has a per-job CA.
            server_address: the PS's worker-facing ``host:port``, for the cloud ``/state``.
            audit_path: the run's ``audit.jsonl``, for refused tokens.
            mounts: more routes (see :func:`~enclavefl.management.api.create_app`).

        Raises:
            ConfigError: a file cannot be written, or ``config.listen`` is malformed.
            TransportError: the address cannot be bound, or uvicorn did not start.
        """
        import uvicorn

        host, port = split_listen(config.listen)
        run_dir.mkdir(parents=True, exist_ok=True)
        token_file = run_dir / TOKEN_FILE
        token = generate_token()
        write_token(token_file, token)
        tls = management_tls(run_dir, tls_dir, job_name=job_name, host=host)
        try:
            sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        except OSError as exc:
            raise TransportError(f"management.listen {config.listen}: cannot bind: {exc.strerror or exc}") from exc
        audit = AuditLog(audit_path) if audit_path is not None else None
        stopping = threading.Event()
        app = create_app(handle, token=token, public_read=config.public_read, audit=audit,
                         server_address=server_address, mounts=mounts, stopping=stopping)
        uv_config = uvicorn.Config(app, ssl_certfile=str(tls.cert), ssl_keyfile=str(tls.key), ssl_ciphers=_CIPHERS,
                                   log_config=None, log_level="warning", access_log=False, lifespan="off",
                                   server_header=False, limit_concurrency=_MAX_CONNECTIONS, timeout_keep_alive=5,
                                   timeout_graceful_shutdown=_GRACE_S)
        server = uvicorn.Server(uv_config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="management-api", daemon=True)
        bound = sock.getsockname()[1]
        url = f"https://{_url_host(host)}:{bound}"
        closers: list[Any] = [app.state.guard] + ([audit] if audit is not None else [])
        self = cls(url=url, port=bound, run_dir=run_dir, tls=tls, token_file=token_file, server=server,
                   thread=thread, stopping=stopping, closers=closers)
        thread.start()
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                self.close()
                sock.close()
                raise TransportError(f"the management API did not start on {config.listen} "
                                     f"within {_READY_TIMEOUT_S:.0f}s (see the log)")
            time.sleep(0.01)
        self._write_info()
        log.info("management API %s (token in %s, CA %s%s)", url, token_file, tls.ca,
                 ", made for this run" if tls.generated else "")
        return self

    def _write_info(self) -> None:
        doc = {"url": self.url, "port": self.port, "pid": os.getpid(), "ca": _relative(self.tls.ca, self.run_dir),
               "token_file": _relative(self.token_file, self.run_dir), "generated_ca": self.tls.generated}
        write_file(self.run_dir / MANAGEMENT_FILE, (json.dumps(doc, indent=2) + "\n").encode(), private=False)

    def close(self) -> None:
        """Stops serving (open event streams end; in-flight requests get a short grace) and removes
        ``management.json``. Idempotent; never raises."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        self._server.should_exit = True
        self._thread.join(_GRACE_S + 3.0)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(2.0)
        try:
            (self.run_dir / MANAGEMENT_FILE).unlink(missing_ok=True)
        except OSError as exc:
            log.warning("management API: cannot remove %s: %s", self.run_dir / MANAGEMENT_FILE, exc)
        for closer in self._closers:
            try:
                closer.close()
            except Exception as exc:  # best effort: closing must not raise
                log.warning("management API: closing %s failed: %s", type(closer).__name__, exc)

    def __enter__(self) -> ManagementServer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
