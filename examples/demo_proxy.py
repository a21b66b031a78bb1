"""The demo gateway: governor in front of a forwarding proxy, one command.

``python examples/demo_proxy.py`` starts the mock upstream and the proxy on 127.0.0.1
with the memory backend, the default catalog and open demo keys (any ``ck_<anything>``
is an account of its own), and prints curl and SDK snippets to try it.

Options (flag, environment variable)::

    --config PATH         GOVERNOR_CONFIG         TOML config (only its keys are accepted)
    --upstream URL        GOVERNOR_UPSTREAM       a server root serving both APIs
                                                  (none: the mock upstream, in-process)
    --openai-url URL      GOVERNOR_OPENAI_URL     OpenAI-compatible base (default URL/v1)
    --anthropic-url URL   GOVERNOR_ANTHROPIC_URL  Anthropic base (default URL)
    --host HOST           GOVERNOR_HOST           default 127.0.0.1
    --port PORT           GOVERNOR_PORT           default 8000
    --workers N           GOVERNOR_WORKERS        default 1; more need Redis
    --redis-url URL       GOVERNOR_REDIS_URL      use the Redis backend at URL
    --upstream-timeout S  GOVERNOR_UPSTREAM_TIMEOUT  longest upstream silence (default 300)

Upstream credentials come from the environment only: ``GOVERNOR_OPENAI_API_KEY`` (else
``OPENAI_API_KEY``) and ``GOVERNOR_ANTHROPIC_API_KEY`` (else ``ANTHROPIC_API_KEY``).

Routes: the five managed surfaces and ``/v1/messages`` (+ ``/count_tokens``) are
forwarded (``examples/forwarder.py``); ``GET /v1/managed/models`` lists the catalog
models the calling key may use; ``/metrics`` serves Prometheus; ``/healthz`` answers
200. Admin routes join through :func:`extra_routes`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import ClassVar

if __package__ in (None, ""):  # run as a script: make the `examples` package importable
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from starlette.applications import Starlette
from starlette.routing import BaseRoute, Route

from examples.forwarder import TARGETS, Forwarder, UpstreamSettings, forwarding_routes
from examples.serving import tune_gc
from governor import Governor, MetricsApp, get_context, load_config, usage_routes, wrap
from governor.breaker import admin_routes as breaker_routes
from governor.catalog import ModelSpec
from governor.config import Config
from governor.context import Surface, shape_for
from governor.errors import ConfigurationError, NotFound, send_error
from governor.fingerprint import admin_routes as suspension_routes
from governor.types import ASGIApp, Receive, Scope, Send

DEMO_KEY = "ck_demo"
MOCK_OPENAI_KEY = "sk-mock-upstream-openai"
MOCK_ANTHROPIC_KEY = "sk-ant-mock-upstream"
Middleware = Callable[[ASGIApp], ASGIApp]


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the demo was asked to run."""

    config_path: str | None = None
    upstream: str | None = None
    openai_url: str | None = None
    anthropic_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    redis_url: str | None = None
    upstream_timeout_s: float = 300.0
    openai_key: str | None = None
    anthropic_key: str | None = None

    # Environment variable of each field (flags win over them).
    ENV: ClassVar[dict[str, str]] = {
        "config_path": "GOVERNOR_CONFIG",
        "upstream": "GOVERNOR_UPSTREAM",
        "openai_url": "GOVERNOR_OPENAI_URL",
        "anthropic_url": "GOVERNOR_ANTHROPIC_URL",
        "host": "GOVERNOR_HOST",
        "port": "GOVERNOR_PORT",
        "workers": "GOVERNOR_WORKERS",
        "redis_url": "GOVERNOR_REDIS_URL",
        "upstream_timeout_s": "GOVERNOR_UPSTREAM_TIMEOUT",
    }

    @classmethod
    def parse(cls, argv: Sequence[str] | None, environ: Mapping[str, str]) -> Settings:
        def env(field: str, default: object = None) -> object:
            return environ.get(cls.ENV[field], default)

        p = argparse.ArgumentParser(
            prog="demo_proxy.py",
            description="The governor demo gateway (see docs/demo.md).",
        )
        p.add_argument("--config", dest="config_path", default=env("config_path"))
        p.add_argument("--upstream", default=env("upstream"))
        p.add_argument("--openai-url", default=env("openai_url"))
        p.add_argument("--anthropic-url", default=env("anthropic_url"))
        p.add_argument("--host", default=env("host", "127.0.0.1"))
        p.add_argument("--port", type=int, default=int(str(env("port", 8000))))
        p.add_argument("--workers", type=int, default=int(str(env("workers", 1))))
        p.add_argument("--redis-url", default=env("redis_url"))
        p.add_argument(
            "--upstream-timeout",
            dest="upstream_timeout_s",
            type=float,
            default=float(str(env("upstream_timeout_s", 300.0))),
        )
        args = p.parse_args(argv)
        if args.workers < 1:
            p.error("--workers must be at least 1")
        return cls(
            **vars(args),
            openai_key=environ.get("GOVERNOR_OPENAI_API_KEY") or environ.get("OPENAI_API_KEY"),
            anthropic_key=environ.get("GOVERNOR_ANTHROPIC_API_KEY")
            or environ.get("ANTHROPIC_API_KEY"),
        )

    def to_environ(self) -> dict[str, str]:
        """These settings as environment variables, for worker processes to read back."""
        out = {}
        for field, name in self.ENV.items():
            value = getattr(self, field)
            if value is not None:
                out[name] = str(value)
        if self.openai_key:
            out["GOVERNOR_OPENAI_API_KEY"] = self.openai_key
        if self.anthropic_key:
            out["GOVERNOR_ANTHROPIC_API_KEY"] = self.anthropic_key
        return out

    def upstream_settings(self) -> UpstreamSettings:
        if self.upstream is None and not (self.openai_url and self.anthropic_url):
            raise ConfigurationError("no upstream: pass --upstream URL (or start the mock)")
        root = (self.upstream or "").rstrip("/")
        return UpstreamSettings(
            openai_url=self.openai_url or root + "/v1",
            anthropic_url=self.anthropic_url or root,
            openai_key=self.openai_key,
            anthropic_key=self.anthropic_key,
            read_timeout_s=self.upstream_timeout_s,
        )

    def config(self) -> Config:
        """The governor config: the file's, or open demo mode without one."""
        config = load_config(self.config_path)
        if self.config_path is None:
            config = dataclasses.replace(config, demo_keys=True)
        if self.redis_url:
            redis = dataclasses.replace(config.redis, url=self.redis_url)
            config = dataclasses.replace(config, backend="redis", redis=redis)
        return config


