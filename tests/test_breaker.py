"""The breaker middleware on every backend: what opens it, what it refuses, how it recovers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from governor import headers as h
from governor.backends import Backend, MemoryBackend
from governor.breaker import breakers_for
from governor.clock import ManualClock
from governor.config import Config
from governor.context import get_context
from governor.runtime import Governor
from governor.stack import wrap
from governor.types import Message, Receive, Scope, Send
from tests.breaker_support import MESSAGES, Factory, Upstream, harnesses
from tests.helpers import auth, call

CIRCUIT = h.CIRCUIT.lower()


@pytest.fixture
async def make_harness(backend: Backend) -> AsyncIterator[Factory]:
    async for factory in harnesses(backend):
        yield factory


async def test_opens_after_threshold(make_harness: Factory) -> None:
    """Three upstream 500s in a row open the path; the fourth call never reaches upstream."""
    hn = make_harness()
    await hn.fail(3)
    assert hn.state() == "open"
    result = await hn.request("ok")
    assert result.status == 503
    assert result.header(CIRCUIT) == "open"
    assert hn.upstream.calls == 3


async def test_stays_closed_below_threshold(make_harness: Factory) -> None:
    """Failures count only while consecutive: a success in between resets the count."""
    hn = make_harness()
    await hn.fail(2)
    assert (await hn.request("ok")).status == 200
    await hn.fail(2)
    assert hn.state() == "closed"
    assert (await hn.request("ok")).header(CIRCUIT) == "closed"


@pytest.mark.parametrize("mode", [400, 404, 422, "disconnect", "refuse"])
async def test_neutral_outcomes_do_not_open(make_harness: Factory, mode: Any) -> None:
    """Request-caused 4xx, client disconnects and governor's own refusals never count."""
    hn = make_harness()
    gone = asyncio.Event()
    gone.set()
    for _ in range(5):
        await hn.request(mode, disconnect=gone)
    assert hn.state() == "closed"
    assert (await hn.request("ok")).status == 200


async def test_429_neutral_when_configured(make_harness: Factory) -> None:
    """With count_429 off, upstream 429s leave the breaker closed."""
    hn = make_harness(count_429=False)
    await hn.fail(5, mode=429)
    assert hn.state() == "closed"


