"""Driving ASGI apps directly, without sockets (``httpx.ASGITransport`` buffers bodies
and costs about 200 us a request; a recorded ``send`` sees every streamed chunk)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Iterable, Mapping
from typing import Any

from governor.types import ASGIApp, Message


@dataclasses.dataclass
class Result:
    """What an ASGI app sent back."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    messages: list[Message]

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.decode().lower() == name.lower():
                return v.decode()
        return None

    def header_names(self) -> list[str]:
        return [k.decode() for k, _ in self.headers]

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def chunks(self) -> list[bytes]:
        return [m.get("body", b"") for m in self.messages if m["type"] == "http.response.body"]


def make_scope(
    method: str = "POST",
    path: str = "/v1/managed/chat/completions",
    headers: Iterable[tuple[str, str]] | Mapping[str, str] = (),
    *,
    query: str = "",
    client: tuple[str, int] = ("127.0.0.1", 50000),
) -> dict[str, Any]:
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in pairs],
        "client": client,
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


async def call(
    app: ASGIApp,
    method: str = "POST",
    path: str = "/v1/managed/chat/completions",
    *,
    headers: Iterable[tuple[str, str]] | Mapping[str, str] = (),
    json_body: Any = None,
    body: bytes | None = None,
    chunks: list[bytes] | None = None,
    query: str = "",
    disconnect: asyncio.Event | None = None,
    client: tuple[str, int] = ("127.0.0.1", 50000),
) -> Result:
    """Call *app* once and record what it sends.

    The body goes as *json_body*, raw *body*, or several *chunks*. After the body,
    ``receive`` waits for *disconnect* (if given) and then reports the client gone.
    """
    if chunks is None:
        if body is None:
            body = json.dumps(json_body).encode() if json_body is not None else b""
        chunks = [body]
    scope = make_scope(method, path, headers, query=query, client=client)
    # No disconnect event: the client stays until the app is done.
    gone = disconnect if disconnect is not None else asyncio.Event()
    return await run_scope(app, scope, chunks, disconnect=gone)


async def run_scope(
    app: ASGIApp,
    scope: dict[str, Any],
    chunks: list[bytes],
    *,
    disconnect: asyncio.Event | None = None,
) -> Result:
    """Call *app* with *scope*, the body in *chunks*, and record what it sends.

    After the body, ``receive`` waits for *disconnect* (if given; else at once) and then
    reports the client gone.
    """
    pending = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]

    async def receive() -> Message:
        if pending:
            return pending.pop(0)
        if disconnect is not None:
            await disconnect.wait()
        return {"type": "http.disconnect"}

    messages: list[Message] = []

    async def send(message: Message) -> None:
        messages.append(message)

    await app(scope, receive, send)
    start = next((m for m in messages if m["type"] == "http.response.start"), None)
    status = start["status"] if start else 0
    headers_out = list(start.get("headers", [])) if start else []
    body_out = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return Result(status, headers_out, body_out, messages)


def auth(key: str = "ck_test", style: str = "bearer") -> dict[str, str]:
    if style == "bearer":
        return {"authorization": f"Bearer {key}"}
    return {style: key}
