"""BillingMiddleware: charges, refusals, failed requests, insurance, metadata."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from governor.backends import Backend, RedisBackend
from governor.billing import BillingMiddleware, Limits, Reservation, ledger_for
from governor.billing.base import KeySpend, Refusal, Settlement
from governor.clock import ManualClock
from governor.config import BillingConfig, InsuranceConfig
from governor.context import get_context
from governor.errors import BackendError, RateLimited
from governor.runtime import Governor
from governor.types import ASGIApp, Receive, Scope, Send
from governor.usage_log import MemorySink
from tests.apps import failing_app
from tests.billing_apps import (
    KEY,
    HeldApp,
    anthropic_message,
    chat_body,
    chat_completion,
    json_app,
    make_governor,
    sse_chat_app,
    stack,
)
from tests.helpers import Result, auth, call

CHAT = "/v1/managed/chat/completions"


async def post(app: ASGIApp, body: dict[str, Any] | None = None, path: str = CHAT) -> Result:
    return await call(app, path=path, headers=auth(KEY), json_body=body or chat_body())


async def state(gov: Governor) -> tuple[int, KeySpend]:
    ledger = ledger_for(gov)
    return await ledger.balance("acme", 1000), await ledger.spent("acme", _kid())


def _kid() -> str:
    from governor.keys import key_id

    return key_id(KEY)


async def wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    """Yield to the loop until *predicate* holds (Redis round trips need real waits)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition never held")
        await asyncio.sleep(0.001)


# --- charges and metadata -------------------------------------------------------------


async def test_non_streaming_charge_and_metadata(backend: Backend, clock: ManualClock) -> None:
    """A 2xx JSON response is charged its usage and carries hypereal.billing."""
    gov = make_governor(backend, clock)
    upstream = chat_completion()
    result = await post(stack(json_app(clock, upstream), gov))
    assert result.status == 200
    body = result.json()
    assert body["hypereal"]["billing"] == {
        "model": "claude-sonnet-4-7",
        "credits_charged": 12,
        "balance_before": 1000,
        "balance_after": 988,
    }
    assert {k: v for k, v in body.items() if k != "hypereal"} == upstream
    assert result.header("content-length") == str(len(result.body))
    balance, spent = await state(gov)
    assert balance == 988
    assert spent == KeySpend(12, 12, 12)


async def test_anthropic_message_charged(backend: Backend, clock: ManualClock) -> None:
    """Anthropic-shaped responses are priced from their usage block too."""
    gov = make_governor(backend, clock)
    result = await post(stack(json_app(clock, anthropic_message()), gov), path="/v1/messages")
    assert result.json()["hypereal"]["billing"]["credits_charged"] == 12


async def test_no_usage_charges_the_reservation(backend: Backend, clock: ManualClock) -> None:
    """An upstream that reports no usage is billed the reserved worst case."""
    gov = make_governor(backend, clock)
    result = await post(stack(json_app(clock, chat_completion(usage=None)), gov))
    assert result.json()["hypereal"]["billing"]["credits_charged"] == 16


async def test_charge_above_reservation_never_below_zero(
    backend: Backend, clock: ManualClock
) -> None:
    """Usage above the reservation is charged only as far as the balance goes."""
    gov = make_governor(backend, clock, balance=20)
    app = stack(json_app(clock, chat_completion()), gov)
    small = chat_body(max_tokens=1)  # reserves 1 credit; the upstream reports 12
    first = await post(app, small)
    assert first.json()["hypereal"]["billing"]["credits_charged"] == 12
    second = await post(app, small)
    assert second.json()["hypereal"]["billing"] == {
        "model": "claude-sonnet-4-7",
        "credits_charged": 8,
        "balance_before": 8,
        "balance_after": 0,
    }


