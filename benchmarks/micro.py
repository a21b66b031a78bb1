"""In-process micro-benchmark: the per-request cost of each governor middleware and of
the full stack over a bare app, by direct ASGI calls (no sockets, no HTTP client).

    python -m benchmarks.micro [--requests 20000] [--repeat 5] [--json]
                               [--redis-url redis://127.0.0.1:6379/0]

Each variant runs the same request against the same trivial app; the figure is the best
of several repeats of the median-free mean (µs per request), and the overhead is that
minus the bare app's figure from the same run. Limits are raised far above the request
count so that no guard refuses: what is measured is the cost of admitting.

With ``--redis-url`` the full stack also runs on the Redis backend (a unique key
prefix, its keys deleted afterwards), and the Redis commands and round trips governor
sends per request are counted inside redis-py (exact, whoever else uses the server).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import governor as g
from governor.config import BillingConfig, Config, ModelEntry, RateLimitConfig, RedisConfig
from governor.types import ASGIApp, Message, Receive, Scope, Send

BODY = json.dumps(
    {
        "model": "gpt-5-5",
        "messages": [{"role": "user", "content": "Review this function for correctness."}],
        "max_tokens": 256,
    }
).encode()
RESPONSE = json.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
    }
).encode()
HEADERS = [
    (b"authorization", b"Bearer ck_bench"),
    (b"content-type", b"application/json"),
    (b"content-length", str(len(BODY)).encode()),
]
START: Message = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(RESPONSE))],
}


async def upstream(scope: Scope, receive: Receive, send: Send) -> None:
    """The cheapest honest app: read the body, answer a chat completion with usage."""
    await receive()
    await send(dict(START))
    await send({"type": "http.response.body", "body": RESPONSE})


def bench_config(redis_url: str | None = None, prefix: str = "gov") -> Config:
    huge = 10**12
    config = Config(
        demo_keys=True,
        ratelimit=RateLimitConfig(account_rpm=huge),
        billing=BillingConfig(default_balance=huge),
        accounts={},
        models={"gpt-5-5": ModelEntry(rpm=huge, tpm=huge, concurrency=10_000)},
    )
    if redis_url is None:
        return config
    redis = RedisConfig(url=redis_url, key_prefix=prefix)
    return dataclasses.replace(config, backend="redis", redis=redis)


def _scope() -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/managed/chat/completions",
        "raw_path": b"/v1/managed/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": list(HEADERS),
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }


async def run_variant(app: ASGIApp, requests: int, warmup: int = 200) -> float:
    """Mean µs per request over *requests* sequential calls."""
    body_message: Message = {"type": "http.request", "body": BODY, "more_body": False}
    statuses: list[int] = []

    async def receive() -> Message:
        return body_message

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    for _ in range(warmup):  # warm up caches, lazily started tasks, script loads
        await app(_scope(), receive, send)
    statuses.clear()
    gc.collect()
    started = time.perf_counter()
    for _ in range(requests):
        await app(_scope(), receive, send)
    elapsed = time.perf_counter() - started
    bad = [s for s in statuses if s != 200]
    if bad:
        raise RuntimeError(f"variant refused requests: {sorted(set(bad))}")
    return elapsed / requests * 1e6


# name -> builder of (app, governor); layers join as governor ships them.
LAYERS = (
    "ContextMiddleware",
    "FingerprintMiddleware",
    "BreakerMiddleware",
    "RateGuardMiddleware",
    "BillingMiddleware",
    "AdmissionMiddleware",
)


def variants() -> dict[str, Callable[[g.Governor], ASGIApp]]:
    out: dict[str, Callable[[g.Governor], ASGIApp]] = {"bare app": lambda gov: upstream}

    def layer(cls: Any) -> Callable[[g.Governor], ASGIApp]:
        return lambda gov: cls(upstream, governor=gov)

    for name in LAYERS:
        cls: Any = getattr(g, name, None)
        if cls is not None:
            out[name] = layer(cls)
    out["full stack (wrap)"] = lambda gov: g.wrap(upstream, gov)
    return out


async def main_async(requests: int, repeat: int) -> list[tuple[str, float]]:
    results: list[tuple[str, float]] = []
    for name, build in variants().items():
        best = float("inf")
        for _ in range(repeat):
            gov = g.Governor(bench_config())
            try:
                best = min(best, await run_variant(build(gov), requests))
            finally:
                await gov.aclose()
        results.append((name, best))
    return results


class RedisCounter:
    """Counts the commands and round trips redis-py sends, by patching it in this process."""

    def __init__(self) -> None:
        self.commands = 0
        self.round_trips = 0

    @contextlib.contextmanager
    def patched(self) -> Iterator[RedisCounter]:
        from redis.asyncio.client import Pipeline, Redis
        from redis.asyncio.connection import AbstractConnection

        execute_command = Redis.execute_command
        pipeline_execute = Pipeline.execute
        send_packed = AbstractConnection.send_packed_command
        counter = self

        async def counted_command(self: Any, *args: Any, **kwargs: Any) -> Any:
            counter.commands += 1
            return await execute_command(self, *args, **kwargs)

        async def counted_pipeline(self: Any, *args: Any, **kwargs: Any) -> Any:
            counter.commands += len(self.command_stack)
            return await pipeline_execute(self, *args, **kwargs)

        async def counted_send(self: Any, *args: Any, **kwargs: Any) -> Any:
            counter.round_trips += 1
            return await send_packed(self, *args, **kwargs)

        Redis.execute_command = counted_command  # type: ignore[method-assign]
        Pipeline.execute = counted_pipeline  # type: ignore[method-assign]
        AbstractConnection.send_packed_command = counted_send  # type: ignore[method-assign]
        try:
            yield self
        finally:
            Redis.execute_command = execute_command  # type: ignore[method-assign]
            Pipeline.execute = pipeline_execute  # type: ignore[method-assign]
            AbstractConnection.send_packed_command = send_packed  # type: ignore[method-assign]


async def redis_variant(redis_url: str, requests: int) -> dict[str, Any]:
    """The full stack on the Redis backend: µs/request and what it sends to Redis."""
    prefix = f"bench-micro-{uuid.uuid4().hex[:8]}"
    gov = g.Governor(bench_config(redis_url, prefix))
    counter = RedisCounter()
    try:
        app = g.wrap(upstream, gov)
        await run_variant(app, 50)  # scripts loaded, pool filled
        with counter.patched():
            us = await run_variant(app, requests, warmup=0)
        info = await gov.backend.redis.info("server")  # type: ignore[attr-defined]
        version = str(info.get("redis_version", "?"))
        keys = [k async for k in gov.backend.redis.scan_iter(match=f"{prefix}*")]  # type: ignore[attr-defined]
        for i in range(0, len(keys), 500):
            await gov.backend.redis.unlink(*keys[i : i + 500])  # type: ignore[attr-defined]
    finally:
        await gov.aclose()
    return {
        "us": us,
        "requests": requests,
        "commands_per_request": counter.commands / requests,
        "round_trips_per_request": counter.round_trips / requests,
        "redis_version": version,
    }


def report(results: list[tuple[str, float]]) -> str:
    bare = results[0][1]
    lines = [
        "| variant | µs / request | added over bare app (µs) |",
        "|---|---:|---:|",
    ]
    for name, us in results:
        lines.append(f"| {name} | {us:.1f} | {us - bare:+.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="JSON for benchmarks.run")
    parser.add_argument("--redis-url", default=None, help="also the full stack on Redis")
    args = parser.parse_args()
    results = asyncio.run(main_async(args.requests, args.repeat))
    redis = None
    if args.redis_url:
        redis = asyncio.run(redis_variant(args.redis_url, max(200, args.requests // 10)))
    if args.json:
        out = {
            "requests": args.requests,
            "repeat": args.repeat,
            "results": [{"name": n, "us": us} for n, us in results],
            "redis": redis,
        }
        print(json.dumps(out))
        return
    print(report(results))
    if redis is not None:
        print(
            f"\nfull stack on Redis: {redis['us']:.0f} µs/request, "
            f"{redis['commands_per_request']:.2f} commands and "
            f"{redis['round_trips_per_request']:.2f} round trips per request"
        )


if __name__ == "__main__":
    main()
