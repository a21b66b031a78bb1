"""Rate guards: requests, tokens and images per minute on `limits`, and model scoping.

:class:`RateGuardMiddleware` is the middleware; the stores keep limits' sliding window
counters in memory (:class:`MemoryRateStore`) or in Redis on governor's shared pool
(:class:`RedisRateStore`). See docs/ratelimit.md.
"""

from __future__ import annotations

from governor.ratelimit.guards import Adjustment, Decision, Guard, Hit, Limit, Unit, Window
from governor.ratelimit.memory import MemoryRateStore
from governor.ratelimit.middleware import RateGuardMiddleware, counted_tokens
from governor.ratelimit.redis import RedisRateStore
from governor.ratelimit.store import RateStore

__all__ = [
    "Adjustment",
    "Decision",
    "Guard",
    "Hit",
    "Limit",
    "MemoryRateStore",
    "RateGuardMiddleware",
    "RateStore",
    "RedisRateStore",
    "Unit",
    "Window",
    "counted_tokens",
]
