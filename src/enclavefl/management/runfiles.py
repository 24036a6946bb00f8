"""The management API's files in a run directory, and reading them back (no web framework needed).

``management.json`` records where a running API listens and which CA its
certificate chains to; ``management.token`` holds the job's bearer token
(mode 0600). The PS writes both when its API starts
(:mod:`enclavefl.management.serve`); the CLI and ``enclavefl run`` read them
here, without loading FastAPI or uvicorn.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from enclavefl.errors import ConfigError

__all__ = ["MANAGEMENT_FILE", "TOKEN_FILE", "ManagementInfo", "read_management_info", "write_file"]

MANAGEMENT_FILE: Final = "management.json"
"""The running API's URL, port, pid and CA file, in the run directory (removed when it stops)."""

TOKEN_FILE: Final = "management.token"
"""The job's bearer token, in the run directory (mode 0600)."""


def write_file(path: Path, data: bytes, *, private: bool) -> None:
    """Replaces ``path`` with ``data`` at once (a reader sees the old file or the new one, never a part).

    The temporary file is created with its final mode (0600 when ``private``), so a
    secret is never readable by another user, even for a moment.

    Raises:
        OSError: the file cannot be written (the temporary file is removed).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


@dataclass(frozen=True, slots=True)
class ManagementInfo:
    """What ``management.json`` says about a running API."""

    url: str
    port: int
    pid: int
    ca: Path
    """The CA file to verify the API's certificate against."""
    token_file: Path


def read_management_info(run_dir: Path) -> ManagementInfo:
    """The management API of the run in ``run_dir``, as its ``management.json`` records it.

    Raises:
        ConfigError: there is no such file (no API runs there), or it is malformed.
    """
    path = run_dir / MANAGEMENT_FILE
    try:
        doc = json.loads(path.read_text())
        return ManagementInfo(url=str(doc["url"]), port=int(doc["port"]), pid=int(doc["pid"]),
                              ca=run_dir / str(doc["ca"]), token_file=run_dir / str(doc["token_file"]))
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no management API runs for {run_dir} (is the job running, with "
                          "management.enabled?)") from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: cannot read the management API's record: {exc}") from exc
