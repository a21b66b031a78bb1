"""BillingMiddleware: reserve at admission, settle when the response ends, insure latency.

Per governed model request (``count_tokens`` and ``models`` are free):

1. Reserve the worst-case cost (:func:`~governor.billing.pricing.estimate_usage`)
   against the account's balance and the key's spending limit and hourly and daily
   budgets, atomically; refuse with 429 ``insufficient_quota`` and
   ``x-should-retry: false`` when any of them cannot cover it.
2. Non-streaming 2xx JSON: the body is held until complete, settled to the reported
   usage, and ``hypereal.billing`` / ``hypereal.insurance`` are spliced into it (the
   upstream's bytes are kept as they are), with the insurance headers and a corrected
   Content-Length.
3. Anything else (streams): insurance policy headers at once (``pending``), settlement
   when the response ends, in a ``finally`` shielded from cancellation.
4. Failed requests (non-2xx, a refusal by an inner layer, an exception, a client that
   left before the end, a stream that broke) release the hold: nothing is charged.

Results go to ``ctx.notes`` for the usage log (``credits_charged``,
``credits_compensated``, ``insurance_status``, ...).
"""

from __future__ import annotations

import asyncio
import collections
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from governor import headers as h
from governor import usage as usage_mod
from governor.aio import finish
from governor.backends import RedisBackend
from governor.billing import insurance as ins
from governor.billing.base import (
    BALANCE,
    DAILY_BUDGET,
    HOURLY_BUDGET,
    SPENDING_LIMIT,
    Ledger,
    Limits,
    Refusal,
    Reservation,
    ReserveUnknown,
    Settlement,
)
from governor.billing.memory import MemoryLedger
from governor.billing.pricing import credits_for, estimate_usage
from governor.billing.redis import RedisLedger
from governor.context import RequestContext, Surface
from governor.degraded import degraded_for
from governor.errors import BackendError, Overloaded, RateLimited, Shape
from governor.response import MAX_BUFFERED_BODY, Outcome
from governor.runtime import Governor
from governor.types import ASGIApp, Message, RawHeaders, Receive, Scope, Send
from governor.usage import Usage

_T = TypeVar("_T")
_UNBILLED = (Surface.COUNT_TOKENS, Surface.MODELS)  # a tuple: no Enum hash per request
# json.dumps(..., separators=...) builds an encoder per call: this one is built once.
# What it encodes is governor's own small dicts, never cyclic: no circular check.
_COMPACT = json.JSONEncoder(separators=(",", ":"), check_circular=False)


def ledger_for(governor: Governor) -> Ledger:
    """The one ledger of *governor* (built on first use from its backend)."""

    def build() -> Ledger:
        backend = governor.backend
        if isinstance(backend, RedisBackend):
            return RedisLedger(backend, lease_s=governor.config.billing.reservation_ttl_s)
        return MemoryLedger(governor.clock)

    return governor.shared("billing.ledger", build)


def opening_balance(governor: Governor, account: str) -> int:
    """The balance *account* starts with: its config entry's, else the default."""
    entry = governor.config.accounts.get(account)
    if entry is not None and entry.balance is not None:
        return entry.balance
    return governor.config.billing.default_balance


# Reservations waiting to be cancelled by id, at most (each a few hundred bytes).
MAX_PENDING_CANCELS = 100_000


