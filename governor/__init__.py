"""governor: composable pure-ASGI middlewares for managed admission control in front of
an LLM API gateway."""

from __future__ import annotations

from governor.admission import AdmissionMiddleware
from governor.backends import Backend, MemoryBackend, RedisBackend
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
from governor.keys import KeyResolver, key_id
from governor.metrics import Metrics, MetricsApp
from governor.runtime import Governor
from governor.stack import ContextMiddleware, wrap

__version__ = "0.1.0"

__all__ = [
    "AdmissionMiddleware",
    "Backend",
    "BackendError",
    "Catalog",
    "Clock",
    "Config",
    "ConfigurationError",
    "ContextMiddleware",
    "Governor",
    "GovernorError",
    "KeyPolicy",
    "KeyResolver",
    "ManualClock",
    "MemoryBackend",
    "Metrics",
    "MetricsApp",
    "ModelSpec",
    "RedisBackend",
    "RequestContext",
    "RequestError",
    "Surface",
    "SystemClock",
    "get_context",
    "key_id",
    "load_config",
    "wrap",
]
