"""governor: composable pure-ASGI middlewares for managed admission control in front of
an LLM API gateway."""

from __future__ import annotations

from governor.admission import AdmissionMiddleware
from governor.backends import Backend, MemoryBackend, RedisBackend
from governor.billing import BillingMiddleware
from governor.breaker import BreakerMiddleware
from governor.catalog import Catalog, ModelSpec
from governor.clock import Clock, ManualClock, SystemClock
from governor.config import Config, KeyPolicy, load_config
from governor.context import RequestContext, Surface, get_context
from governor.errors import (
    BackendError,
    ConfigurationError,
    GovernorError,
    RequestError,
)
from governor.fingerprint import FingerprintMiddleware, Suspensions
from governor.keys import KeyResolver, key_id
from governor.metrics import Metrics, MetricsApp
from governor.ratelimit import RateGuardMiddleware
from governor.runtime import Governor
from governor.stack import ContextMiddleware, wrap
from governor.usage_log import UsageLogMiddleware, usage_routes

__version__ = "0.1.0"

__all__ = [
    "AdmissionMiddleware",
    "Backend",
    "BackendError",
    "BillingMiddleware",
    "BreakerMiddleware",
    "Catalog",
    "Clock",
    "Config",
    "ConfigurationError",
    "ContextMiddleware",
    "FingerprintMiddleware",
    "Governor",
    "GovernorError",
    "KeyPolicy",
    "KeyResolver",
    "ManualClock",
    "MemoryBackend",
    "Metrics",
    "MetricsApp",
    "ModelSpec",
    "RateGuardMiddleware",
    "RedisBackend",
    "RequestContext",
    "RequestError",
    "Surface",
    "Suspensions",
    "SystemClock",
    "UsageLogMiddleware",
    "get_context",
    "key_id",
    "load_config",
    "usage_routes",
    "wrap",
]