# --- routes ---------------------------------------------------------------------------


def admin_token(governor: Governor) -> str | None:
    """The operators' bearer token: ``GOVERNOR_ADMIN_TOKEN``, else the config's."""
    return os.environ.get("GOVERNOR_ADMIN_TOKEN") or governor.config.fingerprint.admin_token


def extra_routes(governor: Governor) -> list[BaseRoute]:
    """Admin and extra routes (breaker overrides, suspensions, per-key usage) join here.

    Admin routes are mounted only with an admin token, so they are never open.
    """
    routes: list[BaseRoute] = [*usage_routes(governor)]
    token = admin_token(governor)
    if token:
        routes += suspension_routes(governor, token=token)
        routes += breaker_routes(governor, token=token)
    return routes


def model_object(model: ModelSpec) -> dict[str, object]:
    """One catalog model in OpenAI's model-list shape, with governor's facts added."""
    return {
        "id": model.id,
        "object": "model",
        "created": 0,
        "owned_by": model.upstream.value,
        "name": model.name,
        "type": model.kind.value,
        "context_window": model.context_tokens,
        "max_output_tokens": model.max_output_tokens,
        "cli_only": model.cli_only,
        # US dollars per million tokens; null: billed at the input price.
        "pricing": {
            "input": model.input_price,
            "output": model.output_price,
            "cache_read": model.cache_read_price,
            "cache_write": model.cache_write_price,
        },
    }


class ModelsApp:
    """``GET /v1/managed/models``: the catalog, filtered to the calling key's models."""

    def __init__(self, governor: Governor) -> None:
        self.governor = governor

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = get_context(scope)
        policy = ctx.policy if ctx is not None else None
        data = [
            model_object(m)
            for m in self.governor.catalog.values()
            if policy is None or policy.allows(m.id)
        ]
        await _json(send, 200, {"object": "list", "data": data})


