"""Fingerprint state: suspensions everywhere and across restarts, strikes, behaviour over
time, operators' API and routes, metrics, logs, and Redis failures."""

from __future__ import annotations

import json
import logging
import socket
import uuid
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from starlette.applications import Starlette

from governor import Governor, key_id
from governor.backends import Backend, RedisBackend
from governor.clock import ManualClock
from governor.config import Config, FingerprintConfig, RedisConfig
from governor.errors import BackendError, ConfigurationError
from governor.fingerprint import FingerprintMiddleware, Suspensions, admin_routes
from governor.fingerprint.memory import MemoryFingerprintStore
from governor.fingerprint.store import Suspension, Windows
from governor.types import ASGIApp
from tests import conftest
from tests.apps import EchoApp
from tests.conftest import drop_prefix, real_redis_or_skip
from tests.fingerprint_support import Make, first, new_key, replay, set_header, stack_factory
from tests.helpers import auth, call


@pytest.fixture
def make(backend: Backend, clock: ManualClock, registry: CollectorRegistry) -> Make:
    return stack_factory(backend, clock, registry)


def cli(device: str | None = None, session: str | None = None) -> dict[str, Any]:
    """A genuine `claude -p` 2.1.197 request, with another device or session id if given."""
    req = first("claude-code-2.1.197-print")
    meta = json.loads(req["body"]["metadata"]["user_id"])
    if device is not None:
        meta["device_id"] = device
    if session is not None:
        meta["session_id"] = session
        set_header(req, "X-Claude-Code-Session-Id", session)
    req["body"]["metadata"]["user_id"] = json.dumps(meta, separators=(",", ":"))
    return req


def device(n: int) -> str:
    return f"{n:064x}"


async def suspend_by_violation(app: ASGIApp, key: str) -> None:
    assert (await replay(app, first("curl"), key)).status == 403


# --- suspension -----------------------------------------------------------------------


