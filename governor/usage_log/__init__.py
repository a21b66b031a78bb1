"""Usage logs: one record per governed model request, to a pluggable sink.

See docs/billing.md. :class:`UsageLogMiddleware` writes records; :func:`usage_routes`
serves each key its own.
"""

from __future__ import annotations

from governor.usage_log.middleware import UsageLogMiddleware
from governor.usage_log.records import UsageRecord, build_record, client_family
from governor.usage_log.routes import usage_routes
from governor.usage_log.sinks import (
    JsonlSink,
    MemorySink,
    RedisStreamSink,
    UsageSink,
    set_sink,
    sink_for,
    sink_from_config,
)

__all__ = [
    "JsonlSink",
    "MemorySink",
    "RedisStreamSink",
    "UsageLogMiddleware",
    "UsageRecord",
    "UsageSink",
    "build_record",
    "client_family",
    "set_sink",
    "sink_for",
    "sink_from_config",
    "usage_routes",
]