class Healthz:
    """``/healthz``: 200 while the process serves (a plain ASGI app, not a Starlette endpoint)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _json(send, 200, {"status": "ok"})


async def _json(send: Send, status: int, payload: object) -> None:
    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Fallback:
    """Requests no route matched: governed paths written another way (``//v1/messages/``)
    go where governor's normalised surface says; anything else is a 404."""

    def __init__(self, forwarder: ASGIApp, models: ASGIApp) -> None:
        self.forwarder = forwarder
        self.models = models

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = get_context(scope) if scope["type"] == "http" else None
        if ctx is not None and ctx.surface in TARGETS:
            await self.forwarder(scope, receive, send)
        elif ctx is not None and ctx.surface is Surface.MODELS:
            await self.models(scope, receive, send)
        elif scope["type"] == "http":
            error = NotFound(f"No route for {scope['path'][:200]}.", code="not_found")
            await send_error(send, error, ctx.shape if ctx else shape_for(scope))
        # lifespan and websockets end here when nothing handles them


def core_routes(governor: Governor, forwarder: Forwarder, models: ASGIApp) -> list[BaseRoute]:
    """The demo's own routes: every governed surface, the models list, metrics, health."""
    routes = forwarding_routes(forwarder)
    routes += [
        Route("/v1/managed/models", models, methods=["GET"]),
        Route("/metrics", MetricsApp(governor.metrics.registry), methods=["GET"]),
        Route("/healthz", Healthz(), methods=["GET", "HEAD"]),
    ]
    return routes


def build_app(
    governor: Governor,
    upstream: UpstreamSettings,
    *,
    middleware: Sequence[Middleware] = (),
    routes: Sequence[BaseRoute] = (),
) -> ASGIApp:
    """The demo gateway: ``wrap(Starlette(routes), governor)``.

    *middleware* wraps the routes inside the governor stack (innermost last), as extra
    governor layers would sit; *routes* are added after :func:`extra_routes`.
    """
    forwarder = Forwarder(upstream)
    models = ModelsApp(governor)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with forwarder.lifespan():
            tune_gc()
            try:
                yield
            finally:
                await governor.aclose()
                if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
                    from prometheus_client import multiprocess

                    multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]

    app = Starlette(
        routes=[*core_routes(governor, forwarder, models), *extra_routes(governor), *routes],
        lifespan=lifespan,
    )
    # A governed path written as //v1/messages/ was already parsed by governor: forward
    # it on its surface rather than redirect (a redirect would make the client send the
    # body twice, and governor count it twice).
    app.router.redirect_slashes = False
    app.router.default = Fallback(forwarder, models)
    inner: ASGIApp = app
    for layer in reversed(middleware):
        inner = layer(inner)
    return wrap(inner, governor)


def create_app(
    settings: Settings | None = None, *, middleware: Sequence[Middleware] = ()
) -> ASGIApp:
    """The app of *settings* (default: read from the environment, as workers do)."""
    settings = settings or Settings.parse([], os.environ)
    return build_app(
        Governor(settings.config()), settings.upstream_settings(), middleware=middleware
    )


# --- running --------------------------------------------------------------------------


def check_workers(settings: Settings, config: Config) -> str | None:
    """Why these settings cannot run, or None."""
    if settings.workers > 1 and config.backend == "memory":
        return (
            f"--workers {settings.workers} needs Redis: with the memory backend each worker "
            f"keeps its own counters, which multiplies every limit by {settings.workers}. "
            'Pass --redis-url redis://127.0.0.1:6379/0 (or set backend = "redis" in the '
            "config), or run one worker."
        )
    return None


