"""Usage records: one per governed request, refusals included; sinks; the usage route."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette

from governor.backends import Backend, MemoryBackend, RedisBackend
from governor.clock import ManualClock
from governor.config import Config, UsageConfig
from governor.keys import key_id
from governor.runtime import Governor
from governor.usage_log import (
    JsonlSink,
    MemorySink,
    RedisStreamSink,
    UsageRecord,
    client_family,
    set_sink,
    sink_from_config,
    usage_routes,
)
from tests.billing_apps import (
    KEY,
    chat_body,
    chat_completion,
    json_app,
    make_governor,
    sse_chat_app,
    stack,
)
from tests.helpers import call


def record(key: str = "key_a", n: int = 0) -> UsageRecord:
    return UsageRecord(
        request_id=f"req_{n}",
        time=1.0,
        key_id=key,
        account="acme",
        model="gpt-5-5",
        surface="chat.completions",
        stream=False,
        status=200,
        outcome="success",
        refusal=None,
        input_tokens=1,
        output_tokens=2,
        cache_read_tokens=0,
        cache_write_tokens=0,
        credits_reserved=3,
        credits_charged=1,
        credits_compensated=0,
        insurance_status="not_triggered",
        latency_ms=5,
        queue_wait_ms=None,
        ttfb_ms=4,
        client_family="curl",
    )


async def test_record_of_a_charged_request(backend: Backend, clock: ManualClock) -> None:
    """A served request's record has its tokens, credits, latency and client family."""
    gov = make_governor(backend, clock)
    sink = MemorySink()
    app = stack(json_app(clock, chat_completion(), work_s=2), gov, sink)
    headers = {"authorization": f"Bearer {KEY}", "user-agent": "OpenAI/Python 3.57.0"}
    result = await call(
        app, path="/v1/managed/chat/completions", headers=headers, json_body=chat_body()
    )
    (rec,) = sink.records
    assert rec.request_id == result.header("x-hypereal-request-id")
    assert rec.key_id == key_id(KEY)
    assert KEY not in json.dumps(rec.as_json())
    assert (rec.account, rec.model, rec.surface, rec.status) == (
        "acme",
        "claude-sonnet-4-7",
        "chat.completions",
        200,
    )
    assert (rec.input_tokens, rec.output_tokens) == (1000, 500)
    assert (rec.credits_reserved, rec.credits_charged, rec.credits_compensated) == (16, 12, 0)
    assert rec.outcome == "success"
    assert rec.latency_ms == 2000
    assert rec.client_family == "openai-sdk"


async def test_refusal_is_recorded(clock: ManualClock) -> None:
    """A request refused by billing still gets a record, with its reason."""
    gov = make_governor(MemoryBackend(), clock, balance=0)
    sink = MemorySink()
    app = stack(json_app(clock, chat_completion()), gov, sink)
    await call(app, headers={"authorization": f"Bearer {KEY}"}, json_body=chat_body())
    (rec,) = sink.records
    assert (rec.status, rec.outcome, rec.refusal, rec.credits_charged) == (
        429,
        "refused",
        "balance",
        0,
    )


async def test_stream_record_has_time_to_first_byte(clock: ManualClock) -> None:
    """Streams record time to first byte apart from total latency, and queue wait."""
    gov = make_governor(MemoryBackend(), clock)
    sink = MemorySink()
    inner = sse_chat_app(clock, work_s=3)

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        scope["governor.context"].notes["queue_wait_ms"] = 250.0
        clock.advance(0.5)
        await inner(scope, receive, send)

    await call(
        stack(app, gov, sink),
        headers={
            "authorization": f"Bearer {KEY}",
            "user-agent": "claude-cli/2.1.197 (external, cli)",
        },
        json_body=chat_body(stream=True),
    )
    (rec,) = sink.records
    assert rec.stream
    assert rec.ttfb_ms == 500
    assert rec.latency_ms == 3500
    assert rec.queue_wait_ms == 250
    assert rec.client_family == "claude-cli"


