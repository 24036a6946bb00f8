"""The dashboard's page and files: served from the package over real HTTP, self-contained, escaping by design.

The page's behaviour in a browser (live charts, the Stop dialog, escaping of
API strings) is tested with headless Chromium in
tests/integration/test_dashboard_browser.py.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import pytest
from fastapi import FastAPI

from enclavefl.management.dashboard import ASSETS, SECURITY_HEADERS, mount
from tests.unit.management.live import app_for, held_job, serving
from tests.unit.server.live_job import LiveJob


def asset_text(name: str) -> str:
    return resources.files("enclavefl.management").joinpath("static", name).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def dashboard_app(reading: LiveJob) -> FastAPI:
    return app_for(reading.handle, [mount])


@pytest.mark.parametrize(("path", "media"), [
    ("/", "text/html"), ("/static/dashboard.js", "text/javascript"), ("/static/dashboard.css", "text/css"),
])
def test_each_file_is_served_with_its_media_type(dashboard_app: FastAPI, path: str, media: str) -> None:
    with serving(dashboard_app) as server:
        code, headers, body = server.get(path)

    assert code == 200
    assert headers["content-type"].startswith(media)
    assert body


def test_page_is_served_with_a_same_origin_content_security_policy(dashboard_app: FastAPI) -> None:
    with serving(dashboard_app) as server:
        _, headers, _ = server.get("/")

    csp = headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "default-src 'none'" in csp
    assert headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("path", ["/static/../dashboard.py", "/static/dashboard.py", "/static/index.html",
                                  "/static/%2e%2e/schema.py", "/static/"])
def test_nothing_but_the_three_files_is_served(dashboard_app: FastAPI, path: str) -> None:
    with serving(dashboard_app) as server:
        code, _, body = server.get(path)

    assert code == 404, body[:200]


def test_page_needs_no_token_and_holds_no_job_data(tmp_path: Path) -> None:
    with held_job(tmp_path, name="secret-job-name") as job, serving(app_for(job.handle, [mount])) as server:
        code, _, body = server.get("/")
        api_code, _, _ = server.get("/api/v1/status")

    assert code == 200
    assert b"secret-job-name" not in body
    assert api_code == 401  # the data stays behind the token


@pytest.mark.parametrize("name", sorted(ASSETS))
def test_files_load_nothing_from_another_site(name: str) -> None:
    text = asset_text(name)

    # The SVG namespace is an identifier, not a fetch.
    urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"')]*", text)) - {"http://www.w3.org/2000/svg"}
    assert urls == set()


def test_page_refers_only_to_the_files_mounted() -> None:
    html = asset_text("index.html")

    refs = set(re.findall(r'(?:src|href)="(/[^"]*)"', html))
    assert refs == {"/static/dashboard.js", "/static/dashboard.css"}


def test_script_never_parses_strings_as_html() -> None:
    script = asset_text("dashboard.js")

    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in script, f"dashboard.js uses {sink}"


def test_security_headers_deny_framing() -> None:
    assert "frame-ancestors 'none'" in SECURITY_HEADERS["Content-Security-Policy"]
    assert SECURITY_HEADERS["X-Frame-Options"] == "DENY"
