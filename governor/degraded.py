"""Saying when governor runs degraded: a metric per guard and a response header.

A guard that cannot reach its shared state (Redis down, too slow, a script error) acts
on its ``fail_mode`` and calls :func:`mark`: the request's context lists the guard
(``ctx.notes["degraded_guards"]``), ``X-Hypereal-Managed-Degraded`` names every
degraded guard of the request (``ratelimit,billing``; added by the foundation's
outermost send wrapper, over any value a guard put itself), and two metrics follow it:

- ``governor_degraded{guard}``: 1 while the guard's last backend operation on this
  worker failed, 0 once one succeeds again (the guard calls :func:`healthy`);
- ``governor_degraded_requests_total{guard,mode}``: requests decided without the shared
  state, by the fail mode applied (``open``/``closed``; the usage log: ``buffered``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge

from governor import headers as h
from governor.types import Message

if TYPE_CHECKING:
    from governor.context import RequestContext
    from governor.runtime import Governor

NOTE = "degraded_guards"
HEADER = h.wire(h.DEGRADED)


class DegradedState:
    """Which guards of one governor currently run without their shared state."""

    def __init__(self, governor: Governor) -> None:
        m = governor.metrics
        self._gauge = m.gauge(
            "degraded",
            "1 while a guard on this worker runs without its shared state (fail mode).",
            ("guard",),
            multiprocess_mode="livemax",
        )
        self._requests = m.counter(
            "degraded_requests",
            "Requests decided without the shared state, by guard and fail mode.",
            ("guard", "mode"),
        )
        self._down: dict[str, bool] = {}
        self._counters: dict[tuple[str, str], Counter] = {}
        self._gauges: dict[str, Gauge] = {}

    def _set(self, guard: str, down: bool) -> None:
        if self._down.get(guard) is down:
            return  # one dict lookup on the healthy hot path
        self._down[guard] = down
        gauge = self._gauges.get(guard)
        if gauge is None:
            gauge = self._gauges[guard] = self._gauge.labels(guard)
        gauge.set(1 if down else 0)

    def mark(self, ctx: RequestContext | None, guard: str, mode: str) -> None:
        """*guard* decided *ctx* without its shared state, under fail mode *mode*."""
        self._set(guard, True)
        counter = self._counters.get((guard, mode))
        if counter is None:
            counter = self._counters[(guard, mode)] = self._requests.labels(guard, mode)
        counter.inc()
        if ctx is not None:
            guards: list[str] = ctx.notes.setdefault(NOTE, [])
            if guard not in guards:
                guards.append(guard)
            ctx.notes["degraded"] = True

    def healthy(self, guard: str) -> None:
        """*guard*'s shared state answered again."""
        self._set(guard, False)

    def is_degraded(self, guard: str) -> bool:
        return self._down.get(guard, False)


def degraded_for(governor: Governor) -> DegradedState:
    """The one :class:`DegradedState` of *governor*."""
    return governor.shared("degraded", lambda: DegradedState(governor))


def header_value(ctx: RequestContext) -> bytes | None:
    """The ``X-Hypereal-Managed-Degraded`` value of *ctx* (None: not degraded)."""
    guards = ctx.notes.get(NOTE)
    if not guards:
        return None
    return ",".join(guards).encode()


def stamp(ctx: RequestContext, message: Message) -> None:
    """Put the degraded header on a response start, replacing any guard's own."""
    value = header_value(ctx)
    if value is not None:
        h.replace(message, [(HEADER, value)])
