"""UsageLogMiddleware: one usage record per governed model request, refusals included.

Mount it just inside the request context (outside every layer that can refuse), so
that a refusal by any layer is recorded too. It reads what the other layers noted on
the request context (billing's credits and insurance, admission's queue wait) after
the response has ended; billing's settlement is awaited first.
"""

from __future__ import annotations

import asyncio
import logging

from governor.aio import finish
from governor.context import RequestContext, Surface
from governor.degraded import degraded_for
from governor.runtime import Governor
from governor.types import ASGIApp, Receive, Scope, Send
from governor.usage_log.records import build_record
from governor.usage_log.sinks import UsageSink, sink_for

log = logging.getLogger("governor.usage")
# count_tokens generates nothing and costs nothing: no usage record.
_SKIP = (Surface.COUNT_TOKENS,)  # a tuple: `in` compares identity, no Enum hash


class UsageLogMiddleware:
    """Writes a :class:`~governor.usage_log.records.UsageRecord` to a sink per request.

    *sink* replaces the governor's own (by default from the ``[usage]`` config).
    """

    def __init__(
        self, app: ASGIApp, *, governor: Governor | None = None, sink: UsageSink | None = None
    ) -> None:
        self.app = app
        self.governor = governor if governor is not None else Governor()
        self.sink = sink if sink is not None else sink_for(self.governor)
        m = self.governor.metrics
        self.m_records = m.counter(
            "usage_records", "Usage records written, by outcome.", ("outcome",)
        )
        self.m_dropped = m.counter("usage_records_dropped", "Usage records the sink refused.")
        self.degraded = degraded_for(self.governor)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        entered = await self.governor.model_call(self.app, scope, receive, send, skip=_SKIP)
        if entered is None:
            return
        ctx, receive, send = entered
        exc: BaseException | None = None
        try:
            await self.app(scope, receive, send)
        except BaseException as e:
            exc = e
            raise
        finally:
            await finish(self._record(ctx, exc))

    async def _record(self, ctx: RequestContext, exc: BaseException | None) -> None:
        billing = ctx.notes.get("billing_task")
        if isinstance(billing, asyncio.Future):
            try:
                await billing
            except Exception:  # billing's own failure is billing's to report
                log.exception("billing settlement failed for %s", ctx.request_id)
        outcome = ctx.response.outcome(
            refused=ctx.refusal is not None, disconnected=ctx.disconnected, exc=exc
        )
        record = build_record(ctx, outcome, self.governor.clock.monotonic())
        try:
            await self.sink.write(record)
        except Exception:
            self.m_dropped.inc()
            log.warning("usage record of %s dropped", ctx.request_id, exc_info=True)
            return
        self.governor.metrics.child(self.m_records, outcome.value).inc()
        pending = getattr(self.sink, "pending", None)
        if pending is not None:
            # Records waiting for Redis in the sink's backlog (docs/reliability.md).
            if pending:
                self.degraded.mark(None, "usage", "buffered")
            else:
                self.degraded.healthy("usage")
