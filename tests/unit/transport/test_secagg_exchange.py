"""Secure aggregation over real gRPC with attested (simulated) workers, and its refusals audited."""

from __future__ import annotations

import datetime as dt
import json
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from enclavefl.attest.ratls import RatlsIdentity, create_ratls_identity
from enclavefl.config import parse_job
from enclavefl.errors import ProtocolError
from enclavefl.privacy.secagg.client import SecAggClient
from enclavefl.privacy.secagg.messages import KeyAdvert, Roster, RoundTag, ShareCiphertext, advert_payload
from enclavefl.privacy.secagg.params import SecAggParams
from enclavefl.privacy.secagg.stages import SecAggAnswer, SecAggCall
from enclavefl.proto import PROTOCOL_VERSION
from enclavefl.proto import federation_pb2 as pb
from enclavefl.proto import federation_pb2_grpc as pb_grpc
from enclavefl.server.ps import ParameterServer
from enclavefl.tensors import ParamSet
from enclavefl.transport.attested import AttestedCredentials
from enclavefl.transport.audit import AuditLog
from enclavefl.transport.secagg_wire import answer_from_proto, answer_to_proto, call_from_proto, call_to_proto
from enclavefl.transport.service import SESSION_METADATA_KEY, FederationServer, handler_threads
from enclavefl.worker import Worker, WorkerSettings
from enclavefl.worker.runtime import grpc_client_factory
from enclavefl.worker.secagg import POLL_S
from tests.unit.transport.attested_server import CHUNK, RunningPs, Sim, challenge, join, make_sim, wait_task
from tests.unit.worker.federation import AddTrainer


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Sim:
    return make_sim(tmp_path_factory.mktemp("sim"))


def start_secagg_ps(tmp: Path, sim: Sim, workers: int = 3, *, rounds: int = 1, threads: int = 16) -> RunningPs:
    config = parse_job({
        "job": {"name": "sa", "rounds": rounds, "workers": workers},
        "round": {"min_workers": workers, "start_window_s": 20, "update_window_s": 20},
        "privacy": {"secure_aggregation": {"enabled": True, "rounding": "deterministic", "stage_timeout_s": 10}},
    })
    ps = ParameterServer(config, ParamSet([("w", np.zeros(4, np.float32))]), out_dir=tmp)
    audit_path = tmp / "ps-audit.jsonl"
    creds = AttestedCredentials.create(sim.provider, sim.policy, node="ps", role="ps", audit=AuditLog(audit_path))
    server = FederationServer.start(ps, creds, listen="127.0.0.1:0", chunk_bytes=CHUNK, max_threads=threads)
    return RunningPs(ps, server, creds, audit_path)


def test_three_attested_workers_complete_a_secure_round_over_grpc(tmp_path: Path, sim: Sim) -> None:
    running = start_secagg_ps(tmp_path, sim)
    steps = [(1.0, 1), (2.0, 1), (-0.5, 2)]  # weighted mean: (1 + 2 - 1) / 4 = 0.5
    workers = [
        Worker(grpc_client_factory(running.target, AttestedCredentials.create(
                   sim.provider, sim.policy, node=f"w{i}", role="worker", audit=AuditLog(tmp_path / f"w{i}.jsonl")),
                   chunk_bytes=CHUNK),
               AddTrainer(step, n), WorkerSettings(name=f"w{i}", poll_s=0.2))
        for i, (step, n) in enumerate(steps)
    ]
    threads = [threading.Thread(target=running.ps.run, daemon=True),
               *(threading.Thread(target=w.run, daemon=True) for w in workers)]
    try:
        for t in threads:
            t.start()
        threads[0].join(60)
    finally:
        running.ps.stop()
        running.server.stop(0.1)
    assert [w.rounds_done for w in workers] == [1, 1, 1]
    np.testing.assert_allclose(running.ps.params["w"], 0.5, atol=8.0 / 32767)


