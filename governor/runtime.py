"""The :class:`Governor`: what every governor middleware shares.

One object holds the config, the catalog, the clock, the state backend, the key
resolver and the metrics. Each middleware takes it as ``governor=``; a middleware
mounted without one builds a default (memory backend, default catalog) so it works
alone. :meth:`Governor.enter` is the single entry every middleware calls first.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter

from governor import context as c
from governor import headers as h
from governor.backends import Backend, backend_from_config
from governor.catalog import Catalog
from governor.clock import SYSTEM_CLOCK, Clock
from governor.config import Config
from governor.degraded import NOTE as DEGRADED_NOTE
from governor.degraded import stamp as stamp_degraded
from governor.errors import RequestError, send_error
from governor.keys import ConfigKeyResolver, KeyResolver
from governor.metrics import Metrics
from governor.types import ASGIApp, Message, RawHeaders, Receive, Scope, Send

_T = TypeVar("_T")
_GOVERNOR_ACTIVE = h.header(h.GOVERNOR, "active")
_REQUEST_ID = h.wire(h.REQUEST_ID)


def _layer_headers(ctx: c.RequestContext, message: Message) -> RawHeaders:
    """Every layer's own headers (:meth:`~governor.context.RequestContext.add_headers`),
    innermost layer's first: the order its own send wrapper would have added them in."""
    extra: RawHeaders = []
    for source in reversed(ctx.header_sources):
        extra += source(ctx, message) if callable(source) else source
    return extra