async def test_count_tokens_is_free(backend: Backend, clock: ManualClock) -> None:
    """count_tokens is not billed and its body is untouched."""
    gov = make_governor(backend, clock)
    payload = {"input_tokens": 5}
    result = await post(
        stack(json_app(clock, payload), gov),
        {"model": "claude-sonnet-4-7", "messages": []},
        path="/v1/messages/count_tokens",
    )
    assert result.json() == payload
    assert (await state(gov))[0] == 1000


# --- failed requests ------------------------------------------------------------------


def _disconnecting_stream(event: asyncio.Event) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        start = {"type": "http.response.start", "status": 200}
        await send({**start, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})
        event.set()
        assert (await receive())["type"] == "http.disconnect"

    return app


def _inner_refusal(gov: Governor) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        ctx = get_context(scope)
        assert ctx is not None
        await gov.refuse(ctx, send, RateLimited("slow down", retry_after=1))

    return app


def _broken_stream(clock: ManualClock) -> ASGIApp:
    """A 2xx stream that ends with an error event instead of [DONE]."""
    sse = sse_chat_app(clock)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        async def send_error_event(message: Any) -> None:
            if message.get("body", b"").startswith(b"data: [DONE]"):
                message = {**message, "body": b'event: error\ndata: {"error": {}}\n\n'}
            await send(message)

        await sse(scope, receive, send_error_event)

    return app


@pytest.mark.parametrize("kind", ["500", "exception", "refused", "disconnect", "broken"])
async def test_failed_requests_are_not_charged(
    backend: Backend, clock: ManualClock, kind: str
) -> None:
    """Upstream errors, exceptions, inner refusals, disconnects, broken streams: free."""
    gov = make_governor(backend, clock)
    gone = asyncio.Event()
    apps: dict[str, ASGIApp] = {
        "500": json_app(clock, {"error": {"message": "x"}}, status=500),
        "exception": failing_app,
        "refused": _inner_refusal(gov),
        "disconnect": _disconnecting_stream(gone),
        "broken": _broken_stream(clock),
    }
    app = stack(apps[kind], gov)
    if kind == "exception":
        with pytest.raises(RuntimeError):
            await post(app)
    elif kind == "disconnect":
        await call(app, path=CHAT, headers=auth(KEY), json_body=chat_body(), disconnect=gone)
    else:
        result = await post(app)
        assert kind == "broken" or result.status >= 400
    balance, spent = await state(gov)
    assert balance == 1000
    assert spent == KeySpend(0, 0, 0)


