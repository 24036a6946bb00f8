"""Deployment mistakes caught at join, in this process: differing job settings, another CA, a taken port."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization

from enclavefl.errors import ConfigError, TransportError
from enclavefl.messages import JoinInfo, PeerIdentity, TaskInfo, TaskKind, UpdateMeta, UpdateSink
from enclavefl.tensors import ParamSet
from enclavefl.transport.certs import make_ca, make_node_cert
from enclavefl.transport.client import FederationClient
from enclavefl.transport.credentials import CaCredentials
from enclavefl.transport.service import FederationServer

CHUNK = 4096
PS_SETTINGS = {"job.seed": "aaaa", "task.params": "bbbb", "model": "cccc"}


class JoinOnly:
    """A handler that admits every join and records the names."""

    def __init__(self) -> None:
        self.joined: list[str] = []

    def join(self, peer: PeerIdentity, worker_name: str, num_samples: int) -> JoinInfo:
        self.joined.append(worker_name)
        return JoinInfo(f"id-{worker_name}", "job", "ps-1", 3)

    def wait_task(self, peer: PeerIdentity, worker_id: str, max_wait_s: float) -> TaskInfo:
        return TaskInfo(kind=TaskKind.WAIT, ps_instance="ps-1")

    def model_for(self, peer: PeerIdentity, worker_id: str, model_version: int) -> tuple[int, ParamSet]:
        return 0, ParamSet({"w": np.zeros(2, np.float32)})

    def open_update(self, peer: PeerIdentity, meta: UpdateMeta) -> UpdateSink:
        raise NotImplementedError

    def leave(self, peer: PeerIdentity, worker_id: str, reason: str) -> None:
        pass


def _pki(name: str, server_names: tuple[str, ...] = ("enclavefl-ps",)) -> tuple[CaCredentials, CaCredentials]:
    ca_cert, ca_key = make_ca(name)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    ps = make_node_cert(ca_cert, ca_key, "enclavefl ps", server_names=server_names)
    worker = make_node_cert(ca_cert, ca_key, "enclavefl worker-0")
    return CaCredentials(ca_pem, ps.cert_pem, ps.key_pem), CaCredentials(ca_pem, worker.cert_pem, worker.key_pem)


@pytest.fixture(scope="module")
def pki() -> tuple[CaCredentials, CaCredentials]:
    return _pki("join-checks")


@pytest.fixture
def server(pki: tuple[CaCredentials, CaCredentials]) -> Iterator[tuple[JoinOnly, str]]:
    handler = JoinOnly()
    running = FederationServer.start(handler, pki[0], listen="127.0.0.1:0", chunk_bytes=CHUNK, max_threads=4,
                                     job_settings=PS_SETTINGS)
    try:
        yield handler, f"127.0.0.1:{running.port}"
    finally:
        running.stop(0.5)


def test_join_with_differing_settings_is_refused_naming_the_keys(
    server: tuple[JoinOnly, str], pki: tuple[CaCredentials, CaCredentials]
) -> None:
    handler, target = server
    theirs = dict(PS_SETTINGS, **{"task.params": "dddd", "model": "eeee"})

    with FederationClient(target, pki[1], chunk_bytes=CHUNK) as client:
        with pytest.raises(ConfigError, match=r"job settings differ from the PS's in model, task\.params:"):
            client.join("w", 10, job_settings=theirs)
    assert handler.joined == []


def test_join_with_the_same_settings_or_none_is_admitted(
    server: tuple[JoinOnly, str], pki: tuple[CaCredentials, CaCredentials]
) -> None:
    handler, target = server

    with FederationClient(target, pki[1], chunk_bytes=CHUNK) as client:
        client.join("same", 10, job_settings=dict(PS_SETTINGS))
        client.join("older", 10)  # a worker of an older release sends none

    assert handler.joined == ["same", "older"]


def test_a_ps_certificate_from_another_ca_is_a_configuration_error(server: tuple[JoinOnly, str]) -> None:
    _, target = server
    _, stranger = _pki("another-job")

    with FederationClient(target, stranger, chunk_bytes=CHUNK) as client:
        with pytest.raises(ConfigError, match="the PS certificate failed verification .*not from this node's CA"):
            client.join("w", 10)


def test_a_ps_certificate_without_the_checked_name_is_a_configuration_error(
    server: tuple[JoinOnly, str], pki: tuple[CaCredentials, CaCredentials]
) -> None:
    _, target = server
    worker = pki[1]
    renamed = CaCredentials(worker._ca, worker._cert, worker._key, server_name="ps.example.org")

    with FederationClient(target, renamed, chunk_bytes=CHUNK) as client:
        with pytest.raises(ConfigError, match=r"does not hold the name this node checks \(transport.tls.server_name\)"):
            client.join("w", 10)


def test_a_port_in_use_is_a_transport_error_naming_it(pki: tuple[CaCredentials, CaCredentials]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        with pytest.raises(TransportError, match=f"cannot listen on 127.0.0.1:{port}: the port is in use"):
            FederationServer.start(JoinOnly(), pki[0], listen=f"127.0.0.1:{port}", chunk_bytes=CHUNK)
