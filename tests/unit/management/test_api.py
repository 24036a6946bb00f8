"""The management API over real HTTPS on 127.0.0.1, in front of an in-memory job."""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI

from enclavefl.config import parse_job
from enclavefl.errors import Unavailable
from enclavefl.management.api import require_read
from enclavefl.management.auth import generate_token, read_token
from enclavefl.management.client import ManagementClient, ManagementError
from enclavefl.management.memory import MemoryJob
from enclavefl.management.schema import JobHandle
from enclavefl.management.runfiles import MANAGEMENT_FILE, read_management_info
from enclavefl.management.serve import ManagementServer

CONTROL_ROUTES = [
    ("POST", "/api/v1/stop", {"mode": "abort"}),
    ("POST", "/api/v1/pause", None),
    ("POST", "/api/v1/resume", None),
    ("PATCH", "/api/v1/config", {"round.fraction": 0.5}),
    ("POST", "/newInstance", {"fl_iteration_num": 3}),
    ("POST", "/enableFLS", None),
    ("POST", "/disableFLS", None),
]
READ_ROUTES = ["/api/v1/status", "/api/v1/workers", "/api/v1/rounds", "/api/v1/config", "/state", "/queryInstance"]


def _start(tmp_path: Path, job: MemoryJob, **management: Any) -> ManagementServer:
    config = parse_job({"management": management}) if management else parse_job(None)
    return ManagementServer.start(job, config.management, tmp_path, job_name="test", audit_path=tmp_path / "audit.jsonl")


@pytest.fixture
def job() -> MemoryJob:
    return MemoryJob()


@pytest.fixture
def server(tmp_path: Path, job: MemoryJob) -> Iterator[ManagementServer]:
    with _start(tmp_path, job) as s:
        yield s


def _raw(server: ManagementServer, method: str, path: str, body: bytes | None, headers: dict[str, str]
         ) -> tuple[int, Any]:
    context = ssl.create_default_context(cafile=str(server.tls.ca))
    conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=context, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def _auth(server: ManagementServer) -> dict[str, str]:
    return {"Authorization": f"Bearer {read_token(server.token_file)}", "Content-Type": "application/json"}


def test_the_run_directory_records_url_ca_and_token(server: ManagementServer, tmp_path: Path) -> None:
    info = read_management_info(tmp_path)

    assert info.url == server.url and info.port == server.port
    assert info.ca.is_file() and info.token_file == tmp_path / "management.token"
    assert ManagementClient.for_run(tmp_path).get("/api/v1/status")["job"] == "job"


def test_closing_removes_the_record_and_stops_serving(tmp_path: Path, job: MemoryJob) -> None:
    server = _start(tmp_path, job)
    client = ManagementClient.for_run(tmp_path)

    server.close()

    assert not (tmp_path / MANAGEMENT_FILE).exists()
    with pytest.raises(Unavailable):
        client.get("/api/v1/status")


def test_a_client_trusting_another_ca_does_not_connect(server: ManagementServer, tmp_path: Path) -> None:
    other = tmp_path / "other"
    with _start(other, MemoryJob()) as second:
        client = ManagementClient(server.url, token=read_token(server.token_file), ca_file=second.tls.ca)

        with pytest.raises(Unavailable, match="certificate"):
            client.get("/api/v1/status")


@pytest.mark.parametrize(("method", "path", "body"), CONTROL_ROUTES)
def test_every_control_route_refuses_a_request_without_token(server: ManagementServer, job: MemoryJob,
                                                             method: str, path: str, body: Any) -> None:
    before = (job.status().state, job.settings())

    status, answer = _raw(server, method, path, json.dumps(body).encode() if body else None,
                          {"Content-Type": "application/json"})

    assert status == 401
    assert (job.status().state, job.settings()) == before


@pytest.mark.parametrize(("method", "path", "body"), CONTROL_ROUTES)
def test_every_control_route_refuses_another_jobs_token(server: ManagementServer, job: MemoryJob,
                                                        method: str, path: str, body: Any) -> None:
    client = ManagementClient(server.url, token=generate_token(), ca_file=server.tls.ca)

    with pytest.raises(ManagementError) as caught:
        client.request(method, path, body)

    assert caught.value.status == 401
    assert job.status().state == "running"


def test_a_refused_cloud_route_answers_in_the_clouds_shape(server: ManagementServer) -> None:
    status, answer = _raw(server, "POST", "/disableFLS", None, {})

    assert status == 401 and answer["code"] == "1" and "bearer token" in answer["error_message"]


def test_refused_requests_are_audited(server: ManagementServer, tmp_path: Path) -> None:
    _raw(server, "POST", "/api/v1/stop", None, {"Authorization": "Bearer wrong"})

    rows = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert rows[-1]["decision"] == "refused" and "POST /api/v1/stop" in rows[-1]["reason"]


@pytest.mark.parametrize("path", READ_ROUTES)
def test_read_routes_need_the_token_by_default(server: ManagementServer, path: str) -> None:
    status, _ = _raw(server, "GET", path, None, {})

    assert status == 401


@pytest.mark.parametrize("path", READ_ROUTES)
def test_public_read_opens_read_routes(tmp_path: Path, path: str) -> None:
    with _start(tmp_path, MemoryJob(), public_read=True) as server:
        status, _ = _raw(server, "GET", path, None, {})

    assert status == 200


