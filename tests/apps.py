"""Raw ASGI apps for tests: answer at once, wait on a gate, stream, fail."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from governor.types import Message, Receive, Scope, Send

CHAT_USAGE = {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}


async def ok_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Echo the request body's model with a chat-completions usage block."""
    message = await receive()
    body = message.get("body", b"")
    try:
        model = json.loads(body).get("model") if body else None
    except ValueError:
        model = None
    payload = json.dumps({"object": "chat.completion", "model": model, "usage": CHAT_USAGE})
    data = payload.encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


class EchoApp:
    """Records the (scope, body) of every call and answers 200 with *payload*."""

    def __init__(self, payload: Any = None, status: int = 200) -> None:
        self.calls: list[tuple[Scope, bytes]] = []
        self.payload = payload if payload is not None else {"ok": True, "usage": CHAT_USAGE}
        self.status = status

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = b""
        if scope["type"] == "http":
            while True:
                message: Message = await receive()
                body += message.get("body", b"")
                if not message.get("more_body", False):
                    break
        self.calls.append((scope, body))
        data = json.dumps(self.payload).encode()
        await send(
            {
                "type": "http.response.start",
                "status": self.status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": data})


class GatedApp:
    """Holds every request until ``gate`` is set; counts how many are inside at once."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.inside = 0
        self.peak = 0
        self.entered = asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        self.inside += 1
        self.peak = max(self.peak, self.inside)
        self.entered.set()
        try:
            await self.gate.wait()
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": b'{"ok":true}'})
        finally:
            self.inside -= 1


async def failing_app(scope: Scope, receive: Receive, send: Send) -> None:
    await receive()
    raise RuntimeError("upstream exploded")


def sse_app(events: list[Any], *, status: int = 200) -> Any:
    """An app that streams *events* as ``data:`` lines, then ``[DONE]``."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        for event in events:
            line = f"data: {json.dumps(event)}\n\n".encode()
            await send({"type": "http.response.body", "body": line, "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    return app
