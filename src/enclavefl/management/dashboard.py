"""The dashboard: one page at ``/`` that watches a job live and can stop it.

How this works: the page (``static/index.html``, ``dashboard.js``,
``dashboard.css``, shipped inside the package: nothing is fetched from
another site) holds no job data. Its script reads the job through the
management API (``/api/v1/status``, ``/rounds``, ``/workers``), follows
``/api/v1/events`` and draws its charts as plain SVG. So serving the page
needs no token: the API routes it calls ask for one as usual, and the page
asks the operator for it once (kept for the browser tab only).

The three files are read once, at :func:`mount`, and served from memory
under fixed names; no request path ever reaches the file system. Each
response carries a Content-Security-Policy that allows scripts, styles and
connections from this server only, so even a string from the API that got
into the page as markup could not run or load anything (the script puts
every string in with ``textContent`` anyway).
"""

from __future__ import annotations

from importlib import resources
from typing import Final

from fastapi import FastAPI
from fastapi.responses import Response

from enclavefl.management.schema import JobHandle

__all__ = ["ASSETS", "SECURITY_HEADERS", "mount"]

ASSETS: Final = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
"""The page's files (in ``enclavefl/management/static/``) and their media types."""

SECURITY_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}
"""Sent with every file of the page."""


def _read_asset(name: str) -> bytes:
    return resources.files("enclavefl.management").joinpath("static", name).read_bytes()


def mount(app: FastAPI, handle: JobHandle) -> None:
    """Serves the dashboard of ``handle``'s job on ``app``: the page at ``/``, its files under ``/static/``.

    The page reads the job through the API routes of the same app, so ``handle``
    itself is not read here.

    Raises:
        FileNotFoundError: a file of the page is missing from the installed package.
    """
    del handle  # the page reads the job through /api/v1
    files = {name: _read_asset(name) for name in ASSETS}

    def serve(name: str) -> Response:
        return Response(content=files[name], media_type=ASSETS[name], headers=SECURITY_HEADERS)

    def page() -> Response:
        return serve("index.html")

    def script() -> Response:
        return serve("dashboard.js")

    def style() -> Response:
        return serve("dashboard.css")

    app.add_api_route("/", page, methods=["GET"], include_in_schema=False)
    app.add_api_route("/static/dashboard.js", script, methods=["GET"], include_in_schema=False)
    app.add_api_route("/static/dashboard.css", style, methods=["GET"], include_in_schema=False)
