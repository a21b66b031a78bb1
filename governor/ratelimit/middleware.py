"""The rate-guard middleware: requests, tokens and images per minute, and model scoping."""

from __future__ import annotations

import logging
import math

from prometheus_client import Counter

from governor import headers as h
from governor.aio import finish
from governor.backends import Backend, RedisBackend
from governor.context import RequestContext
from governor.degraded import degraded_for
from governor.errors import (
    BackendError,
    ConfigurationError,
    Overloaded,
    PermissionDenied,
    RateLimited,
    Shape,
)
from governor.ratelimit.guards import (
    Adjustment,
    Decision,
    Guard,
    Items,
    Plan,
    Unit,
    go_duration,
    plan,
    rfc3339,
)
from governor.ratelimit.memory import MemoryRateStore
from governor.ratelimit.redis import RedisRateStore
from governor.ratelimit.store import RateStore
from governor.response import Outcome
from governor.runtime import Governor
from governor.types import ASGIApp, Message, RawHeaders, Receive, Scope, Send
from governor.usage import Usage

log = logging.getLogger("governor.ratelimit")

# After a Redis failure, go straight to the local fallback for this long instead of
# paying a connect timeout on every request.
BACKEND_RETRY_S = 1.0

_DEGRADED = h.header(h.DEGRADED, "ratelimit")
_RPM_LIMIT = h.wire(h.RPM_LIMIT)
_RPM_REMAINING = h.wire(h.RPM_REMAINING)
_CAPACITY = h.wire(h.CAPACITY_REQUESTS_REMAINING)
_IPM_LIMIT = h.wire(h.IPM_LIMIT)
_IPM_REMAINING = h.wire(h.IPM_REMAINING)
_OPENAI_FAMILY = {
    unit: (
        f"x-ratelimit-limit-{unit.value}".encode(),
        f"x-ratelimit-remaining-{unit.value}".encode(),
        f"x-ratelimit-reset-{unit.value}".encode(),
    )
    for unit in (Unit.REQUESTS, Unit.TOKENS)
}
# Governor's token budget is one bucket for input and output together: the input and
# output families report that same bucket.
_ANTHROPIC_FAMILY = {
    unit: tuple(
        (
            f"anthropic-ratelimit-{name}-limit".encode(),
            f"anthropic-ratelimit-{name}-remaining".encode(),
            f"anthropic-ratelimit-{name}-reset".encode(),
        )
        for name in names
    )
    for unit, names in (
        (Unit.REQUESTS, ("requests",)),
        (Unit.TOKENS, ("tokens", "input-tokens", "output-tokens")),
    )
}

# Stores live on their backend, so every middleware of one governor shares the counters
# (an attribute rather than a weak mapping: a store refers to its backend).
_STORES_ATTR = "_governor_ratelimit_stores"


def counted_tokens(usage: Usage) -> int:
    """Tokens a response counts toward TPM: uncached input, cache writes and output.

    Cache reads do not count: the upstream serves them from its cache at a tenth of the
    price, Anthropic leaves them out of its own input-token limits, and counting them is
    a bug users report against peer gateways (LiteLLM #18728). Cache writes are full
    input processing, so they count.
    """
    return usage.input_tokens + usage.cache_write_tokens + usage.output_tokens


def _stores(backend: Backend, fallback_workers: int) -> tuple[RateStore, MemoryRateStore]:
    stores: tuple[RateStore, MemoryRateStore] | None = getattr(backend, _STORES_ATTR, None)
    if stores is None:
        store: RateStore = (
            RedisRateStore(backend) if isinstance(backend, RedisBackend) else MemoryRateStore()
        )
        stores = (store, MemoryRateStore(share=fallback_workers))
        setattr(backend, _STORES_ATTR, stores)
    return stores


