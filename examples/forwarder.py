"""The forwarding app: governed surfaces to an OpenAI-compatible and an Anthropic upstream.

A raw ASGI app on aiohttp's client: one shared ``ClientSession`` with a connection pool
sized for load (on this kind of machine a bare proxy forwarding with aiohttp served
about 7 times the requests per second of the same proxy on httpx). It knows nothing of
governor's limits, so the benchmarks can run it bare or behind ``governor.wrap``; when a
governor stack runs in front, it forwards on the surface governor parsed (so
``//v1/messages/`` goes where ``/v1/messages`` goes).

What it does to a request:

- the upstream is chosen by surface: chat completions, responses and images go to the
  OpenAI-compatible base URL (``.../v1`` + ``/chat/completions``), messages and
  count_tokens to the Anthropic base URL (+ ``/v1/messages``); the query string is kept
  (``?beta=true``). The wire format is the surface's, so the surface (not the model's
  catalog upstream) decides; override :meth:`Forwarder.target` to route otherwise;
- the caller's credentials (``Authorization``, ``x-api-key``, ``anthropic-api-key``) are
  replaced by the upstream's own, hop-by-hop headers are dropped, and so are governor's
  own request headers (``X-Hypereal-*``, ``X-Session-Id``); everything else passes,
  fault-injection headers of the mock (``X-Mock-*``) included. ``X-Claude-Code-Session-Id``
  is Claude Code's own header, which Anthropic receives anyway: it passes;
- bodies stream both ways chunk by chunk, never buffered; when the client goes away the
  upstream request is closed at once;
- an upstream that cannot be reached is a 502, one that does not answer in time a 504,
  in the caller's error shape; a stream the upstream breaks after it started ends with
  an error event in the caller's dialect (both SDKs raise on it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sys
from collections.abc import AsyncIterator, Iterable

import aiohttp
from starlette.applications import Starlette
from starlette.routing import BaseRoute, Route

from examples.serving import tune_gc
from governor.catalog import Upstream
from governor.context import ROUTES, RequestContext, Surface, get_context, match_route
from governor.errors import (
    BadGateway,
    GatewayTimeout,
    NotFound,
    RequestError,
    Shape,
    error_body,
    send_error,
)
from governor.types import Message, RawHeaders, Receive, Scope, Send

# Where each surface goes: which base URL, and the path under it.
TARGETS: dict[Surface, tuple[Upstream, str]] = {
    Surface.CHAT: (Upstream.OPENAI, "/chat/completions"),
    Surface.RESPONSES: (Upstream.OPENAI, "/responses"),
    Surface.IMAGES: (Upstream.OPENAI, "/images/generations"),
    Surface.MESSAGES: (Upstream.ANTHROPIC, "/v1/messages"),
    Surface.COUNT_TOKENS: (Upstream.ANTHROPIC, "/v1/messages/count_tokens"),
}

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Request headers never forwarded: hop-by-hop, the ones aiohttp sets itself (it asks for
# compression and decompresses, so governor always reads plain bodies), the caller's
# gateway credentials, and governor's own.
DROP_REQUEST = HOP_BY_HOP | {
    b"host",
    b"content-length",
    b"expect",
    b"accept-encoding",
    b"authorization",
    b"x-api-key",
    b"anthropic-api-key",
    b"cookie",
    b"x-session-id",
}
# Response headers not passed back: hop-by-hop, the server's own (uvicorn sets them), and
# what identifies the operator's upstream account. Upstream rate-limit headers and
# retry-after do pass: on an upstream 429 they are what clients need to back off.
DROP_RESPONSE = HOP_BY_HOP | {
    b"date",
    b"server",
    b"set-cookie",
    b"openai-organization",
    b"openai-project",
    b"anthropic-organization-id",
}
GOVERNOR_PREFIX = b"x-hypereal-"


@dataclasses.dataclass(frozen=True)
class UpstreamSettings:
    """Where the upstream APIs are and how to reach them."""

    # OpenAI-compatible base URL, with its version (``https://api.openai.com/v1``).
    openai_url: str
    # Anthropic-native base URL, without a version (``https://api.anthropic.com``).
    anthropic_url: str
    # The upstream's own credentials (never the caller's gateway key).
    openai_key: str | None = None
    anthropic_key: str | None = None
    # Sent when the caller sends none (every Anthropic SDK does).
    anthropic_version: str = "2023-06-01"
    connect_timeout_s: float = 10.0
    # Longest silence allowed while waiting for the answer or between two stream reads.
    read_timeout_s: float = 300.0
    # Connection pool: open connections in all, and to one host (0: no bound).
    max_connections: int = 1_000
    max_connections_per_host: int = 0

    @classmethod
    def for_root(cls, root: str, **options: object) -> UpstreamSettings:
        """Both APIs under one server root, as the mock upstream serves them."""
        root = root.rstrip("/")
        return cls(openai_url=root + "/v1", anthropic_url=root, **options)  # type: ignore[arg-type]


class _Exchange:
    """Per-request flags shared by the forwarding task and its disconnect watcher."""

    __slots__ = ("client_gone", "finished")

    def __init__(self) -> None:
        self.finished = False
        self.client_gone = False


class Forwarder:
    """Forwards governed surfaces to the upstream over one shared aiohttp session.

    Call :meth:`start` before serving and :meth:`aclose` after (or use
    :meth:`lifespan`); a session passed in is used as is and not closed.
    """

    def __init__(
        self, settings: UpstreamSettings, *, session: aiohttp.ClientSession | None = None
    ) -> None:
        self.settings = settings
        self._session = session
        self._owns_session = session is None
        self._bases = {
            Upstream.OPENAI: settings.openai_url.rstrip("/"),
            Upstream.ANTHROPIC: settings.anthropic_url.rstrip("/"),
        }
        self._credentials: dict[Upstream, list[tuple[str, str]]] = {
            Upstream.OPENAI: (
                [("authorization", f"Bearer {settings.openai_key}")] if settings.openai_key else []
            ),
            Upstream.ANTHROPIC: (
                [("x-api-key", settings.anthropic_key)] if settings.anthropic_key else []
            ),
        }

    async def start(self) -> None:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self.settings.max_connections,
                limit_per_host=self.settings.max_connections_per_host,
                ttl_dns_cache=300,
            )
            timeout = aiohttp.ClientTimeout(
                total=None,
                sock_connect=self.settings.connect_timeout_s,
                sock_read=self.settings.read_timeout_s,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=timeout,
                auto_decompress=True,
                skip_auto_headers=("User-Agent",),
            )

    async def aclose(self) -> None:
        if self._session is not None and self._owns_session:
            await self._session.close()
            self._session = None

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        await self.start()
        try:
            yield
        finally:
            await self.aclose()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("Forwarder.start() was not called (no lifespan?)")
        return self._session

    def target(self, surface: Surface, ctx: RequestContext | None) -> tuple[Upstream, str]:
        """The upstream and URL (without query) for *surface*; override to route otherwise."""
        upstream, path = TARGETS[surface]
        return upstream, self._bases[upstream] + path

    def request_headers(
        self, raw: Iterable[tuple[bytes, bytes]], upstream: Upstream
    ) -> list[tuple[str, str]]:
        """*raw* without what must not reach the upstream, plus the upstream's credentials."""
        named: set[bytes] = set()
        for name, value in raw:
            if name.lower() == b"connection":  # headers it names are hop-by-hop too
                named.update(v.strip().lower() for v in value.split(b","))
        out: list[tuple[str, str]] = []
        has_version = False
        for name, value in raw:
            lname = name.lower()
            if lname in DROP_REQUEST or lname in named or lname.startswith(GOVERNOR_PREFIX):
                continue
            has_version = has_version or lname == b"anthropic-version"
            out.append((lname.decode("latin-1"), value.decode("latin-1")))
        out += self._credentials[upstream]
        if upstream is Upstream.ANTHROPIC and not has_version:
            out.append(("anthropic-version", self.settings.anthropic_version))
        return out

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = get_context(scope)
        route = match_route(scope) if ctx is None else None
        surface = ctx.surface if ctx is not None else route[0] if route else None
        request_id = ctx.request_id if ctx is not None else None
        if surface is None or surface not in TARGETS:
            shape = surface.shape if surface is not None else Shape.OPENAI
            await send_error(
                send, NotFound("Not found.", code="not_found"), shape, request_id, id_header=False
            )
            return
        body = await _read_body(receive)
        if body is None:  # the client left while sending
            return
        upstream, url = self.target(surface, ctx)
        query = scope.get("query_string", b"")
        if query:
            url += "?" + query.decode("latin-1")
        headers = self.request_headers(scope.get("headers", ()), upstream)

        # The client leaving shows only on receive(): a watcher cancels the exchange
        # then, which closes the upstream request (and stops the upstream generating).
        task = asyncio.current_task()
        assert task is not None
        state = _Exchange()
        watcher = asyncio.ensure_future(_watch(receive, task, state))
        try:
            await self._exchange(
                scope["method"], url, headers, body, send, surface.shape, request_id
            )
        except asyncio.CancelledError:
            if not state.client_gone:
                raise
            if sys.version_info >= (3, 11):
                task.uncancel()
        finally:
            state.finished = True
            watcher.cancel()

    async def _exchange(
        self,
        method: str,
        url: str,
        headers: list[tuple[str, str]],
        body: bytes,
        send: Send,
        shape: Shape,
        request_id: str | None,
    ) -> None:
        try:
            response = await self.session.request(
                method,
                url,
                data=body,
                headers=headers,
                allow_redirects=False,
            )
        except asyncio.TimeoutError:
            error: RequestError = GatewayTimeout(
                "The upstream did not answer in time.", reason="upstream_timeout"
            )
            await send_error(send, error, shape, request_id, id_header=False)
            return
        except (aiohttp.ClientError, OSError) as exc:
            error = BadGateway(
                f"The upstream could not be reached ({type(exc).__name__}).",
                reason="upstream_unreachable",
            )
            await send_error(send, error, shape, request_id, id_header=False)
            return
        complete = False
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status,
                    "headers": _response_headers(response),
                }
            )
            is_sse = response.content_type == "text/event-stream"
            try:
                async for chunk in response.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except (asyncio.TimeoutError, aiohttp.ClientError, OSError) as exc:
                if not is_sse:
                    raise  # a JSON body cut short: abort the connection, the client sees it
                await send(_stream_error(exc, shape, request_id))
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            complete = True
        finally:
            if complete:
                response.release()
            else:
                response.close()  # stop the upstream: it may still be generating