def snippets(url: str, key: str, config: Config, upstream: str) -> str:
    mode = "open demo keys: any ck_<anything>" if config.demo_keys else "the config's keys only"
    return f"""
governor demo gateway on {url}
  upstream: {upstream}
  backend: {config.backend}   keys: {mode}
  models: {url}/v1/managed/models   metrics: {url}/metrics   health: {url}/healthz

curl:
  curl -i {url}/v1/managed/chat/completions \\
    -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\
    -d '{{"model": "gpt-5-5", "messages": [{{"role": "user", "content": "Hello"}}]}}'

  curl -N {url}/v1/messages -H "x-api-key: {key}" -H "anthropic-version: 2023-06-01" \\
    -H "Content-Type: application/json" \\
    -d '{{"model": "claude-sonnet-4-7", "max_tokens": 64, "stream": true,
         "messages": [{{"role": "user", "content": "Hello"}}]}}'

OpenAI SDK:
  from openai import OpenAI
  client = OpenAI(base_url="{url}/v1/managed", api_key="{key}")
  reply = client.chat.completions.create(
      model="gpt-5-5", messages=[{{"role": "user", "content": "Hello"}}])
  print(reply.choices[0].message.content, reply.usage)

Anthropic SDK:
  from anthropic import Anthropic
  client = Anthropic(base_url="{url}", api_key="{key}")
  reply = client.messages.create(
      model="claude-sonnet-4-7", max_tokens=64,
      messages=[{{"role": "user", "content": "Hello"}}])
  print(reply.content[0].text, reply.usage)

Claude Code:
  ANTHROPIC_BASE_URL={url} ANTHROPIC_API_KEY={key} claude
"""


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    from examples.mock_upstream import MockUpstream
    from examples.serving import FAST_SERVING, ServerThread, bind, url_of

    try:
        settings = Settings.parse(argv, os.environ)
        config = settings.config()
    except ConfigurationError as exc:
        print(f"demo_proxy: {exc}", file=sys.stderr)
        return 2
    problem = check_workers(settings, config)
    if problem:
        print(f"demo_proxy: {problem}", file=sys.stderr)
        return 2

    mock: ServerThread | None = None
    if settings.upstream is None and not (settings.openai_url and settings.anthropic_url):
        # The mock runs on a thread of its own, so every worker shares one.
        mock = ServerThread(MockUpstream(), settings.host).start()
        settings = dataclasses.replace(
            settings,
            upstream=mock.url,
            openai_key=settings.openai_key or MOCK_OPENAI_KEY,
            anthropic_key=settings.anthropic_key or MOCK_ANTHROPIC_KEY,
        )
    upstream = settings.upstream or f"{settings.openai_url} + {settings.anthropic_url}"
    if mock is None and not (settings.openai_key and settings.anthropic_key):
        print(
            "demo_proxy: warning: no upstream credentials for "
            + " and ".join(
                name
                for name, key in (
                    ("OpenAI", settings.openai_key),
                    ("Anthropic", settings.anthropic_key),
                )
                if not key
            )
            + " (set GOVERNOR_OPENAI_API_KEY / GOVERNOR_ANTHROPIC_API_KEY)",
            file=sys.stderr,
        )
    key = DEMO_KEY if settings.config_path is None else _first_key(config)
    log = "warning" if mock is not None else "info"
    multiproc_dir: str | None = None
    try:
        if settings.workers == 1:
            sock = bind(settings.host, settings.port)
            print(snippets(url_of(sock), key, config, upstream), flush=True)
            server = uvicorn.Server(
                uvicorn.Config(
                    build_app(Governor(config), settings.upstream_settings()),
                    log_level=log,
                    **FAST_SERVING,
                )
            )
            server.run(sockets=[sock])
            return 0
        # Several workers: each builds its app from the environment (an import string
        # factory), and their metrics meet in one multiprocess directory.
        os.environ.update(settings.to_environ())
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            multiproc_dir = tempfile.mkdtemp(prefix="governor-metrics-")
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = multiproc_dir
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        print(snippets(f"http://{host}:{settings.port}", key, config, upstream), flush=True)
        uvicorn.run(
            "examples.demo_proxy:create_app",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            log_level=log,
            **FAST_SERVING,
        )
        return 0
    finally:
        if mock is not None:
            mock.stop()
        if multiproc_dir is not None:
            shutil.rmtree(multiproc_dir, ignore_errors=True)


def _first_key(config: Config) -> str:
    for entry in config.keys.values():
        if entry.key:
            return entry.key
    return "<a key of your config>"


if __name__ == "__main__":
    sys.exit(main())
