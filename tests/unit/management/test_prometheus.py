"""``GET /metrics``: served over real HTTP from a real parameter server's handle, parsed with prometheus_client's
own parser."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from enclavefl.management.prometheus import REASON_CLASSES, JobMetrics, mount, reason_class
from enclavefl.transport.audit import AuditRecord
from enclavefl.worker import InMemoryClient
from tests.unit.management.live import TOKEN, app_for, audit_log, held_job, serving
from tests.unit.server.live_job import INITIAL, LiveJob, wait_for

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """Every sample of an exposition, keyed by name and sorted labels."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def scrape(metrics: JobMetrics) -> Samples:
    return samples(metrics.render().decode())


def complete_rounds(job: LiveJob, rounds: int) -> None:
    """Lets the held job's workers fit ``rounds`` times in all and waits for those rounds to complete."""
    job.gate.allow(rounds)
    wait_for(lambda: job.handle.status().rounds_done == rounds, what=f"round {rounds} done")


def test_metrics_route_serves_the_text_format_over_http(reading: LiveJob) -> None:
    app = app_for(reading.handle, [mount])

    with serving(app) as server:
        code, headers, body = server.get("/metrics", {"Authorization": f"Bearer {TOKEN}"})

    assert code == 200
    assert headers["content-type"].startswith("text/plain")
    assert samples(body.decode())[("enclavefl_round", ())] == 1.0


def test_metrics_route_needs_the_token_like_every_read_route(reading: LiveJob) -> None:
    app = app_for(reading.handle, [mount])

    with serving(app) as server:
        code, _, _ = server.get("/metrics")
        wrong, _, _ = server.get("/metrics", {"Authorization": "Bearer another-jobs-token"})

    assert (code, wrong) == (401, 401)


def test_metrics_route_is_open_with_public_read(reading: LiveJob) -> None:
    app = app_for(reading.handle, [mount], public_read=True)

    with serving(app) as server:
        code, _, _ = server.get("/metrics")

    assert code == 200


def test_counters_move_as_rounds_complete_between_scrapes(held: LiveJob) -> None:
    metrics = JobMetrics(held.handle)
    before = scrape(metrics)
    complete_rounds(held, 2)

    after = scrape(metrics)

    assert before[("enclavefl_rounds_completed_total", ())] == 0.0
    assert after[("enclavefl_rounds_completed_total", ())] == 2.0
    # The model is 6 float32 (w 2x2, b 2) = 24 bytes. A round: 2 updates in (48 bytes), the model out to
    # 2 workers (48 bytes); 2 rounds: 96 each way.
    assert after[("enclavefl_bytes_total", (("direction", "in"),))] == 96.0
    assert after[("enclavefl_bytes_total", (("direction", "out"),))] == 96.0
    assert after[("enclavefl_round", ())] == 3.0
    assert after[("enclavefl_model_version", ())] == 2.0


def test_rows_are_counted_once_across_scrapes(finished: LiveJob) -> None:
    metrics = JobMetrics(finished.handle)
    scrape(metrics)
    scrape(metrics)

    assert scrape(metrics)[("enclavefl_rounds_completed_total", ())] == 3.0  # the job ran 3 rounds


def test_phase_durations_fill_histograms_by_phase(held: LiveJob) -> None:
    metrics = JobMetrics(held.handle)
    complete_rounds(held, 1)
    wait_for(lambda: held.handle.status().participants == 2, what="round 2 open")
    time.sleep(0.3)  # round 2 stays open at least this long
    complete_rounds(held, 2)

    s = scrape(metrics)

    train = (("phase", "train"),)
    seconds = [row["seconds_train"] for row in held.ps.metrics.history]
    assert seconds[1] >= 0.3
    assert s[("enclavefl_round_phase_seconds_count", train)] == 2.0
    assert s[("enclavefl_round_phase_seconds_sum", train)] == pytest.approx(sum(seconds))
    # Each bucket counts the rounds that took at most its bound; round 2 (0.3 s or more) is above 0.25 s.
    for bound in ("0.25", "0.5", "1.0", "5.0"):
        expected = sum(1 for v in seconds if v <= float(bound))
        assert s[("enclavefl_round_phase_seconds_bucket", (("le", bound), ("phase", "train")))] == expected
    assert s[("enclavefl_round_phase_seconds_bucket", (("le", "0.25"), ("phase", "train")))] <= 1.0
    assert s[("enclavefl_round_phase_seconds_count", (("phase", "aggregate"),))] == 2.0


def test_updates_are_counted_by_reason_class_never_by_worker(tmp_path: Path) -> None:
    with held_job(tmp_path, names=("alice", "bob")) as job:
        metrics = JobMetrics(job.handle)
        complete_rounds(job, 1)  # 2 accepted updates
        wait_for(lambda: job.handle.status().participants == 2, what="round 2 open")
        alice = InMemoryClient(job.ps, job.peers[0])
        nan = INITIAL.map(lambda a: np.full_like(a, np.nan))
        poisoned = alice.push_update(job.worker_id(0), 2, 1, nan, 4, {})
        misrouted = alice.push_update(job.worker_id(0), 7, 1, INITIAL, 4, {})

        text = metrics.render().decode()
        ids = [w.worker_id for w in job.handle.workers()]

    s = samples(text)
    assert not poisoned.accepted and not misrouted.accepted
    assert s[("enclavefl_updates_total", (("reason", "accepted"), ("result", "accepted")))] == 2.0
    assert s[("enclavefl_updates_total", (("reason", "not_finite"), ("result", "rejected")))] == 1.0
    # "update for round 7 v1, open is round 2 v1" fits no narrower class.
    assert s[("enclavefl_updates_total", (("reason", "other"), ("result", "rejected")))] == 1.0
    assert "alice" not in text and "bob" not in text
    assert all(worker_id not in text for worker_id in ids)


