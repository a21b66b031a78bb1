"""The breaker middleware: refuse at once on an open model path, count how calls end."""

from __future__ import annotations

from governor import headers as h
from governor.breaker.base import Refusal, Verdict, classify
from governor.breaker.registry import BreakerRegistry, breakers_for
from governor.config import BreakerConfig
from governor.degraded import degraded_for
from governor.errors import Overloaded
from governor.runtime import Governor
from governor.types import ASGIApp, Message, Receive, Scope, Send

_DEGRADED = h.header(h.DEGRADED, "breaker")
_CIRCUIT = {s: h.header(h.CIRCUIT, s) for s in ("closed", "open", "half-open")}


class BreakerMiddleware:
    """A circuit breaker per model path (model and upstream), shared by workers in Redis mode.

    An open path is refused before the request queues or takes a slot: 503 on OpenAI
    paths, 529 ``overloaded_error`` on Anthropic ones, with ``Retry-After`` the time left
    until half-open. Every governed response says ``X-Hypereal-Managed-Circuit``.
    *config* overrides ``governor.config.breaker``; the breakers themselves live in
    :func:`~governor.breaker.breakers_for` ``(governor)``, shared with the admin routes.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        governor: Governor | None = None,
        config: BreakerConfig | None = None,
    ) -> None:
        self.app = app
        self.governor = governor if governor is not None else Governor()
        self.breakers: BreakerRegistry = breakers_for(self.governor, config)
        self.config = self.breakers.config
        self.degraded = degraded_for(self.governor)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, self._on_shutdown(receive), send)
            return
        entered = await self.governor.model_call(self.app, scope, receive, send)
        if entered is None:
            return
        ctx, receive, send = entered
        assert ctx.model is not None
        decision = await self.breakers.admit(ctx.model)
        if decision.degraded:
            mode = self.config.fail_mode
            self.degraded.mark(ctx, "breaker", mode)
            if mode == "closed":
                # Fail closed: without the fleet's shared circuit state nothing passes.
                await self.governor.refuse(
                    ctx,
                    send,
                    Overloaded(
                        "The circuit breaker cannot reach its shared state; try again shortly.",
                        retry_after=1,
                        headers=[_DEGRADED],
                        reason="breaker_unavailable",
                    ),
                )
                if not isinstance(decision, Refusal):
                    # A refusal is neutral: a probe lease taken is given back.
                    await self.breakers.settle(decision, Verdict.NEUTRAL)
                return
        elif self.breakers.store is not None:
            self.degraded.healthy("breaker")
        if isinstance(decision, Refusal):
            await self.governor.refuse(ctx, send, _refusal(ctx.model_id, decision))
            return
        ctx.notes["circuit"] = decision.state
        extra = [_CIRCUIT[decision.state]]
        if decision.degraded:
            extra.append(_DEGRADED)
        ctx.add_headers(extra)
        passed_at = self.governor.clock.monotonic()
        exc: BaseException | None = None
        try:
            await self.app(scope, receive, send)
        except BaseException as e:
            exc = e
            raise
        finally:
            # settle() never raises and waits on Redis only boundedly; an outcome
            # it cannot finish here finishes in the background.
            await self.breakers.settle(decision, classify(ctx, exc, passed_at, self.config))

    def _on_shutdown(self, receive: Receive) -> Receive:
        async def wrapped() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await self.breakers.aclose()
            return message

        return wrapped


def _refusal(model_id: str, refusal: Refusal) -> Overloaded:
    if refusal.state == "open":
        what = "is failing upstream; its circuit is open"
    else:
        what = "is being probed after failures upstream"
    headers = [_CIRCUIT[refusal.state]]
    if refusal.degraded:
        headers.append(_DEGRADED)
    return Overloaded(
        f"The model '{model_id[:200]}' {what}. Retry in a moment.",
        retry_after=refusal.retry_after,
        headers=headers,
        reason=f"circuit_{refusal.reason}",
    )
