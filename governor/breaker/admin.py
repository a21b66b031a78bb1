"""Operator routes for the breakers, to mount in an app (the demo does).

``GET /admin/breakers`` lists every model's breaker; ``GET /admin/breakers/{model}`` one;
``POST /admin/breakers/{model}/open|close|clear|reset`` holds a model's breaker open or
closed, drops the hold, or drops it and closes with fresh counters. In Redis mode the
hold is shared by every worker. Every route wants the admin token, as
``Authorization: Bearer <token>`` or ``X-Admin-Token``.
"""

from __future__ import annotations

import hmac

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from governor.breaker.registry import breakers_for
from governor.config import BreakerConfig
from governor.errors import ConfigurationError, NotFound
from governor.runtime import Governor

_ACTIONS = {"open": "force_open", "close": "force_close", "clear": "clear_override"}


def admin_routes(
    governor: Governor,
    *,
    token: str,
    prefix: str = "/admin/breakers",
    config: BreakerConfig | None = None,
) -> list[Route]:
    """Starlette routes that show and override *governor*'s breakers, behind *token*."""
    if not token:
        raise ConfigurationError("breaker admin routes need a non-empty admin token")
    registry = breakers_for(governor, config)
    expected = token.encode()

    def authorised(request: Request) -> bool:
        given = request.headers.get("x-admin-token", "")
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        return hmac.compare_digest(given.encode(), expected)

    def denied() -> Response:
        return JSONResponse({"error": "admin token missing or wrong"}, status_code=401)

    async def list_all(request: Request) -> Response:
        if not authorised(request):
            return denied()
        return JSONResponse(await registry.states())

    async def show(request: Request) -> Response:
        if not authorised(request):
            return denied()
        states = await registry.states()
        model = request.path_params["model"]
        if model not in states:
            return JSONResponse({"error": f"unknown model {model!r}"}, status_code=404)
        return JSONResponse(states[model])

    async def act(request: Request) -> Response:
        if not authorised(request):
            return denied()
        model = request.path_params["model"]
        action = request.path_params["action"]
        try:
            if action == "reset":
                result = await registry.reset(model)
            elif action in _ACTIONS:
                result = await getattr(registry, _ACTIONS[action])(model)
            else:
                return JSONResponse({"error": f"unknown action {action!r}"}, status_code=404)
        except NotFound:
            return JSONResponse({"error": f"unknown model {model!r}"}, status_code=404)
        return JSONResponse(result)

    return [
        Route(prefix, list_all, methods=["GET"]),
        Route(prefix + "/{model}", show, methods=["GET"]),
        Route(prefix + "/{model}/{action}", act, methods=["POST"]),
    ]
