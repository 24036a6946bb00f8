"""The cloud cluster's routes over a real parameter server's handle: its JSON shapes and its state machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from enclavefl.config import CLOUD_KEY_ALIASES
from enclavefl.errors import ConfigError
from enclavefl.management.cloud import HYPER_PARAMETERS, CloudRoutes, cluster_state, from_cloud, to_cloud
from tests.unit.management.live import held_job
from tests.unit.server.live_job import LiveJob


def _routes(job: LiveJob) -> CloudRoutes:
    return CloudRoutes(job.handle, server_address="127.0.0.1:7000")


@pytest.mark.parametrize(("state", "expected"), [
    ("starting", "CLUSTER_READY"), ("running", "CLUSTER_READY"), ("paused", "CLUSTER_DISABLE"),
    ("finished", "CLUSTER_FINISH"), ("failed", "CLUSTER_FINISH"), ("stopped", "CLUSTER_FINISH"),
])
def test_job_states_map_to_the_cloud_cluster_states(state: str, expected: str) -> None:
    assert cluster_state(state) == expected  # type: ignore[arg-type]


def test_state_reports_the_ps_as_server_and_live_workers_as_workers(held: LiveJob) -> None:
    held.leave(1, "maintenance")
    staying = next(w.worker_id for w in held.handle.workers() if w.state != "left")

    reply = _routes(held).state()

    assert reply.status == 200
    assert reply.body["code"] == "0" and reply.body["cluster_state"] == "CLUSTER_READY"
    assert reply.body["nodes"] == [{"node_id": held.ps.instance, "tcp_address": "127.0.0.1:7000", "role": "SERVER"},
                                   {"node_id": staying, "tcp_address": "", "role": "WORKER"}]
    assert set(reply.body) == {"code", "message", "cluster_state", "nodes"}


def test_disable_from_ready_pauses_the_job(held: LiveJob) -> None:
    reply = _routes(held).disable(by="test")

    assert (reply.status, reply.body["code"]) == (200, "0")
    assert held.handle.status().state == "paused"
    assert _routes(held).state().body["cluster_state"] == "CLUSTER_DISABLE"


def test_disable_when_already_disabled_is_refused(held: LiveJob) -> None:
    held.handle.pause(by="test")

    reply = _routes(held).disable(by="test")

    assert reply.status == 400
    assert reply.body == {"code": "1", "error_message": "the job is already disabled"}


def test_enable_from_disabled_resumes_the_job(held: LiveJob) -> None:
    held.handle.pause(by="test")

    reply = _routes(held).enable(by="test")

    assert (reply.status, reply.body["code"]) == (200, "0")
    assert held.handle.status().state == "running"


def test_enable_when_already_enabled_is_refused(held: LiveJob) -> None:
    reply = _routes(held).enable(by="test")

    assert reply.status == 400
    assert reply.body == {"code": "1", "error_message": "the job is already enabled"}


@pytest.mark.parametrize("action", ["enable", "disable"])
def test_enable_and_disable_are_refused_once_the_job_finished(finished: LiveJob, action: str) -> None:
    reply = getattr(_routes(finished), action)(by="test")

    assert reply.status == 400 and reply.body["code"] == "1"
    assert "finished" in reply.body["error_message"]
    assert finished.handle.status().state == "finished"


def test_a_paused_job_that_ends_is_finished_for_the_cloud(held: LiveJob) -> None:
    _routes(held).disable(by="test")
    held.handle.stop("finish", by="test")
    held.gate.allow(10)
    held.wait_done()

    routes = _routes(held)

    assert held.handle.status().state == "stopped"
    assert routes.state().body["cluster_state"] == "CLUSTER_FINISH"
    assert routes.enable(by="test").status == 400


def test_query_instance_returns_hyper_parameters_by_their_cloud_names(held: LiveJob) -> None:
    reply = _routes(held).query_instance()

    # The held job: 5 rounds, 2 workers needed, windows of 20 s (20000 ms), all updates needed,
    # 1 local epoch of batches of 4 at learning rate 0.5.
    assert reply.status == 200 and reply.body["code"] == "0"
    assert reply.body["result"] == {"fl_iteration_num": 5, "start_fl_job_threshold": 2,
                                    "start_fl_job_time_window": 20_000, "update_model_ratio": 1.0,
                                    "update_model_time_window": 20_000, "client_epoch_num": 1,
                                    "client_batch_size": 4, "client_learning_rate": 0.5}


def test_new_instance_applies_hyper_parameters_with_milliseconds_as_seconds(held: LiveJob) -> None:
    body = json.dumps({"update_model_time_window": 5000, "fl_iteration_num": 3}).encode()

    reply = _routes(held).new_instance(body, by="test")

    assert (reply.status, reply.body["code"]) == (200, "0")
    assert held.handle.settings()["round.update_window_s"] == 5.0  # 5000 ms
    assert held.handle.settings()["job.rounds"] == 3
    assert held.ps.config.job.rounds == 3  # what the PS's engine reads for its next round


@pytest.mark.parametrize(("body", "named"), [
    (b'{"update_model_ratio": 1.5}', "update_model_ratio"),
    (b'{"fl_iteration_num": -1}', "fl_iteration_num"),
    (b'{"fl_iteration_num": "3"}', "fl_iteration_num"),
    (b'{"start_fl_job_threshold": true}', "start_fl_job_threshold"),
    (b'{"global_iteration_time_window": 1000}', "global_iteration_time_window"),
    (b'[1, 2]', "JSON object"),
    (b'{"fl_iteration_num": ', "not valid JSON"),
    (b'{}', "names no hyper-parameter"),
])
def test_new_instance_refuses_a_bad_body_naming_the_field(reading: LiveJob, body: bytes, named: str) -> None:
    before = reading.handle.settings()

    reply = _routes(reading).new_instance(body, by="test")

    assert reply.status == 400 and reply.body["code"] == "1"
    assert named in reply.body["error_message"]
    assert reading.handle.settings() == before


def test_new_instance_refuses_a_hyper_parameter_this_job_cannot_change(tmp_path: Path) -> None:
    # An asynchronous job takes no update ratio: it aggregates a buffer of updates instead.
    with held_job(tmp_path, mode="async") as job:
        before = job.handle.settings()

        reply = _routes(job).new_instance(b'{"update_model_ratio": 0.5}', by="test")

        assert reply.status == 400 and "update_model_ratio" in reply.body["error_message"]
        assert job.handle.settings() == before


def test_new_instance_value_the_job_file_refuses_is_refused(reading: LiveJob) -> None:
    # round.min_workers must stay <= job.workers (2 here): the job-file check refuses 50.
    reply = _routes(reading).new_instance(b'{"start_fl_job_threshold": 50}', by="test")

    assert reply.status == 400 and "min_workers" in reply.body["error_message"]
    assert reading.handle.settings()["round.min_workers"] == 2


def test_new_instance_is_refused_once_the_job_finished(finished: LiveJob) -> None:
    reply = _routes(finished).new_instance(b'{"fl_iteration_num": 3}', by="test")

    assert reply.status == 400 and "finished" in reply.body["error_message"]
    assert finished.handle.settings()["job.rounds"] == 3


def test_to_cloud_skips_settings_the_job_does_not_report() -> None:
    assert to_cloud({"round.update_window_s": 1.5, "other.key": 1}) == {"update_model_time_window": 1500}


def test_from_cloud_refuses_a_hyper_parameter_the_job_cannot_change() -> None:
    with pytest.raises(ConfigError, match="client_learning_rate"):
        from_cloud({"client_learning_rate": 0.1}, {"job.rounds": 3})


def test_hyper_parameters_are_the_job_files_cloud_aliases() -> None:
    assert {name: p.key for name, p in HYPER_PARAMETERS.items()} == {
        name: key for name, (key, _) in CLOUD_KEY_ALIASES.items()}
    assert HYPER_PARAMETERS["update_model_time_window"].kind == "ms"
