"""Tests for enclavefl.server.handle: the management plane's view of a real, running ParameterServer."""

from __future__ import annotations

from pathlib import Path

import pytest

from enclavefl.management.schema import Identity, JobHandle
from enclavefl.messages import PeerIdentity
from enclavefl.server.handle import PsHandle, identity_of
from tests.unit.server.live_job import Gate, LiveJob, job, start, wait_for


def test_handle_is_a_job_handle_and_one_per_ps(live: list[LiveJob], tmp_path: Path) -> None:
    j = start(live, tmp_path, gate=Gate(0))

    handle: JobHandle = j.handle

    assert j.ps.handle() is j.handle
    assert isinstance(handle, PsHandle)


def test_status_moves_with_the_rounds(live: list[LiveJob], tmp_path: Path) -> None:
    gate = Gate(0)
    j = start(live, tmp_path, gate=gate, rounds=2)
    wait_for(lambda: j.handle.status().participants == 2, what="round 1 open")

    during = j.handle.status()
    gate.allow(1)
    wait_for(lambda: j.handle.status().rounds_done == 1, what="round 1 done")
    wait_for(lambda: j.handle.status().participants == 2, what="round 2 open")
    between = j.handle.status()
    gate.allow(2)
    j.wait_done()
    after = j.handle.status()

    assert (during.state, during.phase, during.round, during.rounds_done, during.rounds_left) == (
        "running", "training", 1, 0, 2)
    assert (during.workers_joined, during.model_version, during.eta_s) == (2, 0, None)
    assert (between.round, between.rounds_done, between.rounds_left, between.model_version) == (2, 1, 1, 1)
    assert between.eta_s is not None and between.eta_s >= 0
    assert (after.state, after.phase, after.round, after.rounds_done, after.rounds_left) == (
        "finished", "finished", 2, 2, 0)
    assert (after.participants, after.updates, after.failure) == (0, 0, None)
    assert after.attestation_mode == "none" and after.job == j.ps.config.job.name


def test_status_counts_the_updates_accepted_in_the_open_round(live: list[LiveJob], tmp_path: Path) -> None:
    first, second = Gate(0), Gate(0)
    j = LiveJob(job(rounds=1, workers=2), tmp_path, gates={0: first, 1: second})
    live.append(j)
    wait_for(lambda: j.handle.status().participants == 2, what="round 1 open")

    first.allow(1)
    wait_for(lambda: j.handle.status().updates == 1, what="one update accepted")

    assert j.handle.status().participants == 2
    second.allow(1)
    j.wait_done()


def test_workers_table_has_states_rounds_and_bytes(live: list[LiveJob], tmp_path: Path) -> None:
    gate = Gate(0)
    j = start(live, tmp_path, gate=gate, rounds=2)
    wait_for(lambda: sum(w.state == "training" for w in j.handle.workers()) == 2, what="both training")
    training = j.handle.workers()

    gate.allow(2)
    j.wait_done()
    rows = sorted(j.handle.workers(), key=lambda w: w.name)
    history = j.ps.metrics.history

    assert [w.state for w in training] == ["training", "training"]
    assert [w.name for w in rows] == ["worker-0", "worker-1"]
    assert [w.state for w in rows] == ["uploaded", "uploaded"]
    assert [w.rounds_contributed for w in rows] == [2, 2]
    assert sum(w.bytes_in for w in rows) == sum(r["bytes_in"] for r in history)
    assert sum(w.bytes_out for w in rows) == sum(r["bytes_out"] for r in history)
    assert all(w.bytes_in > 0 and w.bytes_out > 0 and w.last_seen_s >= 0 for w in rows)
    assert {w.identity.fingerprint for w in rows} == {r.fingerprint for r in j.ps.core.registry.records()}


def test_workers_table_keeps_a_worker_that_left_with_its_reason(live: list[LiveJob], tmp_path: Path) -> None:
    j = start(live, tmp_path, gate=Gate(0), rounds=1)
    wait_for(lambda: len(j.handle.workers()) == 2, what="two joined")
    record = j.ps.core.registry.records()[0]

    j.ps.leave(PeerIdentity(record.fingerprint, "x"), record.worker_id, "operator shut it down")
    row = next(w for w in j.handle.workers() if w.worker_id == record.worker_id)

    assert (row.state, row.reason) == ("left", "left: operator shut it down")


def test_events_come_in_order(live: list[LiveJob], tmp_path: Path) -> None:
    j = start(live, tmp_path, rounds=1)
    j.wait_done()

    batch = j.handle.events.read(0, limit=1000)
    kinds = [(e.kind, e.data.get("state") or e.data.get("phase") or e.data.get("accepted")) for e in batch.events]

    assert batch.missed == 0
    assert kinds.count(("worker", "joined")) == 2
    assert kinds.count(("update", True)) == 2
    # An upload's event comes from its own thread, after the round took it: the engine may already have
    # moved to aggregating. What holds: uploads follow the round's opening, and the row and the end follow both.
    order = [kinds.index(("worker", "joined")), kinds.index(("phase", "training")), kinds.index(("phase", "aggregating")),
             [k for k, _ in kinds].index("round"), kinds.index(("job", "finished"))]
    assert order == sorted(order)
    assert kinds.index(("phase", "training")) < kinds.index(("update", True))
    round_event = next(e for e in batch.events if e.kind == "round")
    assert round_event.data["round"] == 1 and round_event.data["participants"] == 2


def test_a_refused_update_is_an_event_with_its_reason(live: list[LiveJob], tmp_path: Path) -> None:
    from enclavefl.errors import UpdateRejected
    from enclavefl.messages import UpdateMeta
    from enclavefl.tensors import StreamHeader
    from tests.unit.server.live_job import INITIAL

    j = start(live, tmp_path, gate=Gate(0), rounds=1)
    wait_for(lambda: j.handle.status().participants == 2, what="round 1 open")
    record = j.ps.core.registry.records()[0]
    meta = UpdateMeta(record.worker_id, 7, 0, 4, StreamHeader.of(INITIAL))

    with pytest.raises(UpdateRejected):
        j.ps.open_update(PeerIdentity(record.fingerprint, "x"), meta)
    refused = [e for e in j.handle.events.read(0).events if e.kind == "update" and not e.data["accepted"]]

    assert len(refused) == 1
    assert refused[0].data["worker_id"] == record.worker_id and "round 7" in refused[0].data["reason"]


def test_rounds_pages_the_metrics_rows(live: list[LiveJob], tmp_path: Path) -> None:
    j = start(live, tmp_path, rounds=3)
    j.wait_done()

    page = j.handle.rounds(1, 5)
    first = j.handle.rounds(0, 1)
    past = j.handle.rounds(10, 5)

    assert (page.total, page.offset, [r["round"] for r in page.rows]) == (3, 1, [2, 3])
    assert [r["round"] for r in first.rows] == [1]
    assert (past.total, past.rows) == (3, [])


def test_identity_of_a_peer_carries_what_its_attestation_proved() -> None:
    peer = PeerIdentity("ab" * 32, "w", measurement="11" * 32, evidence="sgx", mr_signer="22" * 32,
                        isv_prod_id=3, isv_svn=4, tcb_status="UpToDate", advisories=("INTEL-SA-1",),
                        weaker=("missing_collateral",))

    identity = identity_of(peer)

    assert identity == Identity(evidence="sgx", mr_enclave="11" * 32, mr_signer="22" * 32, isv_prod_id=3, isv_svn=4,
                                tcb_status="UpToDate", advisories=("INTEL-SA-1",), weaker=("missing_collateral",),
                                fingerprint="ab" * 32)
    assert identity_of(None) == Identity()
