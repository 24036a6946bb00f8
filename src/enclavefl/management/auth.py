"""Who may use the management API: one bearer token per job, checked in constant time.

How this works: the PS makes a random token when it starts its management
API (:func:`generate_token`) and writes it to the run directory, readable by
its owner only (:func:`write_token`). A request carries it as
``Authorization: Bearer <token>``. Control routes (stop, pause, resume,
config changes) always need it; read routes need it unless the job sets
``management.public_read: true``. A request without the right token gets 401
and an audit line: the first refusals of a caller go to the run's
``audit.jsonl`` (when one is given) and to the log, then a bucket per caller
limits the file lines and :class:`~enclavefl.transport.ratelimit.RefusalLog`
sums up the rest, so a flood of bad tokens costs a bounded number of lines.
The token itself is never logged.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import threading
from pathlib import Path
from typing import Final, final

from enclavefl.errors import ConfigError
from enclavefl.management.runfiles import write_file
from enclavefl.transport.audit import AuditLog, AuditRecord
from enclavefl.transport.ratelimit import ConnectionLimiter, RefusalLog

__all__ = ["TokenGuard", "bearer_token", "generate_token", "read_token", "write_token"]

log = logging.getLogger(__name__)

_TOKEN_BYTES = 32
_MAX_TOKEN_CHARS = 512
"""A longer Authorization value is refused before it is compared."""


def generate_token() -> str:
    """A fresh random token (256 bits, URL-safe text)."""
    return secrets.token_urlsafe(_TOKEN_BYTES)


def write_token(path: Path, token: str) -> None:
    """Writes ``token`` to ``path``, mode 0600, replacing any earlier token at once.

    The file is created 0600 before the token is written, so no other user can
    read it even for a moment; a token left by an earlier run is replaced.

    Raises:
        ConfigError: the file cannot be written.
    """
    try:
        write_file(path, (token + "\n").encode(), private=True)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write the management token: {exc.strerror or exc}") from exc


def read_token(path: Path) -> str:
    """The token stored in ``path``.

    Raises:
        ConfigError: the file is missing, unreadable or empty.
    """
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the management token: {exc.strerror or exc}") from exc
    if not token:
        raise ConfigError(f"{path}: the management token file is empty")
    return token


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value; None when there is none."""
    if not authorization or len(authorization) > _MAX_TOKEN_CHARS:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


@final
class TokenGuard:
    """Decides whether a request may use a route, and records every refusal (bounded)."""

    def __init__(self, token: str, *, public_read: bool = False, audit: AuditLog | None = None,
                 node: str = "ps") -> None:
        """Keeps the job's token.

        Args:
            token: the job's token (from :func:`generate_token`).
            public_read: read routes need no token (control routes always do).
            audit: the run's audit log; None logs refusals only.
            node: the deciding node's name in audit records.

        Raises:
            ValueError: the token is empty.
        """
        if not token:
            raise ValueError("TokenGuard: the token must not be empty")
        self._token = token.encode()
        self.public_read = public_read
        self._audit = audit
        self._node = node
        self._audit_budget = ConnectionLimiter(rate_per_s=0.2, burst=5.0, max_connections=1024)
        self._refusals = RefusalLog(log, what="refused management requests")
        self._lock = threading.Lock()
        self._refused = 0

    @property
    def refusals(self) -> int:
        """Requests refused since the start."""
        with self._lock:
            return self._refused

    def valid(self, authorization: str | None) -> bool:
        """Whether ``authorization`` (a header value) carries this job's token; constant time in its content."""
        presented = bearer_token(authorization)
        # compare_digest takes as long for a near miss as for a wild guess: no timing hint at the token.
        return presented is not None and hmac.compare_digest(presented.encode(), self._token)

    def allows(self, authorization: str | None, *, control: bool) -> bool:
        """Whether a request with ``authorization`` may use a read (``control=False``) or control route."""
        if not control and self.public_read:
            return True
        return self.valid(authorization)

    def refuse(self, peer: str, route: str, authorization: str | None) -> str:
        """Records one refused request and returns the reason to send back (naming no secret).

        Args:
            peer: the caller's address (``host:port``).
            route: method and path (``POST /api/v1/stop``).
            authorization: the header value it sent (only its presence and scheme are recorded).
        """
        if authorization is None:
            why = "no bearer token"
        elif bearer_token(authorization) is None:
            why = "an Authorization header that is not 'Bearer <token>'"
        else:
            why = "a token that is not this job's"
        reason = f"management API: {route} with {why}: 401"
        host = peer.rpartition(":")[0] or peer
        with self._lock:
            self._refused += 1
        if self._audit is not None and self._audit_budget.allow(host):
            # AuditLog writes the file line and a rate-limited log line of its own.
            self._audit.record(AuditRecord(node=self._node, role="management", peer=peer, decision="refused",
                                           reason=reason, field="token", evidence="none"))
        else:
            self._refusals.refused(host, "401 " + route, f"{reason} (from {peer})")
        return f"{route} needs this job's bearer token (Authorization: Bearer <token>); got {why}"

    def close(self) -> None:
        """Writes the pending summary of refusals. Idempotent."""
        self._refusals.close()
