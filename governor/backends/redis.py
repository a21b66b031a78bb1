"""The Redis backend: one shared connection pool and Lua scripts registered once."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from importlib import resources
from typing import TYPE_CHECKING, Any, Literal

from governor.backends.base import Backend, MemoryBackend
from governor.backends.batching import ScriptBatcher
from governor.config import Config, RedisConfig
from governor.errors import BackendError, ConfigurationError

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript


@contextlib.contextmanager
def map_redis_errors(what: str = "redis") -> Iterator[None]:
    """Translate redis-py's errors into :class:`BackendError` (httpx's
    ``map_httpcore_exceptions`` idea), so capabilities decide fail-open or fail-closed
    on one exception type."""
    from redis import exceptions as rexc

    try:
        yield
    except (rexc.ConnectionError, rexc.TimeoutError, OSError) as exc:
        raise BackendError(f"{what}: Redis unavailable: {exc}") from exc
    except rexc.RedisError as exc:
        raise BackendError(f"{what}: Redis error: {exc}") from exc


def make_client(config: RedisConfig) -> Redis:
    """A client on a *blocking* pool with explicit timeouts and retries.

    redis-py's default asyncio pool raises ``MaxConnectionsError`` past its size instead
    of waiting, ``Redis(host=...)`` retries ten times with backoff (seconds before a
    refused connection is reported) while ``from_url`` retries not at all: a guard on
    the request path needs bounded, stated behaviour instead.
    """
    try:
        from redis.asyncio import BlockingConnectionPool, Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialBackoff
    except ImportError as exc:  # pragma: no cover
        raise ConfigurationError(
            "backend = 'redis' needs the redis package: pip install 'governor[redis]'"
        ) from exc
    pool = BlockingConnectionPool.from_url(
        config.url,
        max_connections=config.max_connections,
        timeout=config.pool_timeout_s,
        socket_timeout=config.socket_timeout_s,
        socket_connect_timeout=config.connect_timeout_s,
        retry=Retry(ExponentialBackoff(cap=0.05, base=0.005), config.retries),
        decode_responses=False,
        health_check_interval=30,
    )
    return Redis(connection_pool=pool)


class RedisBackend(Backend):
    """State in Redis, shared by every worker on every host.

    *client* may be given (fakeredis in tests, or a client the application already
    has); otherwise one is built from *config*. Keys live under ``config.key_prefix``.
    """

    kind: Literal["memory", "redis"] = "redis"

    def __init__(self, config: RedisConfig | None = None, *, client: Redis | None = None) -> None:
        self.config = config or RedisConfig()
        self.prefix = self.config.key_prefix
        self._owns_client = client is None
        self._client: Redis = client if client is not None else make_client(self.config)
        self._scripts: dict[tuple[str, str], AsyncScript] = {}
        self._batcher: ScriptBatcher | None = None
        if self.config.autopipeline:
            self._batcher = ScriptBatcher(self._client, retries=self.config.retries)

    @property
    def redis(self) -> Redis:
        return self._client

    def script(self, package: str, name: str) -> AsyncScript:
        """The Lua script *name* shipped in *package*, registered once per backend.

        redis-py's ``AsyncScript`` calls ``EVALSHA`` and loads the script again by
        itself after a ``SCRIPT FLUSH`` or a restart.
        """
        key = (package, name)
        script = self._scripts.get(key)
        if script is None:
            source = resources.files(package).joinpath(name).read_text(encoding="utf-8")
            script = self._client.register_script(source)
            self._scripts[key] = script
        return script

    async def run(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        """Run *script*, translating Redis failures into :class:`BackendError`."""
        if self._batcher is not None:
            return await self._batcher.submit(script, keys, args)
        with map_redis_errors("script"):
            return await script(keys=keys, args=args)

    async def ping(self) -> bool:
        with map_redis_errors("ping"):
            return bool(await self._client.ping())

    async def aclose(self) -> None:
        if self._batcher is not None:
            await self._batcher.aclose()
        if self._owns_client:
            await self._client.aclose()

    def __repr__(self) -> str:
        return f"RedisBackend(prefix={self.prefix!r})"


def backend_from_config(config: Config) -> Backend:
    """The backend *config* names."""
    if config.backend == "redis":
        return RedisBackend(config.redis)
    return MemoryBackend()
