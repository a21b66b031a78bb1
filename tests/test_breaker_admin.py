"""The operator's breaker routes: token, listing, holding open or closed, reset."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette

from governor.backends import Backend
from governor.breaker import admin_routes
from governor.errors import ConfigurationError
from governor.runtime import Governor
from tests.breaker_support import Factory, Harness, harnesses

TOKEN = "s3cret-admin"


@pytest.fixture
async def make_harness(backend: Backend) -> AsyncIterator[Factory]:
    async for factory in harnesses(backend):
        yield factory


def admin_client(hn: Harness) -> httpx.AsyncClient:
    app = Starlette(routes=admin_routes(hn.governor, token=TOKEN))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://admin")


async def test_token_required(make_harness: Factory) -> None:
    """Without the admin token (or with a wrong one) every route answers 401."""
    async with admin_client(make_harness()) as client:
        assert (await client.get("/admin/breakers")).status_code == 401
        wrong = {"authorization": "Bearer nope"}
        assert (await client.post("/admin/breakers/gpt-5-5/open", headers=wrong)).status_code == 401


def test_empty_token_rejected() -> None:
    """Mounting the routes without a token is a configuration error."""
    with pytest.raises(ConfigurationError):
        admin_routes(Governor(), token="")


async def test_list_and_show(make_harness: Factory) -> None:
    """The listing has every catalog model, with its state and failure count."""
    hn = make_harness()
    await hn.fail(2)
    async with admin_client(hn) as client:
        listing = (await client.get("/admin/breakers", headers={"x-admin-token": TOKEN})).json()
        assert set(listing) == set(hn.governor.catalog)
        one = (await client.get("/admin/breakers/gpt-5-5", headers={"x-admin-token": TOKEN})).json()
    assert one["state"] == "closed"
    assert one["consecutive_failures"] == 2
    assert one["upstream"] == "openai"


async def test_open_close_reset(make_harness: Factory) -> None:
    """POST open holds the model open, close holds it closed, reset hands it back closed."""
    hn = make_harness()
    headers = {"authorization": f"Bearer {TOKEN}"}
    async with admin_client(hn) as client:
        opened = await client.post("/admin/breakers/gpt-5-5/open", headers=headers)
        assert opened.json()["state"] == "open"
        assert (await hn.request("ok")).status == 503
        await client.post("/admin/breakers/gpt-5-5/close", headers=headers)
        await hn.fail(4)
        assert hn.state() == "closed"
        await client.post("/admin/breakers/gpt-5-5/clear", headers=headers)
        await hn.fail(3)
        assert hn.state() == "open"
        reset = await client.post("/admin/breakers/gpt-5-5/reset", headers=headers)
        assert reset.json()["state"] == "closed"
        assert (await client.post("/admin/breakers/nope/open", headers=headers)).status_code == 404
        assert (
            await client.post("/admin/breakers/gpt-5-5/melt", headers=headers)
        ).status_code == 404
    assert (await hn.request("ok")).status == 200


async def test_forced_state_reaches_other_workers(make_harness: Factory) -> None:
    """In Redis mode a hold set on one worker applies on every worker."""
    a, b = make_harness(), make_harness()
    await b.request("ok")
    await a.breakers.force_open("gpt-5-5")
    await b.breakers.sync()
    expected = 503 if a.shared else 200
    assert (await b.request("ok")).status == expected
