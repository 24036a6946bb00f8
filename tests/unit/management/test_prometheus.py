"""``GET /metrics``: served over real HTTP from a job's handle, parsed with prometheus_client's own parser."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from enclavefl.management.memory import MemoryJob
from enclavefl.management.prometheus import REASON_CLASSES, JobMetrics, mount, reason_class
from enclavefl.management.schema import Identity, WorkerInfo
from tests.unit.management.live import TOKEN, app_for, serving
from tests.unit.server.live_job import Gate, LiveJob, wait_for
from tests.unit.server.live_job import job as live_job_config


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by name and sorted labels."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def scrape(metrics: JobMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return samples(metrics.render().decode())


def row(round_: int, **extra: Any) -> dict[str, Any]:
    return {"round": round_, "participants": 3, "bytes_in": 1000, "bytes_out": 3000, "seconds_wait": 0.2,
            "seconds_train": 3.0, "seconds_aggregate": 0.05, "seconds_eval": 0.01, "train_loss": 0.5} | extra


def worker(worker_id: str) -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, name=worker_id, state="joined", last_seen_s=0.0, rounds_contributed=0,
                      bytes_in=0, bytes_out=0, identity=Identity())


def test_metrics_route_serves_the_text_format_over_http() -> None:
    app = app_for(MemoryJob(), [mount])

    with serving(app) as server:
        code, headers, body = server.get("/metrics", {"Authorization": f"Bearer {TOKEN}"})

    assert code == 200
    assert headers["content-type"].startswith("text/plain")
    assert samples(body.decode())[("enclavefl_round", ())] == 1.0


def test_metrics_route_needs_the_token_like_every_read_route() -> None:
    app = app_for(MemoryJob(), [mount])

    with serving(app) as server:
        code, _, _ = server.get("/metrics")
        wrong, _, _ = server.get("/metrics", {"Authorization": "Bearer another-jobs-token"})

    assert (code, wrong) == (401, 401)


def test_metrics_route_is_open_with_public_read() -> None:
    app = app_for(MemoryJob(), [mount], public_read=True)

    with serving(app) as server:
        code, _, _ = server.get("/metrics")

    assert code == 200


def test_counters_move_as_rounds_complete_between_scrapes() -> None:
    handle = MemoryJob()
    metrics = JobMetrics(handle)
    before = scrape(metrics)
    handle.complete_round(row(1))
    handle.complete_round(row(2))

    after = scrape(metrics)

    assert before[("enclavefl_rounds_completed_total", ())] == 0.0
    assert after[("enclavefl_rounds_completed_total", ())] == 2.0
    # 2 rows x 1000 bytes in, 2 x 3000 out
    assert after[("enclavefl_bytes_total", (("direction", "in"),))] == 2000.0
    assert after[("enclavefl_bytes_total", (("direction", "out"),))] == 6000.0
    assert after[("enclavefl_round", ())] == 3.0
    assert after[("enclavefl_model_version", ())] == 2.0


def test_rows_are_counted_once_across_scrapes() -> None:
    handle = MemoryJob()
    metrics = JobMetrics(handle)
    handle.complete_round(row(1))
    scrape(metrics)
    scrape(metrics)

    assert scrape(metrics)[("enclavefl_rounds_completed_total", ())] == 1.0


def test_phase_durations_fill_histograms_by_phase() -> None:
    handle = MemoryJob()
    metrics = JobMetrics(handle)
    handle.complete_round(row(1, seconds_train=3.0))
    handle.complete_round(row(2, seconds_train=20.0))

    s = scrape(metrics)

    train = (("phase", "train"),)
    assert s[("enclavefl_round_phase_seconds_count", train)] == 2.0
    assert s[("enclavefl_round_phase_seconds_sum", train)] == 23.0  # 3 + 20
    assert s[("enclavefl_round_phase_seconds_bucket", (("le", "5.0"), ("phase", "train")))] == 1.0  # only 3 <= 5
    assert s[("enclavefl_round_phase_seconds_count", (("phase", "aggregate"),))] == 2.0


def test_updates_are_counted_by_reason_class_never_by_worker() -> None:
    handle = MemoryJob()
    metrics = JobMetrics(handle)
    bus = handle.events
    bus.publish("update", round=1, worker_id="w-secret-1", worker="alice", accepted=True, reason="", bytes=10)
    bus.publish("update", round=1, worker_id="w-secret-2", worker="bob", accepted=False,
                reason="tensor 'w' holds NaN or Inf values", bytes=10)
    bus.publish("update", round=1, worker_id="w-secret-3", worker="carol", accepted=False,
                reason="round 1 closed before the update was complete", bytes=0)

    text = metrics.render().decode()
    s = samples(text)

    assert s[("enclavefl_updates_total", (("reason", "accepted"), ("result", "accepted")))] == 1.0
    assert s[("enclavefl_updates_total", (("reason", "not_finite"), ("result", "rejected")))] == 1.0
    assert s[("enclavefl_updates_total", (("reason", "late"), ("result", "rejected")))] == 1.0
    assert "w-secret" not in text and "alice" not in text and "bob" not in text


def test_attestation_decisions_are_counted_by_verdict_and_evidence() -> None:
    handle = MemoryJob()
    metrics = JobMetrics(handle)
    bus = handle.events
    bus.publish("attestation", peer="w1", decision="accepted", evidence="sgx", weaker=[])
    bus.publish("attestation", peer="w2", decision="accepted", evidence="sgx", weaker=["missing_collateral"])
    bus.publish("attestation", peer="w3", decision="refused", evidence="simulated", field="mr_enclave")
    bus.publish("attestation", peer="w4", decision="refused", evidence="made-up-kind")

    s = scrape(metrics)

    assert s[("enclavefl_attestation_decisions_total", (("evidence", "sgx"), ("verdict", "accepted")))] == 1.0
    assert s[("enclavefl_attestation_decisions_total", (("evidence", "sgx"), ("verdict", "weaker")))] == 1.0
    assert s[("enclavefl_attestation_decisions_total", (("evidence", "simulated"), ("verdict", "refused")))] == 1.0
    # An evidence kind outside the four known ones cannot grow the label set.
    assert s[("enclavefl_attestation_decisions_total", (("evidence", "none"), ("verdict", "refused")))] == 1.0


def test_events_that_left_the_ring_before_a_scrape_are_counted_as_missed() -> None:
    handle = MemoryJob()
    metrics = JobMetrics(handle)
    capacity = 2048  # EventBus's default ring, which MemoryJob's bus has
    for _ in range(capacity + 5):
        handle.events.publish("control", action="pause", by="op")

    s = scrape(metrics)

    # capacity + 5 published, the ring kept the last `capacity`
    assert s[("enclavefl_events_missed_total", ())] == 5.0
    assert s[("enclavefl_control_actions_total", (("action", "pause"),))] == float(capacity)


def test_status_gauges_and_state_follow_the_handle() -> None:
    handle = MemoryJob()
    metrics = JobMetrics(handle)
    handle.add_worker(worker("w1"))
    handle.add_worker(worker("w2"))
    handle.pause(by="op")

    s = scrape(metrics)

    assert s[("enclavefl_participants", ())] == 2.0
    assert s[("enclavefl_workers_joined", ())] == 2.0
    assert s[("enclavefl_job_state", (("enclavefl_job_state", "paused"),))] == 1.0
    assert s[("enclavefl_job_state", (("enclavefl_job_state", "running"),))] == 0.0


def test_every_reason_series_exists_before_any_update() -> None:
    s = scrape(JobMetrics(MemoryJob()))

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


# ------------------------------------------------------------------ a real PS

def test_counters_move_while_a_real_ps_runs_its_rounds(tmp_path: Path) -> None:
    gate = Gate(allowed=1)  # each worker may fit once: round 1 completes, round 2 waits
    live = LiveJob(live_job_config(rounds=3), tmp_path, gate=gate)
    try:
        with serving(app_for(live.handle, [mount])) as server:
            wait_for(lambda: live.handle.status().rounds_done >= 1, what="round 1")
            first = samples(server.get("/metrics", {"Authorization": f"Bearer {TOKEN}"})[2].decode())
            gate.allow(2)
            wait_for(lambda: live.handle.status().rounds_done >= 2, what="round 2")
            second = samples(server.get("/metrics", {"Authorization": f"Bearer {TOKEN}"})[2].decode())
        gate.allow(3)
        live.wait_done()
    finally:
        live.close()

    completed = ("enclavefl_rounds_completed_total", ())
    accepted = ("enclavefl_updates_total", (("reason", "accepted"), ("result", "accepted")))
    bytes_in = ("enclavefl_bytes_total", (("direction", "in"),))
    assert (first[completed], second[completed]) == (1.0, 2.0)
    assert first[accepted] == 2.0 and second[accepted] == 4.0  # two workers push each round
    assert 0 < first[bytes_in] < second[bytes_in]
    assert second[("enclavefl_model_version", ())] == 2.0
    assert second[("enclavefl_round_phase_seconds_count", (("phase", "aggregate"),))] == 2.0
