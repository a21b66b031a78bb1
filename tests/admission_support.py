"""Shared pieces of the admission tests: a keyed gated app, a factory, waiting helpers."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CollectorRegistry

from governor import headers as h
from governor.admission import AdmissionMiddleware, Pool
from governor.backends import Backend
from governor.clock import ManualClock
from governor.config import AdmissionConfig, Config, KeyEntry, ModelEntry
from governor.runtime import Governor
from governor.types import ASGIApp, Receive, Scope, Send
from tests.helpers import Result, auth, call

MODEL = "gpt-5-5"
CLAUDE = "claude-sonnet-4-7"
TAG = "x-test-id"


class KeyedApp:
    """Holds each request until the gate named by its ``x-test-id`` opens; records the
    order requests entered and how many were inside at once."""

    def __init__(self) -> None:
        self.gates: collections.defaultdict[str, asyncio.Event] = collections.defaultdict(
            asyncio.Event
        )
        self.order: list[str] = []
        self.inside = 0
        self.peak = 0
        self.bodies: list[bytes] = []

    def open(self, *tags: str) -> None:
        for tag in tags:
            self.gates[tag].set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        self.bodies.append(message.get("body", b""))
        tag = (h.get(scope["headers"], TAG.encode()) or b"").decode()
        self.order.append(tag)
        self.inside += 1
        self.peak = max(self.peak, self.inside)
        try:
            await self.gates[tag].wait()
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


def make_governor(
    backend: Backend,
    clock: ManualClock,
    *,
    limit: int | None = 2,
    keys: dict[str, KeyEntry] | None = None,
    queue_tokens: int | None = None,
    **admission: Any,
) -> Governor:
    admission.setdefault("lease_ttl_s", 5.0)
    admission.setdefault("heartbeat_s", 1.0)
    models: dict[str, ModelEntry] = {}
    if limit is not None or queue_tokens is not None:
        entry = ModelEntry(concurrency=limit, queue_tokens=queue_tokens)
        models = {MODEL: entry, CLAUDE: entry}
    config = Config(
        demo_keys=True,
        admission=AdmissionConfig(**admission),
        models=models,
        keys=keys or {},
    )
    return Governor(config, backend=backend, clock=clock, registry=CollectorRegistry())


def request(
    app: ASGIApp,
    tag: str = "",
    *,
    key: str = "ck_alice",
    model: str = MODEL,
    disconnect: asyncio.Event | None = None,
    stream: bool = False,
) -> Awaitable[Result]:
    """A chat (or, for Claude models, messages) call tagged *tag*."""
    headers = {**auth(key), TAG: tag}
    if model.startswith("claude"):
        body: dict[str, Any] = {"model": model, "max_tokens": 100, "messages": []}
        path = "/v1/messages"
    else:
        body = {"model": model, "max_tokens": 100, "messages": [], "stream": stream}
        path = "/v1/managed/chat/completions"
    return call(app, path=path, headers=headers, json_body=body, disconnect=disconnect)


def sample(gov: Governor, name: str, **labels: str) -> float:
    value = gov.metrics.registry.get_sample_value(f"governor_{name}", labels)
    return 0.0 if value is None else value


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Yield to the loop until *predicate* holds (Redis round trips need real time)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.001)


async def queued(gov: Governor, n: int, model: str = MODEL) -> None:
    """Wait until *n* requests of this worker wait in *model*'s queue."""
    await until(lambda: sample(gov, "admission_queue_depth", model=model) == n)


async def settled(mw: AdmissionMiddleware, model: str = MODEL, limit: int = 2) -> None:
    """Every slot of *model* back and nobody waiting (in the backend itself)."""
    pool = Pool(model, limit)
    loop = asyncio.get_running_loop()
    end = loop.time() + 10
    while True:
        stats = await mw.slots.stats(pool)
        if stats.held == 0 and stats.queued == 0:
            return
        if loop.time() > end:
            raise AssertionError(f"slots not back: {stats}")
        await asyncio.sleep(0.005)
