"""Shared helpers of the rate-guard tests."""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client import CollectorRegistry

from governor import Governor
from governor.backends import Backend
from governor.clock import ManualClock
from governor.config import Config
from governor.ratelimit import Guard, Limit, RateGuardMiddleware
from governor.tokens import estimate_input_tokens
from governor.types import ASGIApp, Receive, Scope, Send
from tests.helpers import Result, auth, call

# Long enough that no window ends while a test runs: the clock never matters.
LONG = 10_000_000

CHAT = "/v1/managed/chat/completions"
IMAGES = "/v1/managed/images/generations"
MESSAGES = "/v1/messages"


def chat(max_tokens: int = 100, model: str = "gpt-5-5", **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "hello there"}],
        **extra,
    }


def image(n: int = 1, model: str = "gpt-image-2") -> dict[str, Any]:
    return {"model": model, "prompt": "a banana", "n": n}


def message(max_tokens: int = 100, model: str = "claude-sonnet-4-7") -> dict[str, Any]:
    return {
        "model": model,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "hello there"}],
    }


def reserve(body: dict[str, Any]) -> int:
    """The tokens a request reserves: the input estimate plus its cap."""
    return estimate_input_tokens(body) + int(body.get("max_tokens", 4096))


def make(
    app: ASGIApp,
    backend: Backend,
    config: Config | None = None,
    *,
    window_s: int = LONG,
    registry: CollectorRegistry | None = None,
) -> RateGuardMiddleware:
    gov = Governor(
        config if config is not None else Config(demo_keys=True),
        backend=backend,
        clock=ManualClock(),
        registry=registry,
    )
    return RateGuardMiddleware(app, governor=gov, window_s=window_s)


def limit_of(mw: RateGuardMiddleware, guard: Guard, amount: int, *ids: str) -> Limit:
    """The Limit a guard uses, to read it back with limits' own strategy."""
    return Limit(guard, mw.items.get(amount, guard.value[-3:]), ids)


async def remaining(mw: RateGuardMiddleware, guard: Guard, amount: int, *ids: str) -> int:
    """What limits' strategy says is left of a limit."""
    stats = await mw.store.stats(limit_of(mw, guard, amount, *ids))
    return int(stats.remaining)


async def post(
    app: ASGIApp, body: dict[str, Any], path: str = CHAT, key: str = "ck_alice"
) -> Result:
    return await call(app, path=path, json_body=body, headers=auth(key))


class Gate:
    """An app that holds every request until opened, and knows when *n* calls have
    either entered it or finished elsewhere (refused), so a test can open it only
    when every concurrent request has been decided."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.open = asyncio.Event()
        self.decided = asyncio.Event()
        self.inside = 0
        self._count = 0

    def mark(self) -> None:
        self._count += 1
        if self._count >= self.n:
            self.decided.set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        self.inside += 1
        self.mark()
        await self.open.wait()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"ok":true}'})

    async def run(self, app: ASGIApp, calls: list[Any]) -> list[Result]:
        """Run every coroutine in *calls* at once; open the gate once all are decided."""
        tasks = [asyncio.ensure_future(c) for c in calls]

        def done(task: asyncio.Future[Result]) -> None:
            if task.result().status != 200:
                self.mark()

        for task in tasks:
            task.add_done_callback(done)
        await asyncio.wait_for(self.decided.wait(), 10)
        self.open.set()
        return list(await asyncio.gather(*tasks))
