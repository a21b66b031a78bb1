"""Metrics plumbing: shared families, an injectable registry, serving as ASGI."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from governor.metrics import Metrics, MetricsApp
from tests.helpers import call


def test_families_are_shared(registry: CollectorRegistry) -> None:
    """Asking twice for a family gives the same one (no duplicate registration)."""
    metrics = Metrics(registry)
    a = metrics.counter("things", "Things.", ("kind",))
    b = metrics.counter("things", "Things.", ("kind",))
    assert a is b
    a.labels("x").inc()
    assert registry.get_sample_value("governor_things_total", {"kind": "x"}) == 1


async def test_metrics_app_serves_text(registry: CollectorRegistry) -> None:
    Metrics(registry).gauge("level", "Level.").set(3)
    result = await call(MetricsApp(registry), "GET", "/metrics")
    assert result.status == 200
    assert result.header(
        "content-type",
    ).startswith("text/plain")  # type: ignore[union-attr]
    assert b"governor_level 3.0" in result.body
