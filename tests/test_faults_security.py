"""Security against the full stack: raw keys never leak (logs, metrics, usage records,
Redis, response bodies, the upstream), suspensions survive restarts, and the
fingerprint bypass attempts fail through the whole gateway too."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import generate_latest
from redis.asyncio import Redis

from governor.config import AccountEntry, KeyEntry, ModelEntry
from governor.keys import key_id
from tests.conftest import REDIS_URL, real_redis_or_skip
from tests.fault_support import (
    CHAT,
    KEY,
    MESSAGES,
    Stack,
    asgi_call,
    chat,
    drop_prefix,
    full_stack,
    make_config,
    message,
    new_prefix,
)
from tests.faults_report import _Recorder
from tests.fingerprint_support import (
    FOREIGN,
    GENUINE,
    body_bytes,
    error_code,
    first,
    new_key,
    scope_for,
)
from tests.helpers import Result
from tests.test_fingerprint import SPOOFS, _spoof

pytestmark = pytest.mark.redis

# More raw keys of the config: one to get suspended, one with no credit, one unknown.
CHEATER = "ck_rel_cheater_" + "Zq9" * 10
BROKE = "ck_rel_broke_" + "Wx7" * 10
UNKNOWN = "ck_rel_unknown_" + "Vb5" * 10
SECRETS = (KEY, CHEATER, BROKE, UNKNOWN)


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    client = await real_redis_or_skip()
    yield client
    await client.aclose()


@pytest.fixture
async def prefix(redis: Redis) -> AsyncIterator[str]:
    name = new_prefix()
    yield name
    await drop_prefix(redis, name)


def _config(prefix: str) -> Any:
    config = make_config(redis_url=REDIS_URL, prefix=prefix, usage_sink="redis", rpm=3)
    keys = {
        **config.keys,
        "cheater": KeyEntry(key=CHEATER, account="acme"),
        "broke": KeyEntry(key=BROKE, account="poor"),
    }
    accounts = {**config.accounts, "poor": AccountEntry(balance=0)}
    return type(config)(
        **{
            **{f: getattr(config, f) for f in config.__dataclass_fields__},
            "keys": keys,
            "accounts": accounts,
            "models": {"gpt-5-5": ModelEntry(rpm=3)},
        }
    )


async def _every_surface(stack: Stack) -> list[Result]:
    """Every surface, streams, and every kind of refusal, with raw keys in headers."""
    out = []
    out.append(await stack.call(CHAT, chat()))
    out.append(await stack.call(CHAT, chat(stream=True)))
    out.append(await stack.call("/v1/managed/responses", {"model": "gpt-5-5", "input": "Hi"}))
    out.append(
        await stack.call("/v1/managed/images/generations", {"model": "gpt-image-2", "prompt": "a"})
    )
    out.append(await stack.call(MESSAGES, message()))
    out.append(await stack.call(MESSAGES, message(stream=True)))
    out.append(await stack.call("/v1/messages/count_tokens", message()))
    out.append(await stack.call("/v1/managed/models", method="GET"))
    out.append(await stack.call(CHAT, chat()))  # 4th gpt-5-5 call: over the model RPM of 3
    out.append(await stack.call(CHAT, raw=b"{not json"))  # bad input
    out.append(await stack.call(CHAT, chat(), key=UNKNOWN))  # unknown key
    out.append(await stack.call(CHAT, chat(), key=f"{KEY}x"))  # near miss
    out.append(await stack.call(MESSAGES, message(), key=BROKE))  # no credit
    out.append(await stack.call(MESSAGES, message(), headers={"x-mock-status": "500"}))
    out.append(await stack.call(MESSAGES, message(model="claude-opus-4-7-max"), key=CHEATER))
    out.append(await stack.call(MESSAGES, message(), key=CHEATER))  # suspended now
    return out


async def _redis_dump(redis: Redis, prefix: str) -> list[bytes]:
    """Every key and value written under *prefix* (as bytes)."""
    out: list[Any] = []
    async for key in redis.scan_iter(match=f"{prefix}:*", count=500):
        out.append(key)
        kind_raw: Any = await redis.type(key)
        kind = kind_raw.decode() if isinstance(kind_raw, bytes) else str(kind_raw)
        if kind == "string":
            out.append(await redis.get(key))
        elif kind == "hash":
            for k, v in (await redis.hgetall(key)).items():
                out += [k, v]
        elif kind == "zset":
            members: Any = await redis.zrange(key, 0, -1)
            out += list(members)
        elif kind == "set":
            out += list(await redis.smembers(key))
        elif kind == "list":
            out += list(await redis.lrange(key, 0, -1))
        elif kind == "stream":
            entries: Any = await redis.xrange(key)
            for _id, fields in entries:
                for k, v in fields.items():
                    out += [k, v]
    return [x if isinstance(x, bytes) else str(x).encode() for x in out if x is not None]


async def test_raw_keys_never_leak(
    redis: Redis, prefix: str, caplog: pytest.LogCaptureFixture, faults: _Recorder
) -> None:
    """Raw keys appear in no log, metric, usage record, Redis key or value, or response."""
    caplog.set_level(logging.DEBUG)
    async with full_stack(_config(prefix)) as stack:
        results = await _every_surface(stack)
        statuses = [r.status for r in results]
        assert statuses[-2] == 403  # the -max model from a non-CLI client: suspended
        assert statuses[-1] == 403  # and refused everywhere after
        assert 429 in statuses
        assert 401 in statuses
        assert 500 in statuses  # the upstream's error, passed on
        metrics = generate_latest(stack.registry)
        records = [r.as_json() for r in await stack.records()]
        upstream = [repr(r.headers).encode() + r.body for r in stack.mock.requests]
        stored = await _redis_dump(redis, prefix)
    logs = caplog.text.encode() + b"".join(
        repr((r.args, r.__dict__.get("fingerprint"))).encode() for r in caplog.records
    )
    responses = b"".join(r.body + repr(r.headers).encode() for r in results)
    places = {
        "logs": logs,
        "metrics": metrics,
        "usage records": repr(records).encode(),
        "redis": b"\n".join(stored),
        "responses": responses,
        "upstream requests": b"".join(upstream),
    }
    assert records, "no usage records written"
    assert stored, "nothing written to Redis"
    assert key_id(KEY).encode() in places["redis"]  # the key id is what identifies keys
    for where, blob in places.items():
        for secret in SECRETS:
            assert secret.encode() not in blob, f"raw key in {where}"
            assert secret[8:].encode() not in blob, f"part of a raw key in {where}"
    faults.record(
        "raw API keys scanned for everywhere",
        "every layer / real Redis, usage sink redis",
        "no raw key in logs (DEBUG), /metrics, usage records, Redis, responses, upstream",
        f"{len(results)} requests on every surface incl. 401/403/429/500 and a suspension; "
        f"{len(caplog.records)} log records, {len(stored)} Redis keys/values, "
        f"{len(records)} usage records scanned: no raw key, only key ids",
    )


async def test_suspension_survives_restart(prefix: str, faults: _Recorder) -> None:
    """A key suspended by one Governor is refused by a new one on the same Redis prefix."""
    config = _config(prefix)
    async with full_stack(config) as stack:
        first_try = await stack.call(MESSAGES, message(model="claude-opus-4-7-max"), key=CHEATER)
        assert first_try.status == 403
    async with full_stack(config) as restarted:
        again = await restarted.call(CHAT, chat(), key=CHEATER)
        assert again.status == 403
        assert again.json()["error"]["code"] == "key_suspended"
        other = await restarted.call(CHAT, chat())
        assert other.status == 200
    faults.record(
        "governor restarted after a suspension",
        "fingerprint / real Redis",
        "the suspension survives (new Governor, same prefix)",
        "suspended key refused 403 key_suspended on every model by the new Governor; "
        "other keys served",
    )


async def replay(stack: Stack, req: dict[str, Any], key: str) -> Result:
    """A captured request through the full stack, from a client that stays."""
    body = body_bytes(req)
    return await asgi_call(stack.app, "POST", "", [], body, scope=scope_for(req, key, body))


@pytest.fixture
async def fp_stack(prefix: str) -> AsyncIterator[Stack]:
    config = make_config(redis_url=REDIS_URL, prefix=prefix, demo_keys=True)
    async with full_stack(config) as stack:
        yield stack


async def test_fingerprint_bypass_attempts_full_stack(fp_stack: Stack, faults: _Recorder) -> None:
    """Every captured foreign client and every spoof is refused through the whole gateway;
    the genuine CLI captures are served by the upstream."""
    stack = fp_stack
    refused = 0
    for name in FOREIGN:
        result = await replay(stack, first(name), new_key())
        assert result.status in (403, 404), (name, result.status)
        refused += 1
    for spoof, (edit, _reason) in sorted(SPOOFS.items()):
        key = new_key()
        result = await replay(stack, _spoof(edit), key)
        assert result.status == 403, spoof
        assert error_code(result) == "key_suspended", spoof
        refused += 1
    served = 0
    for name in GENUINE:
        result = await replay(stack, first(name), new_key())
        assert result.status == 200, (name, result.body[:200])
        served += 1
    # Only the genuine requests reached the upstream.
    assert len(stack.mock.requests) == served
    faults.record(
        "fingerprint bypass attempts (captured foreign clients, spoofs)",
        "fingerprint / full stack, real Redis",
        "every attempt refused before the upstream; genuine CLI served",
        f"{refused} attempts refused (spoofs suspended the key); {served} genuine CLI "
        "requests served; only those reached the upstream",
    )
