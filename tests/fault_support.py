"""The full stack under faults: the demo gateway (governor.wrap over the forwarder) in
front of the mock upstream, driven by direct ASGI calls, with Redis behind a fault proxy
or a throwaway redis-server, and the ledger, usage records and metrics read back.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from examples.demo_proxy import build_app
from examples.forwarder import UpstreamSettings
from examples.mock_upstream import MockUpstream
from examples.serving import serve
from governor import AdmissionMiddleware, Config, Governor
from governor.backends import RedisBackend
from governor.billing.middleware import ledger_for, retries_for
from governor.billing.redis import _tag
from governor.config import AccountEntry, KeyEntry, ModelEntry, RedisConfig
from governor.types import ASGIApp, Message
from governor.usage_log.records import UsageRecord
from governor.usage_log.sinks import MemorySink, RedisStreamSink, sink_for
from tests.helpers import Result, make_scope

_L = TypeVar("_L")
KEY = "ck_rel_" + "s3cr3t" * 6  # the raw key the security scan looks for
ACCOUNT = "acme"
OPENING = 1_000_000
CHAT = "/v1/managed/chat/completions"
MESSAGES = "/v1/messages"
HELLO = [{"role": "user", "content": "Hello"}]


def chat(stream: bool = False, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "gpt-5-5", "messages": HELLO, "max_tokens": 64}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return {**body, **extra}


def message(stream: bool = False, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "claude-sonnet-4-7", "messages": HELLO, "max_tokens": 64}
    if stream:
        body["stream"] = True
    return {**body, **extra}


def make_config(
    *,
    redis_url: str | None = None,
    prefix: str = "gov",
    fail: Mapping[str, str] | None = None,
    rpm: int | None = None,
    usage_sink: str = "memory",
    reservation_ttl_s: float = 3_600.0,
    timeout_s: float = 0.5,
    **sections: Any,
) -> Config:
    """A config with one key of account ``acme``; Redis (with *timeout_s* for connects
    and replies) if *redis_url*."""
    fail = dict(fail or {})
    kwargs: dict[str, Any] = {
        "keys": {"tester": KeyEntry(key=KEY, account=ACCOUNT)},
        "accounts": {ACCOUNT: AccountEntry(balance=OPENING)},
        "models": {"gpt-5-5": ModelEntry(rpm=rpm)} if rpm else {},
    }
    if redis_url is not None:
        kwargs["backend"] = "redis"
        kwargs["redis"] = RedisConfig(
            url=redis_url,
            key_prefix=prefix,
            socket_timeout_s=timeout_s,
            connect_timeout_s=timeout_s,
            pool_timeout_s=2 * timeout_s,
        )
    base = Config()
    for section in ("admission", "ratelimit", "billing", "breaker", "fingerprint", "usage"):
        current = sections.pop(section, getattr(base, section))
        changes: dict[str, Any] = {}
        if section in fail:
            changes["fail_mode"] = fail[section]
        if section == "usage":
            changes["sink"] = usage_sink
        if section == "billing":
            changes["reservation_ttl_s"] = reservation_ttl_s
        if section == "fingerprint":
            # The faults write suspensions straight into Redis, as another worker would,
            # and expect them at once: no "not suspended" cache here (its own tests
            # cover the bounded delay it adds).
            changes["suspension_cache_s"] = 0.0
        kwargs[section] = dataclasses.replace(current, **changes)
    kwargs.update(sections)
    return Config(**kwargs)


@contextlib.asynccontextmanager
async def lifespan(app: ASGIApp) -> AsyncIterator[None]:
    """Run *app*'s lifespan (the forwarder's session; closes the Governor at the end)."""
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    started, stopped = asyncio.Event(), asyncio.Event()

    async def receive() -> Message:
        return await inbox.get()

    async def send(message: Message) -> None:
        if message["type"].startswith("lifespan.startup"):
            started.set()
        elif message["type"].startswith("lifespan.shutdown"):
            stopped.set()

    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}

    async def run() -> None:
        await app(scope, receive, send)

    task = asyncio.create_task(run())
    await inbox.put({"type": "lifespan.startup"})
    await started.wait()
    try:
        yield
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        await stopped.wait()
        await task


@dataclasses.dataclass
class Stack:
    """One governor (its app, registry) in front of the mock upstream."""

    governor: Governor
    app: ASGIApp
    mock: MockUpstream
    registry: CollectorRegistry

    async def call(
        self,
        path: str = CHAT,
        body: Any = None,
        *,
        headers: Mapping[str, str] | None = None,
        key: str | None = KEY,
        raw: bytes | None = None,
        disconnect: Callable[[list[Message]], bool] | None = None,
        gone: asyncio.Event | None = None,
        method: str = "POST",
    ) -> Result:
        """One request through the full stack. *disconnect(messages)*: the client leaves
        as soon as it returns True for what was received so far; *gone*: when it is set."""
        hdrs = {"content-type": "application/json"}
        if key is not None:
            hdrs["authorization" if not path.startswith("/v1/messages") else "x-api-key"] = (
                f"Bearer {key}" if not path.startswith("/v1/messages") else key
            )
        hdrs.update(headers or {})
        data = raw if raw is not None else json.dumps(body if body is not None else {}).encode()
        return await asgi_call(self.app, method, path, hdrs, data, disconnect=disconnect, gone=gone)

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    async def records(self, n: int = 1_000) -> list[UsageRecord]:
        sink = sink_for(self.governor)
        if isinstance(sink, MemorySink):
            return list(sink.records)
        assert isinstance(sink, RedisStreamSink)
        return list(reversed(await sink.recent(_key_id(), n)))

    def layer(self, cls: type[_L]) -> _L:
        """The governor middleware of type *cls* in this stack."""
        app: Any = self.app
        while app is not None:
            if isinstance(app, cls):
                return app
            app = getattr(app, "app", None)
        raise LookupError(cls.__name__)

    async def slots(self, model: str = "gpt-5-5") -> tuple[int, int]:
        """(slots held, requests queued) of *model*, shared pool and local fallback."""
        mw = self.layer(AdmissionMiddleware)
        pool = mw._pools[model]
        shared = await mw.slots.stats(pool)
        local = await mw._fallback.stats(mw._share(pool))
        return shared.held + local.held, shared.queued + local.queued

    async def all_slots(self) -> tuple[int, int]:
        """(slots held, requests queued) summed over every model."""
        mw = self.layer(AdmissionMiddleware)
        held = queued = 0
        for model in mw._pools:
            h, q = await self.slots(model)
            held, queued = held + h, queued + q
        return held, queued

    async def ledger(self) -> tuple[int, int, int]:
        """(balance, credits held, reservations live) of the test account."""
        await retries_for(self.governor, ledger_for(self.governor)).drain()
        backend = self.governor.backend
        if isinstance(backend, RedisBackend):
            r = backend.redis
            tag = _tag(ACCOUNT)
            balance, held = await r.hmget(backend.key("bill", tag, "acct"), ["balance", "held"])
            live = await r.zcard(backend.key("bill", tag, "res"))
            return (
                OPENING if balance is None else int(balance),
                int(held or 0),
                int(live),
            )
        ledger: Any = ledger_for(self.governor)
        account = ledger._accounts.get(ACCOUNT)
        if account is None:
            return OPENING, 0, 0
        return account.balance, account.held, len(ledger._live)


def _key_id() -> str:
    from governor.keys import key_id

    return key_id(KEY)


@contextlib.asynccontextmanager
async def full_stack(
    config: Config | None = None,
    *,
    backend: Any = None,
    read_timeout_s: float = 30.0,
    upstream_url: str | None = None,
    keep: int = 1_000,
) -> AsyncIterator[Stack]:
    """The demo gateway over *config* (default: memory) in front of an in-process mock
    (remembering its last *keep* requests)."""
    registry = CollectorRegistry()
    gov = Governor(config or make_config(), backend=backend, registry=registry)
    mock = MockUpstream(keep=keep)
    async with contextlib.AsyncExitStack() as stack:
        url = upstream_url
        if url is None:
            url = await stack.enter_async_context(serve(mock))
        upstream = UpstreamSettings.for_root(
            url, openai_key="sk-up", anthropic_key="sk-ant-up", read_timeout_s=read_timeout_s
        )
        app = build_app(gov, upstream)
        await stack.enter_async_context(lifespan(app))
        yield Stack(gov, app, mock, registry)


async def asgi_call(
    app: ASGIApp,
    method: str,
    path: str,
    headers: Mapping[str, str] | list[tuple[str, str]],
    body: bytes,
    *,
    disconnect: Callable[[list[Message]], bool] | None = None,
    gone: asyncio.Event | None = None,
    scope: dict[str, Any] | None = None,
) -> Result:
    """Like tests.helpers.call, with a client that can leave mid-response (sends after
    it left raise OSError, as uvicorn's do). *scope* replaces the one built here."""
    scope = scope if scope is not None else make_scope(method, path, headers)
    left = gone if gone is not None else asyncio.Event()
    sent_body = False
    messages: list[Message] = []

    async def receive() -> Message:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if left.is_set():
            raise OSError("client disconnected")
        messages.append(message)
        if disconnect is not None and disconnect(messages):
            left.set()

    await app(scope, receive, send)
    start = next((m for m in messages if m["type"] == "http.response.start"), None)
    status = start["status"] if start else 0
    hdrs = list(start.get("headers", [])) if start else []
    out = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return Result(status, hdrs, out, messages)


def error_shape(result: Result, path: str) -> str | None:
    """Why *result*'s error body is not in the shape of *path*'s API (None: it is)."""
    try:
        data = json.loads(result.body)
    except ValueError:
        return f"not JSON: {result.body[:100]!r}"
    anthropic = "/messages" in path
    if anthropic:
        ok = (
            isinstance(data, dict)
            and data.get("type") == "error"
            and isinstance(data.get("error"), dict)
            and isinstance(data["error"].get("type"), str)
            and isinstance(data["error"].get("message"), str)
        )
    else:
        ok = (
            isinstance(data, dict)
            and isinstance(data.get("error"), dict)
            and isinstance(data["error"].get("message"), str)
            and "type" in data["error"]
        )
    return None if ok else f"not the {'Anthropic' if anthropic else 'OpenAI'} shape: {data!r}"


async def wait_for(
    check: Callable[[], Awaitable[bool]], timeout: float = 10.0, step: float = 0.05
) -> float:
    """Seconds until *check()* holds (real time: Redis recovers in real time)."""
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not recovered within {timeout} s")
        await asyncio.sleep(step)
    return time.monotonic() - start


async def drop_prefix(client: Redis, prefix: str) -> int:
    """Delete every key under *prefix* (a FLUSHALL of this test's data only)."""
    n = 0
    async for key in client.scan_iter(match=f"{prefix}:*", count=500):
        n += await client.delete(key)
    return n


def new_prefix() -> str:
    return f"gov-test-{uuid.uuid4().hex[:12]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A throwaway redis-server (no persistence) this test may kill and restart."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        client: Redis = Redis.from_url(self.url, socket_connect_timeout=0.2)
        try:
            for _ in range(200):
                try:
                    await client.ping()
                    return
                except Exception:
                    await asyncio.sleep(0.02)
            raise RuntimeError("redis-server did not start")
        finally:
            await client.aclose()

    async def kill(self) -> None:
        """SIGKILL: a crash, every connection cut, all data lost."""
        if self.proc is not None:
            if self.proc.returncode is None:
                self.proc.kill()
            await self.proc.wait()
            self.proc = None

    async def __aenter__(self) -> RedisServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.kill()


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0", "false")
