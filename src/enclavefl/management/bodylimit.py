"""A cap on request bodies, checked before they are buffered: anything larger gets 413.

How this works: an ASGI middleware looks at ``Content-Length`` first and
refuses a body announced too large without reading it. A body sent in chunks
(no length) is counted as it arrives and refused the moment it passes the
cap, so no request can make the management API hold more than the cap.
"""

from __future__ import annotations

import json
from typing import Final, final

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["DEFAULT_MAX_BODY_BYTES", "BodyLimit"]

DEFAULT_MAX_BODY_BYTES: Final = 64 * 1024


class _TooLarge(HTTPException):
    """Raised from ``receive``: an HTTPException, so the framework's body parsing passes it on as it is."""


async def _refuse(send: Send, max_bytes: int, found: str, status: int = 413) -> None:
    body = json.dumps({"detail": f"the request body is limited to {max_bytes} bytes, got {found}",
                       "field": "body"}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


@final
class BodyLimit:
    """Refuses request bodies over ``max_bytes`` with 413 before they are buffered."""

    def __init__(self, app: ASGIApp, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        if max_bytes < 1:
            raise ValueError(f"BodyLimit: max_bytes must be >= 1, got {max_bytes}")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = -1
                if length < 0 or length > self.max_bytes:
                    await _refuse(send, self.max_bytes, f"Content-Length {value.decode(errors='replace')[:32]}",
                                  400 if length < 0 else 413)
                    return
        seen = 0
        started = False

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge(413, f"the request body is limited to {self.max_bytes} bytes")
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except _TooLarge:
            if not started:
                await _refuse(send, self.max_bytes, f"more than {self.max_bytes} bytes")