async def test_suspended_key_refused_on_every_model(make: Make) -> None:
    """After a suspension every request of the key is refused: standard models too."""
    _, app, echo = make()
    key = new_key()
    await suspend_by_violation(app, key)
    chat = await call(
        app,
        path="/v1/managed/chat/completions",
        headers=auth(key),
        json_body={"model": "gpt-5-5", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert chat.status == 403
    assert chat.json()["error"]["code"] == "key_suspended"
    messages = await call(
        app,
        path="/v1/messages",
        headers=auth(key, "x-api-key"),
        json_body={"model": "claude-opus-4-8", "max_tokens": 5, "messages": []},
    )
    assert messages.status == 403
    assert messages.json()["error"]["type"] == "permission_error"
    assert "suspended" in messages.json()["error"]["message"]
    image = await call(
        app,
        path="/v1/managed/images/generations",
        headers=auth(key),
        json_body={"model": "gpt-image-2", "prompt": "a cat"},
    )
    assert image.status == 403
    models = await call(app, "GET", "/v1/managed/models", headers=auth(key))
    assert models.status == 403
    assert (await replay(app, cli(), key)).status == 403
    assert echo.calls == []


async def test_other_keys_unaffected(make: Make) -> None:
    """A suspension is per key: another key of the same client is served."""
    _, app, _ = make()
    await suspend_by_violation(app, new_key())
    assert (await replay(app, cli(), new_key())).status == 200


@pytest.mark.parametrize("kind", ["fakeredis", pytest.param("redis", marks=pytest.mark.redis)])
async def test_suspension_survives_restart(kind: str, redis_url: str) -> None:
    """A new Governor and backend on the same Redis and prefix still refuses the key."""
    import fakeredis

    prefix = conftest.test_prefix()
    server = fakeredis.FakeServer()

    async def client() -> Redis:
        if kind == "fakeredis":
            return fakeredis.FakeAsyncRedis(server=server)
        return await real_redis_or_skip()

    config = Config(demo_keys=True, redis=RedisConfig(url=redis_url, key_prefix=prefix))
    key = new_key()
    first_client = await client()
    try:
        async with Governor(config, backend=RedisBackend(config.redis, client=first_client)) as a:
            await suspend_by_violation(FingerprintMiddleware(EchoApp(), governor=a), key)
        await first_client.aclose()
        second_client = await client()
        backend = RedisBackend(config.redis, client=second_client)
        async with Governor(config, backend=backend, registry=CollectorRegistry()) as b:
            app = FingerprintMiddleware(EchoApp(), governor=b)
            result = await call(
                app,
                headers=auth(key),
                json_body={"model": "gpt-5-5", "messages": []},
            )
            assert result.status == 403
            assert result.json()["error"]["code"] == "key_suspended"
            assert [s.key_id for s in await Suspensions(b).list()] == [key_id(key)]
    finally:
        cleanup = await client()
        await drop_prefix(cleanup, prefix)
        await cleanup.aclose()
        if kind == "redis":
            await first_client.aclose()


async def test_suspension_fleet_wide(redis_backend: RedisBackend) -> None:
    """Two workers on one Redis: a suspension made by one is enforced by the other."""
    config = Config(demo_keys=True)
    one = Governor(config, backend=redis_backend, registry=CollectorRegistry())
    twin = RedisBackend(redis_backend.config, client=redis_backend.redis)
    two = Governor(config, backend=twin, registry=CollectorRegistry())
    key = new_key()
    await suspend_by_violation(FingerprintMiddleware(EchoApp(), governor=one), key)
    echo = EchoApp()
    result = await replay(FingerprintMiddleware(echo, governor=two), cli(), key)
    assert result.status == 403
    assert echo.calls == []


async def test_lift_restores_the_key(make: Make) -> None:
    """Operators list and lift suspensions; the key is then served again."""
    gov, app, _ = make()
    key = new_key()
    await suspend_by_violation(app, key)
    api = Suspensions(gov)
    listed = await api.list()
    assert [s.key_id for s in listed] == [key_id(key)]
    assert "beta_query" in listed[0].reasons
    assert await api.lift(key_id(key))
    assert not await api.lift(key_id(key))
    assert (await replay(app, cli(), key)).status == 200
    assert await api.list() == []


async def test_lift_clears_strikes(make: Make) -> None:
    """A lifted key starts again from zero strikes."""
    gov, app, _ = make(strikes_to_suspend=2)
    key = new_key()
    await suspend_by_violation(app, key)
    await Suspensions(gov).suspend(key_id(key))
    await Suspensions(gov).lift(key_id(key))
    await suspend_by_violation(app, key)
    assert await Suspensions(gov).get(key_id(key)) is None


async def test_operator_suspension(make: Make) -> None:
    """An operator can suspend a key by its id; the key is refused at once."""
    gov, app, _ = make()
    key = new_key()
    record = await Suspensions(gov).suspend(key_id(key), reason="abuse report")
    assert record.reasons == ("abuse report",)
    assert (await replay(app, cli(), key)).status == 403


# --- strikes and behaviour ------------------------------------------------------------


async def test_strikes_expire(clock: ManualClock, registry: CollectorRegistry) -> None:
    """Strikes older than strike_ttl_s no longer count towards a suspension."""
    config = Config(
        demo_keys=True, fingerprint=FingerprintConfig(strikes_to_suspend=2, strike_ttl_s=60)
    )
    gov = Governor(config, clock=clock, registry=registry)
    app = FingerprintMiddleware(EchoApp(), governor=gov)
    key = new_key()
    await suspend_by_violation(app, key)
    clock.advance(61)
    await suspend_by_violation(app, key)
    assert await Suspensions(gov).get(key_id(key)) is None
    await suspend_by_violation(app, key)
    assert await Suspensions(gov).get(key_id(key)) is not None


async def test_too_many_devices_blocked(make: Make) -> None:
    """More device ids on one key than allowed: refused, not suspended (default)."""
    gov, app, _ = make(max_devices_per_key=2)
    key = new_key()
    for n in range(2):
        assert (await replay(app, cli(device=device(n)), key)).status == 200
    result = await replay(app, cli(device=device(9)), key)
    assert result.status == 403
    assert "suspended" not in result.body.decode()
    assert await Suspensions(gov).get(key_id(key)) is None
    assert (await replay(app, cli(device=device(0)), key)).status == 403  # still over


async def test_too_many_devices_can_suspend(make: Make) -> None:
    """behaviour_action = "suspend": an account pool's key is suspended."""
    gov, app, _ = make(max_devices_per_key=2, behaviour_action="suspend")
    key = new_key()
    for n in range(3):
        await replay(app, cli(device=device(n)), key)
    assert await Suspensions(gov).get(key_id(key)) is not None


async def test_too_many_sessions_blocked(make: Make) -> None:
    """More concurrent sessions on one key than allowed are refused."""
    _, app, _ = make(max_sessions_per_key=3)
    key = new_key()
    statuses = [(await replay(app, cli(session=str(uuid.uuid4())), key)).status for _ in range(4)]
    assert statuses == [200, 200, 200, 403]


async def test_too_many_addresses_blocked(make: Make) -> None:
    """One key used from more client addresses than allowed is refused."""
    _, app, _ = make(max_addresses_per_key=2)
    key = new_key()
    statuses = []
    for n in range(3):
        req = cli(session=str(uuid.uuid4()))
        statuses.append((await replay(app, req, key, client=(f"10.0.0.{n}", 4000))).status)
    assert statuses == [200, 200, 403]


async def test_behaviour_windows_expire(clock: ManualClock, registry: CollectorRegistry) -> None:
    """Devices seen longer ago than the window no longer count."""
    config = Config(
        demo_keys=True, fingerprint=FingerprintConfig(max_devices_per_key=1, device_window_s=60)
    )
    gov = Governor(config, clock=clock, registry=registry)
    app = FingerprintMiddleware(EchoApp(), governor=gov)
    key = new_key()
    assert (await replay(app, cli(device=device(1)), key)).status == 200
    assert (await replay(app, cli(device=device(2)), key)).status == 403
    clock.advance(61)
    assert (await replay(app, cli(device=device(2)), key)).status == 200


async def test_replay_from_another_key_suspends(make: Make) -> None:
    """The same CLI body sent again under another key is a replay: suspended."""
    gov, app, _ = make()
    req = cli()
    assert (await replay(app, req, new_key())).status == 200
    other = new_key()
    assert (await replay(app, req, other)).status == 403
    assert await Suspensions(gov).get(key_id(other)) is not None


async def test_replay_from_another_address_suspends(make: Make) -> None:
    """The same body from another address of the same key: replayed, suspended."""
    gov, app, _ = make()
    key = new_key()
    req = cli()
    assert (await replay(app, req, key, client=("10.0.0.1", 1))).status == 200
    assert (await replay(app, req, key, client=("10.0.0.1", 2))).status == 200  # same host
    assert (await replay(app, req, key, client=("10.9.9.9", 1))).status == 403
    assert await Suspensions(gov).get(key_id(key)) is not None


async def test_retry_from_another_address_allowed(make: Make) -> None:
    """A CLI retry (x-stainless-retry-count > 0) after a network change is no replay."""
    _, app, _ = make()
    key = new_key()
    req = cli()
    assert (await replay(app, req, key, client=("10.0.0.1", 1))).status == 200
    set_header(req, "X-Stainless-Retry-Count", "1")
    assert (await replay(app, req, key, client=("10.0.0.2", 1))).status == 200


async def test_memory_state_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """The memory store keeps at most MAX_KEYS keys and MAX_BODIES bodies."""
    from governor.fingerprint import memory

    monkeypatch.setattr(memory, "MAX_KEYS", 3)
    monkeypatch.setattr(memory, "MAX_BODIES", 3)
    store = MemoryFingerprintStore(ManualClock())
    windows = Windows(60, 60, 60, cap=2)
    for n in range(10):
        await store.observe(f"k{n}", "d", "s", "a", windows)
        await store.first_sender(f"h{n}", "k a", 60)
        await store.strike(Suspension(f"k{n}"), threshold=5, ttl_s=60)
    seen = await store.observe("k9", "d2", "s2", "a2", windows)
    seen = await store.observe("k9", "d3", "s3", "a3", windows)
    assert seen.devices == 2  # capped members
    assert len(store._seen) == 3
    assert len(store._bodies) == 3
    assert len(store._strikes) == 3


# --- operators' routes ----------------------------------------------------------------


async def test_admin_routes(make: Make) -> None:
    """List, read, impose and lift suspensions over HTTP behind the admin token."""
    gov, app, _ = make()
    key = new_key()
    await suspend_by_violation(app, key)
    kid = key_id(key)
    admin = Starlette(routes=admin_routes(gov, token="s3cret"))
    token = {"authorization": "Bearer s3cret"}
    base = "/admin/fingerprint/suspensions"
    assert (await call(admin, "GET", base)).status == 401
    assert (await call(admin, "GET", base, headers={"authorization": "Bearer nope"})).status == 401
    listed = await call(admin, "GET", base, headers=token)
    assert [s["key_id"] for s in listed.json()["suspensions"]] == [kid]
    one = await call(admin, "GET", f"{base}/{kid}", headers=token)
    assert one.json()["reasons"][0] == "beta_query"
    assert (await call(admin, "GET", f"{base}/not-a-key", headers=token)).status == 400
    assert (await call(admin, "DELETE", f"{base}/{kid}", headers=token)).status == 200
    assert (await call(admin, "DELETE", f"{base}/{kid}", headers=token)).status == 404
    assert (await call(admin, "GET", f"{base}/{kid}", headers=token)).status == 404
    assert (await replay(app, cli(), key)).status == 200
    put = await call(admin, "PUT", f"{base}/{kid}", headers=token, json_body={"reason": "pool"})
    assert put.status == 201
    assert (await replay(app, cli(), key)).status == 403


def test_admin_routes_need_a_token() -> None:
    """Admin routes are never built open: no token is a configuration error."""
    with pytest.raises(ConfigurationError):
        admin_routes(Governor())
    config = Config(fingerprint=FingerprintConfig(admin_token="from-config"))
    assert len(admin_routes(Governor(config))) == 2


# --- metrics and logs -----------------------------------------------------------------


async def test_decisions_counted_by_verdict_and_reason(
    make: Make, registry: CollectorRegistry
) -> None:
    """Decisions are counted by verdict and reason; signals by severity."""
    _, app, _ = make()
    key = new_key()
    await replay(app, cli(), new_key())
    await suspend_by_violation(app, key)
    await replay(app, cli(), key)

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(f"governor_fingerprint_{name}_total", labels)

    assert sample("decisions", verdict="allow", reason="ok") == 1
    assert sample("decisions", verdict="block_and_suspend", reason="beta_query") == 1
    assert sample("decisions", verdict="suspended", reason="key_suspended") == 1
    assert sample("signals", severity="violation", signal="user_agent") == 1


async def test_decisions_logged_without_the_key(
    make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    """Every decision is logged with its reasons and key id, never the raw key."""
    _, app, _ = make()
    key = new_key()
    caplog.set_level(logging.DEBUG, logger="governor.fingerprint")
    await replay(app, cli(), key)
    await suspend_by_violation(app, key)
    await replay(app, cli(), key)
    records = [r for r in caplog.records if hasattr(r, "fingerprint")]
    verdicts = [r.fingerprint["verdict"] for r in records]
    assert verdicts == ["allow", "block_and_suspend", "suspended"]
    assert all(r.fingerprint["key_id"] == key_id(key) for r in records)
    assert "beta_query" in records[1].fingerprint["reasons"]
    for r in caplog.records:
        assert key not in r.getMessage()
        assert key not in repr(r.__dict__)


# --- Redis failures -------------------------------------------------------------------


def dead_redis(fail_mode: str) -> Governor:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    redis = RedisConfig(
        url=f"redis://127.0.0.1:{port}/0", connect_timeout_s=0.2, socket_timeout_s=0.2, retries=0
    )
    config = Config(
        demo_keys=True,
        backend="redis",
        redis=redis,
        fingerprint=FingerprintConfig(fail_mode=fail_mode),  # type: ignore[arg-type]
    )
    return Governor(config, registry=CollectorRegistry())


async def test_redis_down_fail_open() -> None:
    """Fail open: the stateless layers still decide; suspensions are kept locally."""
    async with dead_redis("open") as gov:
        app = FingerprintMiddleware(EchoApp(), governor=gov)
        assert (await replay(app, cli(), new_key())).status == 200
        key = new_key()
        await suspend_by_violation(app, key)
        assert (await replay(app, cli(), key)).status == 403


async def test_redis_down_fail_closed() -> None:
    """Fail closed: what cannot be checked is refused as overloaded (529 on messages)."""
    async with dead_redis("closed") as gov:
        app = FingerprintMiddleware(EchoApp(), governor=gov)
        result = await replay(app, cli(), new_key())
        assert result.status == 529
        chat = await call(
            app, headers=auth(new_key()), json_body={"model": "gpt-5-5", "messages": []}
        )
        assert chat.status == 503


class Flaky:
    """A store that fails while ``down`` is set."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.down = False

    def __getattr__(self, name: str) -> Any:
        target = getattr(self.inner, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise BackendError("down")
            return await target(*args, **kwargs)

        return call


async def test_offline_suspension_persisted_after_recovery(
    redis_backend: RedisBackend,
) -> None:
    """A suspension made while Redis was down is written to Redis once it answers."""
    gov = Governor(Config(demo_keys=True), backend=redis_backend, registry=CollectorRegistry())
    middleware = FingerprintMiddleware(EchoApp(), governor=gov)
    flaky = Flaky(middleware.store)
    middleware.store = flaky
    key = new_key()
    flaky.down = True
    await suspend_by_violation(middleware, key)
    flaky.down = False
    assert (await replay(middleware, cli(), key)).status == 403
    assert await Suspensions(gov).get(key_id(key)) is not None