class SettleRetries:
    """Settlements (and cancellations of reservations whose reply was lost) that failed
    on a ledger error, retried until the ledger answers again.

    Backoff from 50 ms to 2 s, for at most the reservation lease (after which the lease
    has released the hold). Closing the governor cancels what is still pending.
    """

    def __init__(self, governor: Governor, ledger: Ledger) -> None:
        self.ledger = ledger
        self.lease_s = governor.config.billing.reservation_ttl_s
        self.tasks: set[asyncio.Future[None]] = set()
        # Reservation id -> (the unknown reserve, when its lease has surely ended).
        self.cancels: collections.OrderedDict[str, tuple[ReserveUnknown, float]] = (
            collections.OrderedDict()
        )
        self.drainer: asyncio.Future[None] | None = None
        m = governor.metrics
        self.m_retried = m.counter(
            "billing_settle_retries",
            "Settlements retried after a ledger error, by result.",
            ("result",),
        )
        self.degraded = degraded_for(governor)

    def start(self, reservation: Reservation, actual: int, limits: Limits) -> None:
        """Retry settling *reservation* to *actual* credits."""
        self._spawn(lambda: self.ledger.settle(reservation, actual, limits), "settled")

    def cancel(self, unknown: ReserveUnknown) -> None:
        """Cancel a reservation whose reserve call may or may not have run.

        Every request refused during an outage leaves one of these, so they are not a
        task each: one drainer works through a bounded queue once the ledger answers
        (past the bound the oldest is left to its lease).
        """
        if getattr(self.ledger, "cancel", None) is None:
            return
        if len(self.cancels) >= MAX_PENDING_CANCELS:
            self.cancels.popitem(last=False)
            self.m_retried.labels("expired").inc()
        loop = asyncio.get_running_loop()
        self.cancels[unknown.reservation_id] = (unknown, loop.time() + self.lease_s)
        if self.drainer is None or self.drainer.done():
            self.drainer = asyncio.ensure_future(self._drain_cancels())
            self.tasks.add(self.drainer)
            self.drainer.add_done_callback(self.tasks.discard)

    async def _drain_cancels(self) -> None:
        loop = asyncio.get_running_loop()
        cancel = self.ledger.cancel  # type: ignore[attr-defined]
        delay = 0.05
        while self.cancels:
            await asyncio.sleep(delay)
            while self.cancels:
                rid, (unknown, deadline) = next(iter(self.cancels.items()))
                if loop.time() > deadline:  # the lease has released it by now
                    del self.cancels[rid]
                    self.m_retried.labels("expired").inc()
                    continue
                try:
                    await cancel(unknown.account, unknown.key_id, rid)
                except BackendError:
                    delay = min(delay * 2, 2.0)
                    break
                self.cancels.pop(rid, None)
                self.m_retried.labels("cancelled").inc()
                self.degraded.healthy("billing")
                delay = 0.05

    def _spawn(self, call: Callable[[], Awaitable[object]], result: str) -> None:
        task = asyncio.ensure_future(self._run(call, result))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, call: Callable[[], Awaitable[object]], result: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.lease_s
        delay = 0.05
        while loop.time() + delay < deadline:
            await asyncio.sleep(delay)
            try:
                await call()
            except BackendError:
                delay = min(delay * 2, 2.0)
                continue
            self.degraded.healthy("billing")
            self.m_retried.labels(result).inc()
            return
        self.m_retried.labels("expired").inc()

    async def drain(self) -> None:
        """Wait for every pending retry (tests; a graceful shutdown)."""
        while self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)

    async def aclose(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*list(self.tasks), return_exceptions=True)


def retries_for(governor: Governor, ledger: Ledger) -> SettleRetries:
    """The settlement retries of *governor*."""
    return governor.shared("billing.retries", lambda: SettleRetries(governor, ledger))


class QuotaExceeded(RateLimited):
    """429 ``insufficient_quota``: a balance or budget cannot cover the request."""

    openai_type = "insufficient_quota"


_CODES = {
    BALANCE: ("credit_balance_exhausted", "The account's credit balance"),
    SPENDING_LIMIT: ("spending_limit_exceeded", "This API key's spending limit"),
    HOURLY_BUDGET: ("hourly_budget_exceeded", "This API key's hourly budget"),
    DAILY_BUDGET: ("daily_budget_exceeded", "This API key's daily budget"),
}


