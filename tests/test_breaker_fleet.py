"""Breakers shared through Redis: several workers, probe leases, a slow or missing Redis."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from governor import headers as h
from governor.backends import Backend, RedisBackend
from governor.backends.redis import make_client
from governor.breaker import BreakerMiddleware, RedisBreakerStore, Verdict
from governor.clock import SYSTEM_CLOCK
from governor.config import Config, RedisConfig
from governor.runtime import Governor
from tests.breaker_support import Factory, Upstream, breaker_config, harnesses
from tests.conftest import REDIS_URL, make_backend
from tests.helpers import auth, call

CIRCUIT = h.CIRCUIT.lower()
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def make_harness(redis_backend: RedisBackend) -> AsyncIterator[Factory]:
    async for factory in harnesses(redis_backend):
        yield factory


@pytest.fixture
async def real_backend() -> AsyncIterator[RedisBackend]:
    """The real Redis server, under a key prefix of this test's own."""
    async for b in make_backend("redis"):
        assert isinstance(b, RedisBackend)
        yield b


async def test_workers_share_the_state(make_harness: Factory) -> None:
    """One worker opens the breaker; another refuses once it has synced."""
    a, b = make_harness(), make_harness()
    assert (await b.request("ok")).status == 200
    await a.fail(3)
    await b.breakers.sync()
    result = await b.request("ok")
    assert result.status == 503
    assert result.header(CIRCUIT) == "open"
    assert b.upstream.calls == 1


async def test_probes_bounded_across_workers(make_harness: Factory) -> None:
    """In half-open, two workers together let through only half_open_probes callers."""
    a, b = make_harness(half_open_probes=2), make_harness(half_open_probes=2)
    await a.fail(3)
    await b.request("ok")  # b learns the path (and that it is open)
    await a.elapse(0.35)
    for w in (a, b):
        w.upstream.mode = "gate"
    tasks = [
        asyncio.ensure_future(call(w.app, headers=auth(), json_body={"model": "gpt-5-5"}))
        for _ in range(4)
        for w in (a, b)
    ]
    calls = a.upstream.calls + b.upstream.calls
    pending = set(tasks)
    while len(pending) > 2:  # the refused ones answer at once; the probes wait at the gate
        _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    refused = [t.result() for t in tasks if t.done()]
    assert all(r.status == 503 and r.header(CIRCUIT) == "half-open" for r in refused)
    a.upstream.gate.set()
    b.upstream.gate.set()
    results = await asyncio.gather(*tasks)
    assert sum(r.status == 200 for r in results) == 2
    assert a.upstream.calls + b.upstream.calls == calls + 2
    await a.breakers.sync()
    assert a.state() == "closed"


async def test_crashed_probe_lease_expires(redis_backend: RedisBackend) -> None:
    """A probe that never reports back frees its place when its lease runs out."""
    config = breaker_config(probe_lease_s=0.2, reset_timeout_s=0.05)
    store = RedisBreakerStore(redis_backend, config)
    path = "gpt-5-5@openai"
    for _ in range(3):
        await store.record(path, Verdict.FAILURE)
    await asyncio.sleep(0.1)
    assert (await store.probe(path, "crashed"))[1]
    assert not (await store.probe(path, "second"))[1]
    await asyncio.sleep(0.25)
    snap, granted = await store.probe(path, "third")
    assert granted
    assert snap.state == "half-open"


async def test_local_breaker_when_redis_unreachable() -> None:
    """With Redis down every worker keeps breaking on its own, and says it is degraded."""
    cfg = RedisConfig(url="redis://127.0.0.1:1/0", retries=0, connect_timeout_s=0.2)
    registry = CollectorRegistry()
    async with RedisBackend(cfg, client=make_client(cfg)) as backend:
        governor = Governor(
            Config(demo_keys=True, breaker=breaker_config()),
            backend=backend,
            registry=registry,
        )
        upstream = Upstream(governor)
        upstream.mode = 500
        app = BreakerMiddleware(upstream, governor=governor)
        for _ in range(3):
            result = await call(app, headers=auth(), json_body={"model": "gpt-5-5"})
            assert result.status == 500
            assert result.header(h.DEGRADED.lower()) == "breaker"
        result = await call(app, headers=auth(), json_body={"model": "gpt-5-5"})
        assert result.status == 503
        assert upstream.calls == 3
        assert registry.get_sample_value("governor_breaker_degraded") == 1
        await app.breakers.aclose()
        await backend.redis.aclose()


