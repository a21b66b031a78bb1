"""Admission: slots, the fair queue, refusals and headers, on every backend."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from governor import headers as h
from governor.admission import AdmissionMiddleware
from governor.backends import Backend
from governor.clock import ManualClock
from governor.config import KeyEntry, ModelLimits
from governor.runtime import Governor
from governor.types import ASGIApp, Receive, Scope, Send
from tests.admission_support import (
    CLAUDE,
    MODEL,
    KeyedApp,
    make_governor,
    queued,
    request,
    sample,
    settled,
    until,
)
from tests.apps import GatedApp, failing_app

Factory = Callable[..., tuple[AdmissionMiddleware, Governor]]


@pytest.fixture
async def make(backend: Backend, clock: ManualClock) -> AsyncIterator[Factory]:
    """Build admission middlewares on the test's backend; close them afterwards."""
    made: list[AdmissionMiddleware] = []

    def factory(app: ASGIApp, **options: Any) -> tuple[AdmissionMiddleware, Governor]:
        gov = make_governor(backend, clock, **options)
        mw = AdmissionMiddleware(app, governor=gov)
        made.append(mw)
        return mw, gov

    yield factory
    for mw in made:
        await mw.aclose()


async def test_headers_exact(make: Factory) -> None:
    """A model call gets the spec's 80/79 and a zero queue wait."""
    app = KeyedApp()
    app.open("a")
    mw, _gov = make(app, limit=None)
    result = await request(mw, "a")
    assert result.status == 200
    assert result.header(h.CONCURRENCY_LIMIT) == "80"
    assert result.header(h.CONCURRENCY_REMAINING) == "79"
    assert result.header(h.QUEUE_WAIT_MS) == "0"
    assert result.header(h.GOVERNOR) == "active"
    assert result.header(h.DEGRADED) is None


async def test_remaining_counts_slots_in_use(make: Factory) -> None:
    """Remaining is the free slots once this request holds its own."""
    app = KeyedApp()
    mw, _ = make(app, limit=3)
    held = [asyncio.ensure_future(request(mw, t)) for t in ("a", "b")]
    await until(lambda: app.inside == 2)
    app.open("c")
    result = await request(mw, "c")
    assert result.header(h.CONCURRENCY_LIMIT) == "3"
    assert result.header(h.CONCURRENCY_REMAINING) == "0"
    app.open("a", "b")
    await asyncio.gather(*held)


async def test_never_more_than_limit(make: Factory) -> None:
    """Ten times the limit at once: the app never sees more than the limit."""
    app = GatedApp()
    mw, gov = make(app, limit=3)
    calls = [asyncio.ensure_future(request(mw, str(i), key=f"ck_{i % 4}")) for i in range(30)]
    await until(lambda: app.inside == 3)
    await queued(gov, 27)
    assert app.peak == 3
    app.gate.set()
    results = await asyncio.gather(*calls)
    assert [r.status for r in results] == [200] * 30
    assert app.peak == 3
    assert sample(gov, "admission_admitted_total", model=MODEL, path="queued") == 27
    assert sample(gov, "admission_in_flight", model=MODEL) == 0
    await settled(mw, limit=3)


async def test_fifo_within_an_account(make: Factory) -> None:
    """One account's waiters are served in arrival order."""
    app = KeyedApp()
    mw, gov = make(app, limit=1)
    first = asyncio.ensure_future(request(mw, "h"))
    await until(lambda: app.inside == 1)
    waiters = []
    for i in range(5):
        waiters.append(asyncio.ensure_future(request(mw, f"w{i}")))
        await queued(gov, i + 1)
    app.open("h", *(f"w{i}" for i in range(5)))
    await asyncio.gather(first, *waiters)
    assert app.order == ["h", "w0", "w1", "w2", "w3", "w4"]


async def test_flooding_account_holds_another_for_one_turnover(make: Factory) -> None:
    """An account with ten waiters queued first cannot keep another's request waiting
    longer than the next freed slot."""
    app = KeyedApp()
    mw, gov = make(app, limit=2)
    flood = [asyncio.ensure_future(request(mw, f"a{i}", key="ck_a")) for i in range(2)]
    await until(lambda: app.inside == 2)
    for i in range(2, 12):
        flood.append(asyncio.ensure_future(request(mw, f"a{i}", key="ck_a")))
        await queued(gov, i - 1)
    other = asyncio.ensure_future(request(mw, "b0", key="ck_b"))
    await queued(gov, 11)
    app.open("a0")
    await until(lambda: len(app.order) == 3)
    assert app.order[2] == "b0"
    app.open(*(f"a{i}" for i in range(12)), "b0")
    await asyncio.gather(other, *flood)


