"""The rate-guard middleware: requests, tokens and images per minute, and model scoping."""

from __future__ import annotations

import functools
import logging
import math
from math import floor

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
    go_duration_bytes,
    plan,
    rfc3339_bytes,
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

_OPENAI_REQUESTS_LIMIT, _OPENAI_REQUESTS_REMAINING, _OPENAI_REQUESTS_RESET = _OPENAI_FAMILY[
    Unit.REQUESTS
]
_OPENAI_TOKENS_LIMIT, _OPENAI_TOKENS_REMAINING, _OPENAI_TOKENS_RESET = _OPENAI_FAMILY[Unit.TOKENS]
((_ANTHROPIC_REQUESTS_LIMIT, _ANTHROPIC_REQUESTS_REMAINING, _ANTHROPIC_REQUESTS_RESET),) = (
    _ANTHROPIC_FAMILY[Unit.REQUESTS]
)
_ANTHROPIC_TOKENS = _ANTHROPIC_FAMILY[Unit.TOKENS]
_ANTHROPIC = Shape.ANTHROPIC
# Compared by identity on every request: bound once.
_MODEL_RPM = Guard.MODEL_RPM
_ACCOUNT_RPM = Guard.ACCOUNT_RPM
_MODEL_IPM = Guard.MODEL_IPM
_REQUESTS = Unit.REQUESTS
_TOKENS = Unit.TOKENS
_IMAGES = Unit.IMAGES
_REFUSED = Outcome.REFUSED
_EXCEPTION = Outcome.EXCEPTION

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


