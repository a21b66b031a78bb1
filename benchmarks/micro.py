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
The server-side count (``INFO commandstats`` before and after, so the calls Lua scripts
make count too, per command) is exact only on a Redis nobody else uses meanwhile: on a
shared one it includes their commands.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import statistics
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


async def run_variant(
    app: ASGIApp,
    requests: int,
    warmup: int = 200,
    before_each: Callable[[], None] | None = None,
) -> float:
    """Mean µs per request over *requests* sequential calls (*before_each* runs before each)."""
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
        if before_each is not None:
            before_each()
        await app(_scope(), receive, send)
    elapsed = time.perf_counter() - started
    bad = [s for s in statuses if s != 200]
    if bad:
        raise RuntimeError(f"variant refused requests: {sorted(set(bad))}")
    return elapsed / requests * 1e6


# name -> builder of (app, governor); layers join as governor ships them.
LAYERS = (
    "ContextMiddleware",
    "UsageLogMiddleware",
    "FingerprintMiddleware",
    "BreakerMiddleware",
    "RateGuardMiddleware",
    "BillingMiddleware",
    "AdmissionMiddleware",
)


def variants(inner: ASGIApp = upstream) -> dict[str, Callable[[g.Governor], ASGIApp]]:
    out: dict[str, Callable[[g.Governor], ASGIApp]] = {"bare app": lambda gov: inner}

    def layer(cls: Any) -> Callable[[g.Governor], ASGIApp]:
        return lambda gov: cls(inner, governor=gov)

    for name in LAYERS:
        cls: Any = getattr(g, name, None)
        if cls is not None:
            out[name] = layer(cls)
    out["full stack (wrap)"] = lambda gov: g.wrap(inner, gov)
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

        from governor.backends.batching import ScriptBatcher

        execute_command = Redis.execute_command
        submit = ScriptBatcher.submit
        pipeline_execute = Pipeline.execute
        send_packed = AbstractConnection.send_packed_command
        counter = self

        async def counted_command(self: Any, *args: Any, **kwargs: Any) -> Any:
            counter.commands += 1
            return await execute_command(self, *args, **kwargs)  # type: ignore[no-untyped-call]

        async def counted_pipeline(self: Any, *args: Any, **kwargs: Any) -> Any:
            counter.commands += len(self.command_stack)
            return await pipeline_execute(self, *args, **kwargs)

        def counted_submit(self: Any, *args: Any, **kwargs: Any) -> Any:
            # Auto-pipelined script calls bypass execute_command (see backends/batching).
            counter.commands += 1
            return submit(self, *args, **kwargs)

        async def counted_send(self: Any, *args: Any, **kwargs: Any) -> Any:
            counter.round_trips += 1
            return await send_packed(self, *args, **kwargs)

        Redis.execute_command = counted_command  # type: ignore[method-assign]
        Pipeline.execute = counted_pipeline  # type: ignore[method-assign]
        AbstractConnection.send_packed_command = counted_send  # type: ignore[method-assign]
        ScriptBatcher.submit = counted_submit  # type: ignore[method-assign]
        try:
            yield self
        finally:
            Redis.execute_command = execute_command  # type: ignore[method-assign]
            Pipeline.execute = pipeline_execute  # type: ignore[method-assign]
            AbstractConnection.send_packed_command = send_packed  # type: ignore[method-assign]
            ScriptBatcher.submit = submit  # type: ignore[method-assign]


def server_calls(commandstats: dict[str, Any]) -> dict[str, int]:
    """Calls so far per command, from ``INFO commandstats`` (script-internal calls too)."""
    return {
        name.removeprefix("cmdstat_"): int(v["calls"])
        for name, v in commandstats.items()
        if isinstance(v, dict) and "calls" in v
    }


async def drop_keys(client: Any, prefix: str) -> None:
    """Delete a run's keys (its unique prefix) from a Redis others may share."""
    keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
    for i in range(0, len(keys), 500):
        await client.unlink(*keys[i : i + 500])