async def test_round_robin_between_accounts(make: Factory) -> None:
    """Two accounts that both queue are served alternately, each in its own order."""
    app = KeyedApp()
    mw, gov = make(app, limit=1)
    first = asyncio.ensure_future(request(mw, "c", key="ck_c"))
    await until(lambda: app.inside == 1)
    calls = []
    for n, tag in enumerate(["a0", "a1", "a2", "b0", "b1", "b2"]):
        calls.append(asyncio.ensure_future(request(mw, tag, key="ck_" + tag[0])))
        await queued(gov, n + 1)
    app.open("c", "a0", "a1", "a2", "b0", "b1", "b2")
    await asyncio.gather(first, *calls)
    assert app.order == ["c", "a0", "b0", "a1", "b1", "a2", "b2"]


async def test_queue_wait_header_and_note(make: Factory, clock: ManualClock) -> None:
    """A request that waited says how long, in the header and in ctx.notes."""
    app = KeyedApp()
    seen: dict[str, Any] = {}

    async def noting(scope: Scope, receive: Receive, send: Send) -> None:
        from governor import get_context

        ctx = get_context(scope)
        assert ctx is not None
        seen.update(ctx.notes)
        await app(scope, receive, send)

    mw, gov = make(noting, limit=1)
    first = asyncio.ensure_future(request(mw, "a"))
    await until(lambda: app.inside == 1)
    second = asyncio.ensure_future(request(mw, "b"))
    await queued(gov, 1)
    clock.advance(1.5)
    app.open("a", "b")
    await first
    result = await second
    assert result.header(h.QUEUE_WAIT_MS) == "1500"
    assert seen["queue_wait_ms"] == 1500
    assert sample(gov, "admission_queue_wait_seconds_count", model=MODEL) == 2


async def test_wait_timeout_is_429_with_retry_after(make: Factory, clock: ManualClock) -> None:
    """A wait past max_wait_s is a 429 in the OpenAI shape, with Retry-After from the
    measured hold time; nothing is left behind."""
    app = KeyedApp()
    mw, gov = make(app, limit=1, max_wait_s=2.0)
    # Teach the pool a 10 s hold time.
    first = asyncio.ensure_future(request(mw, "h0"))
    await until(lambda: app.inside == 1)
    clock.advance(10)
    app.open("h0")
    await first
    held = asyncio.ensure_future(request(mw, "h1"))
    await until(lambda: app.inside == 1)
    waiting = asyncio.ensure_future(request(mw, "w"))
    await queued(gov, 1)
    clock.advance(2.0)
    result = await waiting
    assert result.status == 429
    body = result.json()
    assert body["error"]["type"] == "rate_limit_error"
    assert body["error"]["code"] == "queue_timeout"
    # One waiter (itself) ahead of a slot that turns over every 10 s.
    assert result.header("retry-after") == "10"
    assert result.header("x-should-retry") == "true"
    assert result.header(h.QUEUE_WAIT_MS) == "2000"
    assert result.header(h.CONCURRENCY_REMAINING) == "0"
    assert sample(gov, "admission_rejected_total", model=MODEL, reason="queue_timeout") == 1
    app.open("h1")
    await held
    await settled(mw, limit=1)
    assert "w" not in app.order


async def test_wait_timeout_on_anthropic_path_is_529(make: Factory, clock: ManualClock) -> None:
    """On a messages path a model that stays full is Anthropic's 529 overloaded_error."""
    app = KeyedApp()
    mw, gov = make(app, limit=1, max_wait_s=1.0)
    held = asyncio.ensure_future(request(mw, "h", model=CLAUDE))
    await until(lambda: app.inside == 1)
    waiting = asyncio.ensure_future(request(mw, "w", model=CLAUDE))
    await queued(gov, 1, CLAUDE)
    clock.advance(1.0)
    result = await waiting
    assert result.status == 529
    body = result.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == "overloaded_error"
    assert body["request_id"].startswith("req_")
    # No hold time measured yet: the max wait stands in for it.
    assert result.header("retry-after") == "1"
    app.open("h")
    await held


