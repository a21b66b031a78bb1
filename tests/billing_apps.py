"""Fake upstreams and a governor factory for the billing tests.

The fake upstreams "work" by advancing a ManualClock, so latency insurance is tested
around its threshold without sleeping.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from prometheus_client import CollectorRegistry

from governor.backends import Backend
from governor.billing import BillingMiddleware
from governor.clock import ManualClock
from governor.config import (
    AccountEntry,
    BillingConfig,
    Config,
    InsuranceConfig,
    KeyEntry,
)
from governor.runtime import Governor
from governor.stack import ContextMiddleware
from governor.types import ASGIApp, Message, Receive, Scope, Send
from governor.usage_log import MemorySink, UsageLogMiddleware

KEY = "ck_billing_test"
# 1,000 input and 500 output tokens of claude-sonnet-4-7: 11.025 credits, billed 12.
USAGE_12 = {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500}
ANTHROPIC_USAGE_12 = {"input_tokens": 1000, "output_tokens": 500}


def make_governor(
    backend: Backend,
    clock: ManualClock,
    *,
    balance: int = 1000,
    spending_limit: int | None = None,
    hourly_budget: int | None = None,
    daily_budget: int | None = None,
    billing: BillingConfig | None = None,
    insurance: InsuranceConfig | None = None,
) -> Governor:
    config = Config(
        billing=billing or BillingConfig(),
        insurance=insurance or InsuranceConfig(),
        accounts={"acme": AccountEntry(balance=balance)},
        keys={
            "k": KeyEntry(
                account="acme",
                key=KEY,
                spending_limit=spending_limit,
                hourly_budget=hourly_budget,
                daily_budget=daily_budget,
            )
        },
    )
    return Governor(config, backend=backend, clock=clock, registry=CollectorRegistry())


def stack(app: ASGIApp, gov: Governor, sink: MemorySink | None = None) -> ASGIApp:
    """Context -> usage log -> billing -> *app*, as ``wrap()`` orders them."""
    return ContextMiddleware(
        UsageLogMiddleware(BillingMiddleware(app, governor=gov), governor=gov, sink=sink),
        governor=gov,
    )


def chat_body(**extra: Any) -> dict[str, Any]:
    return {
        "model": "claude-sonnet-4-7",
        "messages": [{"role": "user", "content": "hi"}],
        # Reserves 16 credits: 5 input tokens + 1,000 output tokens at Sonnet prices.
        "max_tokens": 1000,
        **extra,
    }


async def _start(send: Send, status: int, ctype: bytes, length: int | None = None) -> None:
    headers = [(b"content-type", ctype)]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})


def chat_completion(usage: dict[str, Any] | None = USAGE_12, model: str = "x") -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hello"},
                "finish_reason": "stop",
            }
        ],
    }
    if usage is not None:
        body["usage"] = usage
    return body


def anthropic_message(model: str = "claude-sonnet-4-7") -> dict[str, Any]:
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": "hello"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": ANTHROPIC_USAGE_12,
    }


def json_app(
    clock: ManualClock, payload: Any, *, work_s: float = 0.0, status: int = 200
) -> ASGIApp:
    """Answers *payload* as JSON after advancing *clock* by *work_s*."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        clock.advance(work_s)
        data = json.dumps(payload).encode()
        await _start(send, status, b"application/json", len(data))
        await send({"type": "http.response.body", "body": data})

    return app


def sse_chat_app(
    clock: ManualClock, *, work_s: float = 0.0, usage: dict[str, Any] | None = USAGE_12
) -> ASGIApp:
    """A chat-completions stream; the clock moves *work_s* across it; usage last."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await _start(send, 200, b"text/event-stream")
        for i in range(3):
            chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "x"}
            chunk["choices"] = [{"index": 0, "delta": {"content": f"t{i}"}, "finish_reason": None}]
            await send(
                {
                    "type": "http.response.body",
                    "body": f"data: {json.dumps(chunk)}\n\n".encode(),
                    "more_body": True,
                }
            )
            clock.advance(work_s / 3)
        if usage is not None:
            last = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "x"}
            last["choices"] = []
            last["usage"] = usage
            await send(
                {
                    "type": "http.response.body",
                    "body": f"data: {json.dumps(last)}\n\n".encode(),
                    "more_body": True,
                }
            )
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    return app


class HeldApp:
    """Holds every request on a gate, then answers a completion with ``USAGE_12``."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.inside = 0
        self.arrived = asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        message: Message = await receive()
        assert message["type"] == "http.request"
        self.inside += 1
        self.arrived.set()
        await self.gate.wait()
        data = json.dumps(chat_completion()).encode()
        await _start(send, 200, b"application/json", len(data))
        await send({"type": "http.response.body", "body": data})


def sse_anthropic_app(clock: ManualClock, *, work_s: float = 0.0) -> ASGIApp:
    """An Anthropic messages stream (usage in message_start and message_delta)."""
    message = {**anthropic_message(), "content": [], "stop_reason": None}
    message["usage"] = {"input_tokens": 1000, "output_tokens": 1}
    events: list[tuple[str, dict[str, Any]]] = [
        ("message_start", {"type": "message_start", "message": message}),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "hello"},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": 500},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await _start(send, 200, b"text/event-stream")
        for i, (name, data) in enumerate(events):
            frame = f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
            last = i == len(events) - 1
            await send({"type": "http.response.body", "body": frame, "more_body": not last})
            clock.advance(work_s / len(events))

    return app