async def _watch(receive: Receive, task: asyncio.Task[object], state: _Exchange) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    if not state.finished:
        state.client_gone = True
        task.cancel()


async def _read_body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _response_headers(response: aiohttp.ClientResponse) -> RawHeaders:
    decoded = any(k.lower() == b"content-encoding" for k, _ in response.raw_headers)
    out: RawHeaders = []
    for name, value in response.raw_headers:
        lname = name.lower()
        if lname in DROP_RESPONSE or lname.startswith(GOVERNOR_PREFIX):
            continue
        # aiohttp decompressed the body: its encoding and length no longer apply.
        if decoded and lname in (b"content-encoding", b"content-length"):
            continue
        out.append((lname, value))
    return out


def _stream_error(exc: BaseException, shape: Shape, request_id: str | None) -> Message:
    """The event that ends a stream the upstream broke, in the caller's dialect."""
    error: RequestError
    if isinstance(exc, asyncio.TimeoutError):
        error = GatewayTimeout("The upstream stopped answering mid-stream.")
    else:
        error = BadGateway("The upstream connection broke mid-stream.")
    data = error_body(error, shape, request_id)
    head = b"event: error\n" if shape is Shape.ANTHROPIC else b""
    return {
        "type": "http.response.body",
        "body": head + b"data: " + data + b"\n\n",
        "more_body": True,
    }


def forwarding_routes(forwarder: Forwarder) -> list[BaseRoute]:
    """A route to *forwarder* for every forwarded surface's canonical path."""
    return [
        Route(path, forwarder, methods=[method])
        for path, (surface, method, _native) in ROUTES.items()
        if surface in TARGETS
    ]


def bare_app(settings: UpstreamSettings) -> Starlette:
    """The forwarding proxy alone, without governor: the benchmarks' baseline.

    The same Starlette routing and the same forwarding client as the demo gateway, so
    the difference between the two is governor's cost.
    """
    forwarder = Forwarder(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with forwarder.lifespan():
            tune_gc()  # as the demo does
            yield

    return Starlette(routes=forwarding_routes(forwarder), lifespan=lifespan)
