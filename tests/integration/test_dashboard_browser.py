"""The dashboard in a real browser: headless Chromium driven by Playwright.

The first tests serve the management API (real HTTP, the API's own app) over
a real parameter server running in this process with two real workers whose
rounds the test holds open and releases, and check what the page does as the
job changes: charts gaining points without a reload, API strings (a worker's
name, a refusal's reason) shown as text, the Stop dialog.
The last two run a real ``enclavefl run`` with its HTTPS management API: one
watches the rounds advance, saves a screenshot and stops the job from the page;
the other runs a cluster (``--servers 2``) and scales it to 4 servers and back
while the page and the cloud ``/state`` show the servers come and go.

Chromium is the system's (the Debian ``chromium`` package); Playwright never
downloads a browser here.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from enclavefl.management import dashboard
from enclavefl.management.client import ManagementClient
from enclavefl.server.checkpoint import latest_checkpoint
from enclavefl.transport.audit import AuditRecord
from tests.unit.management.live import TOKEN, app_for, audit_log, controls, held_job, serving

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
REPO = Path(__file__).resolve().parents[2]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium)"),
]

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the dev extra)")


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One Chromium for the module, with a fresh profile; each test opens its own tab (its own sessionStorage)."""
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, ignore_https_errors=True)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def tab(browser: Any) -> Iterator[Any]:
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    page.close()
    assert errors == [], f"the page's script failed: {errors}"


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.05)


def open_dashboard(page: Any, url: str, token: str) -> None:
    page.goto(url + "/")
    page.fill("#token-input", token)
    page.click("#token-save")
    page.wait_for_function("() => document.querySelector('#state').dataset.state !== ''")


def points(page: Any) -> int:
    return int(page.locator("#chart-accuracy circle.point.eval").count())


# ------------------------------------------------------------------ over a PS in this process

def test_charts_gain_a_point_per_round_without_a_reload(tab: Any, tmp_path: Path) -> None:
    with held_job(tmp_path, name="browser-live", rounds=6) as job, \
            serving(app_for(job.handle, [dashboard.mount])) as server:
        open_dashboard(tab, server.url, TOKEN)
        tab.evaluate("window.__sameDocument = true")
        assert tab.text_content("#job") == "browser-live"
        assert points(tab) == 0

        job.gate.allow(1)  # round 1 completes
        tab.wait_for_function("() => document.querySelectorAll('#chart-accuracy circle.point.eval').length === 1")
        job.gate.allow(2)  # round 2 completes, round 3 opens
        tab.wait_for_function("() => document.querySelectorAll('#chart-accuracy circle.point.eval').length === 2")
        tab.wait_for_function("() => document.querySelector('#round').textContent === '3'")

        assert tab.evaluate("window.__sameDocument") is True  # no reload happened
        assert tab.locator("#chart-seconds rect.bar").count() == 2 * 3  # 2 rounds x wait, train, aggregate
        assert tab.text_content("#rounds") == "6"


def test_api_strings_are_shown_as_text_never_run_as_markup(tab: Any, tmp_path: Path) -> None:
    hostile = '<img src=x onerror="window.__pwned = 1">'
    with held_job(tmp_path, names=(hostile, "worker-1")) as job, audit_log(job) as audit, \
            serving(app_for(job.handle, [dashboard.mount])) as server:
        job.leave(0, "<b>gone</b>")  # the worker with the hostile name leaves, giving a hostile reason
        audit.record(AuditRecord("ps", "ps", "10.0.0.9:5000", "refused", "<script>window.__pwned = 2</script>",
                                 field="mr_enclave", evidence="sgx"))
        open_dashboard(tab, server.url, TOKEN)
        tab.wait_for_function("() => document.querySelectorAll('#workers tbody tr').length === 2")
        tab.wait_for_function("() => document.querySelectorAll('#refused tbody tr').length === 1")

        cells = tab.locator("#workers tbody td").all_text_contents()
        assert hostile in cells
        assert any("<b>gone</b>" in cell for cell in cells)
        assert tab.locator("#workers img, #workers b, #refused script").count() == 0
        assert "<script>window.__pwned = 2</script>" in tab.text_content("#refused")
        assert "<script>" in tab.text_content("#audit")
        assert tab.evaluate("window.__pwned") is None


def test_worker_table_flags_simulated_evidence_and_weaker_verdicts(tab: Any, tmp_path: Path) -> None:
    proved: dict[int, dict[str, Any]] = {
        0: {"evidence": "simulated"},
        1: {"evidence": "sgx", "tcb_status": "OutOfDate", "advisories": ("INTEL-SA-1",),
            "weaker": ("out_of_date_tcb",)},
    }
    with held_job(tmp_path, proved=proved) as job, serving(app_for(job.handle, [dashboard.mount])) as server:
        open_dashboard(tab, server.url, TOKEN)
        tab.wait_for_function("() => document.querySelectorAll('#workers tbody tr').length === 2")

        badges = tab.locator("#workers .badge").all_text_contents()

    assert "SIMULATED — NOT A REAL TEE" in badges
    assert "SGX" in badges
    assert "weaker: out_of_date_tcb" in badges
    assert "TCB OutOfDate" in badges


