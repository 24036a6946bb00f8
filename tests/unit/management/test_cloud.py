from __future__ import annotations

import json

import pytest

from enclavefl.config import CLOUD_KEY_ALIASES
from enclavefl.errors import ConfigError
from enclavefl.management.cloud import HYPER_PARAMETERS, CloudRoutes, cluster_state, from_cloud, to_cloud
from enclavefl.management.memory import MemoryJob
from enclavefl.management.schema import Identity, WorkerInfo


def _routes(job: MemoryJob) -> CloudRoutes:
    return CloudRoutes(job, server_address="127.0.0.1:7000")


def _worker(worker_id: str, state: str = "joined") -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, name=worker_id, state=state, last_seen_s=0.0,  # type: ignore[arg-type]
                      rounds_contributed=0, bytes_in=0, bytes_out=0, identity=Identity())


@pytest.mark.parametrize(("state", "expected"), [
    ("starting", "CLUSTER_READY"), ("running", "CLUSTER_READY"), ("paused", "CLUSTER_DISABLE"),
    ("finished", "CLUSTER_FINISH"), ("failed", "CLUSTER_FINISH"), ("stopped", "CLUSTER_FINISH"),
])
def test_job_states_map_to_the_cloud_cluster_states(state: str, expected: str) -> None:
    assert cluster_state(state) == expected  # type: ignore[arg-type]


def test_state_reports_the_ps_as_server_and_live_workers_as_workers() -> None:
    job = MemoryJob(instance="ps-1")
    job.add_worker(_worker("w-0"))
    job.add_worker(_worker("w-1", "dropped"))

    reply = _routes(job).state()

    assert reply.status == 200
    assert reply.body["code"] == "0" and reply.body["cluster_state"] == "CLUSTER_READY"
    assert reply.body["nodes"] == [{"node_id": "ps-1", "tcp_address": "127.0.0.1:7000", "role": "SERVER"},
                                   {"node_id": "w-0", "tcp_address": "", "role": "WORKER"}]
    assert set(reply.body) == {"code", "message", "cluster_state", "nodes"}


def test_disable_from_ready_pauses_the_job() -> None:
    job = MemoryJob()

    reply = _routes(job).disable(by="test")

    assert (reply.status, reply.body["code"]) == (200, "0")
    assert job.status().state == "paused"
    assert _routes(job).state().body["cluster_state"] == "CLUSTER_DISABLE"


def test_disable_when_already_disabled_is_refused() -> None:
    job = MemoryJob()
    job.pause(by="test")

    reply = _routes(job).disable(by="test")

    assert reply.status == 400
    assert reply.body == {"code": "1", "error_message": "the job is already disabled"}


def test_enable_from_disabled_resumes_the_job() -> None:
    job = MemoryJob()
    job.pause(by="test")

    reply = _routes(job).enable(by="test")

    assert (reply.status, reply.body["code"]) == (200, "0")
    assert job.status().state == "running"


def test_enable_when_already_enabled_is_refused() -> None:
    reply = _routes(MemoryJob()).enable(by="test")

    assert reply.status == 400
    assert reply.body == {"code": "1", "error_message": "the job is already enabled"}


@pytest.mark.parametrize("action", ["enable", "disable"])
def test_enable_and_disable_are_refused_once_the_job_finished(action: str) -> None:
    job = MemoryJob()
    job.finish()

    reply = getattr(_routes(job), action)(by="test")

    assert reply.status == 400 and reply.body["code"] == "1"
    assert "finished" in reply.body["error_message"]
    assert job.status().state == "finished"


def test_query_instance_returns_hyper_parameters_by_their_cloud_names() -> None:
    job = MemoryJob()

    reply = _routes(job).query_instance()

    # The defaults: 10 rounds, start window 30 s, update window 120 s, min_workers 1, update_ratio 1.
    assert reply.status == 200 and reply.body["code"] == "0"
    assert reply.body["result"] == {"fl_iteration_num": 10, "start_fl_job_threshold": 1,
                                    "start_fl_job_time_window": 30_000, "update_model_ratio": 1.0,
                                    "update_model_time_window": 120_000}


def test_new_instance_applies_hyper_parameters_with_milliseconds_as_seconds() -> None:
    job = MemoryJob()
    body = json.dumps({"update_model_time_window": 5000, "fl_iteration_num": 3}).encode()

    reply = _routes(job).new_instance(body, by="test")

    assert (reply.status, reply.body["code"]) == (200, "0")
    assert job.settings()["round.update_window_s"] == 5.0  # 5000 ms
    assert job.settings()["job.rounds"] == 3


@pytest.mark.parametrize(("body", "named"), [
    (b'{"update_model_ratio": 1.5}', "update_model_ratio"),
    (b'{"fl_iteration_num": -1}', "fl_iteration_num"),
    (b'{"fl_iteration_num": "3"}', "fl_iteration_num"),
    (b'{"start_fl_job_threshold": true}', "start_fl_job_threshold"),
    (b'{"global_iteration_time_window": 1000}', "global_iteration_time_window"),
    (b'{"client_epoch_num": 2}', "client_epoch_num"),  # not changeable in this job
    (b'[1, 2]', "JSON object"),
    (b'{"fl_iteration_num": ', "not valid JSON"),
    (b'{}', "names no hyper-parameter"),
])
def test_new_instance_refuses_a_bad_body_naming_the_field(body: bytes, named: str) -> None:
    job = MemoryJob()
    before = job.settings()

    reply = _routes(job).new_instance(body, by="test")

    assert reply.status == 400 and reply.body["code"] == "1"
    assert named in reply.body["error_message"]
    assert job.settings() == before


def test_new_instance_value_the_job_file_refuses_is_refused() -> None:
    # round.min_workers must stay <= job.workers (3 by default): the job-file check refuses 50.
    job = MemoryJob()

    reply = _routes(job).new_instance(b'{"start_fl_job_threshold": 50}', by="test")

    assert reply.status == 400 and "min_workers" in reply.body["error_message"]


def test_new_instance_is_refused_once_the_job_finished() -> None:
    job = MemoryJob()
    job.finish()

    reply = _routes(job).new_instance(b'{"fl_iteration_num": 3}', by="test")

    assert reply.status == 400 and "finished" in reply.body["error_message"]


def test_to_cloud_skips_settings_the_job_does_not_report() -> None:
    assert to_cloud({"round.update_window_s": 1.5, "other.key": 1}) == {"update_model_time_window": 1500}


def test_from_cloud_refuses_a_hyper_parameter_the_job_cannot_change() -> None:
    with pytest.raises(ConfigError, match="client_learning_rate"):
        from_cloud({"client_learning_rate": 0.1}, {"job.rounds": 3})


def test_hyper_parameters_are_the_job_files_cloud_aliases() -> None:
    assert {name: p.key for name, p in HYPER_PARAMETERS.items()} == {
        name: key for name, (key, _) in CLOUD_KEY_ALIASES.items()}
    assert HYPER_PARAMETERS["update_model_time_window"].kind == "ms"
