"""A worker process for the multi-process rate-guard test (importable under spawn)."""

from __future__ import annotations

import asyncio
from typing import Any

from governor import Governor
from governor.config import Config, ModelEntry, RateLimitConfig, RedisConfig
from governor.ratelimit import RateGuardMiddleware
from tests.apps import EchoApp
from tests.helpers import auth, call

BODY = {"model": "gpt-5-5", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}


async def hammer(url: str, prefix: str, model: ModelEntry, n: int, barrier: Any) -> int:
    """Send *n* concurrent requests through a rate guard on the shared Redis; count 200s."""
    # Room for every concurrent request and generous timeouts on a slow CI box; and
    # fail closed, so that a Redis hiccup could only admit fewer, never more.
    config = Config(
        demo_keys=True,
        backend="redis",
        redis=RedisConfig(
            url=url,
            key_prefix=prefix,
            max_connections=n,
            pool_timeout_s=30,
            socket_timeout_s=10,
            connect_timeout_s=10,
        ),
        ratelimit=RateLimitConfig(fail_mode="closed"),
        models={"gpt-5-5": model},
    )
    async with Governor(config) as gov:
        app = RateGuardMiddleware(EchoApp(payload={"ok": True}), governor=gov, window_s=10_000_000)
        # Open the pool's connections first, so that every process starts hammering at
        # once when the barrier lets them go.
        redis = gov.backend.redis
        await asyncio.gather(*(redis.ping() for _ in range(min(n, 60))))
        await asyncio.to_thread(barrier.wait)
        results = await asyncio.gather(
            *(call(app, json_body=BODY, headers=auth("ck_shared")) for _ in range(n))
        )
    assert all(r.status in (200, 429) for r in results), {r.status for r in results}
    return sum(r.status == 200 for r in results)


def run(url: str, prefix: str, model: ModelEntry, n: int, barrier: Any, out: Any) -> None:
    """Process entry: puts the number admitted, or the error, on *out*."""
    try:
        out.put(asyncio.run(hammer(url, prefix, model, n, barrier)))
    except BaseException as exc:
        out.put(repr(exc))
        raise
