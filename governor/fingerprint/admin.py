"""Operators: list, inspect, lift and impose key suspensions (Python API and HTTP routes)."""

from __future__ import annotations

import hmac
import logging
import re

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from governor.errors import ConfigurationError
from governor.fingerprint.store import FingerprintStore, Suspension, cleared_keys, store_for
from governor.runtime import Governor

log = logging.getLogger("governor.fingerprint")

KEY_ID = re.compile(r"^key_[0-9a-f]{16}$")


class Suspensions:
    """The suspensions of one governor's backend (memory: this process; Redis: the fleet).

    Keys are named by key id (``governor.key_id(raw_key)``), never by the raw key.
    """

    def __init__(self, governor: Governor) -> None:
        self.governor = governor
        self.store: FingerprintStore = store_for(governor.backend, governor.clock)
        self.cleared = cleared_keys(governor)

    async def list(self) -> list[Suspension]:
        return await self.store.suspensions()

    async def get(self, key_id: str) -> Suspension | None:
        return await self.store.suspension(key_id)

    async def lift(self, key_id: str, *, by: str = "operator") -> bool:
        """Lift *key_id*'s suspension (and its strikes). False if it was not suspended."""
        lifted = await self.store.lift(key_id)
        self.cleared.forget(key_id)
        log.warning(
            "fingerprint suspension lifted key=%s by=%s found=%s",
            key_id,
            by,
            lifted,
            extra={"fingerprint": {"action": "lift", "key_id": key_id, "by": by}},
        )
        return lifted

    async def suspend(
        self, key_id: str, *, reason: str = "operator", account: str = "", by: str = "operator"
    ) -> Suspension:
        """Suspend *key_id* now, whatever its strikes."""
        record = Suspension(
            key_id=key_id,
            account=account,
            reasons=(reason,),
            at=self.governor.clock.time(),
            by=by,
        )
        await self.store.suspend(record)
        self.cleared.forget(key_id)
        log.warning(
            "fingerprint key suspended by operator key=%s reason=%s",
            key_id,
            reason,
            extra={"fingerprint": {"action": "suspend", "key_id": key_id, "by": by}},
        )
        return record


def admin_routes(
    governor: Governor, *, token: str | None = None, prefix: str = "/admin/fingerprint"
) -> list[BaseRoute]:
    """Starlette routes for operators, behind ``Authorization: Bearer <admin token>``.

    - ``GET {prefix}/suspensions``: every suspension.
    - ``GET {prefix}/suspensions/{key_id}``: one (404 if not suspended).
    - ``PUT {prefix}/suspensions/{key_id}``: suspend now (JSON ``{"reason": ...}``, optional).
    - ``DELETE {prefix}/suspensions/{key_id}``: lift (404 if not suspended).

    *token* defaults to ``config.fingerprint.admin_token``; without one this raises
    :class:`ConfigurationError`, so the routes are never mounted open.
    """
    secret = token if token is not None else governor.config.fingerprint.admin_token
    if not secret:
        raise ConfigurationError(
            "fingerprint admin routes need a token: admin_routes(token=...) or "
            "fingerprint.admin_token (GOVERNOR_FINGERPRINT__ADMIN_TOKEN)"
        )
    expected = f"Bearer {secret}".encode()
    api = Suspensions(governor)

    def denied(request: Request) -> Response | None:
        given = request.headers.get("authorization", "").encode()
        if hmac.compare_digest(given, expected):
            return None
        return JSONResponse({"error": "admin token required"}, status_code=401)

    def bad_key(key_id: str) -> Response | None:
        if KEY_ID.match(key_id):
            return None
        return JSONResponse({"error": "expected a key id: key_ and 16 hex digits"}, 400)

    async def list_all(request: Request) -> Response:
        if (refused := denied(request)) is not None:
            return refused
        records = await api.list()
        return JSONResponse({"suspensions": [r.public() for r in records]})

    async def one(request: Request) -> Response:
        if (refused := denied(request)) is not None:
            return refused
        key_id = request.path_params["key_id"]
        if (invalid := bad_key(key_id)) is not None:
            return invalid
        if request.method == "GET":
            found = await api.get(key_id)
            if found is None:
                return JSONResponse({"error": "not suspended"}, 404)
            return JSONResponse(found.public())
        if request.method == "DELETE":
            if not await api.lift(key_id, by="admin-api"):
                return JSONResponse({"error": "not suspended"}, 404)
            return JSONResponse({"lifted": key_id})
        reason = "operator"
        if await request.body():
            try:
                data = await request.json()
            except ValueError:
                return JSONResponse({"error": "body must be JSON"}, 400)
            if isinstance(data, dict) and isinstance(data.get("reason"), str):
                reason = data["reason"][:200]
        record = await api.suspend(key_id, reason=reason, by="admin-api")
        return JSONResponse(record.public(), 201)

    return [
        Route(f"{prefix}/suspensions", list_all, methods=["GET"]),
        Route(f"{prefix}/suspensions/{{key_id}}", one, methods=["GET", "PUT", "DELETE"]),
    ]
