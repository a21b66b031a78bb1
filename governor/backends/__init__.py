"""Where governor keeps shared state: in this process, or in Redis for a fleet.

Each stateful capability (admission, rate guards, breakers, suspensions, the ledger,
usage logs) owns a small backend contract with a memory and a Redis implementation
beside it, and picks one by looking at the :class:`Backend` it is given. What they
share lives here: the one Redis connection pool, Lua script registration, key naming
and the translation of Redis errors into :class:`~governor.errors.BackendError`.
"""

from __future__ import annotations

from governor.backends.base import Backend, MemoryBackend
from governor.backends.redis import RedisBackend, backend_from_config, map_redis_errors

__all__ = ["Backend", "MemoryBackend", "RedisBackend", "backend_from_config", "map_redis_errors"]
