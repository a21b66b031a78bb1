"""Fixtures every test module shares.

``backend`` is parametrized over the in-memory backend, fakeredis (Lua through lupa) and
a real Redis server (``GOVERNOR_REDIS_URL``, default ``redis://127.0.0.1:6379/15``).
Without a server the real-Redis cases skip, unless ``GOVERNOR_REQUIRE_REDIS=1`` (CI),
where they fail. Each Redis case gets a key prefix of its own, so tests and test runs
sharing one server never see each other's keys.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator

import fakeredis
import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from governor.backends import Backend, MemoryBackend, RedisBackend
from governor.clock import ManualClock
from governor.config import RedisConfig

# The fault table's recorder and --faults-report (docs/faults.md).
pytest_plugins = ("tests.faults_report",)

# Apps served in this process (and the servers tests start) keep Python's default
# garbage collector: examples.serving.tune_gc would freeze the test process's heap.
os.environ.setdefault("GOVERNOR_GC_TUNE", "0")

REDIS_URL = os.environ.get("GOVERNOR_REDIS_URL", "redis://127.0.0.1:6379/15")
REQUIRE_REDIS = os.environ.get("GOVERNOR_REQUIRE_REDIS") == "1"

BACKENDS = [
    pytest.param("memory", id="memory"),
    pytest.param("fakeredis", id="fakeredis"),
    pytest.param("redis", id="redis", marks=pytest.mark.redis),
]


async def real_redis_or_skip() -> Redis:
    """A client of the real test server; skip (or fail when required) if it is down."""
    client: Redis = Redis.from_url(REDIS_URL, socket_connect_timeout=1, socket_timeout=2)
    try:
        await client.ping()
    except Exception as exc:
        await client.aclose()
        message = f"no Redis at {REDIS_URL}: {exc}"
        if REQUIRE_REDIS:
            pytest.fail(message + " (GOVERNOR_REQUIRE_REDIS=1)")
        pytest.skip(message)
    return client


async def drop_prefix(client: Redis, prefix: str) -> None:
    async for key in client.scan_iter(match=f"{prefix}:*", count=500):
        await client.delete(key)


def test_prefix() -> str:
    return f"gov-test-{uuid.uuid4().hex[:12]}"


async def make_backend(kind: str) -> AsyncIterator[Backend]:
    if kind == "memory":
        yield MemoryBackend()
        return
    prefix = test_prefix()
    config = RedisConfig(url=REDIS_URL, key_prefix=prefix)
    if kind == "fakeredis":
        fake = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
        async with RedisBackend(config, client=fake) as b:
            yield b
        await fake.aclose()
        return
    client = await real_redis_or_skip()
    try:
        async with RedisBackend(config, client=client) as b:
            yield b
    finally:
        await drop_prefix(client, prefix)
        await client.aclose()


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """A fresh backend of each kind: memory, fakeredis, real Redis."""
    async for b in make_backend(request.param):
        yield b


@pytest.fixture(params=BACKENDS[1:])
async def redis_backend(request: pytest.FixtureRequest) -> AsyncIterator[RedisBackend]:
    """A fresh Redis backend: fakeredis and the real server."""
    async for b in make_backend(request.param):
        assert isinstance(b, RedisBackend)
        yield b


@pytest.fixture
def redis_url() -> str:
    return REDIS_URL


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()
