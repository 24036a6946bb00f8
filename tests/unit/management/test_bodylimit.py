from __future__ import annotations

import asyncio
import json

from starlette.types import Message, Receive, Scope, Send

from enclavefl.management.bodylimit import BodyLimit


async def _echo_length(scope: Scope, receive: Receive, send: Send) -> None:
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    body = json.dumps({"size": size}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def _call(chunks: list[bytes], headers: list[tuple[bytes, bytes]]) -> tuple[int, dict[str, object]]:
    sent: list[Message] = []
    pending = list(chunks)

    async def receive() -> Message:
        chunk = pending.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

    async def send(message: Message) -> None:
        sent.append(message)

    scope: Scope = {"type": "http", "headers": headers}
    asyncio.run(BodyLimit(_echo_length, max_bytes=10)(scope, receive, send))
    return int(sent[0]["status"]), json.loads(sent[1]["body"])


def test_a_body_within_the_cap_passes() -> None:
    status, body = _call([b"12345"], [(b"content-length", b"5")])

    assert (status, body) == (200, {"size": 5})


def test_an_announced_oversized_body_is_refused_before_it_is_read() -> None:
    status, body = _call([], [(b"content-length", b"11")])  # receive() is never called: no chunk is there

    assert status == 413 and body["field"] == "body"


def test_a_chunked_body_is_refused_once_it_passes_the_cap() -> None:
    status, body = _call([b"123456", b"789012", b"3"], [])

    assert status == 413 and "10 bytes" in str(body["detail"])


def test_a_malformed_content_length_is_refused() -> None:
    status, _ = _call([], [(b"content-length", b"lots")])

    assert status == 400