def test_a_ps_with_the_handler_threads_its_workers_need_never_lets_a_stage_wait_out_a_poll(
        tmp_path: Path, sim: Sim) -> None:
    # A stage call holds a handler thread until every worker posted: with a fixed pool smaller than the
    # job (128 threads, any job.workers up to 1024) the last posts queued behind the waits until those
    # timed out, one poll each (24 workers on 16 threads: 10.5 s a round instead of 0.5 s).
    workers = 24
    running = start_secagg_ps(tmp_path, sim, workers, rounds=2, threads=handler_threads(workers))
    clients = [
        Worker(grpc_client_factory(running.target, AttestedCredentials.create(
                   sim.provider, sim.policy, node=f"w{i}", role="worker", audit=AuditLog(tmp_path / f"w{i}.jsonl")),
                   chunk_bytes=CHUNK),
               AddTrainer(1.0, 1), WorkerSettings(name=f"w{i}", poll_s=0.2))
        for i in range(workers)
    ]
    threads = [threading.Thread(target=w.run, daemon=True) for w in clients]
    try:
        for t in threads:
            t.start()
        running.ps.run()
    finally:
        running.ps.stop()
        running.server.stop(0.1)
    times = [float(row["time"]) for row in running.ps.metrics.history]
    assert [row["secagg_survivors"] for row in running.ps.metrics.history] == [workers, workers]
    assert times[1] - times[0] < POLL_S  # the second round waited out no stage poll


def _joined(running: RunningPs, sim: Sim, channels: list[grpc.Channel]) -> list[tuple[pb.JoinReply, RatlsIdentity]]:
    out = []
    for i, channel in enumerate(channels):
        ident = create_ratls_identity(sim.provider, common_name=f"w{i}", validity=dt.timedelta(hours=1))
        out.append((join(channel, running, ident.cert_pem, ident.key, challenge(channel), name=f"w{i}"), ident))
    return out


def _exchange(channel: grpc.Channel, token: str, request: pb.SecAggRequest) -> pb.SecAggReply:
    stub = pb_grpc.FederationStub(channel)  # type: ignore[no-untyped-call]
    reply: pb.SecAggReply = stub.SecAggExchange(request, timeout=5, metadata=((SESSION_METADATA_KEY, token),))
    return reply


def _refusals(running: RunningPs) -> list[dict[str, object]]:
    lines = running.audit_path.read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["decision"] == "refused" and str(r["field"]).startswith("secagg")]


def test_forged_and_replayed_key_adverts_are_refused_and_audited(tmp_path: Path, sim: Sim) -> None:
    running = start_secagg_ps(tmp_path, sim)
    ps_thread = threading.Thread(target=running.ps.run, daemon=True)
    ps_thread.start()
    channels = [running.channel() for _ in range(3)]
    try:
        joined = _joined(running, sim, channels)
        (reply0, ident0), (reply1, _) = joined[0], joined[1]
        task = wait_task(channels[0], reply0.worker_id, reply0.session_token)
        for _ in range(100):
            if task.kind == pb.Task.TRAIN:
                break
            task = wait_task(channels[0], reply0.worker_id, reply0.session_token)
        nonce = bytes.fromhex(task.config["secagg.nonce"].text)
        tag = RoundTag(task.round, nonce)
        keys = (b"\x09" * 32, b"\x05" * 32)

        def advert(sender: str, signature: bytes) -> pb.SecAggRequest:
            return call_to_proto(SecAggCall(sender, task.round, nonce, "advertise",
                                            advert=KeyAdvert(sender, *keys, signature),
                                            certificate=ident0.cert_pem, max_wait_s=0))

        # Forged: worker 0's certificate, but the signature is not by its key.
        with pytest.raises(grpc.RpcError) as forged:
            _exchange(channels[0], reply0.session_token, advert(reply0.worker_id, b"\x30\x06\x02\x01\x01\x02\x01\x01"))
        # Replayed from another round: signed by worker 0, but over round 99's tag.
        old = ident0.key.sign(advert_payload(RoundTag(99, nonce), reply0.worker_id, *keys),
                              ec.ECDSA(hashes.SHA256()))
        with pytest.raises(grpc.RpcError) as replayed:
            _exchange(channels[0], reply0.session_token, advert(reply0.worker_id, old))
        # Replayed under another sender: worker 0's valid signature and certificate on worker 1's session.
        valid = ident0.key.sign(advert_payload(tag, reply1.worker_id, *keys), ec.ECDSA(hashes.SHA256()))
        with pytest.raises(grpc.RpcError) as relabelled:
            _exchange(channels[1], reply1.session_token, advert(reply1.worker_id, valid))
    finally:
        running.ps.stop()
        for channel in channels:
            channel.close()
        running.server.stop(0.1)
    for info in (forged, replayed, relabelled):
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "forged or replayed" in (forged.value.details() or "")
    assert "forged or replayed" in (replayed.value.details() or "")
    assert "other than the one bound at its join" in (relabelled.value.details() or "")
    refusals = _refusals(running)
    assert len(refusals) == 3 and all(r["field"] == "secagg.advertise" for r in refusals)