async def test_cancellation_is_neutral(make_harness: Factory) -> None:
    """Requests cancelled mid-flight neither open the breaker nor count as successes."""
    hn = make_harness()
    hn.upstream.mode = "gate"
    for _ in range(4):
        task = asyncio.ensure_future(call(hn.app, headers=auth(), json_body={"model": "gpt-5-5"}))
        await hn.upstream.until_inside(1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert hn.state() == "closed"
    await hn.fail(2)
    await hn.request("ok")
    await hn.fail(2)
    assert hn.state() == "closed"


@pytest.mark.parametrize("mode", [502, 503, 504, 529, 429, "raise", "broken", "sse_error"])
async def test_failure_kinds_open(make_harness: Factory, mode: Any) -> None:
    """5xx, 529, 429, connection errors and broken streams each count as failures."""
    hn = make_harness()
    for _ in range(3):
        with contextlib.suppress(ConnectionRefusedError):
            await hn.request(mode)
    assert hn.state() == "open"


async def test_open_refuses_before_inner_layers(make_harness: Factory) -> None:
    """An open path is refused without the inner layers (queue, upstream) seeing it."""
    hn = make_harness()
    await hn.fail(3)
    calls = hn.upstream.calls
    for _ in range(5):
        result = await hn.request("ok")
        assert result.status == 503
        assert result.json()["error"]["type"] == "service_unavailable_error"
        assert result.header("retry-after") is not None
    assert hn.upstream.calls == calls
    assert hn.sample(
        "governor_breaker_refusals_total", model="gpt-5-5", upstream="openai", reason="open"
    ) == pytest.approx(5)


async def test_anthropic_paths_get_529(make_harness: Factory) -> None:
    """On Anthropic paths an open circuit answers 529 overloaded_error."""
    hn = make_harness()
    hn.upstream.mode = 529
    for _ in range(3):
        await call(hn.app, path="/v1/messages", headers=auth(), json_body=MESSAGES)
    result = await call(hn.app, path="/v1/messages", headers=auth(), json_body=MESSAGES)
    assert result.status == 529
    body = result.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == "overloaded_error"
    assert result.header(CIRCUIT) == "open"


async def test_paths_are_independent(make_harness: Factory) -> None:
    """One model's open circuit does not touch another model's."""
    hn = make_harness()
    await hn.fail(3)
    result = await hn.request("ok", payload={"model": "kimi-latest", "messages": []})
    assert result.status == 200
    assert result.header(CIRCUIT) == "closed"


async def test_retry_after_counts_down(make_harness: Factory) -> None:
    """Retry-After is the time left until half-open, rounded up."""
    hn = make_harness(reset_timeout_s=30.0, max_reset_timeout_s=60.0)
    await hn.fail(3)
    assert (await hn.request("ok")).header("retry-after") == "30"
    if isinstance(hn.clock, ManualClock):
        await hn.elapse(10.5)
        assert (await hn.request("ok")).header("retry-after") == "20"


async def test_half_open_admits_bounded_probes(make_harness: Factory) -> None:
    """Once the open period ends, only half_open_probes concurrent callers get through."""
    hn = make_harness(half_open_probes=2)
    await hn.fail(3)
    await hn.elapse(0.35)
    hn.upstream.mode = "gate"
    tasks = [
        asyncio.ensure_future(call(hn.app, headers=auth(), json_body={"model": "gpt-5-5"}))
        for _ in range(8)
    ]
    await hn.upstream.until_inside(2)
    for _ in range(20):  # the refused ones finish on their own
        await asyncio.sleep(0)
    refused = [t.result() for t in tasks if t.done()]
    assert len(refused) == 6
    assert all(r.status == 503 and r.header(CIRCUIT) == "half-open" for r in refused)
    hn.upstream.gate.set()
    admitted = [r for r in await asyncio.gather(*tasks) if r.status == 200]
    assert len(admitted) == 2
    assert all(r.header(CIRCUIT) == "half-open" for r in admitted)
    assert hn.state() == "closed"
    assert (await hn.request("ok")).header(CIRCUIT) == "closed"


async def test_failed_probe_reopens_for_longer(make_harness: Factory) -> None:
    """Each failed probe re-opens for twice as long as the last time, up to the cap."""
    hn = make_harness(reset_timeout_s=0.2, max_reset_timeout_s=0.6)
    await hn.fail(3)
    lb = hn.breakers.breaker(hn.governor.catalog["gpt-5-5"])
    assert lb.open_for == pytest.approx(0.2)
    for expected in (0.4, 0.6, 0.6):
        await hn.elapse(lb.open_for + 0.05)
        result = await hn.request(500)
        assert result.header(CIRCUIT) == "half-open"
        assert hn.state() == "open"
        assert lb.open_for == pytest.approx(expected)
        assert (await hn.request("ok")).status == 503
    await hn.elapse(lb.open_for + 0.05)
    assert (await hn.request("ok")).status == 200
    assert hn.state() == "closed"
    await hn.fail(3)
    assert lb.open_for == pytest.approx(0.2)


async def test_probe_that_disconnects_frees_its_place(make_harness: Factory) -> None:
    """A probe whose client leaves is neutral: the next caller may probe instead."""
    hn = make_harness()
    await hn.fail(3)
    await hn.elapse(0.35)
    gone = asyncio.Event()
    gone.set()
    await hn.request("disconnect", disconnect=gone)
    if hn.shared:
        await hn.breakers.drain()
    assert hn.state() == "half-open"
    assert (await hn.request("ok")).status == 200
    assert hn.state() == "closed"


async def test_header_on_inner_refusals(make_harness: Factory) -> None:
    """Responses refused by an inner governor layer carry the circuit header too."""
    hn = make_harness()
    result = await hn.request("refuse")
    assert result.status == 429
    assert result.header(CIRCUIT) == "closed"


async def test_force_open_and_close(make_harness: Factory) -> None:
    """The operator holds a breaker open or closed, then hands it back to the traffic."""
    hn = make_harness()
    info = await hn.breakers.force_open("gpt-5-5")
    assert info["state"] == "open"
    assert info["scope"] == ("fleet" if hn.shared else "local")
    assert (await hn.request("ok")).status == 503
    await hn.breakers.force_close("gpt-5-5")
    await hn.fail(5)
    assert hn.state() == "closed"
    await hn.breakers.clear_override("gpt-5-5")
    await hn.fail(3)
    assert hn.state() == "open"
    await hn.breakers.reset("gpt-5-5")
    assert (await hn.request("ok")).status == 200


async def test_metrics(make_harness: Factory) -> None:
    """State gauge, transitions and fast refusals are exported per model path."""
    hn = make_harness()
    labels = {"model": "gpt-5-5", "upstream": "openai"}
    await hn.request("ok")
    assert hn.sample("governor_breaker_state", **labels) == 0
    await hn.fail(3)
    await hn.request("ok")
    assert hn.sample("governor_breaker_state", **labels) == 2
    assert (
        hn.sample(
            "governor_breaker_transitions_total", **labels, from_state="closed", to_state="open"
        )
        == 1
    )
    assert hn.sample("governor_breaker_refusals_total", **labels, reason="open") == 1


async def test_wrap_puts_breaker_in_the_stack(backend: Backend) -> None:
    """wrap() includes the breaker, so failures through the stack open it."""
    governor = Governor(Config(demo_keys=True), backend=backend, clock=ManualClock())
    upstream = Upstream(governor)
    upstream.mode = 502
    app = wrap(upstream, governor)
    for _ in range(5):
        assert (await call(app, headers=auth(), json_body={"model": "gpt-5-5"})).status == 502
    result = await call(app, headers=auth(), json_body={"model": "gpt-5-5"})
    assert result.status == 503
    assert result.header(CIRCUIT) == "open"
    await breakers_for(governor).aclose()


async def test_lifespan_shutdown_stops_sync(make_harness: Factory) -> None:
    """The middleware passes lifespan through and stops its background sync at shutdown."""
    hn = make_harness()
    await hn.request("ok")
    sent: list[Message] = []
    inbox: list[Message] = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def receive() -> Message:
        return inbox.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    hn.app.app = app
    await hn.app({"type": "lifespan"}, receive, send)
    assert sent == [{"type": "lifespan.shutdown.complete"}]
    assert hn.breakers._syncer is None


class Queued:
    """Stands in for the admission layer: the request waits *wait_s* in its queue."""

    def __init__(self, app: Upstream, clock: ManualClock, wait_s: float) -> None:
        self.app, self.clock, self.wait_s = app, clock, wait_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = get_context(scope)
        assert ctx is not None
        self.clock.advance(self.wait_s)
        ctx.notes["queue_wait_ms"] = self.wait_s * 1000
        await self.app(scope, receive, send)


@pytest.mark.parametrize(
    ("queued_s", "upstream_s", "state"), [(0, 2.0, "open"), (1.5, 0.5, "closed")]
)
async def test_slow_first_byte(queued_s: float, upstream_s: float, state: str) -> None:
    """A first byte slower than slow_first_byte_s fails; the queue's wait is not the upstream's."""
    async for make in harnesses(MemoryBackend()):
        hn = make(slow_first_byte_s=1.0)
        clock = hn.clock
        assert isinstance(clock, ManualClock)
        hn.app.app = Queued(hn.upstream, clock, queued_s)
        hn.upstream.delay = upstream_s
        await hn.fail(3, mode="ok")
        assert hn.state() == state
