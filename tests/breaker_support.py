"""A scripted upstream and a harness for the breaker tests."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from prometheus_client import CollectorRegistry

from governor.backends import Backend, MemoryBackend
from governor.breaker import BreakerMiddleware, BreakerRegistry
from governor.clock import SYSTEM_CLOCK, Clock, ManualClock
from governor.config import BreakerConfig, Config
from governor.context import get_context
from governor.errors import RateLimited
from governor.runtime import Governor
from governor.types import ASGIApp, Receive, Scope, Send
from tests.helpers import Result, auth, call

CHAT = {"model": "gpt-5-5", "messages": [{"role": "user", "content": "hi"}]}
MESSAGES = {"model": "claude-sonnet-4-7", "max_tokens": 10, "messages": []}


class Upstream:
    """A fake upstream: answers as ``mode`` says and counts the calls that reached it.

    Modes: ``"ok"``, an int status (an error body), ``"raise"`` (connection refused),
    ``"broken"`` (a stream cut mid-way), ``"sse_error"`` (an ``event: error`` frame after
    a 200), ``"disconnect"`` (the client leaves mid-stream), ``"refuse"`` (an inner
    governor layer refuses), ``"gate"`` (wait on :attr:`gate`, then ok).
    """

    def __init__(self, governor: Governor | None = None) -> None:
        self.mode: Any = "ok"
        self.calls = 0
        self.inside = 0
        self.gate = asyncio.Event()
        self._entered = asyncio.Event()
        self.governor = governor
        # Time the fake upstream takes before its first byte (a ManualClock advance).
        self.delay = 0.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        self.calls += 1
        self.inside += 1
        self._entered.set()
        try:
            await self._answer(scope, receive, send)
        finally:
            self.inside -= 1

    async def until_inside(self, n: int) -> None:
        """Wait until *n* calls are inside at once."""
        while self.inside < n:
            self._entered.clear()
            await self._entered.wait()

    async def _answer(self, scope: Scope, receive: Receive, send: Send) -> None:
        mode = self.mode
        if self.delay and self.governor is not None:
            clock = self.governor.clock
            assert isinstance(clock, ManualClock)
            clock.advance(self.delay)
        if mode == "gate":
            await self.gate.wait()
            mode = "ok"
        if mode == "raise":
            raise ConnectionRefusedError("upstream unreachable")
        if mode == "refuse":
            assert self.governor is not None
            ctx = get_context(scope)
            assert ctx is not None
            await self.governor.refuse(ctx, send, RateLimited("slow down", retry_after=1))
            return
        if isinstance(mode, int):
            await _json(send, mode, {"error": {"message": "upstream says no"}})
            return
        if mode == "ok":
            await _json(send, 200, {"ok": True})
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})
        if mode == "sse_error":
            frame = b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error"}}\n\n'
            await send({"type": "http.response.body", "body": frame})
        elif mode == "disconnect":
            message = await receive()
            assert message["type"] == "http.disconnect"
        # "broken": return without finishing the body.


async def _json(send: Send, status: int, payload: Any) -> None:
    data = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": data})


@dataclasses.dataclass
class Harness:
    """A Governor on one backend, a breaker middleware over a scripted upstream."""

    governor: Governor
    upstream: Upstream
    app: BreakerMiddleware
    metrics: CollectorRegistry

    @property
    def clock(self) -> Clock:
        return self.governor.clock

    @property
    def breakers(self) -> BreakerRegistry:
        return self.app.breakers

    @property
    def shared(self) -> bool:
        return self.governor.backend.kind == "redis"

    async def elapse(self, seconds: float) -> None:
        """Let *seconds* pass: a ManualClock moves; with Redis (Lua reads TIME) we wait."""
        if isinstance(self.clock, ManualClock):
            self.clock.advance(seconds)
        else:
            await asyncio.sleep(seconds)

    async def request(self, mode: Any = None, payload: Any = None, **kwargs: Any) -> Result:
        if mode is not None:
            self.upstream.mode = mode
        return await call(
            self.app, headers=auth(), json_body=payload if payload is not None else CHAT, **kwargs
        )

    async def fail(self, times: int, mode: Any = 500) -> None:
        for _ in range(times):
            result = await self.request(mode)
            assert result.header("x-hypereal-managed-circuit") is not None

    def state(self, model: str = "gpt-5-5") -> str:
        return self.breakers.breaker(self.governor.catalog[model]).effective

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.get_sample_value(name, labels)
        return 0.0 if value is None else value


Factory = Callable[..., Harness]


def breaker_config(**overrides: Any) -> BreakerConfig:
    base: dict[str, Any] = {
        "failure_threshold": 3,
        "reset_timeout_s": 0.3,
        "max_reset_timeout_s": 1.2,
        "half_open_probes": 1,
        # Generous for a loaded CI machine: the slow-Redis test sets its own.
        "sync_timeout_s": 2.0,
    }
    base.update(overrides)
    return BreakerConfig(**base)


async def harnesses(backend: Backend) -> AsyncIterator[Factory]:
    made: list[Harness] = []

    def make(app: ASGIApp | None = None, **overrides: Any) -> Harness:
        clock: Clock = ManualClock() if isinstance(backend, MemoryBackend) else SYSTEM_CLOCK
        metrics = CollectorRegistry()
        governor = Governor(
            Config(demo_keys=True, breaker=breaker_config(**overrides)),
            backend=backend,
            clock=clock,
            registry=metrics,
        )
        upstream = Upstream(governor)
        middleware = BreakerMiddleware(app if app is not None else upstream, governor=governor)
        harness = Harness(governor, upstream, middleware, metrics)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        await harness.breakers.aclose()