class _ModelCounters:
    """The metric children one model's requests increment (labels bound once)."""

    __slots__ = ("hits", "reserved", "settled")

    def __init__(self, middleware: RateGuardMiddleware, model: str) -> None:
        self.hits: dict[str, Counter] = {}  # by guard
        self.reserved: Counter = middleware._reserved.labels(model)
        self.settled: Counter = middleware._settled.labels(model)


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
        self._per_model: dict[str, _ModelCounters] = {}

    def _model_counters(self, model: str) -> _ModelCounters:
        counters = self._per_model.get(model)
        if counters is None:
            counters = self._per_model[model] = _ModelCounters(self, model)
        return counters

    def _count(self, family: Counter, *labels: str, n: int = 1) -> None:
        key: tuple[Counter | str, ...] = (family, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = family.labels(*labels)
        child.inc(n)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        entered = await self.governor.model_call(self.app, scope, receive, send)
        if entered is None:
            return
        ctx, receive, send = entered
        assert ctx.model is not None
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
        counters = self._model_counters(model)
        hit_counters = counters.hits
        for hit in request.hits:
            name = hit.limit.name
            child = hit_counters.get(name)
            if child is None:
                child = hit_counters[name] = self._hits.labels(name, model)
            child.inc()
        if request.reserved_tokens:
            counters.reserved.inc(request.reserved_tokens)

        ctx.add_headers(functools.partial(self._start_headers, request, decision, degraded))
        error: BaseException | None = None
        try:
            await self.app(scope, receive, send)
        except BaseException as exc:
            error = exc
            raise
        finally:
            # Shielded: a cancelled request still gives back or settles what it took.
            await finish(self._settle(ctx, request, decision, store, error))

    def _start_headers(
        self,
        request: Plan,
        decision: Decision,
        degraded: bool,
        ctx: RequestContext,
        message: Message,
    ) -> RawHeaders:
        # Made at the response start: a refusal further in by then reports its hits
        # given back.
        return self._headers(ctx, request, decision, ctx.refusal is not None, degraded)

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
        refund_all = outcome is _REFUSED or outcome is _EXCEPTION
        status = observer.status
        failed = status is not None and status >= 400
        usage = observer.usage
        settled = request.reserved_tokens
        adjustments: list[Adjustment] = []
        for hit, window, cost in zip(request.hits, decision.windows, decision.costs, strict=True):
            limit = hit.limit
            unit = limit.unit
            if refund_all:
                delta = -cost
                self._count(self._refunds, limit.name, model)
            elif unit is _TOKENS:
                if usage is not None:
                    settled = counted_tokens(usage)
                    delta = settled - cost
                elif failed:
                    settled = 0
                    delta = -cost
                else:
                    continue
            elif unit is _IMAGES and failed:
                delta = -cost
            else:
                continue
            if delta and window.window_id is not None:
                adjustments.append(Adjustment(limit, window.window_id, delta))
        if refund_all:
            settled = 0
        if request.reserved_tokens:
            self._model_counters(model).settled.inc(settled)
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
        remaining; ties: the smaller limit), so a client that paces itself on them never
        meets a refusal. A request refused further in (*refunded*) reports its hits
        given back.
        """
        out: RawHeaders = []
        # The binding guard of each family's unit: remaining, amount, window, span.
        req_left = tok_left = -1  # -1: no guard of that unit yet
        req_amount = tok_amount = req_span = tok_span = 0
        req_window = tok_window = None
        for hit, window, amount, cost in zip(
            request.hits, decision.windows, decision.amounts, decision.costs, strict=True
        ):
            limit = hit.limit
            span = limit.window
            # Window.remaining, inlined (every hit of every request).
            previous = window.previous
            used = window.current
            if previous:
                used += floor(previous * window.previous_ttl / span)
            remaining = amount - used if used < amount else 0
            if refunded:
                remaining = min(amount, remaining + cost)
            guard = limit.guard
            if guard is _MODEL_RPM:
                out += ((_RPM_LIMIT, b"%d" % amount), (_RPM_REMAINING, b"%d" % remaining))
            elif guard is _ACCOUNT_RPM:
                out.append((_CAPACITY, b"%d" % remaining))
            elif guard is _MODEL_IPM:
                out += ((_IPM_LIMIT, b"%d" % amount), (_IPM_REMAINING, b"%d" % remaining))
            unit = limit.unit
            if unit is _REQUESTS:
                if (
                    req_left < 0
                    or remaining < req_left
                    or (remaining == req_left and amount < req_amount)
                ):
                    req_left, req_amount, req_window, req_span = remaining, amount, window, span
            elif unit is _TOKENS and (
                tok_left < 0
                or remaining < tok_left
                or (remaining == tok_left and amount < tok_amount)
            ):
                tok_left, tok_amount, tok_window, tok_span = remaining, amount, window, span
        if ctx.shape is _ANTHROPIC:
            wall = self.governor.clock.time()
            if req_window is not None:
                stamp = rfc3339_bytes(wall + req_window.reset(req_span))
                out += (
                    (_ANTHROPIC_REQUESTS_LIMIT, b"%d" % req_amount),
                    (_ANTHROPIC_REQUESTS_REMAINING, b"%d" % req_left),
                    (_ANTHROPIC_REQUESTS_RESET, stamp),
                )
            if tok_window is not None:
                stamp = rfc3339_bytes(wall + tok_window.reset(tok_span))
                whole = b"%d" % tok_amount
                left = b"%d" % tok_left
                for limit_name, remaining_name, reset_name in _ANTHROPIC_TOKENS:
                    out += ((limit_name, whole), (remaining_name, left), (reset_name, stamp))
        else:
            if req_window is not None:
                out += (
                    (_OPENAI_REQUESTS_LIMIT, b"%d" % req_amount),
                    (_OPENAI_REQUESTS_REMAINING, b"%d" % req_left),
                    (_OPENAI_REQUESTS_RESET, go_duration_bytes(req_window.reset(req_span))),
                )
            if tok_window is not None:
                out += (
                    (_OPENAI_TOKENS_LIMIT, b"%d" % tok_amount),
                    (_OPENAI_TOKENS_REMAINING, b"%d" % tok_left),
                    (_OPENAI_TOKENS_RESET, go_duration_bytes(tok_window.reset(tok_span))),
                )
        if degraded:
            out.append(_DEGRADED)
        return out