def test_stop_asks_for_confirmation_then_stops_the_job(tab: Any, tmp_path: Path) -> None:
    with held_job(tmp_path) as job, serving(app_for(job.handle, [dashboard.mount])) as server:
        open_dashboard(tab, server.url, TOKEN)

        tab.click("#stop")
        assert tab.locator("#stop-dialog").is_visible()
        tab.click("#stop-cancel")
        assert not tab.locator("#stop-dialog").is_visible()
        assert controls(job) == []  # cancelled: nothing was sent

        tab.click("#stop")
        tab.check("input[name=mode][value=abort]")
        tab.click("#stop-confirm")
        wait_until(lambda: controls(job) != [], 10, "the stop request")
        tab.wait_for_function("() => document.querySelector('#state').dataset.state === 'stopped'")

        assert [c["mode"] for c in controls(job)] == ["abort"]
        assert job.handle.status().rounds_done == 0  # the open round was abandoned
        assert tab.locator("#stop").is_disabled()


def test_page_without_the_token_asks_for_it(tab: Any, tmp_path: Path) -> None:
    with held_job(tmp_path) as job, serving(app_for(job.handle, [dashboard.mount])) as server:
        tab.goto(server.url + "/")
        tab.wait_for_function("() => document.querySelector('#token-state').textContent === 'needed'")

        assert "management.token" in tab.text_content("#notice")
        tab.click("#stop")
        assert not tab.locator("#stop-dialog").is_visible()  # no token, no control
        assert controls(job) == []


def test_page_works_without_a_token_when_reads_are_public(tab: Any, tmp_path: Path) -> None:
    with held_job(tmp_path, name="public") as job, \
            serving(app_for(job.handle, [dashboard.mount], public_read=True)) as server:
        tab.goto(server.url + "/")
        tab.wait_for_function("() => document.querySelector('#job').textContent === 'public'")
        job.gate.allow(1)  # round 1 completes: its row has an eval loss and a train loss
        tab.wait_for_function("() => document.querySelectorAll('#chart-loss circle.point').length === 2")


# ------------------------------------------------------------------ a real job

def test_dashboard_follows_a_real_job_and_stops_it(tab: Any, tmp_path: Path) -> None:
    out, console = tmp_path / "run", tmp_path / "console.txt"
    # Many short rounds: only the Stop button ends this job.
    args = [sys.executable, "-m", "enclavefl", "run", str(REPO / "examples" / "digits" / "job.yaml"), "--out",
            str(out), "--quiet", "--workers", "2", "--set", "round.min_workers=2", "--set", "job.rounds=1000",
            "--set", "server.checkpoint_every=1000", "--set", "management.enabled=true"]
    with console.open("wb") as f:
        run = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT)
    try:
        info_file = out / "management.json"
        wait_until(lambda: info_file.exists() or run.poll() is not None, 180, "management.json")
        assert run.poll() is None, console.read_text()
        info = json.loads(info_file.read_text())
        token = (out / info.get("token_file", "management.token")).read_text().strip()
        assert info["url"].startswith("https://")

        open_dashboard(tab, info["url"], token)
        tab.evaluate("window.__sameDocument = true")
        tab.wait_for_function("() => Number(document.querySelector('#round').textContent) >= 2", timeout=120_000)
        first_round = int(tab.text_content("#round") or 0)
        first_points = points(tab)
        tab.wait_for_function(f"() => Number(document.querySelector('#round').textContent) > {first_round}",
                              timeout=120_000)
        tab.wait_for_function(
            f"() => document.querySelectorAll('#chart-accuracy circle.point.eval').length > {first_points}",
            timeout=120_000)
        assert tab.evaluate("window.__sameDocument") is True
        assert tab.locator("#workers tbody tr").count() == 2
        assert "SIMULATED — NOT A REAL TEE" in tab.text_content("#workers")
        assert "accepted" in tab.text_content("#audit")  # the workers' attestation decisions
        tab.wait_for_function("() => document.querySelector('#version').textContent !== 'v0'")
        tab.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)

        tab.click("#stop")
        tab.click("#stop-confirm")
        tab.wait_for_function("() => document.querySelector('#notice').textContent.startsWith('Stop requested')")
        code = run.wait(120)

        assert code == 0, console.read_text()
        assert (tmp_path / "dashboard.png").stat().st_size > 10_000
        checkpoint = latest_checkpoint(out / "checkpoints")
        assert checkpoint is not None and checkpoint.round >= first_round
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(10)


