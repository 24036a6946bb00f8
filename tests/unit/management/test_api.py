"""The management API over real HTTPS on 127.0.0.1, in front of a real parameter server's handle."""

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
from enclavefl.management.runfiles import MANAGEMENT_FILE, read_management_info
from enclavefl.management.schema import JobHandle
from enclavefl.management.serve import ManagementServer
from tests.unit.management.live import controls
from tests.unit.server.live_job import LiveJob

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


def _start(tmp_path: Path, job: LiveJob, **management: Any) -> ManagementServer:
    config = parse_job({"management": management}) if management else parse_job(None)
    return ManagementServer.start(job.handle, config.management, tmp_path, job_name="test",
                                  audit_path=tmp_path / "audit.jsonl")


@pytest.fixture
def server(tmp_path: Path, held: LiveJob) -> Iterator[ManagementServer]:
    """The API of a job with round 1 held open (see conftest.py)."""
    with _start(tmp_path, held) as s:
        yield s


@pytest.fixture
def finished_server(tmp_path: Path, finished: LiveJob) -> Iterator[ManagementServer]:
    """The API of a job that ran its 3 rounds to the end."""
    with _start(tmp_path, finished) as s:
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


def test_closing_removes_the_record_and_stops_serving(tmp_path: Path, held: LiveJob) -> None:
    server = _start(tmp_path, held)
    client = ManagementClient.for_run(tmp_path)

    server.close()

    assert not (tmp_path / MANAGEMENT_FILE).exists()
    with pytest.raises(Unavailable):
        client.get("/api/v1/status")


def test_a_client_trusting_another_ca_does_not_connect(server: ManagementServer, held: LiveJob,
                                                       tmp_path: Path) -> None:
    other = tmp_path / "other"
    with _start(other, held) as second:
        client = ManagementClient(server.url, token=read_token(server.token_file), ca_file=second.tls.ca)

        with pytest.raises(Unavailable, match="certificate"):
            client.get("/api/v1/status")


@pytest.mark.parametrize(("method", "path", "body"), CONTROL_ROUTES)
def test_every_control_route_refuses_a_request_without_token(server: ManagementServer, held: LiveJob,
                                                             method: str, path: str, body: Any) -> None:
    before = (held.handle.status().state, held.handle.settings())

    status, answer = _raw(server, method, path, json.dumps(body).encode() if body else None,
                          {"Content-Type": "application/json"})

    assert status == 401
    assert (held.handle.status().state, held.handle.settings()) == before
    assert controls(held) == []


@pytest.mark.parametrize(("method", "path", "body"), CONTROL_ROUTES)
def test_every_control_route_refuses_another_jobs_token(server: ManagementServer, held: LiveJob,
                                                        method: str, path: str, body: Any) -> None:
    client = ManagementClient(server.url, token=generate_token(), ca_file=server.tls.ca)

    with pytest.raises(ManagementError) as caught:
        client.request(method, path, body)

    assert caught.value.status == 401
    assert held.handle.status().state == "running" and controls(held) == []


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
def test_public_read_opens_read_routes(tmp_path: Path, held: LiveJob, path: str) -> None:
    with _start(tmp_path, held, public_read=True) as server:
        status, _ = _raw(server, "GET", path, None, {})

    assert status == 200


def test_public_read_keeps_control_routes_closed(tmp_path: Path, held: LiveJob) -> None:
    with _start(tmp_path, held, public_read=True) as server:
        status, _ = _raw(server, "POST", "/api/v1/stop", None, {})

    assert status == 401 and held.handle.status().state == "running"


def test_an_oversized_body_is_refused(server: ManagementServer, held: LiveJob) -> None:
    body = json.dumps({"round.fraction": 0.5, "pad": "x" * 70_000}).encode()

    status, answer = _raw(server, "PATCH", "/api/v1/config", body, _auth(server))

    assert status == 413 and answer["field"] == "body"
    assert held.handle.settings()["round.fraction"] == 1.0


@pytest.mark.parametrize("path", ["/api/v1/config", "/api/v1/stop"])
def test_malformed_json_is_refused_with_422(server: ManagementServer, path: str) -> None:
    method = "PATCH" if path.endswith("config") else "POST"

    status, answer = _raw(server, method, path, b'{"round.fraction": ', _auth(server))

    assert status == 422 and answer["detail"][0]["loc"][0] == "body"


def test_an_unknown_stop_mode_is_refused_naming_the_field(server: ManagementServer, held: LiveJob) -> None:
    status, answer = _raw(server, "POST", "/api/v1/stop", b'{"mode": "later"}', _auth(server))

    assert status == 422 and answer["detail"][0]["loc"] == ["body", "mode"]
    assert held.handle.status().state == "running" and controls(held) == []