@pytest.mark.redis
async def test_second_process_refuses_within_a_second(real_backend: RedisBackend) -> None:
    """A worker in another process refuses within a second of this one opening the path."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.breaker_worker",
        REDIS_URL,
        real_backend.prefix,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env=env,
    )
    assert child.stdout is not None
    try:
        line = await asyncio.wait_for(child.stdout.readline(), timeout=30)
        assert line.strip() == b"ready"
        async for make in harnesses(real_backend):
            hn = make(reset_timeout_s=30.0, max_reset_timeout_s=60.0)
            await hn.fail(3)
            opened = time.time()
            assert hn.state() == "open"
            line = await asyncio.wait_for(child.stdout.readline(), timeout=20)
        word, _, when = line.decode().strip().partition(" ")
        assert word == "refused", line
        print(f"\nsecond worker refused {float(when) - opened:.3f}s after opening")
        assert float(when) - opened < 1.0
    finally:
        if child.returncode is None:
            child.kill()
        await child.wait()


class DelayProxy:
    """A TCP proxy that delivers every chunk, both ways, *delay* seconds late."""

    def __init__(self, target: tuple[str, int], delay: float) -> None:
        self.target = target
        self.delay = delay
        self.server: asyncio.Server | None = None
        self.port = 0
        self.down = False
        self._writers: list[asyncio.StreamWriter] = []

    def cut(self) -> None:
        """Drop every connection and refuse new ones until :meth:`restore`."""
        self.down = True
        for writer in self._writers:
            writer.close()
        self._writers.clear()

    def restore(self) -> None:
        self.down = False

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers += [writer, up_writer]
        await asyncio.gather(
            self._pump(reader, up_writer), self._pump(up_reader, writer), return_exceptions=True
        )

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        try:
            while data := await reader.read(65536):
                loop.call_later(self.delay, _write, writer, data)
        finally:
            loop.call_later(self.delay, writer.close)


def _write(writer: asyncio.StreamWriter, data: bytes) -> None:
    if not writer.is_closing():
        writer.write(data)


@pytest.mark.redis
async def test_no_event_loop_stall_when_redis_is_slow(real_backend: RedisBackend) -> None:
    """Redis answering 600 ms late stalls neither the event loop nor any request."""
    real = urlsplit(REDIS_URL)
    proxy = DelayProxy((real.hostname or "127.0.0.1", real.port or 6379), delay=0.3)
    await proxy.start()
    client: Redis = Redis.from_url(f"redis://127.0.0.1:{proxy.port}{real.path}", socket_timeout=5)
    backend: Backend = RedisBackend(RedisConfig(key_prefix=real_backend.prefix), client=client)
    governor = Governor(
        Config(demo_keys=True, breaker=breaker_config(sync_timeout_s=0.05)),
        backend=backend,
        clock=SYSTEM_CLOCK,
        registry=CollectorRegistry(),
    )
    upstream = Upstream(governor)
    app = BreakerMiddleware(upstream, governor=governor)
    lags: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            start = loop.time()
            await asyncio.sleep(0.005)
            lags.append(loop.time() - start - 0.005)

    tick = asyncio.ensure_future(ticker())
    latencies: list[float] = []
    statuses: list[int] = []

    async def one(mode: object) -> None:
        upstream.mode = mode
        start = time.perf_counter()
        result = await call(app, headers=auth(), json_body={"model": "gpt-5-5"})
        latencies.append(time.perf_counter() - start)
        statuses.append(result.status)

    try:
        for round_ in range(12):
            await asyncio.gather(*(one(500 if round_ % 4 else "ok") for _ in range(5)))
            await asyncio.sleep(0.05)
        await app.breakers.drain()
    finally:
        stop.set()
        await tick
        await app.breakers.aclose()
        await client.aclose()
        await proxy.close()
    lag_ms, wait_ms = max(lags) * 1000, max(latencies) * 1000
    print(f"\nmax event-loop lag {lag_ms:.1f} ms, slowest request {wait_ms:.1f} ms")
    assert max(lags) < 0.1, f"event loop stalled {max(lags):.3f}s"
    assert max(latencies) < 0.2, f"a request waited {max(latencies):.3f}s on Redis"
    assert 503 in statuses  # the breaker still broke


@pytest.mark.redis
async def test_redis_outage_and_recovery(real_backend: RedisBackend) -> None:
    """Redis lost mid-way: the worker breaks locally; once it is back, the shared state rules."""
    real = urlsplit(REDIS_URL)
    proxy = DelayProxy((real.hostname or "127.0.0.1", real.port or 6379), delay=0)
    await proxy.start()
    cfg = RedisConfig(
        url=f"redis://127.0.0.1:{proxy.port}{real.path}",
        key_prefix=real_backend.prefix,
        retries=0,
    )
    backend = RedisBackend(cfg, client=make_client(cfg))
    try:
        async for make in harnesses(backend):
            hn = make()
            assert (await hn.request("ok")).status == 200
            proxy.cut()
            await hn.fail(3)
            result = await hn.request("ok")
            assert result.status == 503
            assert result.header(h.DEGRADED.lower()) == "breaker"
            assert hn.sample("governor_breaker_degraded") == 1
            proxy.restore()
            await hn.breakers.sync()
            assert not hn.breakers.degraded
            result = await hn.request("ok")  # Redis never saw the failures: closed
            assert result.status == 200
            assert result.header(h.DEGRADED.lower()) is None
    finally:
        await backend.redis.aclose()
        await proxy.close()


async def test_probe_caller_cancelled_while_asking(make_harness: Factory) -> None:
    """A caller cancelled while asking Redis for a probe lease gives the lease back."""
    hn = make_harness()
    await hn.fail(3)
    await hn.elapse(0.35)
    lb = hn.breakers.breaker(hn.governor.catalog["gpt-5-5"])
    task = asyncio.ensure_future(hn.request("ok"))
    for _ in range(1000):
        if lb.pending_probes:
            break
        await asyncio.sleep(0)
    assert lb.pending_probes == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await hn.breakers.drain()
    assert lb.pending_probes == 0
    assert (await hn.request("ok")).status == 200
    assert hn.state() == "closed"