async def test_cancelled_request_releases(backend: Backend, clock: ManualClock) -> None:
    """A request cancelled mid-way releases its hold, shielded from the cancellation."""
    gov = make_governor(backend, clock)
    held = HeldApp()
    task = asyncio.ensure_future(post(stack(held, gov)))
    await wait_until(lambda: held.inside == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await state(gov) == (1000, KeySpend(0, 0, 0))


async def test_upstream_error_says_not_eligible(backend: Backend, clock: ManualClock) -> None:
    """A failed response carries the not_eligible insurance status, body untouched."""
    gov = make_governor(backend, clock)
    result = await post(stack(json_app(clock, {"error": {"message": "x"}}, status=502), gov))
    assert result.header("x-hypereal-insurance-status") == "not_eligible"
    assert result.json() == {"error": {"message": "x"}}


# --- refusals -------------------------------------------------------------------------


async def test_balance_refusal_openai_shape(backend: Backend, clock: ManualClock) -> None:
    """An exhausted balance is a 429 insufficient_quota that SDKs never retry."""
    gov = make_governor(backend, clock, balance=10)
    result = await post(stack(json_app(clock, chat_completion()), gov))
    assert result.status == 429
    error = result.json()["error"]
    assert error["type"] == "insufficient_quota"
    assert error["code"] == "credit_balance_exhausted"
    assert result.header("x-should-retry") == "false"
    assert result.header("retry-after") is None
    value = gov.metrics.registry.get_sample_value(
        "governor_billing_refusals_total", {"reason": "balance"}
    )
    assert value == 1


async def test_budget_refusal_anthropic_shape(backend: Backend, clock: ManualClock) -> None:
    """A budget refusal on /v1/messages is Anthropic-shaped with a reset time."""
    gov = make_governor(backend, clock, hourly_budget=10)
    body = {**chat_body(), "model": "claude-sonnet-4-7"}
    result = await post(stack(json_app(clock, anthropic_message()), gov), body, "/v1/messages")
    assert result.status == 429
    assert result.json()["type"] == "error"
    assert result.json()["error"]["type"] == "rate_limit_error"
    assert result.header("x-should-retry") == "false"
    retry_after = int(result.header("retry-after") or 0)
    assert 0 < retry_after <= 3600
    assert result.header("anthropic-ratelimit-unified-status") == "rejected"


@pytest.mark.parametrize(
    ("limit", "code", "reset"),
    [
        ("hourly_budget", "hourly_budget_exceeded", 3_600),
        ("daily_budget", "daily_budget_exceeded", 57_600),
        ("spending_limit", "spending_limit_exceeded", None),
    ],
)
async def test_budget_windows_on_the_clock(
    clock: ManualClock, limit: str, code: str, reset: int | None
) -> None:
    """Hourly and daily budgets reset on calendar boundaries; the lifetime limit never."""
    from governor.backends import MemoryBackend

    gov = make_governor(MemoryBackend(), clock, **{limit: 20})  # type: ignore[arg-type]
    app = stack(json_app(clock, chat_completion()), gov)
    assert (await post(app)).status == 200  # 12 spent; the next needs 16 more
    refused = await post(app)
    assert refused.status == 429
    assert refused.json()["error"]["code"] == code
    if reset is None:
        assert refused.header("retry-after") is None
        clock.advance(10 * 86_400)
        assert (await post(app)).status == 429
    else:
        # The ManualClock's wall time starts on an hour boundary (and 57,600 s before a
        # UTC midnight).
        assert refused.header("retry-after") == str(reset)
        clock.advance(reset - 1)
        assert (await post(app)).status == 429
        clock.advance(1)
        assert (await post(app)).status == 200


# --- concurrency ----------------------------------------------------------------------


@pytest.mark.parametrize("limit", ["balance", "hourly_budget", "daily_budget", "spending_limit"])
async def test_concurrent_burst_never_overspends(
    backend: Backend, clock: ManualClock, limit: str
) -> None:
    """Of 30 concurrent requests reserving 16 credits each, only 100 // 16 get in."""
    kwargs: dict[str, Any] = {"balance": 100} if limit == "balance" else {limit: 100}
    gov = make_governor(backend, clock, **kwargs)
    held = HeldApp()
    app = stack(held, gov)
    tasks = [asyncio.ensure_future(post(app)) for _ in range(30)]
    await wait_until(lambda: held.inside + sum(t.done() for t in tasks) == 30)
    assert held.inside == 6
    held.gate.set()
    results = await asyncio.gather(*tasks)
    assert sorted(r.status for r in results) == [200] * 6 + [429] * 24
    balance, spent = await state(gov)
    charged = sum(
        r.json()["hypereal"]["billing"]["credits_charged"] for r in results if r.status == 200
    )
    assert charged == 72
    assert spent.lifetime == 72
    if limit == "balance":
        assert balance == 28


# --- backend failures -----------------------------------------------------------------


class BrokenLedger:
    """A ledger whose backend is down."""

    async def reserve(self, *args: object) -> Reservation | Refusal:
        raise BackendError("down")

    async def settle(self, *args: object) -> Settlement:
        raise BackendError("down")

    async def compensate(self, account: str, credits: int) -> int:
        raise BackendError("down")

    async def balance(self, account: str, opening: int) -> int:
        raise BackendError("down")

    async def spent(self, account: str, key_id: str) -> KeySpend:
        raise BackendError("down")


@pytest.mark.parametrize(("mode", "status"), [("closed", 503), ("open", 200)])
async def test_backend_down_follows_fail_mode(clock: ManualClock, mode: str, status: int) -> None:
    """Ledger down: fail closed answers 503; fail open serves the request unbilled."""
    from governor.backends import MemoryBackend

    gov = make_governor(MemoryBackend(), clock, billing=BillingConfig(fail_mode=mode))  # type: ignore[arg-type]
    app = BillingMiddleware(json_app(clock, chat_completion()), governor=gov, ledger=BrokenLedger())
    result = await post(app)
    assert result.status == status
    if status == 200:
        assert "hypereal" not in result.json()


# --- insurance ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("work_s", "status", "paid"),
    [
        (94.32, "paid", 3),
        (90.0, "not_triggered", 0),
        (90.001, "paid", 3),
        (1.0, "not_triggered", 0),
    ],
)
async def test_insurance_non_streaming(
    backend: Backend, clock: ManualClock, work_s: float, status: str, paid: int
) -> None:
    """Past the threshold, 25 % of the charge goes back; body and headers say so."""
    gov = make_governor(backend, clock)
    result = await post(stack(json_app(clock, chat_completion(), work_s=work_s), gov))
    latency = round(work_s * 1000)
    insurance = result.json()["hypereal"]["insurance"]
    assert insurance == {
        "status": status,
        "trigger": "latency" if paid else "none",
        "reason": "latency_threshold_exceeded" if paid else "within_threshold",
        "latency_ms": latency,
        "threshold_ms": 90_000,
        "credits_charged": 12,
        "credits_compensated": paid,
    }
    assert result.header("X-Hypereal-Insurance-Status") == status
    assert result.header("X-Hypereal-Insurance-Trigger") == insurance["trigger"]
    assert result.header("X-Hypereal-Insurance-Latency-Ms") == str(latency)
    assert result.header("X-Hypereal-Insurance-Threshold-Ms") == "90000"
    assert result.header("X-Hypereal-Insurance-Credits") == str(paid)
    assert (await state(gov))[0] == 1000 - 12 + paid
    payouts = gov.metrics.registry.get_sample_value(
        "governor_insurance_payouts_total", {"model": "claude-sonnet-4-7"}
    )
    assert (payouts or 0) == (1 if paid else 0)


