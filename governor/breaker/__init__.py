"""Circuit breakers per model path, on pybreaker, shared across workers through Redis.

See ``docs/breaker.md``.
"""

from __future__ import annotations

from governor.breaker.admin import admin_routes
from governor.breaker.base import Admission, Refusal, Snapshot, Verdict, classify, path_of
from governor.breaker.memory import LocalBreaker
from governor.breaker.middleware import BreakerMiddleware
from governor.breaker.redis import RedisBreakerStore
from governor.breaker.registry import BreakerRegistry, breakers_for

__all__ = [
    "Admission",
    "BreakerMiddleware",
    "BreakerRegistry",
    "LocalBreaker",
    "RedisBreakerStore",
    "Refusal",
    "Snapshot",
    "Verdict",
    "admin_routes",
    "breakers_for",
    "classify",
    "path_of",
]