class RateGuardMiddleware:
    """Requests, tokens and images per minute on `limits`, and per-key model scoping.

    Every governed model call meets the requests-per-minute guards of its model (across
    the fleet), its account (across models) and, where configured, its key and its key
    on that model; the tokens-per-minute guards of the model and key; and, when it
    generates images, the images-per-minute guards. All of them are taken or none
    (a refused request consumes nothing), tokens are reserved at admission and settled
    to the upstream's reported usage when the response ends, and what a request took is
    given back when a layer further in refuses it or it fails before the upstream
    answers. See docs/ratelimit.md.

    *window_s* is the window every limit counts over (60: per minute, the spec's
    meaning); tests lengthen it so the clock never matters. *store* replaces the store
    the backend implies (memory or Redis).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        governor: Governor | None = None,
        window_s: int = 60,
        store: RateStore | None = None,
    ) -> None:
        if window_s < 1:
            raise ConfigurationError(f"window_s: must be at least 1, got {window_s}")
        self.app = app
        self.governor = governor if governor is not None else Governor()
        self.config = self.governor.config
        self.settings = self.config.ratelimit
        self.items = Items(window_s)
        shared, self.fallback = _stores(self.governor.backend, self.settings.fallback_workers)
        self.store: RateStore = store if store is not None else shared
        self._skip_store_until = -math.inf
        self.degraded = degraded_for(self.governor)
        metrics = self.governor.metrics
        self._hits = metrics.counter(
            "ratelimit_hits", "Rate guard hits admitted, by guard and model.", ("guard", "model")
        )
        self._refusals = metrics.counter(
            "ratelimit_refusals",
            "Requests refused by a rate guard (or model scoping: guard=scope), by model.",
            ("guard", "model"),
        )
        self._refunds = metrics.counter(
            "ratelimit_refunds",
            "Hits given back because a layer further in refused the request or it failed "
            "before the upstream answered, by guard and model.",
            ("guard", "model"),
        )
        self._reserved = metrics.counter(
            "ratelimit_tokens_reserved", "Tokens reserved at admission, by model.", ("model",)
        )
        self._settled = metrics.counter(
            "ratelimit_tokens_settled",
            "Tokens finally counted (the reported usage, else the estimate), by model.",
            ("model",),
        )
        self._degraded = metrics.counter(
            "ratelimit_degraded",
            "Requests decided without the shared store, by fail mode.",
            ("mode",),
        )
        self._store_errors = metrics.counter(
            "ratelimit_store_errors", "Rate store failures, by operation.", ("op",)
        )
        self._children: dict[tuple[Counter | str, ...], Counter] = {}

    def _count(self, family: Counter, *labels: str, n: int = 1) -> None:
        key: tuple[Counter | str, ...] = (family, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = family.labels(*labels)
        child.inc(n)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        entered = await self.governor.enter(scope, receive, send)
        if entered is None:
            return
        ctx, receive, send = entered
        if ctx is None or ctx.model is None:
            await self.app(scope, receive, send)
            return
        model = ctx.model.id
        if not ctx.policy.allows(model):
            self._count(self._refusals, "scope", model)
            await self.governor.refuse(
                ctx,
                send,
                PermissionDenied(
                    f"This API key is not allowed to use the model '{model}'.",
                    param="model",
                    code="model_not_allowed",
                    reason="model_scope",
                ),
            )
            return
        request = plan(ctx, self.config, self.items)
        if request.too_large is not None:
            await self._refuse_too_large(ctx, send, request)
            return

        store = self.store
        degraded = False
        decision: Decision | None = None
        if self.governor.clock.monotonic() >= self._skip_store_until:
            try:
                decision = await store.acquire(request.hits)
                self.degraded.healthy("ratelimit")
            except BackendError as exc:
                log.warning("rate store down, fail_mode=%s: %s", self.settings.fail_mode, exc)
                self._store_errors.labels("acquire").inc()
                self._skip_store_until = self.governor.clock.monotonic() + BACKEND_RETRY_S
        if decision is None:
            degraded = True
            self.degraded.mark(ctx, "ratelimit", self.settings.fail_mode)
            self._degraded.labels(self.settings.fail_mode).inc()
            if self.settings.fail_mode == "closed":
                # Fail closed: without the shared counters nothing is admitted.
                await self.governor.refuse(
                    ctx,
                    send,
                    Overloaded(
                        "Rate limits cannot be checked right now; try again shortly.",
                        retry_after=BACKEND_RETRY_S,
                        should_retry=True,
                        reason="ratelimit_unavailable",
                        headers=[_DEGRADED],
                    ),
                )
                return
            # Fail open: a local limiter at a fair share of each fleet limit.
            store = self.fallback
            decision = await store.acquire(request.hits)

        if not decision.granted:
            await self._refuse(ctx, send, request, decision, degraded)
            return
        for hit in request.hits:
            self._count(self._hits, hit.limit.guard.value, model)
        if request.reserved_tokens:
            self._count(self._reserved, model, n=request.reserved_tokens)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                refunded = ctx.refusal is not None
                h.replace(message, self._headers(ctx, request, decision, refunded, degraded))
            await send(message)

        error: BaseException | None = None
        try:
            await self.app(scope, receive, send_with_headers)
        except BaseException as exc:
            error = exc
            raise
        finally:
            # Shielded: a cancelled request still gives back or settles what it took.
            await finish(self._settle(ctx, request, decision, store, error))

    async def _settle(
        self,
        ctx: RequestContext,
        request: Plan,
        decision: Decision,
        store: RateStore,
        error: BaseException | None,
    ) -> None:
        """Refund a request that never reached the upstream; settle tokens to usage.

        - Refused by a layer further in, or failed with no response at all (the app
          raised before answering): every hit is given back.
        - An answered request keeps its request hits, upstream errors included: the
          upstream spent a request on it, and counting retries is what stops a storm.
        - Tokens settle to the reported usage in both directions; an error answer with no
          usage generated nothing and gives them back; a success with no usage keeps the
          estimate. Images are given back on an error answer.
        """
        assert ctx.model is not None
        model = ctx.model.id
        observer = ctx.response
        outcome = observer.outcome(
            refused=ctx.refusal is not None, disconnected=ctx.disconnected, exc=error
        )
        refund_all = outcome in (Outcome.REFUSED, Outcome.EXCEPTION)
        failed = observer.status is not None and observer.status >= 400
        usage = observer.usage
        settled = request.reserved_tokens
        adjustments: list[Adjustment] = []
        for hit, window, cost in zip(request.hits, decision.windows, decision.costs, strict=True):
            unit = hit.limit.guard.unit
            if refund_all:
                delta = -cost
                self._count(self._refunds, hit.limit.guard.value, model)
            elif unit is Unit.TOKENS:
                if usage is not None:
                    settled = counted_tokens(usage)
                    delta = settled - cost
                elif failed:
                    settled = 0
                    delta = -cost
                else:
                    delta = 0
            elif unit is Unit.IMAGES and failed:
                delta = -cost
            else:
                delta = 0
            if delta and window.window_id is not None:
                adjustments.append(Adjustment(hit.limit, window.window_id, delta))
        if refund_all:
            settled = 0
        if request.reserved_tokens:
            self._count(self._settled, model, n=settled)
            ctx.notes["ratelimit"] = {
                "tokens_reserved": request.reserved_tokens,
                "tokens_settled": settled,
            }
        if not adjustments:
            return
        try:
            await store.adjust(adjustments)
        except BackendError as exc:
            # The estimate stands: a lost adjustment errs toward counting what was reserved.
            log.warning("rate store unavailable while settling: %s", exc)
            self._store_errors.labels("adjust").inc()

    async def _refuse(
        self,
        ctx: RequestContext,
        send: Send,
        request: Plan,
        decision: Decision,
        degraded: bool,
    ) -> None:
        assert ctx.model is not None
        model = ctx.model.id
        wait = 0.0
        for i in decision.refused:
            hit = request.hits[i]
            self._count(self._refusals, hit.limit.guard.value, model)
            window = decision.windows[i]
            wait = max(
                wait, window.retry_after(decision.amounts[i], hit.limit.window, decision.costs[i])
            )
        first = request.hits[decision.refused[0]]
        guard = first.limit.guard
        amount = decision.amounts[decision.refused[0]]
        headers = self._headers(ctx, request, decision, False, degraded)
        await self.governor.refuse(
            ctx,
            send,
            RateLimited(
                f"Rate limit reached for {guard.describe(model)}: {amount} per "
                f"{go_duration(first.limit.window)}. Try again in {math.ceil(wait)} s.",
                retry_after=wait,
                should_retry=True,
                headers=headers,
                reason=guard.value,
            ),
        )

    async def _refuse_too_large(self, ctx: RequestContext, send: Send, request: Plan) -> None:
        """A request larger than a limit can never fit: 429 with ``x-should-retry: false``."""
        assert ctx.model is not None
        assert request.too_large is not None
        limit = request.too_large.limit
        guard = limit.guard
        need = ctx.input_tokens if guard.unit is Unit.TOKENS else ctx.image_count
        self._count(self._refusals, guard.value, ctx.model.id)
        await self.governor.refuse(
            ctx,
            send,
            RateLimited(
                f"Request too large for {guard.describe(ctx.model.id)}: it needs {need} "
                f"{guard.unit.value} and the limit is {limit.amount} per "
                f"{go_duration(limit.window)}.",
                should_retry=False,
                reason=f"{guard.value}_too_large",
            ),
        )

    def _headers(
        self,
        ctx: RequestContext,
        request: Plan,
        decision: Decision,
        refunded: bool,
        degraded: bool,
    ) -> RawHeaders:
        """The spec's rate headers and the family the caller's SDK reads.

        The families report the binding guard of each unit (the one with the least
        remaining), so a client that paces itself on them never meets a refusal.
        A request refused further in (*refunded*) reports its hits given back.
        """
        out: RawHeaders = []
        binding: dict[Unit, tuple[int, int, float]] = {}
        for hit, window, amount, cost in zip(
            request.hits, decision.windows, decision.amounts, decision.costs, strict=True
        ):
            limit = hit.limit
            remaining = window.remaining(amount, limit.window)
            if refunded:
                remaining = min(amount, remaining + cost)
            guard = limit.guard
            if guard is Guard.MODEL_RPM:
                out += [(_RPM_LIMIT, b"%d" % amount), (_RPM_REMAINING, b"%d" % remaining)]
            elif guard is Guard.ACCOUNT_RPM:
                out.append((_CAPACITY, b"%d" % remaining))
            elif guard is Guard.MODEL_IPM:
                out += [(_IPM_LIMIT, b"%d" % amount), (_IPM_REMAINING, b"%d" % remaining)]
            unit = guard.unit
            best = binding.get(unit)
            if best is None or (remaining, amount) < best[:2]:
                binding[unit] = (remaining, amount, window.reset(limit.window))
        if ctx.shape is Shape.ANTHROPIC:
            wall = self.governor.clock.time()
            for unit, names in _ANTHROPIC_FAMILY.items():
                if unit in binding:
                    remaining, amount, reset = binding[unit]
                    stamp = rfc3339(wall + reset).encode()
                    for limit_name, remaining_name, reset_name in names:
                        out += [
                            (limit_name, b"%d" % amount),
                            (remaining_name, b"%d" % remaining),
                            (reset_name, stamp),
                        ]
        else:
            for unit, (limit_name, remaining_name, reset_name) in _OPENAI_FAMILY.items():
                if unit in binding:
                    remaining, amount, reset = binding[unit]
                    out += [
                        (limit_name, b"%d" % amount),
                        (remaining_name, b"%d" % remaining),
                        (reset_name, go_duration(reset).encode()),
                    ]
        if degraded:
            out.append(_DEGRADED)
        return out