@pytest.mark.parametrize(("work_s", "paid"), [(94.32, 3), (60.0, 0)])
async def test_insurance_streaming(
    backend: Backend, clock: ManualClock, work_s: float, paid: int
) -> None:
    """A stream gets pending policy headers at once and settles when it ends."""
    gov = make_governor(backend, clock)
    sink = MemorySink()
    result = await post(
        stack(sse_chat_app(clock, work_s=work_s), gov, sink), chat_body(stream=True)
    )
    assert result.header("X-Hypereal-Insurance-Status") == "pending"
    assert result.header("X-Hypereal-Insurance-Threshold-Ms") == "90000"
    assert result.body.endswith(b"data: [DONE]\n\n")
    assert b"hypereal" not in result.body
    assert (await state(gov))[0] == 1000 - 12 + paid
    (record,) = sink.records
    assert record.credits_charged == 12
    assert record.credits_compensated == paid
    assert record.insurance_status == ("paid" if paid else "not_triggered")
    assert record.latency_ms == round(work_s * 1000)


async def test_insurance_disabled(backend: Backend, clock: ManualClock) -> None:
    """With insurance off, responses carry billing only."""
    gov = make_governor(backend, clock, insurance=InsuranceConfig(enabled=False))
    result = await post(stack(json_app(clock, chat_completion(), work_s=100), gov))
    assert set(result.json()["hypereal"]) == {"billing"}
    assert result.header("X-Hypereal-Insurance-Status") is None
    assert (await state(gov))[0] == 988