class Governor:
    """Shared runtime of a governor stack: config, catalog, clock, backend, keys, metrics.

    ``async with Governor(...)`` closes the backend on exit; so does :meth:`aclose`.
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        backend: Backend | None = None,
        clock: Clock | None = None,
        key_resolver: KeyResolver | None = None,
        registry: CollectorRegistry | None = None,
        catalog: Catalog | None = None,
    ) -> None:
        self.config = config if config is not None else Config()
        self.catalog = catalog if catalog is not None else self.config.catalog()
        self.clock: Clock = clock if clock is not None else SYSTEM_CLOCK
        self.backend = backend if backend is not None else backend_from_config(self.config)
        self.keys: KeyResolver = (
            key_resolver if key_resolver is not None else ConfigKeyResolver.from_config(self.config)
        )
        self.metrics = Metrics(registry)
        self._shared: dict[str, Any] = {}
        self._requests = self.metrics.counter(
            "requests", "Governed requests by surface and HTTP status.", ("surface", "status")
        )
        self._request_children: dict[tuple[str, int], Counter] = {}
        self._bad_input = self.metrics.counter(
            "bad_requests", "Requests refused while parsing, by error code.", ("code",)
        )
        self._on_close: list[Callable[[], Awaitable[None]]] = []

    def on_close(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run *callback* in :meth:`aclose`, before the backend closes (last added first):
        middlewares stop their background tasks there."""
        self._on_close.append(callback)

    def _counted(self, surface: str, status: int) -> Counter:
        # Bound children cost a third of labels() on every request.
        child = self._request_children.get((surface, status))
        if child is None:
            child = self._request_children[(surface, status)] = self._requests.labels(
                surface, str(status)
            )
        return child

    def shared(self, name: str, factory: Callable[[], _T]) -> _T:
        """The one object *name* of this governor, built by *factory* on first use.

        Capabilities keep their per-governor state here (a ledger, a usage sink, a slot
        pool), so that several middlewares and routes of one governor share it, and
        :meth:`aclose` closes whatever has an ``aclose()``.
        """
        try:
            return self._shared[name]  # type: ignore[no-any-return]
        except KeyError:
            value = self._shared[name] = factory()
            return value

    def set_shared(self, name: str, value: object) -> None:
        """Use *value* as the shared object *name* (a custom ledger, sink, ...)."""
        self._shared[name] = value

    async def aclose(self) -> None:
        """Run the close callbacks, close every shared object (each in reverse order of
        registration), then the backend."""
        callbacks, self._on_close = self._on_close[::-1], []
        for callback in callbacks:
            await callback()
        for value in reversed(list(self._shared.values())):
            close = getattr(value, "aclose", None)
            if close is not None:
                await close()
        self._shared.clear()
        await self.backend.aclose()

    async def __aenter__(self) -> Governor:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def enter(
        self, scope: Scope, receive: Receive, send: Send
    ) -> tuple[c.RequestContext | None, Receive, Send] | None:
        """The request context of *scope*, parsing it if no middleware has yet.

        Returns ``(ctx, receive, send)`` to pass on; ``ctx`` is None when the path is not
        governed (pass it through untouched). Returns None when the request was answered
        here (bad input: an error in the caller's shape, nothing consumed, or a client
        that left while sending its body): the caller must stop. The first middleware
        to see a request reads its body once and replays it downstream byte for byte;
        its ``send`` adds ``X-Hypereal-Request-Id`` and ``X-Hypereal-Managed-Governor``
        and feeds the one :class:`~governor.response.ResponseObserver`.
        """
        ctx = c.get_context(scope)
        if ctx is not None:
            return ctx, receive, send
        route = c.match_route(scope)
        if route is None:
            return None, receive, send
        shape = route[0].shape
        request_id = c.new_request_id()
        try:
            c.check_method(scope, route)
            api_key = c.extract_key(list(scope.get("headers", ())))
            policy = await c.resolve_key(self.keys, api_key)
            ctx = c.new_context(
                scope,
                route,
                api_key,
                policy,
                request_id=request_id,
                arrived=self.clock.monotonic(),
                arrived_wall=self.clock.time(),
            )
            if route[1] == "POST":
                body = await c.read_body(scope, receive, self.config.max_body_bytes, ctx.header_map)
                if body is None:  # the client left while sending the body
                    return None
                ctx.body = body
                c.apply_payload(ctx, c.parse_body(body), self.catalog)
        except RequestError as exc:
            self._bad_input.labels(exc.code or exc.reason).inc()
            await send_error(send, exc, shape, request_id)
            return None
        scope[c.SCOPE_KEY] = ctx
        return ctx, self._replay(ctx, receive), self._observe(ctx, send)

    async def model_call(
        self,
        app: ASGIApp,
        scope: Scope,
        receive: Receive,
        send: Send,
        *,
        skip: Collection[c.Surface] = (),
    ) -> tuple[c.RequestContext, Receive, Send] | None:
        """:meth:`enter` for a middleware that governs model calls.

        Returns ``(ctx, receive, send)`` for a model call on a surface not in *skip*. For
        anything else (not HTTP, not a governed path, no model such as the models list,
        a skipped surface) it runs *app* itself; bad input it has answered already.
        Either way it returns None, and the middleware is done.
        """
        if scope["type"] != "http":
            await app(scope, receive, send)
            return None
        ctx = scope.get(c.SCOPE_KEY)
        if ctx is None:  # the first layer to see the request: parse it
            entered = await self.enter(scope, receive, send)
            if entered is None:
                return None
            ctx, receive, send = entered
        if ctx is None or ctx.model is None or ctx.surface in skip:
            await app(scope, receive, send)
            return None
        return ctx, receive, send

    def _replay(self, ctx: c.RequestContext, receive: Receive) -> Receive:
        replayed = ctx.method != "POST"

        async def replay() -> Message:
            # The body once, then the real receive: a replay that kept answering with
            # the body would make a streaming response spin (it polls for disconnect).
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": ctx.body, "more_body": False}
            message = await receive()
            if message["type"] == "http.disconnect":
                ctx.disconnected = True
            return message

        return replay

    def _observe(self, ctx: c.RequestContext, send: Send) -> Send:
        clock = self.clock
        observer = ctx.response
        request_id = (_REQUEST_ID, ctx.request_id.encode())
        counted = self._counted

        async def observed(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                # Ours are appended, not replaced: the forwarder drops the upstream's
                # X-Hypereal-*. The layers' replace theirs, all in one pass.
                if ctx.header_sources:
                    h.replace(message, _layer_headers(ctx, message))
                    message["headers"] += (request_id, _GOVERNOR_ACTIVE)  # a new list
                else:
                    message["headers"] = [*message.get("headers", ()), request_id, _GOVERNOR_ACTIVE]
                if ctx.notes.get(DEGRADED_NOTE):
                    stamp_degraded(ctx, message)  # guards that ran on their fail mode
                observer.on_start(message, clock.monotonic())
                counted(ctx.surface.value, message["status"]).inc()
            elif kind == "http.response.body":
                observer.on_body(message, clock.monotonic())
            try:
                await send(message)
            except OSError:
                ctx.disconnected = True
                raise

        return observed

    async def refuse(self, ctx: c.RequestContext, send: Send, error: RequestError) -> None:
        """Answer *ctx* with *error* in its shape, marking it as governor's own refusal."""
        ctx.refusal = error.reason
        await send_error(send, error, ctx.shape, ctx.request_id, id_header=False)