async def test_queue_full_refused_at_once(make: Factory) -> None:
    """Past max_waiters a request is refused without waiting; Retry-After grows with
    the queue."""
    app = KeyedApp()
    mw, gov = make(app, limit=1, max_waiters=3, max_wait_s=4.0)
    held = asyncio.ensure_future(request(mw, "h"))
    await until(lambda: app.inside == 1)
    waiters = []
    for i in range(3):
        waiters.append(asyncio.ensure_future(request(mw, f"w{i}", key=f"ck_{i}")))
        await queued(gov, i + 1)
    result = await request(mw, "x", key="ck_x")
    assert result.status == 429
    assert result.json()["error"]["code"] == "queue_full"
    assert result.header("retry-after") == "16"  # (3 + 1) waiters x 4 s / 1 slot
    assert sample(gov, "admission_rejected_total", model=MODEL, reason="queue_full") == 1
    app.open("h", "w0", "w1", "w2")
    await asyncio.gather(held, *waiters)
    assert "x" not in app.order


async def test_account_waiter_cap(make: Factory) -> None:
    """An account at max_waiters_per_account gets a 429 rate_limit_error (both shapes);
    other accounts still queue."""
    app = KeyedApp()
    mw, gov = make(app, limit=1, max_waiters_per_account=1)
    held = asyncio.ensure_future(request(mw, "h", model=CLAUDE))
    await until(lambda: app.inside == 1)
    mine = asyncio.ensure_future(request(mw, "a0", model=CLAUDE))
    await queued(gov, 1, CLAUDE)
    result = await request(mw, "a1", model=CLAUDE)
    assert result.status == 429
    assert result.json()["error"]["type"] == "rate_limit_error"
    assert result.header("retry-after") is not None
    other = asyncio.ensure_future(request(mw, "b0", key="ck_b", model=CLAUDE))
    await queued(gov, 2, CLAUDE)
    assert sample(gov, "admission_rejected_total", model=CLAUDE, reason="account_queue_full") == 1
    app.open("h", "a0", "b0")
    await asyncio.gather(held, mine, other)


async def test_queued_token_bounds(make: Factory) -> None:
    """Tokens waiting are bounded per model (queue_tokens) and per account."""
    app = KeyedApp()
    # Each request reserves its 100 output tokens plus a few of input.
    mw, gov = make(app, limit=1, queue_tokens=250, max_queued_tokens_per_account=150)
    held = asyncio.ensure_future(request(mw, "h"))
    await until(lambda: app.inside == 1)
    a0 = asyncio.ensure_future(request(mw, "a0", key="ck_a"))
    await queued(gov, 1)
    refused = await request(mw, "a1", key="ck_a")
    assert refused.status == 429
    assert refused.json()["error"]["code"] == "too_many_queued_requests"
    b0 = asyncio.ensure_future(request(mw, "b0", key="ck_b"))
    await queued(gov, 2)
    full = await request(mw, "c0", key="ck_c")
    assert full.json()["error"]["code"] == "queue_tokens"
    app.open("h", "a0", "b0")
    await asyncio.gather(held, a0, b0)


async def test_disconnect_while_queued_leaves_at_once(make: Factory) -> None:
    """A waiter whose client goes leaves the queue at once and takes no slot."""
    app = KeyedApp()
    mw, gov = make(app, limit=1)
    held = asyncio.ensure_future(request(mw, "h"))
    await until(lambda: app.inside == 1)
    gone = asyncio.Event()
    waiting = asyncio.ensure_future(request(mw, "w", disconnect=gone))
    await queued(gov, 1)
    gone.set()
    result = await waiting
    assert result.status == 0  # nothing sent to a client that left
    assert sample(gov, "admission_queue_depth", model=MODEL) == 0
    assert sample(gov, "admission_abandoned_total", model=MODEL) == 1
    app.open("h", "next")
    await held
    after = await request(mw, "next")
    assert after.header(h.QUEUE_WAIT_MS) == "0"
    assert "w" not in app.order
    await settled(mw, limit=1)


async def test_queued_request_body_reaches_the_app(make: Factory) -> None:
    """Watching for a disconnect while queued never takes the body from the app."""
    app = KeyedApp()
    mw, gov = make(app, limit=1)
    held = asyncio.ensure_future(request(mw, "h"))
    await until(lambda: app.inside == 1)
    waiting = asyncio.ensure_future(request(mw, "w"))
    await queued(gov, 1)
    app.open("h", "w")
    await held
    assert (await waiting).status == 200
    assert b'"model": "gpt-5-5"' in app.bodies[1]


async def test_disconnect_before_first_byte(make: Factory) -> None:
    """A client that leaves before the response starts gives its slot back."""
    left = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        message = await receive()  # the app notices the disconnect and stops
        assert message["type"] == "http.disconnect"
        left.set()

    mw, gov = make(app, limit=1)
    gone = asyncio.Event()
    call = asyncio.ensure_future(request(mw, "a", disconnect=gone))
    await until(lambda: sample(gov, "admission_in_flight", model=MODEL) == 1)
    gone.set()
    await call
    assert left.is_set()
    assert sample(gov, "admission_in_flight", model=MODEL) == 0
    await settled(mw, limit=1)