def test_stop_without_body_finishes_the_open_round_then_ends(server: ManagementServer, held: LiveJob) -> None:
    answer = ManagementClient.for_run(server.run_dir).post("/api/v1/stop")
    held.gate.allow(10)  # the workers' round-1 fits end; no other round opens
    held.wait_done()

    assert answer == {"stopping": True, "mode": "finish"}
    assert [c["mode"] for c in controls(held)] == ["finish"]
    status = held.handle.status()
    assert (status.state, status.rounds_done) == ("stopped", 1)


def test_stop_after_the_end_is_a_conflict(finished_server: ManagementServer, finished: LiveJob) -> None:
    with pytest.raises(ManagementError) as caught:
        ManagementClient.for_run(finished_server.run_dir).post("/api/v1/stop", {"mode": "abort"})

    assert caught.value.status == 409
    assert finished.handle.status().state == "finished" and controls(finished) == []


def test_pause_and_resume_report_whether_they_changed_anything(server: ManagementServer, held: LiveJob) -> None:
    client = ManagementClient.for_run(server.run_dir)

    assert client.post("/api/v1/pause") == {"paused": True, "changed": True}
    assert client.post("/api/v1/pause") == {"paused": True, "changed": False}
    assert held.handle.status().state == "paused"
    assert client.post("/api/v1/resume") == {"paused": False, "changed": True}
    assert held.handle.status().state == "running"
    assert [c["action"] for c in controls(held)] == ["pause", "resume"]


def test_config_accepts_dotted_keys_and_nested_json(server: ManagementServer, held: LiveJob) -> None:
    client = ManagementClient.for_run(server.run_dir)

    client.patch("/api/v1/config", {"round.fraction": 0.5})
    after = client.patch("/api/v1/config", {"round": {"update_window_s": 7.5}})

    assert after["round.fraction"] == 0.5 and after["round.update_window_s"] == 7.5
    assert client.get("/api/v1/config") == held.handle.settings()
    assert (held.ps.config.round.fraction, held.ps.config.round.update_window_s) == (0.5, 7.5)


def test_a_refused_setting_is_named_in_a_422(server: ManagementServer, held: LiveJob) -> None:
    with pytest.raises(ManagementError) as caught:
        ManagementClient.for_run(server.run_dir).patch("/api/v1/config", {"round": {"fraction": 2}})

    assert caught.value.status == 422 and "round.fraction" in caught.value.message
    assert held.handle.settings()["round.fraction"] == 1.0


def test_rounds_are_paged_oldest_first(finished_server: ManagementServer, finished: LiveJob) -> None:
    page = ManagementClient.for_run(finished_server.run_dir).get("/api/v1/rounds?offset=1&limit=1")

    # The job ran 3 rounds: the page holds the second row alone, as the PS wrote it.
    assert (page["total"], page["offset"], [r["round"] for r in page["rows"]]) == (3, 1, [2])
    assert page["rows"] == [json.loads(json.dumps(finished.ps.metrics.history[1]))]


def test_a_rounds_page_over_the_limit_is_refused_naming_the_parameter(server: ManagementServer) -> None:
    status, answer = _raw(server, "GET", "/api/v1/rounds?limit=5000", None, _auth(server))

    assert status == 422 and answer["detail"][0]["loc"] == ["query", "limit"]


def test_events_stream_with_ids_and_resume_after_last_event_id(finished_server: ManagementServer,
                                                               finished: LiveJob) -> None:
    events = finished.handle.events.read(0, limit=2048).events
    last_round = [e.seq for e in events if e.kind == "round"][-1]
    server = finished_server
    context = ssl.create_default_context(cafile=str(server.tls.ca))
    conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=context, timeout=10)
    # The job has ended: the stream sends what follows the given id, then ends.
    conn.request("GET", "/api/v1/events", headers={**_auth(server), "Last-Event-ID": str(last_round - 1)})
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()

    assert response.status == 200 and response.getheader("content-type", "").startswith("text/event-stream")
    ids = [line for line in text.splitlines() if line.startswith("id:")]
    assert ids == [f"id: {e.seq}" for e in events if e.seq >= last_round]
    assert text.index("event: round") < text.index("event: job")


def test_mounts_add_routes_that_use_the_guard(tmp_path: Path, finished: LiveJob) -> None:
    def mount(app: FastAPI, handle: JobHandle) -> None:
        from fastapi import Depends

        @app.get("/extra", dependencies=[Depends(require_read)])
        def extra() -> dict[str, str]:
            return {"job": handle.status().job}

    config = parse_job(None)
    with ManagementServer.start(finished.handle, config.management, tmp_path, job_name="t", mounts=[mount]) as server:
        assert ManagementClient.for_run(tmp_path).get("/extra") == {"job": "job"}
        assert _raw(server, "GET", "/extra", None, {})[0] == 401