def quota_error(refusal: Refusal, amount: int, shape: Shape, now: float) -> QuotaExceeded:
    """The 429 for *refusal*: never retried by the SDKs; Retry-After only when a window
    resets (an exhausted balance or lifetime limit does not reset by itself)."""
    code, what = _CODES.get(refusal.reason, ("budget_exceeded", "A budget"))
    message = (
        f"{what} cannot cover this request: its worst-case cost is {amount} credits and "
        f"{max(refusal.remaining, 0)} remain."
    )
    extra: RawHeaders = []
    if refusal.retry_after is not None and shape is Shape.ANTHROPIC:
        # Claude Code stops retrying only when it sees these along with Retry-After.
        extra = [
            (b"anthropic-ratelimit-unified-status", b"rejected"),
            (b"anthropic-ratelimit-unified-reset", str(int(now + refusal.retry_after)).encode()),
        ]
    return QuotaExceeded(
        message,
        code=code,
        retry_after=refusal.retry_after,
        should_retry=False,
        headers=extra,
        reason=refusal.reason,
    )


class BillingMiddleware:
    """Credit billing, per-key budgets and latency insurance for governed model requests.

    *ledger* replaces the governor's own (by default memory or Redis after its backend).
    """

    def __init__(
        self, app: ASGIApp, *, governor: Governor | None = None, ledger: Ledger | None = None
    ) -> None:
        self.app = app
        self.governor = governor if governor is not None else Governor()
        gov = self.governor
        self.billing = gov.config.billing
        self.insurance = gov.config.insurance
        self.ledger = ledger if ledger is not None else ledger_for(gov)
        m = gov.metrics
        self.m_charged = m.counter(
            "billing_credits_charged", "Credits charged for settled requests.", ("model",)
        )
        self.m_compensated = m.counter(
            "billing_credits_compensated", "Credits given back by latency insurance.", ("model",)
        )
        self.m_payouts = m.counter(
            "insurance_payouts", "Requests paid by latency insurance.", ("model",)
        )
        self.m_refusals = m.counter(
            "billing_refusals", "Requests refused by a balance or budget.", ("reason",)
        )
        self.m_errors = m.counter(
            "billing_backend_errors", "Ledger operations that failed.", ("operation",)
        )
        self.degraded = degraded_for(gov)
        self.retries = retries_for(gov, self.ledger)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        entered = await self.governor.model_call(self.app, scope, receive, send, skip=_UNBILLED)
        if entered is None:
            return
        ctx, receive, send = entered
        await _Billed(self, ctx, send).run(scope, receive)


