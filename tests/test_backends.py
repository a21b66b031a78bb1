"""The backend handle: kinds, keys, Lua registration, error translation."""

from __future__ import annotations

import pytest

from governor.backends import Backend, MemoryBackend, RedisBackend, map_redis_errors
from governor.backends.redis import make_client
from governor.config import Config, RedisConfig
from governor.errors import BackendError
from governor.runtime import Governor


async def test_kinds(backend: Backend) -> None:
    """Each backend says what it is; only Redis has a client."""
    if isinstance(backend, MemoryBackend):
        assert backend.kind == "memory"
        with pytest.raises(TypeError):
            _ = backend.redis
    else:
        assert backend.kind == "redis"
        assert isinstance(backend, RedisBackend)
        assert await backend.ping()


async def test_script_registered_once_and_uses_redis_time(redis_backend: RedisBackend) -> None:
    """A packaged Lua script loads once and runs atomically with the server's TIME."""
    backend = redis_backend
    script = backend.script("tests", "probe.lua")
    assert backend.script("tests", "probe.lua") is script
    key = backend.key("probe")
    first = await backend.run(script, [key], [5])
    second = await backend.run(script, [key], [5])
    assert first[0] == 5
    assert second[0] == 10
    assert first[1] > 1_600_000_000_000


def test_key_prefix() -> None:
    assert RedisBackend(RedisConfig(key_prefix="x"), client=None).key("a", "{m}") == "x:a:{m}"


async def test_unreachable_redis_is_a_backend_error() -> None:
    """A refused connection surfaces as BackendError quickly, not after redis-py's retries."""
    client = make_client(RedisConfig(url="redis://127.0.0.1:1/0", retries=0))
    async with RedisBackend(RedisConfig(url="redis://127.0.0.1:1/0"), client=client) as b:
        with pytest.raises(BackendError):
            await b.ping()
    await client.aclose()


def test_map_redis_errors() -> None:
    from redis.exceptions import ResponseError

    with pytest.raises(BackendError), map_redis_errors():
        raise ResponseError("boom")


async def test_governor_picks_backend_from_config() -> None:
    async with Governor(Config()) as gov:
        assert gov.backend.kind == "memory"
    async with Governor(Config(backend="redis")) as gov:
        assert gov.backend.kind == "redis"
