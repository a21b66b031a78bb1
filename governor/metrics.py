"""Prometheus metrics: an injectable registry, metric families shared by name, an ASGI app.

Every capability asks :class:`Metrics` for its families by name; asking twice returns
the same family, so two middlewares (or two instances of one) never register a
metric twice. Tests pass ``Metrics(CollectorRegistry())`` and read samples with
``registry.get_sample_value``.

Several workers: set ``PROMETHEUS_MULTIPROC_DIR`` to an empty directory before the
workers start (the demo does this for ``--workers N``); :func:`scrape_registry` then
aggregates every worker's files with ``MultiProcessCollector``. Gauges declare how
they combine (``multiprocess_mode``); ``mark_process_dead(pid)`` runs at worker exit.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Literal, TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics import MetricWrapperBase
from starlette.concurrency import run_in_threadpool

from governor.types import Receive, Scope, Send

_M = TypeVar("_M", bound=MetricWrapperBase)

NAMESPACE = "governor"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """The metric families of one governor, in one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._families: dict[str, MetricWrapperBase] = {}
        self._children: dict[tuple[MetricWrapperBase, tuple[str, ...]], MetricWrapperBase] = {}

    def child(self, family: _M, *labels: str) -> _M:
        """``family.labels(*labels)``, bound once: ``labels()`` costs several times an
        ``inc()``, and per-request paths would pay it on every request. (The registry
        keeps every child anyway, so caching them holds nothing more.)"""
        key = (family, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = family.labels(*labels)
        return found  # type: ignore[return-value]

    def _get(self, cls: type[_M], name: str, make: Callable[[], MetricWrapperBase]) -> _M:
        family = self._families.get(name)
        if family is None:
            family = self._families[name] = make()
        if not isinstance(family, cls):
            raise TypeError(f"metric {name} exists as another type")
        return family

    def counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
        return self._get(
            Counter,
            name,
            lambda: Counter(name, doc, tuple(labels), namespace=NAMESPACE, registry=self.registry),
        )

    def gauge(
        self,
        name: str,
        doc: str,
        labels: Sequence[str] = (),
        *,
        multiprocess_mode: Literal[
            "all",
            "liveall",
            "min",
            "livemin",
            "max",
            "livemax",
            "sum",
            "livesum",
            "mostrecent",
            "livemostrecent",
        ] = "livesum",
    ) -> Gauge:
        return self._get(
            Gauge,
            name,
            lambda: Gauge(
                name,
                doc,
                tuple(labels),
                namespace=NAMESPACE,
                registry=self.registry,
                multiprocess_mode=multiprocess_mode,
            ),
        )

    def histogram(
        self,
        name: str,
        doc: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> Histogram:
        return self._get(
            Histogram,
            name,
            lambda: Histogram(
                name,
                doc,
                tuple(labels),
                namespace=NAMESPACE,
                registry=self.registry,
                buckets=tuple(buckets),
            ),
        )


def scrape_registry(registry: CollectorRegistry) -> CollectorRegistry:
    """The registry to expose: *registry*, or in multiprocess mode one that collects every
    worker's files."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
        return merged
    return registry


class MetricsApp:
    """An ASGI app serving a registry in the Prometheus text format.

    ``generate_latest`` is synchronous and walks every series (about 120 ms for 500
    models' worth), so it runs in a worker thread instead of stalling the event loop.
    Mount it at an exact path from your own routing; starlette's ``Mount`` would answer
    ``/metrics`` with a redirect.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await run_in_threadpool(generate_latest, scrape_registry(self.registry))
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", CONTENT_TYPE_LATEST.encode()),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
