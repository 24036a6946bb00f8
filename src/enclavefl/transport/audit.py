"""The attestation audit log: one JSON line and one log line per trust decision.

Every time a node accepts or refuses a peer's evidence it records who decided
(node, role), about whom (peer), what the peer claimed or proved (mr_enclave,
mr_signer, isv_prod_id, isv_svn, simulated or not) and why. The JSON lines go
to a file in the run directory (``audit.jsonl``); several processes may append
to the same file, each record being one ``write`` on an ``O_APPEND`` descriptor.
Nothing secret is recorded: no keys, no session tokens, no full quotes.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from enclavefl.errors import ConfigError
from enclavefl.transport.ratelimit import RefusalLog

__all__ = ["AuditListener", "AuditLog", "AuditRecord"]

log = logging.getLogger(__name__)

_NOT_A_TEE = "SIMULATED evidence, NOT A REAL TEE"


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One trust decision.

    Attributes:
        node: the deciding node's name.
        role: ``ps`` or ``worker``.
        peer: whom the decision is about (an address or a worker name and fingerprint prefix).
        decision: ``accepted`` or ``refused``.
        reason: why (for a refusal, the failed field, expected and actual values).
        field: the field that failed ("" when accepted).
        evidence: ``simulated``, ``sgx``, ``tdx`` or ``unknown`` (evidence that did not parse).
        simulated: the evidence chains to a simulated root (NOT A REAL TEE).
        mr_enclave: hex; proved when accepted, only claimed when refused ("" if unreadable).
        mr_signer: hex, as ``mr_enclave``.
        isv_prod_id: as claimed or proved (-1 if unreadable).
        isv_svn: as claimed or proved (-1 if unreadable).
        weaker: the policy allowances an acceptance relied on (``missing_collateral``,
            ``outdated_tcb``, ``provision_key``); empty for a full verdict.
    """

    node: str
    role: str
    peer: str
    decision: Literal["accepted", "refused"]
    reason: str
    field: str = ""
    evidence: str = "unknown"
    simulated: bool = False
    mr_enclave: str = ""
    mr_signer: str = ""
    isv_prod_id: int = -1
    isv_svn: int = -1
    weaker: tuple[str, ...] = ()


AuditListener = Callable[["AuditRecord"], None]
"""Hears each decision as it is recorded (the PS's event stream for its management plane)."""


class AuditLog:
    """Appends :class:`AuditRecord` s to a JSON lines file (optional) and to the module logger.

    Listeners (:meth:`subscribe`) hear every decision too, on the thread that made it.
    """

    def __init__(self, path: Path | None = None) -> None:
        """Opens ``path`` for appending (created with mode 0600 if missing); None logs only.

        Raises:
            ConfigError: the file cannot be opened.
        """
        self.path = path
        self._refusals = RefusalLog(log, what="more refusals (each in the audit file)")
        self._lock = threading.Lock()
        self._listeners: list[AuditListener] = []
        self._fd: int | None = None
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            except OSError as exc:
                raise ConfigError(f"{path}: cannot open the audit log: {exc.strerror or exc}") from exc

    def subscribe(self, listener: AuditListener) -> None:
        """Calls ``listener`` with each later decision, on the deciding thread (keep it short, never block)."""
        with self._lock:
            self._listeners.append(listener)

    def _tell(self, entry: AuditRecord) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(entry)
            except Exception:  # the decision stands whatever a listener does
                log.exception("audit: a listener failed on a decision about %s; ignored", entry.peer)

    def record(self, entry: AuditRecord) -> None:
        """Writes one decision and tells the listeners. A failed file write or listener is logged, never raised
        (the decision stands)."""
        self._tell(entry)
        tee = f" -- {_NOT_A_TEE}" if entry.simulated else ""
        if entry.weaker:
            tee += f" -- WEAKER VERDICT ({', '.join(entry.weaker)})"
        args = (entry.node, entry.role, entry.decision, entry.peer, entry.evidence, entry.mr_enclave[:16] or "-",
                entry.mr_signer[:16] or "-", entry.reason, tee)
        message = "audit: %s (%s) %s peer %s: evidence %s mr_enclave=%s mr_signer=%s: %s%s"
        if entry.decision == "accepted":
            (log.warning if entry.weaker else log.info)(message, *args)
        else:  # every refusal goes to the file; the log gets a bounded number of lines (peers can cause them)
            self._refusals.refused(entry.peer, entry.field or "refused", message % args)
        if self._fd is None:
            return
        row = {"time": round(time.time(), 3), **asdict(entry)}
        if entry.simulated:
            row["note"] = _NOT_A_TEE
        line = (json.dumps(row, sort_keys=True) + "\n").encode()
        with self._lock:
            try:
                os.write(self._fd, line)
            except OSError as exc:
                log.error("audit: cannot write %s: %s", self.path, exc)

    def close(self) -> None:
        """Closes the file, after logging a pending summary of refusals. Idempotent."""
        self._refusals.close()
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