class _Billed:
    """One billed request: its reservation, its held JSON body, its settlement."""

    def __init__(self, mw: BillingMiddleware, ctx: RequestContext, send: Send) -> None:
        self.mw = mw
        self.ctx = ctx
        self.downstream = send
        assert ctx.model is not None
        self.model = ctx.model
        self.limits = Limits.of(ctx.policy)
        self.estimate = 0
        self.reservation: Reservation | None = None
        self.held_start: Message | None = None
        self.buffer = bytearray()
        # Set once settlement has begun (at the end of a held JSON body, or after the app).
        self.settling = False
        self.payload: Any = None

    def _keep(self, task: asyncio.Task[None]) -> None:
        # Settlement waits on the ledger: the usage log (outside) waits for its credits.
        self.ctx.notes["billing_task"] = task

    # --- admission ----------------------------------------------------------------

    async def run(self, scope: Scope, receive: Receive) -> None:
        mw, ctx = self.mw, self.ctx
        cfg = mw.billing
        worst = estimate_usage(
            ctx,
            default_output_reserve=cfg.default_output_reserve,
            image_output_tokens=cfg.image_output_tokens,
        )
        self.estimate = max(1, credits_for(self.model, worst, cfg.credit_usd))
        ctx.notes["credits_reserved"] = self.estimate
        try:
            result = await mw.ledger.reserve(
                ctx.account,
                ctx.key_id,
                opening_balance(mw.governor, ctx.account),
                self.estimate,
                self.limits,
            )
        except BackendError as unknown:
            mw.m_errors.labels("reserve").inc()
            mw.degraded.mark(ctx, "billing", cfg.fail_mode)
            if isinstance(unknown, ReserveUnknown):
                # The script may have run and hold credits: release them by id.
                mw.retries.cancel(unknown)
            if cfg.fail_mode == "closed":
                # Money is at stake: without the ledger nothing is admitted.
                await mw.governor.refuse(
                    ctx,
                    self.downstream,
                    Overloaded(
                        "Billing is temporarily unavailable; try again shortly.",
                        retry_after=5,
                        reason="billing_unavailable",
                    ),
                )
                return
            # Fail open: serve the request unbilled (each worker, no shared state).
            ctx.notes["billing"] = "unbilled"
            await mw.app(scope, receive, self.downstream)
            return
        mw.degraded.healthy("billing")
        if isinstance(result, Refusal):
            mw.m_refusals.labels(result.reason).inc()
            ctx.notes["billing_refusal"] = result.reason
            error = quota_error(result, self.estimate, ctx.shape, mw.governor.clock.time())
            await mw.governor.refuse(ctx, self.downstream, error)
            return
        self.reservation = result
        exc: BaseException | None = None
        try:
            await mw.app(scope, receive, self.send)
        except BaseException as e:
            exc = e
            raise
        finally:
            if not self.settling:
                self.settling = True
                await finish(self._finish_after(exc), on_task=self._keep)

    # --- the response ---------------------------------------------------------------

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            status = int(message["status"])
            headers = message.get("headers", ())
            ctype = h.get(headers, b"content-type") or b""
            if (
                self.ctx.refusal is None
                and 200 <= status < 300
                and b"json" in ctype
                and h.get(headers, b"content-encoding") is None
            ):
                self.held_start = message
                return
            if self.mw.insurance.enabled and self.ctx.refusal is None:
                if 200 <= status < 300:
                    h.append(message, ins.pending_headers(self.mw.insurance.threshold_ms))
                else:
                    h.append(message, [h.header(h.INSURANCE_STATUS, ins.NOT_ELIGIBLE)])
            await self.downstream(message)
            return
        if kind != "http.response.body" or self.held_start is None:
            await self.downstream(message)
            return
        self.buffer += message.get("body", b"")
        more = bool(message.get("more_body", False))
        if len(self.buffer) > MAX_BUFFERED_BODY:
            # Too large to rewrite: pass it on as it came; settled at the end.
            start, self.held_start = self.held_start, None
            await self.downstream(start)
            await self.downstream(
                {"type": "http.response.body", "body": bytes(self.buffer), "more_body": more}
            )
            self.buffer = bytearray()
            return
        if more:
            return
        self.settling = True
        await finish(self._finish_json(), on_task=self._keep)
        start, body = self._rewritten()
        await self.downstream(start)
        await self.downstream({"type": "http.response.body", "body": body, "more_body": False})

    def _rewritten(self) -> tuple[Message, bytes]:
        start = self.held_start
        assert start is not None
        body = bytes(self.buffer)
        extra: dict[str, Any] = {}
        billing = self.ctx.notes.get("hypereal_billing")
        if billing is not None:
            extra["billing"] = billing
        insurance: ins.Insurance | None = self.ctx.notes.get("insurance")
        if insurance is not None:
            extra["insurance"] = insurance.as_json()
            h.append(start, insurance.headers())
        if extra:
            body = splice_hypereal(body, extra, self.payload)
            h.replace(start, [(b"content-length", str(len(body)).encode())])
        return start, body

    # --- settlement -----------------------------------------------------------------

    async def _finish_json(self) -> None:
        try:
            payload = json.loads(self.buffer)
        except ValueError:
            payload = None
            self.ctx.response.malformed = True  # an upstream failure, for logs and breaker
        self.payload = payload
        # A 2xx "JSON" body that does not parse is a failed request: not charged.
        await self._settle(
            payload is not None,
            usage_mod.from_body(payload),
            self.mw.governor.clock.monotonic(),
        )

    async def _finish_after(self, exc: BaseException | None) -> None:
        ctx = self.ctx
        outcome = ctx.response.outcome(
            refused=ctx.refusal is not None, disconnected=ctx.disconnected, exc=exc
        )
        ended = ctx.response.finished_at
        await self._settle(
            outcome is Outcome.SUCCESS,
            ctx.response.usage,
            ended if ended is not None else self.mw.governor.clock.monotonic(),
        )

    async def _settle(self, success: bool, usage: Usage | None, ended: float) -> None:
        mw, ctx = self.mw, self.ctx
        reservation = self.reservation
        assert reservation is not None
        actual = 0
        if success:
            # No usage reported: the reservation's worst case (documented).
            actual = (
                self.estimate
                if usage is None
                else credits_for(self.model, usage, mw.billing.credit_usd)
            )
        try:
            settlement: Settlement = await mw.ledger.settle(reservation, actual, self.limits)
        except BackendError:
            # Retried in the background until the ledger answers (settlements are
            # idempotent: a lost reply is never charged twice); past the lease the
            # hold is released by the lease and the request goes unbilled.
            mw.m_errors.labels("settle").inc()
            mw.degraded.mark(ctx, "billing", "retry")
            ctx.notes["billing"] = "settle_retrying"
            mw.retries.start(reservation, actual, self.limits)
            return
        charged = settlement.charged
        ctx.notes["credits_charged"] = charged
        if charged:
            mw.governor.metrics.child(mw.m_charged, self.model.id).inc(charged)
        if success:
            ctx.notes["hypereal_billing"] = {
                "model": self.model.id,
                "credits_charged": charged,
                "balance_before": settlement.balance_before,
                "balance_after": settlement.balance_after,
            }
        if not mw.insurance.enabled:
            return
        latency_ms = round((ended - ctx.arrived) * 1000)
        result = ins.evaluate(
            success=success,
            charged=charged,
            latency_ms=latency_ms,
            threshold_ms=mw.insurance.threshold_ms,
            ratio=mw.insurance.compensation_ratio,
        )
        if result.credits_compensated:
            try:
                ctx.notes["balance_after_compensation"] = await mw.ledger.compensate(
                    ctx.account, result.credits_compensated
                )
            except BackendError:
                mw.m_errors.labels("compensate").inc()
                result = ins.Insurance(
                    ins.NOT_TRIGGERED,
                    "latency",
                    "compensation_failed",
                    latency_ms,
                    result.threshold_ms,
                    charged,
                    0,
                )
            else:
                metrics = mw.governor.metrics
                metrics.child(mw.m_compensated, self.model.id).inc(result.credits_compensated)
                metrics.child(mw.m_payouts, self.model.id).inc()
        ctx.notes["insurance"] = result
        ctx.notes["insurance_status"] = result.status
        ctx.notes["credits_compensated"] = result.credits_compensated


def splice_hypereal(body: bytes, extra: dict[str, Any], payload: Any = ...) -> bytes:
    """*body* (a JSON object) with ``hypereal`` holding *extra*, upstream bytes untouched.

    The object is appended before the closing brace; if the body already has a
    ``hypereal`` object it is merged and the body re-encoded. A body that is not a JSON
    object is returned as it is. *payload* is the body already decoded, if it was.
    """
    stripped = body.rstrip()
    if payload is ...:
        try:
            payload = json.loads(stripped)
        except ValueError:
            return body
    if not isinstance(payload, dict):
        return body
    if "hypereal" in payload:
        existing = payload["hypereal"]
        payload["hypereal"] = {**(existing if isinstance(existing, dict) else {}), **extra}
        return json.dumps(payload).encode()
    addition = _COMPACT.encode({"hypereal": extra}).encode()[1:-1]
    head = stripped[:-1].rstrip()
    sep = b"" if head.endswith(b"{") else b","
    return head + sep + addition + b"}"
