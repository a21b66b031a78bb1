"""In-process micro-benchmark: the per-request cost of each governor middleware and of
the full stack over a bare app, by direct ASGI calls (no sockets, no HTTP client).

    python -m benchmarks.micro [--requests 20000] [--repeat 5]

Each variant runs the same request against the same trivial app; the figure is the best
of several repeats of the median-free mean (µs per request), and the overhead is that
minus the bare app's figure from the same run. Limits are raised far above the request
count so that no guard refuses: what is measured is the cost of admitting.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import time
from collections.abc import Callable
from typing import Any

import governor as g
from governor.config import BillingConfig, Config, ModelEntry, RateLimitConfig
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


def bench_config() -> Config:
    huge = 10**12
    return Config(
        demo_keys=True,
        ratelimit=RateLimitConfig(account_rpm=huge),
        billing=BillingConfig(default_balance=huge),
        accounts={},
        models={"gpt-5-5": ModelEntry(rpm=huge, tpm=huge, concurrency=10_000)},
    )


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


async def run_variant(app: ASGIApp, requests: int) -> float:
    """Mean µs per request over *requests* sequential calls."""
    body_message: Message = {"type": "http.request", "body": BODY, "more_body": False}
    statuses: list[int] = []

    async def receive() -> Message:
        return body_message

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    for _ in range(200):  # warm up caches, lazily started tasks, script loads
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
    args = parser.parse_args()
    print(report(asyncio.run(main_async(args.requests, args.repeat))))


if __name__ == "__main__":
    main()
