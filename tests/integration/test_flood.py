"""A flood of unauthenticated calls while a 3-worker attested job runs: same model, bounded PS log.

What is compared: the final checkpoint's tensors, bit for bit, with those of
the same job run without the flood. The job is deterministic apart from the
order in which the PS receives the three updates of a round (process
scheduling, and here the flood, decide it). A weighted mean adds them in that
order, and float addition is not associative, so two honest runs could differ
in the last bit; the job therefore aggregates with the coordinate-wise median,
which picks the middle of three values whatever their order. Each worker's
local training is deterministic (fixed seed, one thread).

The flood comes from this process on loopback: Challenge calls, Joins with
garbage evidence, calls with bogus sessions, and protobuf garbage through a
raw channel, from several connections, some of them short-lived.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from enclavefl.config import parse_job
from enclavefl.proto import PROTOCOL_VERSION
from enclavefl.proto import federation_pb2 as pb
from enclavefl.proto import federation_pb2_grpc as pb_grpc
from enclavefl.server.checkpoint import latest_checkpoint
from enclavefl.transport.attested import fetch_server_certificate
from enclavefl.transport.provisioning import prepare_simulated_attestation
from enclavefl.transport.service import SESSION_METADATA_KEY
from tests.integration.cluster import Cluster, free_port, wait_for

FLOOD_CALLS = 20_000
MAX_PS_LOG_LINES = 200
IN_FLIGHT = 64  # calls a flooding connection keeps open at once
SECTIONS = {
    "job": {"workers": 3, "rounds": 3, "seed": 5},
    "round": {"min_workers": 3, "start_window_s": 60, "update_window_s": 60},
    "server": {"checkpoint_every": 1, "aggregator": {"name": "median"}},
}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


# Protobuf framing around nonsense: an unknown field, and field 1 (protocol_version) with the wrong wire type;
# and bytes that are no message at all (a length running past the end), which the PS must refuse quietly.
GARBAGE = [_varint(1000 << 3 | 2) + _varint(40) + os.urandom(40), _varint(1 << 3 | 2) + _varint(8) + b"\xff" * 8,
           _varint(1 << 3 | 2) + _varint(200) + b"\x00" * 3]


def _flood_calls(channel: grpc.Channel) -> list[Callable[[], grpc.Future]]:
    """One of each kind of unauthenticated call, bound to ``channel``, each returning a future."""
    stub = pb_grpc.FederationStub(channel)  # type: ignore[no-untyped-call]
    raw_join = channel.unary_unary("/enclavefl.v1.Federation/Join")
    raw_wait = channel.unary_unary("/enclavefl.v1.Federation/WaitTask")
    raw_challenge = channel.unary_unary("/enclavefl.v1.Federation/Challenge")
    junk = pb.JoinRequest(protocol_version=PROTOCOL_VERSION, worker_name="flood", num_samples=1,
                          attestation=pb.JoinAttestation(certificate=b"-----BEGIN CERTIFICATE-----\nAAAA\n",
                                                         nonce=os.urandom(56), ps_cert_sha256=os.urandom(32),
                                                         signature=os.urandom(70)))
    bogus = ((SESSION_METADATA_KEY, "bogus-session-token"),)
    return [
        lambda: stub.Challenge.future(pb.ChallengeRequest(protocol_version=PROTOCOL_VERSION), timeout=10),
        lambda: stub.Join.future(junk, timeout=10),
        lambda: stub.WaitTask.future(pb.WaitTaskRequest(protocol_version=PROTOCOL_VERSION, worker_id="w-x",
                                                        max_wait_s=0.0), timeout=10, metadata=bogus),
        lambda: stub.Heartbeat.future(pb.HeartbeatRequest(protocol_version=PROTOCOL_VERSION, worker_id="w-x"),
                                      timeout=10, metadata=bogus),
        lambda: raw_join.future(GARBAGE[0], timeout=10),
        lambda: raw_wait.future(GARBAGE[1], timeout=10, metadata=bogus),
        lambda: raw_challenge.future(GARBAGE[2], timeout=10),
    ]


class Flooder:
    """Makes ``total`` unauthenticated calls to the PS from a thread, counting the answers by status code."""

    def __init__(self, target: str, total: int) -> None:
        cert = fetch_server_certificate(target)
        self._credentials = grpc.ssl_channel_credentials(root_certificates=cert)
        self._target = target
        self._total = total
        self.codes: Counter[grpc.StatusCode] = Counter()
        self.sent = 0
        self._thread = threading.Thread(target=self._run, name="flooder", daemon=True)
        self._thread.start()

    def _channel(self) -> grpc.Channel:
        return grpc.secure_channel(self._target, self._credentials, options=[
            ("grpc.ssl_target_name_override", "enclavefl-ps"), ("grpc.use_local_subchannel_pool", 1)])

    def _run(self) -> None:
        # Batches of calls on a connection, then a new connection: 100 connections over the flood.
        per_connection = self._total // 100
        while self.sent < self._total:
            with self._channel() as channel:
                calls = itertools.cycle(_flood_calls(channel))
                batch = min(per_connection, self._total - self.sent)
                futures: list[grpc.Future] = []
                for _ in range(batch):
                    futures.append(next(calls)())
                    self.sent += 1
                    if len(futures) >= IN_FLIGHT:
                        self._settle(futures)
                self._settle(futures)

    def _settle(self, futures: list[grpc.Future]) -> None:
        for future in futures:
            self.codes[future.code()] += 1  # blocks until answered
        futures.clear()

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), f"the flood did not end within {timeout_s}s ({self.sent} sent)"


def start_workers(c: Cluster, port: int) -> None:
    for i in range(3):
        c.start_worker(i, port)


def final_model(c: Cluster) -> dict[str, np.ndarray]:
    codes = c.wait_all(120)
    assert set(codes.values()) == {0}, {name: (code, c.log(name)[-2000:]) for name, code in codes.items()}
    ckpt = latest_checkpoint(c.root / "checkpoints")
    assert ckpt is not None and ckpt.round == SECTIONS["job"]["rounds"]
    return {name: np.asarray(value) for name, value in ckpt.params.items()}


def make(make_cluster: type[Cluster], root: Path) -> Cluster:
    root.mkdir(parents=True)
    config = parse_job({**SECTIONS, "attestation": {"mode": "simulated"}})
    sim_root, policy, _, _ = prepare_simulated_attestation(root, config)
    return make_cluster.create(root, **SECTIONS, attestation={"mode": "simulated", "policy": policy,
                                                              "sim_root": sim_root})


def test_a_flood_of_unauthenticated_calls_changes_neither_the_model_nor_the_log_size(
    tmp_path: Path, make_cluster: type[Cluster]
) -> None:
    # The two jobs run side by side (wall time); the flood reaches only the second PS.
    quiet, flooded = make(make_cluster, tmp_path / "quiet"), make(make_cluster, tmp_path / "flooded")
    quiet_port, flooded_port = free_port(), free_port()
    quiet.start_ps(quiet_port)
    flooded.start_ps(flooded_port)
    flooder = Flooder(f"127.0.0.1:{flooded_port}", FLOOD_CALLS)
    wait_for(lambda: flooder.sent >= 1000, 30, "the flood to start")
    start_workers(quiet, quiet_port)
    start_workers(flooded, flooded_port)

    quiet_model = final_model(quiet)
    flooded_model = final_model(flooded)
    flooder.join(60)

    assert sorted(flooded_model) == sorted(quiet_model)
    for name in quiet_model:
        np.testing.assert_array_equal(flooded_model[name], quiet_model[name], err_msg=name)
    # The PS answered the flood (refusals), up to its end: calls still in flight when it stopped are UNAVAILABLE.
    answered = sum(n for code, n in flooder.codes.items() if code != grpc.StatusCode.UNAVAILABLE)
    assert flooder.sent == FLOOD_CALLS and answered >= FLOOD_CALLS // 2, flooder.codes
    assert flooder.codes[grpc.StatusCode.RESOURCE_EXHAUSTED] > FLOOD_CALLS // 4, flooder.codes
    ps_log = flooded.log("ps").splitlines()
    assert len(ps_log) < MAX_PS_LOG_LINES, "\n".join(ps_log[-50:])
    assert any("refused calls from" in line for line in ps_log)  # the flood was summed up, not hidden
    assert not any("Traceback" in line for line in ps_log), "\n".join(ps_log[-50:])