# ------------------------------------------------------------------ a real cluster, scaled while it trains

def _server_nodes(client: ManagementClient) -> list[str]:
    return sorted(n["node_id"] for n in client.get("/state")["nodes"] if n["role"] == "SERVER")


def _rows(path: Path) -> list[dict[str, Any]]:
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.splitlines() if line.endswith("}")]


@pytest.mark.skipif(shutil.which("redis-server") is None,
                    reason="redis-server is not on PATH (Debian: apt-get install redis-server; .ci/run installs it)")
def test_a_cluster_scaled_from_two_to_four_servers_and_back_loses_no_round_and_the_page_shows_it(
        tab: Any, tmp_path: Path) -> None:
    # Prepare: `enclavefl run --servers 2`, 8 workers, 10 rounds of several seconds (400 local epochs), the
    # scheduler's HTTPS API and dashboard.
    out, console = tmp_path / "run", tmp_path / "console.txt"
    args = [sys.executable, "-m", "enclavefl", "run", str(REPO / "examples" / "digits" / "job.yaml"), "--out",
            str(out), "--quiet", "--servers", "2", "--workers", "8", "--set", "job.rounds=10",
            "--set", "round.min_workers=8", "--set", "round.update_window_s=120", "--set", "round.start_window_s=180",
            "--set", "server.checkpoint_every=1000", "--set", "management.enabled=true",
            "--set", "cluster.poll_s=0.05", "--set", "client.epochs=400"]
    with console.open("wb") as f:
        run = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT)
    metrics = out / "scheduler" / "metrics.jsonl"
    try:
        wait_until(lambda: (out / "scheduler" / "management.json").exists() or run.poll() is not None, 180,
                   "the scheduler's management.json")
        assert run.poll() is None, console.read_text()
        client = ManagementClient.for_run(out / "scheduler")
        info = json.loads((out / "scheduler" / "management.json").read_text())
        token = (out / "scheduler" / info.get("token_file", "management.token")).read_text().strip()
        open_dashboard(tab, info["url"], token)
        tab.wait_for_function("() => document.querySelectorAll('#servers tbody tr').length === 2", timeout=120_000)
        wait_until(lambda: len(_rows(metrics)) >= 1 or run.poll() is not None, 240, "round 1")

        # Execute: scale to 4 after round 1, back to 2 once two more rounds ran on 4.
        up = client.post("/api/v1/scale", {"servers": 4})
        wait_until(lambda: len(_server_nodes(client)) == 4 or run.poll() is not None, 120, "4 servers in /state")
        tab.wait_for_function("() => document.querySelectorAll('#servers tbody tr').length === 4", timeout=60_000)
        scaled_at = len(_rows(metrics))
        wait_until(lambda: len(_rows(metrics)) >= scaled_at + 2 or run.poll() is not None, 240, "2 rounds on 4")
        four = _server_nodes(client)
        down = client.post("/api/v1/scale", {"servers": 2})
        wait_until(lambda: len(_server_nodes(client)) == 2 or run.poll() is not None, 120, "2 servers in /state")
        tab.wait_for_function("() => document.querySelectorAll('#servers tbody tr').length === 2", timeout=60_000)
        feed = tab.text_content("#audit") or ""
        code = run.wait(600)
    finally:
        if run.poll() is None:  # SIGTERM first: `run` then stops its redis-server, which SIGKILL would orphan
            run.terminate()
            try:
                run.wait(60)
            except subprocess.TimeoutExpired:
                run.kill()
                run.wait(10)

    # Assert: the answers named the new and the draining servers; every round closed on its first attempt with
    # all 8 workers; workers moved to the new servers and back; the feed told the membership changes.
    assert code == 0, console.read_text()[-3000:]
    assert up["starting"] == ["server-2", "server-3"] and down["draining"] == ["server-2", "server-3"]
    assert four == ["server-0", "server-1", "server-2", "server-3"]
    rows = _rows(metrics)
    assert [r["round"] for r in rows] == list(range(1, 11))
    assert all(r["attempt"] == 0 and r["participants"] == 8 for r in rows), rows
    logs = "".join((out / "logs" / f"worker-{i}.log").read_text() for i in range(8))
    assert "the cluster moves this worker" in logs
    for server in ("server-2", "server-3"):  # each served workers of at least one round
        served = re.findall(r"round \d+: open \(attempt 0\) on model version \d+, (\d+) of 8 sampled workers here",
                            (out / server / "logs" / "server.log").read_text())
        assert any(int(n) > 0 for n in served), (server, served)
    assert re.search(r"joined [^)]*server-2", feed) and re.search(r"left [^)]*server-2", feed), feed
