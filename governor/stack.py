"""One call that wraps an ASGI app in every governor middleware, in the right order.

Outermost first, and why:

1. :class:`ContextMiddleware` parses the request once (bad input is answered here,
   before anything is consumed) and stamps the request id. Usage logs sit just inside
   it, so that a refusal by any later layer is recorded too.
2. Fingerprint: a suspended key or a ``-max`` model from the wrong client is refused
   before it can touch any budget, queue or breaker.
3. Breaker: an open circuit refuses at once, before the request takes rate budget,
   credits, a queue place or a slot.
4. Rate guards: cheap, fleet-wide counters; refused requests never wait in the queue.
5. Billing: reserves the worst-case cost only for requests the rate guards admitted;
   it also settles latency insurance (and notes credits for the usage record), so it
   sits outside admission to see the queue wait as part of the latency.
6. Admission: the queue and the slot come last, so a slot is held only by a request
   every other guard has already admitted, and only for the upstream call itself.

A refusal by an inner layer is marked on the request context (``ctx.refusal``), so
outer layers give back what they took for it (rate budget, reservations) and the
breaker counts it as neither success nor failure.
"""

from __future__ import annotations

from governor.admission import AdmissionMiddleware
from governor.billing import BillingMiddleware
from governor.breaker import BreakerMiddleware
from governor.fingerprint import FingerprintMiddleware
from governor.ratelimit import RateGuardMiddleware
from governor.runtime import Governor
from governor.types import ASGIApp, Receive, Scope, Send
from governor.usage_log import UsageLogMiddleware


class ContextMiddleware:
    """Parses every governed request into its context; answers bad input in the caller's shape.

    Mount it outermost when you use governor middlewares one by one and want one place
    where requests are parsed; every governor middleware also parses by itself when it
    finds no context on the scope.
    """

    def __init__(self, app: ASGIApp, *, governor: Governor | None = None) -> None:
        self.app = app
        self.governor = governor if governor is not None else Governor()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        entered = await self.governor.enter(scope, receive, send)
        if entered is None:
            return
        _, receive, send = entered
        await self.app(scope, receive, send)


def wrap(app: ASGIApp, governor: Governor | None = None) -> ASGIApp:
    """Wrap *app* in every enabled governor middleware, configured from *governor*."""
    gov = governor if governor is not None else Governor()
    config = gov.config
    # Innermost first.
    if config.admission.enabled:
        app = AdmissionMiddleware(app, governor=gov)
    if config.billing.enabled:
        app = BillingMiddleware(app, governor=gov)
    if config.ratelimit.enabled:
        app = RateGuardMiddleware(app, governor=gov)
    if config.breaker.enabled:
        app = BreakerMiddleware(app, governor=gov)
    if config.fingerprint.enabled:
        app = FingerprintMiddleware(app, governor=gov)
    # Usage logs sit right inside the context, outside every layer that can refuse.
    if config.usage.enabled:
        app = UsageLogMiddleware(app, governor=gov)
    return ContextMiddleware(app, governor=gov)