async def redis_variants(redis_url: str, requests: int) -> dict[str, Any]:
    """Each layer and the full stack on the Redis backend: µs/request and what each sends."""
    out: dict[str, Any] = {"requests": requests, "layers": []}
    counter = RedisCounter()
    starts: list[int] = []
    entries: list[int] = []

    async def marked(scope: Scope, receive: Receive, send: Send) -> None:
        # Round trips so far when the request reaches the app: the admission path's.
        entries.append(counter.round_trips)
        await upstream(scope, receive, send)

    for name, build in variants(marked).items():
        if name == "bare app":
            continue
        prefix = f"bench-micro-{uuid.uuid4().hex[:8]}"
        gov = g.Governor(bench_config(redis_url, prefix))
        counter.commands = counter.round_trips = 0
        try:
            app = build(gov)
            await run_variant(app, 50)  # scripts loaded, pool filled
            client: Any = getattr(gov.backend, "redis")  # noqa: B009 (Backend has no .redis)
            server0 = server_calls(await client.info("commandstats"))
            starts.clear()
            entries.clear()
            with counter.patched():
                started = time.perf_counter()
                us = await run_variant(
                    app, requests, warmup=0, before_each=lambda: starts.append(counter.round_trips)
                )
                # Background (heartbeats, breaker syncs) over as long again, idle: what
                # the requests did not send themselves.
                sent = counter.commands, counter.round_trips
                await asyncio.sleep(time.perf_counter() - started)
                idle = counter.commands - sent[0], counter.round_trips - sent[1]
            server1 = server_calls(await client.info("commandstats"))
            out["redis_version"] = str((await client.info("server")).get("redis_version", "?"))
            await drop_keys(client, prefix)
        finally:
            await gov.aclose()
        before = [e - b for b, e in zip(starts, entries, strict=True)]
        server = {
            name: (calls - server0.get(name, 0)) / requests
            for name, calls in server1.items()
            if name != "info" and calls > server0.get(name, 0)
        }
        row = {
            "name": name,
            "us": us,
            "commands_per_request": max(0, sent[0] - idle[0]) / requests,
            "round_trips_per_request": max(0, sent[1] - idle[1]) / requests,
            "background_commands": idle[0],
            "admission_round_trips": statistics.median(before) if before else 0,
            "admission_round_trips_max": max(before, default=0),
            "server_commands_per_request": sum(server.values()),
            "server_commands": dict(sorted(server.items(), key=lambda kv: -kv[1])),
        }
        out["layers"].append(row)
        if name == "full stack (wrap)":
            out.update({k: v for k, v in row.items() if k != "name"})
    out["concurrent"] = await redis_concurrent(redis_url, requests, counter)
    return out


async def redis_concurrent(
    redis_url: str, requests: int, counter: RedisCounter, clients: int = 64
) -> dict[str, Any]:
    """The full stack on Redis with *clients* requests in flight at once: CPU µs per
    request (this process) and the round trips auto-pipelining leaves per request."""
    prefix = f"bench-micro-{uuid.uuid4().hex[:8]}"
    gov = g.Governor(bench_config(redis_url, prefix))
    body_message: Message = {"type": "http.request", "body": BODY, "more_body": False}
    statuses: list[int] = []

    async def receive() -> Message:
        return body_message

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    app = g.wrap(upstream, gov)

    async def client(n: int) -> None:
        for _ in range(n):
            await app(_scope(), receive, send)

    each = max(1, requests // clients)
    try:
        await asyncio.gather(*(client(4) for _ in range(clients)))  # warm: scripts, pool
        statuses.clear()
        counter.commands = counter.round_trips = 0
        with counter.patched():
            cpu = time.process_time()
            await asyncio.gather(*(client(each) for _ in range(clients)))
            cpu = time.process_time() - cpu
        await drop_keys(gov.backend.redis, prefix)
    finally:
        await gov.aclose()
    total = each * clients
    if any(s != 200 for s in statuses):
        raise RuntimeError(f"concurrent run refused requests: {sorted(set(statuses))}")
    return {
        "clients": clients,
        "requests": total,
        "cpu_us": cpu / total * 1e6,
        "commands_per_request": counter.commands / total,
        "round_trips_per_request": counter.round_trips / total,
    }


def report(results: list[tuple[str, float]]) -> str:
    bare = results[0][1] if results else 0.0
    lines = [
        "| variant | µs / request | added over bare app (µs) |",
        "|---|---:|---:|",
    ]
    for name, us in results:
        lines.append(f"| {name} | {us:.1f} | {us - bare:+.1f} |")
    return "\n".join(lines)


def redis_report(redis: dict[str, Any]) -> str:
    lines = [
        "| variant (Redis backend) | µs / request | Redis commands / request "
        "| round trips / request | round trips before the upstream call (median) "
        "| server-side commands / request |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    breakdown = []
    for row in redis["layers"]:
        server = row.get("server_commands_per_request")
        lines.append(
            f"| {row['name']} | {row['us']:.0f} | {row['commands_per_request']:.2f} "
            f"| {row['round_trips_per_request']:.2f} | {row['admission_round_trips']:g} "
            f"(most {row.get('admission_round_trips_max', '?')}) "
            f"| {'?' if server is None else f'{server:.2f}'} |"
        )
        if row.get("server_commands"):
            calls = ", ".join(f"{k} {v:.2f}" for k, v in row["server_commands"].items())
            breakdown.append(f"- {row['name']}: {calls}")
    conc = redis.get("concurrent")
    if conc:
        lines.append(
            f"| full stack, {conc['clients']} requests at once (auto-pipelined) "
            f"| {conc['cpu_us']:.0f} CPU | {conc['commands_per_request']:.2f} "
            f"| {conc['round_trips_per_request']:.2f} | – | – |"
        )
    if breakdown:
        note = "Server side, per request (INFO commandstats; on a shared Redis, others' too):"
        lines += ["", note, "", *breakdown]
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
        redis = asyncio.run(redis_variants(args.redis_url, max(200, args.requests // 10)))
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
        print("\nOn the Redis backend:\n")
        print(redis_report(redis))


if __name__ == "__main__":
    main()