def test_attestation_decisions_are_counted_by_verdict_and_evidence(reading: LiveJob) -> None:
    metrics = JobMetrics(reading.handle)
    with audit_log(reading) as audit:
        audit.record(AuditRecord("ps", "ps", "w1", "accepted", "ok", evidence="sgx"))
        audit.record(AuditRecord("ps", "ps", "w2", "accepted", "ok", evidence="sgx", weaker=("missing_collateral",)))
        audit.record(AuditRecord("ps", "ps", "w3", "refused", "mr_enclave: expected 11.., got 22..",
                                 field="mr_enclave", evidence="simulated", simulated=True))
        audit.record(AuditRecord("ps", "ps", "w4", "refused", "evidence did not parse", evidence="made-up-kind"))

    s = scrape(metrics)

    assert s[("enclavefl_attestation_decisions_total", (("evidence", "sgx"), ("verdict", "accepted")))] == 1.0
    assert s[("enclavefl_attestation_decisions_total", (("evidence", "sgx"), ("verdict", "weaker")))] == 1.0
    assert s[("enclavefl_attestation_decisions_total", (("evidence", "simulated"), ("verdict", "refused")))] == 1.0
    # An evidence kind outside the four known ones cannot grow the label set.
    assert s[("enclavefl_attestation_decisions_total", (("evidence", "none"), ("verdict", "refused")))] == 1.0


def test_events_that_left_the_ring_before_a_scrape_are_counted_as_missed(held: LiveJob) -> None:
    metrics = JobMetrics(held.handle)
    scrape(metrics)  # read every event so far
    capacity = 2048  # the PS's EventBus keeps its last 2048 events
    for toggle in range(capacity + 5):  # with round 1 held open, only these publish events
        if toggle % 2 == 0:
            held.handle.pause(by="op")
        else:
            held.handle.resume(by="op")

    s = scrape(metrics)

    # 2053 actions: pause, resume, pause, ... (1027 pauses, 1026 resumes). The first 5 (3 pauses,
    # 2 resumes) left the ring: 1024 of each are counted.
    assert s[("enclavefl_events_missed_total", ())] == 5.0
    assert s[("enclavefl_control_actions_total", (("action", "pause"),))] == 1024.0
    assert s[("enclavefl_control_actions_total", (("action", "resume"),))] == 1024.0


def test_status_gauges_and_state_follow_the_handle(held: LiveJob) -> None:
    metrics = JobMetrics(held.handle)
    held.handle.pause(by="op")

    s = scrape(metrics)

    assert s[("enclavefl_participants", ())] == 2.0
    assert s[("enclavefl_workers_joined", ())] == 2.0
    assert s[("enclavefl_job_state", (("enclavefl_job_state", "paused"),))] == 1.0
    assert s[("enclavefl_job_state", (("enclavefl_job_state", "running"),))] == 0.0


def test_every_reason_series_exists_before_any_update(reading: LiveJob) -> None:
    s = scrape(JobMetrics(reading.handle))

    reasons = {dict(labels)["reason"] for (name, labels) in s if name == "enclavefl_updates_total"}
    assert reasons == set(REASON_CLASSES)


@pytest.mark.parametrize(("reason", "expected"), [
    ("tensor 'w' holds NaN or Inf values", "not_finite"),
    ("update weight must be a positive finite number, got -1", "weight"),
    ("round 4 closed before the update was complete", "late"),
    ("no round is open (phase idle)", "late"),
    ("tensor 'w' has shape (3,), expected (2,)", "shape"),
    ("stale", "stale"),
    ("something nobody foresaw", "other"),
    ("", "other"),
])
def test_reason_class_maps_free_text_to_a_fixed_set(reason: str, expected: str) -> None:
    assert reason_class(reason) == expected


# ------------------------------------------------------------------ over HTTP while rounds run

def test_counters_move_while_a_real_ps_runs_its_rounds(held: LiveJob) -> None:
    with serving(app_for(held.handle, [mount])) as server:
        complete_rounds(held, 1)
        first = samples(server.get("/metrics", {"Authorization": f"Bearer {TOKEN}"})[2].decode())
        complete_rounds(held, 2)
        second = samples(server.get("/metrics", {"Authorization": f"Bearer {TOKEN}"})[2].decode())

    completed = ("enclavefl_rounds_completed_total", ())
    accepted = ("enclavefl_updates_total", (("reason", "accepted"), ("result", "accepted")))
    bytes_in = ("enclavefl_bytes_total", (("direction", "in"),))
    assert (first[completed], second[completed]) == (1.0, 2.0)
    assert first[accepted] == 2.0 and second[accepted] == 4.0  # two workers push each round
    assert 0 < first[bytes_in] < second[bytes_in]
    assert second[("enclavefl_model_version", ())] == 2.0
    assert second[("enclavefl_round_phase_seconds_count", (("phase", "aggregate"),))] == 2.0
