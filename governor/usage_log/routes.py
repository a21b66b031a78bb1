"""``GET /v1/managed/usage``: the calling key's own latest usage records and balance.

Authenticated with the same key as the API (``Authorization: Bearer`` or
``x-api-key``); a key only ever sees its own records. ``?limit=N`` (1-1000, default 50).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from governor.billing.middleware import ledger_for, opening_balance
from governor.context import extract_key, resolve_key
from governor.errors import BackendError, BadRequest, Overloaded, RequestError, Shape, error_body
from governor.keys import key_id
from governor.runtime import Governor
from governor.usage_log.sinks import sink_for

DEFAULT_LIMIT = 50
MAX_LIMIT = 1_000


def _error(exc: RequestError) -> Response:
    return Response(
        error_body(exc, Shape.OPENAI, None),
        status_code=exc.status_for(Shape.OPENAI),
        media_type="application/json",
    )


def usage_routes(governor: Governor, *, path: str = "/v1/managed/usage") -> list[Route]:
    """Starlette routes serving each key its own usage records (mount them in your app)."""
    sink = sink_for(governor)
    ledger = ledger_for(governor)

    async def usage(request: Request) -> Response:
        try:
            api_key = extract_key(list(request.scope.get("headers", ())))
            policy = await resolve_key(governor.keys, api_key)
            raw = request.query_params.get("limit", str(DEFAULT_LIMIT))
            if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
                raise BadRequest(
                    f"'limit' must be an integer between 1 and {MAX_LIMIT}.",
                    param="limit",
                    code="invalid_value",
                )
            kid = key_id(api_key)
            try:
                records = await sink.recent(kid, int(raw))
                balance = await ledger.balance(
                    policy.account, opening_balance(governor, policy.account)
                )
                spent = await ledger.spent(policy.account, kid)
            except BackendError:
                raise Overloaded("Usage records are unavailable; try again shortly.") from None
        except RequestError as exc:
            return _error(exc)
        return JSONResponse(
            {
                "object": "list",
                "key_id": kid,
                "account": policy.account,
                "balance": balance,
                "spent": {"lifetime": spent.lifetime, "hour": spent.hour, "day": spent.day},
                "limits": {
                    "spending_limit": policy.spending_limit,
                    "hourly_budget": policy.hourly_budget,
                    "daily_budget": policy.daily_budget,
                },
                "data": [r.as_json() for r in records],
            }
        )

    return [Route(path, usage, methods=["GET"])]
