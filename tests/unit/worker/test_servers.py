"""Tests for enclavefl.worker.servers: the order in which a worker of a cluster uses its servers."""

from __future__ import annotations

import pytest

from enclavefl.errors import ConfigError, ProtocolError
from enclavefl.messages import WorkerClient
from enclavefl.worker.servers import MAX_SERVERS, ServerList, parse_servers


class _Opened:
    """A connect callable that records the addresses it was asked for (what a TLS channel would reach)."""

    def __init__(self) -> None:
        self.addresses: list[str] = []

    def __call__(self, address: str) -> WorkerClient:
        self.addresses.append(address)
        return None  # type: ignore[return-value]  # the list never uses the client it returns


def test_each_call_after_the_first_goes_to_the_next_server_round_the_list() -> None:
    opened = _Opened()
    servers = ServerList(["a:1", "b:2", "c:3"], opened)

    for _ in range(4):
        servers()

    assert opened.addresses == ["a:1", "b:2", "c:3", "a:1"]
    assert servers.current == "a:1"


def test_following_an_order_with_the_current_server_first_keeps_it_and_fails_over_to_the_new_second() -> None:
    opened = _Opened()
    servers = ServerList(["a:1", "b:2"], opened)
    servers()

    moves = servers.follow(["a:1", "d:4", "b:2"])
    servers()  # the connection to a:1 failed

    assert moves is False
    assert opened.addresses == ["a:1", "d:4"]
    assert servers.addresses == ["a:1", "d:4", "b:2"]


def test_following_an_order_that_puts_another_server_first_moves_there() -> None:
    opened = _Opened()
    servers = ServerList(["a:1", "b:2"], opened)
    servers()

    moves = servers.follow(["d:4", "a:1", "b:2"])
    servers()

    assert moves is True
    assert opened.addresses == ["a:1", "d:4"]


def test_an_order_before_the_first_connection_only_replaces_the_list() -> None:
    opened = _Opened()
    servers = ServerList(["a:1"], opened)

    assert servers.follow(["b:2", "a:1"]) is False
    servers()

    assert opened.addresses == ["b:2"]


@pytest.mark.parametrize("text", ["", "a:1,a:1", "a", "a:0", "a:65536", ":80", "a:x", ",".join(
    f"h{i}:1" for i in range(MAX_SERVERS + 1))])
def test_a_malformed_list_from_a_server_is_refused(text: str) -> None:
    with pytest.raises(ProtocolError, match="cluster.servers"):
        parse_servers(text)


def test_a_list_of_addresses_is_parsed_in_order() -> None:
    assert parse_servers("10.0.0.2:7000, [::1]:7001,host.example:8443") == [
        "10.0.0.2:7000", "[::1]:7001", "host.example:8443"]


@pytest.mark.parametrize("addresses", [[], [""], ["nohost"]])
def test_a_worker_needs_well_formed_addresses(addresses: list[str]) -> None:
    with pytest.raises(ConfigError, match="address"):
        ServerList(addresses, _Opened())