def test_a_share_bundle_posted_under_another_workers_session_is_refused_and_audited(tmp_path: Path, sim: Sim) -> None:
    running = start_secagg_ps(tmp_path, sim)
    ps_thread = threading.Thread(target=running.ps.run, daemon=True)
    ps_thread.start()
    channels = [running.channel() for _ in range(3)]
    try:
        joined = _joined(running, sim, channels)
        tasks = []
        for channel, (reply, _) in zip(channels, joined):
            task = wait_task(channel, reply.worker_id, reply.session_token)
            while task.kind != pb.Task.TRAIN:
                task = wait_task(channel, reply.worker_id, reply.session_token)
            tasks.append(task)
        nonce = bytes.fromhex(tasks[0].config["secagg.nonce"].text)
        tag = RoundTag(tasks[0].round, nonce)
        params = SecAggParams()
        clients = []
        for (reply, ident), channel in zip(joined, channels):
            sign = (lambda key: lambda payload: key.sign(payload, ec.ECDSA(hashes.SHA256())))(ident.key)
            client = SecAggClient(reply.worker_id, tag, params, sign, lambda *a: True)
            clients.append(client)
            post = SecAggCall(reply.worker_id, tag.round, nonce, "advertise", advert=client.advertise(),
                              certificate=ident.cert_pem, max_wait_s=0)
            _exchange(channel, reply.session_token, call_to_proto(post))
        poll = call_to_proto(SecAggCall(joined[0][0].worker_id, tag.round, nonce, "advertise", poll=True,
                                        max_wait_s=5))
        answer = answer_from_proto(_exchange(channels[0], joined[0][0].session_token, poll),
                                   call_from_proto(poll))
        bundle = clients[0].share(Roster(tag, answer.roster))
        # Worker 0's bundle, replayed by worker 1 (its session): the PS refuses a bundle under another name.
        replay = call_to_proto(SecAggCall(joined[1][0].worker_id, tag.round, nonce, "share", shares=tuple(bundle),
                                          max_wait_s=0))
        with pytest.raises(grpc.RpcError) as refused:
            _exchange(channels[1], joined[1][0].session_token, replay)
    finally:
        running.ps.stop()
        for channel in channels:
            channel.close()
        running.server.stop(0.1)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "another sender's name" in (refused.value.details() or "")
    assert [r["field"] for r in _refusals(running)] == ["secagg.share"]


def test_wire_refuses_a_sealed_share_of_the_wrong_size_and_unknown_stages() -> None:
    call = SecAggCall("w0", 1, b"\x01" * 16, "share", shares=(ShareCiphertext("w0", "w1", b"\x00" * 94),))
    assert call_from_proto(call_to_proto(call)) == call
    bad = call_to_proto(SecAggCall("w0", 1, b"\x01" * 16, "share", shares=(ShareCiphertext("w0", "w1", b"x"),)))
    with pytest.raises(ProtocolError, match="a sealed share is 94 bytes, got 1"):
        call_from_proto(bad)
    other = pb.SecAggRequest(protocol_version=PROTOCOL_VERSION, worker_id="w0", nonce=b"\x01" * 16, stage="peek")
    with pytest.raises(ProtocolError, match="unknown stage 'peek'"):
        call_from_proto(other)
    short = pb.SecAggRequest(protocol_version=PROTOCOL_VERSION, worker_id="w0", nonce=b"\x01", stage="ready")
    with pytest.raises(ProtocolError, match="nonce is 16 bytes, got 1"):
        call_from_proto(short)


def test_a_roster_answer_may_leave_out_certificates_but_a_key_advert_may_not() -> None:
    call = SecAggCall("w0", 1, b"\x01" * 16, "advertise", poll=True)
    adverts = [KeyAdvert(f"w{i}", bytes([i + 1]) * 32, bytes([i + 2]) * 32, b"sig") for i in range(3)]
    answer = SecAggAnswer("ready", roster=tuple(adverts), certificates={"w1": b"cert-of-w1"})
    decoded = answer_from_proto(answer_to_proto(answer), call)
    assert decoded.roster == tuple(adverts)
    assert decoded.certificates == {"w1": b"cert-of-w1"}  # no empty entry for the others
    advert = SecAggCall("w0", 1, b"\x01" * 16, "advertise", advert=adverts[0], certificate=b"")
    with pytest.raises(ProtocolError, match="a certificate of 1..131072 bytes, got 3 and 0"):
        call_from_proto(call_to_proto(advert))