async def test_metrics(backend: Backend, clock: ManualClock) -> None:
    """Credits charged and compensated are counted per model."""
    gov = make_governor(backend, clock)
    await post(stack(json_app(clock, chat_completion(), work_s=95), gov))
    get = gov.metrics.registry.get_sample_value
    labels = {"model": "claude-sonnet-4-7"}
    assert get("governor_billing_credits_charged_total", labels) == 12
    assert get("governor_billing_credits_compensated_total", labels) == 3


async def test_reaped_reservation_is_released(redis_backend: RedisBackend) -> None:
    """A hold whose request never settled (a dead worker) is released after its lease."""
    from governor.billing import RedisLedger

    ledger = RedisLedger(redis_backend, lease_s=0)
    limits = Limits(hourly_budget=100)
    first = await ledger.reserve("acme", "k1", 100, 60, limits)
    assert isinstance(first, Reservation)
    # The first hold's lease has run out: the next reservation reaps it.
    second = await ledger.reserve("acme", "k1", 100, 60, limits)
    assert isinstance(second, Reservation)
    assert (await ledger.spent("acme", "k1")).hour == 60
    # Settling the reaped one still charges, within what is left.
    settled = await ledger.settle(first, 50, limits)
    assert settled.charged == 40
    assert settled.balance_after == 60


async def test_wrap_includes_billing_and_usage(backend: Backend, clock: ManualClock) -> None:
    """wrap() bills and logs when [billing] and [usage] are enabled."""
    from governor.stack import wrap
    from governor.usage_log import MemorySink, sink_for

    gov = make_governor(backend, clock)
    result = await post(wrap(json_app(clock, chat_completion()), gov))
    assert result.json()["hypereal"]["billing"]["credits_charged"] == 12
    sink = sink_for(gov)
    assert isinstance(sink, MemorySink)
    assert len(sink.records) == 1


async def test_ledger_invariants_under_random_use(backend: Backend, clock: ManualClock) -> None:
    """Random reserves and settles (above and below the hold) keep every invariant."""
    import random

    gov = make_governor(backend, clock)
    ledger = ledger_for(gov)
    limits = Limits(spending_limit=900, hourly_budget=300, daily_budget=600)
    rng = random.Random(7)
    holds: list[Reservation] = []
    charged = 0
    for _ in range(200):
        if holds and rng.random() < 0.5:
            settled = await ledger.settle(
                holds.pop(rng.randrange(len(holds))), rng.randint(0, 80), limits
            )
            charged += settled.charged
            assert settled.balance_before - settled.charged == settled.balance_after
        else:
            result = await ledger.reserve("acme", "k", 1000, rng.randint(1, 50), limits)
            if isinstance(result, Reservation):
                holds.append(result)
        spent = await ledger.spent("acme", "k")
        assert spent.lifetime == charged + sum(r.amount for r in holds)
        assert spent.lifetime <= 900
        assert spent.hour <= 300
        assert spent.day <= 600
        assert await ledger.balance("acme", 1000) == 1000 - charged >= 0


def _malformed_json_app(scope: Scope, receive: Receive, send: Send) -> Any:
    async def app() -> None:
        await receive()
        body = b'{"id": "chatcmpl-1", "choices": [trunc'
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app()


async def test_malformed_success_body_is_an_upstream_error(
    backend: Backend, clock: ManualClock
) -> None:
    """A 200 "JSON" body that does not parse is charged nothing, passed on untouched and
    logged as an upstream error, not a success."""
    from governor.stack import wrap
    from governor.usage_log import sink_for

    gov = make_governor(backend, clock)
    result = await post(wrap(_malformed_json_app, gov))
    assert result.status == 200
    assert result.body == b'{"id": "chatcmpl-1", "choices": [trunc'
    balance, spent = await state(gov)
    assert (balance, spent) == (1000, KeySpend(0, 0, 0))
    sink = sink_for(gov)
    assert isinstance(sink, MemorySink)
    [record] = sink.records
    assert record.outcome == "upstream_error"
    assert record.credits_charged == 0