async def test_disconnect_mid_stream(make: Factory) -> None:
    """A stream whose client leaves half-way gives its slot back when the app stops."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        await receive()  # http.disconnect
        raise OSError("client went away")

    mw, gov = make(app, limit=1)
    gone = asyncio.Event()
    call = asyncio.ensure_future(request(mw, "a", disconnect=gone, stream=True))
    await until(lambda: sample(gov, "admission_in_flight", model=MODEL) == 1)
    gone.set()
    with pytest.raises(OSError, match="went away"):
        await call
    await settled(mw, limit=1)


async def test_stream_holds_its_slot_until_the_end(make: Factory) -> None:
    """A streaming response keeps its slot until its last chunk is sent."""
    step = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        await step.wait()
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        step.clear()
        await step.wait()  # after the body: the slot is already back

    mw, gov = make(app, limit=1)
    call = asyncio.ensure_future(request(mw, "a", stream=True))
    await until(lambda: sample(gov, "admission_in_flight", model=MODEL) == 1)
    step.set()
    await until(lambda: sample(gov, "admission_in_flight", model=MODEL) == 0)
    await settled(mw, limit=1)
    step.set()
    result = await call
    assert result.chunks[-1] == b"data: [DONE]\n\n"


async def test_upstream_exception_gives_slot_back(make: Factory) -> None:
    """An app that raises releases its slot; the exception propagates."""
    mw, gov = make(failing_app, limit=1)
    with pytest.raises(RuntimeError):
        await request(mw, "a")
    assert sample(gov, "admission_in_flight", model=MODEL) == 0
    await settled(mw, limit=1)


async def test_cancelled_while_holding(make: Factory) -> None:
    """A request task cancelled inside the app gives its slot back."""
    app = KeyedApp()
    mw, _gov = make(app, limit=1)
    call = asyncio.ensure_future(request(mw, "a"))
    await until(lambda: app.inside == 1)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await settled(mw, limit=1)
    app.open("b")
    assert (await request(mw, "b")).header(h.QUEUE_WAIT_MS) == "0"


async def test_cancelled_while_queued(make: Factory) -> None:
    """A request task cancelled while waiting leaves the queue and takes nothing."""
    app = KeyedApp()
    mw, gov = make(app, limit=1)
    held = asyncio.ensure_future(request(mw, "h"))
    await until(lambda: app.inside == 1)
    waiting = asyncio.ensure_future(request(mw, "w"))
    await queued(gov, 1)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    app.open("h")
    await held
    await settled(mw, limit=1)
    assert app.order == ["h"]


async def test_per_key_concurrency_limit(make: Factory) -> None:
    """A key with its own concurrency on a model waits for its own slot first."""
    keys = {
        "limited": KeyEntry(
            account="acme", key="sk-limited", model_limits={MODEL: ModelLimits(concurrency=1)}
        )
    }
    app = KeyedApp()
    mw, gov = make(app, limit=5, keys=keys)
    first = asyncio.ensure_future(request(mw, "a", key="sk-limited"))
    await until(lambda: app.inside == 1)
    second = asyncio.ensure_future(request(mw, "b", key="sk-limited"))
    await queued(gov, 1)
    app.open("c")
    other = await request(mw, "c", key="ck_other")
    assert other.header(h.CONCURRENCY_REMAINING) == "3"
    app.open("a", "b")
    results = await asyncio.gather(first, second)
    assert [r.status for r in results] == [200, 200]
    assert app.peak == 2


async def test_count_tokens_takes_no_slot(make: Factory) -> None:
    """count_tokens is not a model call: no slot, no admission headers."""
    app = KeyedApp()
    app.open("")
    mw, _ = make(app, limit=1)
    from tests.helpers import auth, call

    result = await call(
        mw,
        path="/v1/messages/count_tokens",
        headers=auth("ck_a"),
        json_body={"model": CLAUDE, "messages": []},
    )
    assert result.status == 200
    assert result.header(h.CONCURRENCY_LIMIT) is None


async def test_wrap_puts_admission_innermost(make: Factory) -> None:
    """The full stack from wrap() adds the admission headers to a model call."""
    from governor.stack import wrap

    app = KeyedApp()
    app.open("a")
    _, gov = make(app, limit=4)
    stacked = wrap(app, gov)
    result = await request(stacked, "a")
    assert result.header(h.CONCURRENCY_LIMIT) == "4"
    assert result.header(h.CONCURRENCY_REMAINING) == "3"
    await gov.aclose()