def test_public_read_keeps_control_routes_closed(tmp_path: Path) -> None:
    job = MemoryJob()
    with _start(tmp_path, job, public_read=True) as server:
        status, _ = _raw(server, "POST", "/api/v1/stop", None, {})

    assert status == 401 and job.status().state == "running"


def test_an_oversized_body_is_refused(server: ManagementServer, job: MemoryJob) -> None:
    body = json.dumps({"round.fraction": 0.5, "pad": "x" * 70_000}).encode()

    status, answer = _raw(server, "PATCH", "/api/v1/config", body, _auth(server))

    assert status == 413 and answer["field"] == "body"
    assert job.settings()["round.fraction"] == 1.0


@pytest.mark.parametrize("path", ["/api/v1/config", "/api/v1/stop"])
def test_malformed_json_is_refused_with_422(server: ManagementServer, path: str) -> None:
    method = "PATCH" if path.endswith("config") else "POST"

    status, answer = _raw(server, method, path, b'{"round.fraction": ', _auth(server))

    assert status == 422 and answer["detail"][0]["loc"][0] == "body"


def test_an_unknown_stop_mode_is_refused_naming_the_field(server: ManagementServer, job: MemoryJob) -> None:
    status, answer = _raw(server, "POST", "/api/v1/stop", b'{"mode": "later"}', _auth(server))

    assert status == 422 and answer["detail"][0]["loc"] == ["body", "mode"]
    assert job.status().state == "running"


def test_stop_without_body_finishes_the_job(server: ManagementServer, job: MemoryJob) -> None:
    answer = ManagementClient.for_run(server.run_dir).post("/api/v1/stop")

    assert answer == {"stopping": True, "mode": "finish"}
    assert job.stop_mode == "finish"


def test_stop_after_the_end_is_a_conflict(server: ManagementServer, job: MemoryJob) -> None:
    job.finish()

    with pytest.raises(ManagementError) as caught:
        ManagementClient.for_run(server.run_dir).post("/api/v1/stop", {"mode": "abort"})

    assert caught.value.status == 409


def test_pause_and_resume_report_whether_they_changed_anything(server: ManagementServer, job: MemoryJob) -> None:
    client = ManagementClient.for_run(server.run_dir)

    assert client.post("/api/v1/pause") == {"paused": True, "changed": True}
    assert client.post("/api/v1/pause") == {"paused": True, "changed": False}
    assert job.status().state == "paused"
    assert client.post("/api/v1/resume") == {"paused": False, "changed": True}
    assert job.status().state == "running"


def test_config_accepts_dotted_keys_and_nested_json(server: ManagementServer, job: MemoryJob) -> None:
    client = ManagementClient.for_run(server.run_dir)

    client.patch("/api/v1/config", {"round.fraction": 0.5})
    after = client.patch("/api/v1/config", {"round": {"update_window_s": 7.5}})

    assert after["round.fraction"] == 0.5 and after["round.update_window_s"] == 7.5
    assert client.get("/api/v1/config") == job.settings()


def test_a_refused_setting_is_named_in_a_422(server: ManagementServer, job: MemoryJob) -> None:
    with pytest.raises(ManagementError) as caught:
        ManagementClient.for_run(server.run_dir).patch("/api/v1/config", {"round": {"fraction": 2}})

    assert caught.value.status == 422 and "round.fraction" in caught.value.message
    assert job.settings()["round.fraction"] == 1.0


def test_rounds_are_paged_oldest_first(server: ManagementServer, job: MemoryJob) -> None:
    for r in (1, 2, 3):
        job.complete_round({"round": r})

    page = ManagementClient.for_run(server.run_dir).get("/api/v1/rounds?offset=1&limit=1")

    assert page == {"total": 3, "offset": 1, "rows": [{"round": 2}]}


def test_a_rounds_page_over_the_limit_is_refused_naming_the_parameter(server: ManagementServer) -> None:
    status, answer = _raw(server, "GET", "/api/v1/rounds?limit=5000", None, _auth(server))

    assert status == 422 and answer["detail"][0]["loc"] == ["query", "limit"]


def test_events_stream_with_ids_and_resume_after_last_event_id(server: ManagementServer, job: MemoryJob) -> None:
    for r in (1, 2, 3):
        job.complete_round({"round": r})
    job.finish()  # closes the bus: the stream ends after the last event
    context = ssl.create_default_context(cafile=str(server.tls.ca))
    conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=context, timeout=10)
    conn.request("GET", "/api/v1/events", headers={**_auth(server), "Last-Event-ID": "2"})
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()

    assert response.status == 200 and response.getheader("content-type", "").startswith("text/event-stream")
    assert [line for line in text.splitlines() if line.startswith("id:")] == ["id: 3", "id: 4"]
    assert "event: round" in text and "event: job" in text


def test_mounts_add_routes_that_use_the_guard(tmp_path: Path) -> None:
    def mount(app: FastAPI, handle: JobHandle) -> None:
        from fastapi import Depends

        @app.get("/extra", dependencies=[Depends(require_read)])
        def extra() -> dict[str, str]:
            return {"job": handle.status().job}

    config = parse_job(None)
    with ManagementServer.start(MemoryJob(), config.management, tmp_path, job_name="t", mounts=[mount]) as server:
        assert ManagementClient.for_run(tmp_path).get("/extra") == {"job": "job"}
        assert _raw(server, "GET", "/extra", None, {})[0] == 401
