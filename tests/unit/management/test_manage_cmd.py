"""``enclavefl status|stop|pause|resume`` against a real API server over an in-memory job."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from enclavefl.cli import main
from enclavefl.config import parse_job
from enclavefl.management.memory import MemoryJob
from enclavefl.management.schema import Identity, WorkerInfo
from enclavefl.management.serve import ManagementServer


@pytest.fixture
def job() -> MemoryJob:
    job = MemoryJob()
    job.add_worker(WorkerInfo(worker_id="abcdef0123456789", name="worker-0", state="training", last_seen_s=0.5,
                              rounds_contributed=2, bytes_in=100, bytes_out=200,
                              identity=Identity(evidence="simulated", mr_enclave="ab" * 32)))
    return job


@pytest.fixture
def server(tmp_path: Path, job: MemoryJob) -> Iterator[ManagementServer]:
    with ManagementServer.start(job, parse_job(None).management, tmp_path, job_name="t") as s:
        yield s


def test_status_of_a_run_directory_shows_the_job_and_its_workers(server: ManagementServer,
                                                                 capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # one line per row, whatever the terminal

    code = main(["status", str(server.run_dir)])

    out = capsys.readouterr().out
    assert code == 0
    assert "round 1 of 10" in out and "worker-0" in out and "simulated abababababab" in out


def test_status_json_prints_status_and_workers(server: ManagementServer, capsys: pytest.CaptureFixture[str]) -> None:
    main(["status", str(server.run_dir), "--json"])

    doc = json.loads(capsys.readouterr().out)
    assert doc["status"]["state"] == "running" and doc["workers"][0]["name"] == "worker-0"


def test_status_of_a_url_uses_the_token_and_ca_files(server: ManagementServer) -> None:
    code = main(["status", server.url, "--token-file", str(server.token_file), "--ca-file", str(server.tls.ca)])

    assert code == 0


def test_a_url_without_token_file_is_a_usage_error(server: ManagementServer,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["stop", server.url])

    assert code == 2 and "--token-file" in capsys.readouterr().err


def test_stop_abort_asks_the_job_to_abort(server: ManagementServer, job: MemoryJob) -> None:
    code = main(["stop", str(server.run_dir), "--abort"])

    assert code == 0 and job.stop_mode == "abort"


def test_pause_then_resume(server: ManagementServer, job: MemoryJob, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pause", str(server.run_dir)]) == 0
    assert job.status().state == "paused"
    assert main(["pause", str(server.run_dir)]) == 0
    assert "already paused" in capsys.readouterr().out
    assert main(["resume", str(server.run_dir)]) == 0
    assert job.status().state == "running"


def test_a_run_directory_without_an_api_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["status", str(tmp_path)])

    assert code == 2 and "management.json" in capsys.readouterr().err


def test_an_api_that_is_gone_is_a_network_error(tmp_path: Path, job: MemoryJob,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    with ManagementServer.start(job, parse_job(None).management, tmp_path, job_name="t") as server:
        url, token, ca = server.url, server.token_file, server.tls.ca

    code = main(["status", url, "--token-file", str(token), "--ca-file", str(ca), "--timeout", "2"])

    assert code == 4 and "cannot reach" in capsys.readouterr().err