@pytest.mark.parametrize(
    ("ua", "family"),
    [
        ("claude-cli/2.1.197 (external, sdk-cli)", "claude-cli"),
        ("OpenAI/Python 3.57.0", "openai-sdk"),
        ("AsyncAnthropic/Python 2.14.0", "anthropic-sdk"),
        ("Anthropic/JS 1.14.0", "anthropic-sdk"),
        ("curl/7.88.1", "curl"),
        ("Bun/1.4.0", "other"),
        ("", "other"),
    ],
)
def test_client_family(ua: str, family: str) -> None:
    """The user agent names the client family."""
    assert client_family([(b"user-agent", ua.encode())]) == family


async def test_memory_ring_is_bounded_and_per_key() -> None:
    """The ring keeps the last N records; recent() returns one key's, newest first."""
    sink = MemorySink(size=3)
    for n in range(5):
        await sink.write(record("key_a" if n % 2 else "key_b", n))
    assert [r.request_id for r in await sink.recent("key_a", 10)] == ["req_3"]
    assert [r.request_id for r in await sink.recent("key_b", 1)] == ["req_4"]


async def test_jsonl_sink(tmp_path: Path) -> None:
    """The JSON lines sink appends one object per line off the event loop."""
    path = tmp_path / "usage.jsonl"
    sink = JsonlSink(path)
    for n in range(3):
        await sink.write(record(n=n))
    await sink.aclose()
    lines = path.read_text().splitlines()
    assert [json.loads(line)["request_id"] for line in lines] == ["req_0", "req_1", "req_2"]
    assert [r.request_id for r in await sink.recent("key_a", 2)] == ["req_2", "req_1"]


async def test_redis_stream_sink_is_bounded(redis_backend: RedisBackend) -> None:
    """Records go to capped streams; recent() reads the key's own, newest first."""
    sink = RedisStreamSink(redis_backend, maxlen=10, key_maxlen=10)
    for n in range(30):
        await sink.write(record("key_a" if n % 3 else "key_b", n))
    recent = await sink.recent("key_b", 2)
    assert [r.request_id for r in recent] == ["req_27", "req_24"]
    assert recent[0] == record("key_b", 27)
    # MAXLEN ~ trims whole nodes: bounded, if not exactly 10.
    assert await redis_backend.redis.xlen(redis_backend.key("usage")) < 30


def test_sink_from_config(tmp_path: Path) -> None:
    """The [usage] section picks the sink."""
    gov = Governor(Config(usage=UsageConfig(sink="jsonl", path=str(tmp_path / "u.jsonl"))))
    assert isinstance(sink_from_config(gov), JsonlSink)
    assert isinstance(sink_from_config(Governor(Config())), MemorySink)


async def test_usage_route_serves_own_records(clock: ManualClock) -> None:
    """GET /v1/managed/usage answers the calling key's records and balance only."""
    gov = make_governor(MemoryBackend(), clock)
    sink = MemorySink()
    set_sink(gov, sink)
    await sink.write(record("key_someone_else"))
    await call(
        stack(json_app(clock, chat_completion()), gov, sink),
        headers={"authorization": f"Bearer {KEY}"},
        json_body=chat_body(),
    )
    app = Starlette(routes=usage_routes(gov))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gw"
    ) as http:
        ok = await http.get("/v1/managed/usage", headers={"x-api-key": KEY})
        anonymous = await http.get("/v1/managed/usage")
        bad_limit = await http.get("/v1/managed/usage?limit=0", headers={"x-api-key": KEY})
    assert ok.status_code == 200
    data = ok.json()
    assert data["balance"] == 988
    assert data["spent"] == {"lifetime": 12, "hour": 12, "day": 12}
    assert [r["key_id"] for r in data["data"]] == [key_id(KEY)]
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["code"] == "missing_api_key"
    assert bad_limit.status_code == 400
