"""The management API's TLS identity: the job's own certificates when it has a CA, else a per-run one.

How this works: a job under a per-job CA (``attestation.mode: none``, made by
``enclavefl run`` or ``enclavefl certs``) already has ``ca.pem`` and the
PS's ``ps.pem``/``ps.key``: the API serves with the PS's certificate and a
client verifies it against ``ca.pem``. An attested job has no CA file (its
TLS certificates carry evidence instead, which a browser or curl cannot
check), so the PS makes a management CA of its own for the run, issues the
API a certificate for the listen host, ``localhost`` and ``127.0.0.1``,
writes them under ``<run>/management-tls/`` (keys 0600) and forgets the CA
key: nobody can issue another certificate that clients of this run trust.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from enclavefl.errors import ConfigError
from enclavefl.management.runfiles import write_file
from enclavefl.transport.certs import make_ca, make_node_cert

__all__ = ["MANAGEMENT_TLS_DIR", "TlsFiles", "management_tls"]

log = logging.getLogger(__name__)

MANAGEMENT_TLS_DIR: Final = "management-tls"
"""Where a run's own management CA and certificate go, inside the run directory."""

_VALIDITY = dt.timedelta(days=30)


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The files the API serves with, and the CA a client verifies it against."""

    ca: Path
    cert: Path
    key: Path
    generated: bool
    """True: a per-run management CA made by :func:`management_tls`; False: the job's own CA."""


def _server_names(host: str) -> tuple[str, ...]:
    names = ["localhost", "127.0.0.1", "::1"]
    try:
        unspecified = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        unspecified = False
    if host and not unspecified and host not in names:
        names.insert(0, host)
    return tuple(names)


def management_tls(run_dir: Path, tls_dir: Path | None, *, job_name: str, host: str) -> TlsFiles:
    """The TLS files for the management API of the run in ``run_dir``.

    Args:
        tls_dir: the job's certificate directory (``ca.pem``, ``ps.pem``, ``ps.key``), if it has one.
        job_name: named in a generated CA's subject.
        host: the API's listen host, added to a generated certificate's names.

    Raises:
        ConfigError: the management certificate cannot be written.
    """
    if tls_dir is not None and all((tls_dir / name).is_file() for name in ("ca.pem", "ps.pem", "ps.key")):
        return TlsFiles(tls_dir / "ca.pem", tls_dir / "ps.pem", tls_dir / "ps.key", generated=False)
    out = run_dir / MANAGEMENT_TLS_DIR
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        ca_cert, ca_key = make_ca(f"{job_name} management", _VALIDITY)
        bundle = make_node_cert(ca_cert, ca_key, "enclavefl-management", server_names=_server_names(host),
                                validity=_VALIDITY)
        files = TlsFiles(out / "ca.pem", out / "server.pem", out / "server.key", generated=True)
        write_file(files.ca, bundle.ca_cert_pem, private=False)
        write_file(files.cert, bundle.cert_pem, private=False)
        write_file(files.key, bundle.key_pem, private=True)
    except OSError as exc:
        raise ConfigError(f"{out}: cannot write the management API's certificate: {exc.strerror or exc}") from exc
    log.info("management API: no job CA, made a per-run management CA %s (its key is not kept)", files.ca)
    return files
