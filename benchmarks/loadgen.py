"""An asyncio load generator for OpenAI-style chat completions, on aiohttp's client.

Closed loop: *concurrency* workers, each sending its next request as soon as the last
one ends. Open loop: requests start at a fixed *rate* per second whatever the latency
(coordinated omission is avoided: latency is measured from the scheduled start).
Both stop after *requests* requests or *duration* seconds, whichever comes first: every
run is bounded in count and time.

    python -m benchmarks.loadgen URL --concurrency 64 --requests 20000
    python -m benchmarks.loadgen URL --rate 500 --duration 10 --stream
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import time
from collections import Counter
from typing import Any

import aiohttp

PATH = "/v1/managed/chat/completions"


def chat_body(model: str, stream: bool) -> bytes:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "Review this function for correctness."}],
        "max_tokens": 64,
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


@dataclasses.dataclass
class Stats:
    """What one load run saw."""

    sent: int = 0
    elapsed: float = 0.0
    latencies: list[float] = dataclasses.field(default_factory=list)
    statuses: Counter[int] = dataclasses.field(default_factory=Counter)
    errors: Counter[str] = dataclasses.field(default_factory=Counter)

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def rps(self) -> float:
        return self.ok / self.elapsed if self.elapsed else 0.0

    def percentile(self, p: float) -> float:
        if not self.latencies:
            return float("nan")
        if len(self.latencies) == 1:
            return self.latencies[0]
        return statistics.quantiles(self.latencies, n=1000, method="inclusive")[
            min(998, int(p * 1000) - 1)
        ]

    def summary(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "ok": self.ok,
            "rps": round(self.rps, 1),
            "p50_ms": round(self.percentile(0.50) * 1000, 3),
            "p95_ms": round(self.percentile(0.95) * 1000, 3),
            "p99_ms": round(self.percentile(0.99) * 1000, 3),
            "statuses": dict(self.statuses),
            "errors": dict(self.errors),
        }


async def _one(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
    stats: Stats,
    started: float,
) -> None:
    stats.sent += 1
    try:
        async with session.post(url, data=body, headers=headers) as response:
            async for _ in response.content.iter_any():
                pass
            stats.statuses[response.status] += 1
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        stats.errors[type(exc).__name__] += 1
        return
    stats.latencies.append(time.perf_counter() - started)


async def run(
    base_url: str,
    *,
    concurrency: int = 64,
    rate: float | None = None,
    requests: int = 10_000,
    duration: float = 30.0,
    stream: bool = False,
    model: str = "gpt-5-5",
    key: str = "ck_bench",
    keys: list[str] | None = None,
    extra_headers: dict[str, str] | None = None,
) -> Stats:
    """Run one bounded load against *base_url* and return what it saw.

    With *keys*, closed-loop worker *i* (open loop: request *i*) uses ``keys[i % len]``:
    several accounts share the load.
    """
    url = base_url.rstrip("/") + PATH
    body = chat_body(model, stream)
    key_list = keys or [key]
    all_headers = [
        {
            "authorization": f"Bearer {k}",
            "content-type": "application/json",
            **(extra_headers or {}),
        }
        for k in key_list
    ]
    stats = Stats()
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)
    deadline = time.perf_counter() + duration
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t0 = time.perf_counter()
        if rate is None:
            remaining = requests

            async def worker(headers: dict[str, str]) -> None:
                nonlocal remaining
                while remaining > 0 and time.perf_counter() < deadline:
                    remaining -= 1
                    await _one(session, url, body, headers, stats, time.perf_counter())

            await asyncio.gather(
                *(worker(all_headers[i % len(all_headers)]) for i in range(concurrency))
            )
        else:
            interval = 1.0 / rate
            tasks: set[asyncio.Task[None]] = set()
            for i in range(requests):
                scheduled = t0 + i * interval
                if scheduled >= deadline:
                    break
                delay = scheduled - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                headers = all_headers[i % len(all_headers)]
                task = asyncio.create_task(_one(session, url, body, headers, stats, scheduled))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(tasks, timeout=max(1.0, deadline - time.perf_counter() + 5))
        stats.elapsed = time.perf_counter() - t0
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rate", type=float, default=None, help="open loop: requests/s")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--model", default="gpt-5-5")
    parser.add_argument("--key", default="ck_bench")
    args = parser.parse_args()
    stats = asyncio.run(
        run(
            args.url,
            concurrency=args.concurrency,
            rate=args.rate,
            requests=args.requests,
            duration=args.duration,
            stream=args.stream,
            model=args.model,
            key=args.key,
        )
    )
    print(json.dumps(stats.summary(), indent=2))


if __name__ == "__main__":
    main()
