"""The servers a worker of a cluster may use, in the order it tries them, as the cluster reorders them.

How this works: a :class:`ServerList` is the worker's client factory. Each
call opens a connection to one address: the first call to the first address,
every later call (the worker calls again only after its connection failed or
its server no longer knew it) to the next one, round the list. A cluster
server's WAIT answers name the worker's servers in the cluster's order
(:data:`~enclavefl.messages.CLUSTER_SERVERS_KEY`, rendezvous hashing over the
live servers): :meth:`ServerList.follow` takes that list, so a worker learns
servers started after it and forgets drained ones, and says whether the
worker should move because its server is no longer first (a server was
added, and this worker is one of the few it takes).

A list from a server is only a routing hint: every connection verifies the
server it reaches (RA-TLS against the job's policy) before anything is sent,
so a server can send a worker nowhere but to another server of the job.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from enclavefl.errors import ConfigError, ProtocolError
from enclavefl.messages import WorkerClient

__all__ = ["MAX_SERVERS", "ServerList", "parse_servers"]

log = logging.getLogger(__name__)

MAX_SERVERS = 256
"""The most addresses a list may hold (``cluster.servers``' own limit)."""

_MAX_ADDRESS = 262
"""A host name (253) plus ``:`` and a port; longer is not an address."""


def _check(address: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not host or len(address) > _MAX_ADDRESS or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address[:80]!r} is not HOST:PORT")
    return address


def parse_servers(text: str) -> list[str]:
    """The addresses of a ``cluster.servers`` value (``HOST:PORT`` separated by commas).

    Raises:
        ProtocolError: empty, more than :data:`MAX_SERVERS` addresses, a malformed or repeated address.
    """
    parts = [p.strip() for p in text.split(",")] if text else []
    if not parts or len(parts) > MAX_SERVERS:
        raise ProtocolError(f"cluster.servers: {len(parts)} addresses, expected 1..{MAX_SERVERS}")
    try:
        addresses = [_check(p) for p in parts]
    except ValueError as exc:
        raise ProtocolError(f"cluster.servers: {exc}") from None
    if len(set(addresses)) != len(addresses):
        raise ProtocolError("cluster.servers: an address is listed twice")
    return addresses


class ServerList:
    """A worker's client factory over several servers (see the module docstring).

    Args:
        addresses: ``HOST:PORT`` of each server, the worker's own first.
        connect: opens a connection to one address (a fresh TLS channel in a deployment).

    Raises:
        ConfigError: no address, or a malformed one.
    """

    def __init__(self, addresses: Sequence[str], connect: Callable[[str], WorkerClient]) -> None:
        try:
            checked = [_check(a) for a in addresses]
        except ValueError as exc:
            raise ConfigError(f"expected server addresses as HOST:PORT: {exc}") from None
        if not checked:
            raise ConfigError("expected at least one server address (HOST:PORT), got none")
        self._addresses = checked
        self._connect = connect
        self._next = 0
        self._current: str | None = None
        self._lock = threading.Lock()

    @property
    def addresses(self) -> list[str]:
        with self._lock:
            return list(self._addresses)

    @property
    def current(self) -> str | None:
        """The address of the last connection opened (None before the first)."""
        with self._lock:
            return self._current

    def __call__(self) -> WorkerClient:
        with self._lock:
            address = self._addresses[self._next % len(self._addresses)]
            moved = self._current is not None and len(self._addresses) > 1
            position = self._next % len(self._addresses) + 1
            self._next = position % len(self._addresses)
            self._current = address
            total = len(self._addresses)
        if moved:
            log.info("connecting to server %s (target %d of %d)", address, position, total,
                     extra={"event": "failover"})
        return self._connect(address)

    def follow(self, addresses: Sequence[str]) -> bool:
        """Takes the cluster's order of this worker's servers; True when the worker should move to the first.

        The next connection goes to the first address when moving; else, after a failure, to the one
        after the current server in the new order.
        """
        if not addresses:
            raise ConfigError("a worker needs at least one server address, got none")
        with self._lock:
            self._addresses = list(addresses)
            if self._current is None:
                self._next = 0
                return False
            if self._current == self._addresses[0]:
                self._next = 1 % len(self._addresses)
                return False
            self._next = 0
            return True
