"""``enclavefl status|stop|pause|resume`` against a real API server over a real parameter server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from enclavefl.cli import main
from enclavefl.config import parse_job
from enclavefl.management.serve import ManagementServer
from tests.unit.management.live import controls
from tests.unit.server.live_job import LiveJob, wait_for


@pytest.fixture
def server(tmp_path: Path, held: LiveJob) -> Iterator[ManagementServer]:
    with ManagementServer.start(held.handle, parse_job(None).management, tmp_path, job_name="t") as s:
        yield s


def test_status_of_a_run_directory_shows_the_job_and_its_workers(server: ManagementServer,
                                                                 capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # one line per row, whatever the terminal

    code = main(["status", str(server.run_dir)])

    out = capsys.readouterr().out
    assert code == 0
    # The held job: round 1 of 5 open, its workers proved simulated evidence of mr_enclave abab...
    assert "round 1 of 5" in out and "worker-0" in out and "worker-1" in out and "simulated abababababab" in out


def test_status_json_prints_status_and_workers(server: ManagementServer, capsys: pytest.CaptureFixture[str]) -> None:
    main(["status", str(server.run_dir), "--json"])

    doc = json.loads(capsys.readouterr().out)
    assert doc["status"]["state"] == "running"
    assert sorted(w["name"] for w in doc["workers"]) == ["worker-0", "worker-1"]


def test_status_of_a_url_uses_the_token_and_ca_files(server: ManagementServer) -> None:
    code = main(["status", server.url, "--token-file", str(server.token_file), "--ca-file", str(server.tls.ca)])

    assert code == 0


def test_a_url_without_token_file_is_a_usage_error(server: ManagementServer,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["stop", server.url])

    assert code == 2 and "--token-file" in capsys.readouterr().err


def test_stop_abort_abandons_the_open_round(server: ManagementServer, held: LiveJob) -> None:
    code = main(["stop", str(server.run_dir), "--abort"])
    wait_for(lambda: held.handle.status().state == "stopped", what="the job to end")

    assert code == 0 and [c["mode"] for c in controls(held)] == ["abort"]
    assert held.handle.status().rounds_done == 0  # round 1 was held open: abandoned


def test_pause_then_resume(server: ManagementServer, held: LiveJob, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pause", str(server.run_dir)]) == 0
    assert held.handle.status().state == "paused"
    assert main(["pause", str(server.run_dir)]) == 0
    assert "already paused" in capsys.readouterr().out
    assert main(["resume", str(server.run_dir)]) == 0
    assert held.handle.status().state == "running"


def test_a_run_directory_without_an_api_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["status", str(tmp_path)])

    assert code == 2 and "management.json" in capsys.readouterr().err


def test_an_api_that_is_gone_is_a_network_error(tmp_path: Path, reading: LiveJob,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    with ManagementServer.start(reading.handle, parse_job(None).management, tmp_path, job_name="t") as server:
        url, token, ca = server.url, server.token_file, server.tls.ca

    code = main(["status", url, "--token-file", str(token), "--ca-file", str(ca), "--timeout", "2"])

    assert code == 4 and "cannot reach" in capsys.readouterr().err
