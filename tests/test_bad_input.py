"""Every bad input gets a clear 4xx in the caller's shape and consumes nothing."""

from __future__ import annotations

from typing import Any

import pytest

from governor import Governor
from governor.backends import Backend
from governor.config import Config, KeyEntry
from governor.stack import ContextMiddleware
from tests.apps import EchoApp
from tests.helpers import Result, auth, call

CHAT = "/v1/managed/chat/completions"
MESSAGES = "/v1/managed/messages"
IMAGES = "/v1/managed/images/generations"


@pytest.fixture
def governor() -> Governor:
    config = Config(keys={"alice": KeyEntry(account="acme", key="ck_alice")})
    return Governor(config)


def assert_shape(result: Result, path: str, status: int) -> dict[str, Any]:
    assert result.status == status, result.body
    body = result.json()
    if path.startswith(("/v1/messages", MESSAGES)):
        assert body["type"] == "error"
        assert set(body["error"]) >= {"type", "message"}
        assert body["request_id"].startswith("req_")
        return dict(body["error"])
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


CASES: list[tuple[str, dict[str, str] | None, bytes, int, str]] = [
    ("not json", None, b"{nope", 400, "invalid_json"),
    ("empty body", None, b"", 400, "invalid_json"),
    ("json array", None, b"[1, 2]", 400, "invalid_json"),
    ("json string", None, b'"hi"', 400, "invalid_json"),
    ("model missing", None, b'{"messages": []}', 400, "missing_model"),
    ("model empty", None, b'{"model": "  "}', 400, "invalid_model"),
    ("model not a string", None, b'{"model": 5}', 400, "invalid_model"),
    ("unknown model", None, b'{"model": "gpt-9"}', 404, "model_not_found"),
    ("invalid utf-8", None, b'{"model": "gpt-5-5", "x": "\xff\xfe"}', 400, "invalid_encoding"),
    ("negative cap", None, b'{"model": "gpt-5-5", "max_tokens": -1}', 400, "invalid_value"),
    ("zero cap", None, b'{"model": "gpt-5-5", "max_completion_tokens": 0}', 400, "invalid_value"),
    ("absurd cap", None, b'{"model": "gpt-5-5", "max_tokens": 10000000000}', 400, "invalid_value"),
    ("cap not int", None, b'{"model": "gpt-5-5", "max_tokens": "10"}', 400, "invalid_type"),
    ("cap bool", None, b'{"model": "gpt-5-5", "max_output_tokens": true}', 400, "invalid_type"),
    ("stream not bool", None, b'{"model": "gpt-5-5", "stream": "yes"}', 400, "invalid_type"),
    ("missing key", {}, b'{"model": "gpt-5-5"}', 401, "missing_api_key"),
    ("unknown key", auth("ck_nobody"), b'{"model": "gpt-5-5"}', 401, "invalid_api_key"),
    ("basic auth", {"authorization": "Basic abc"}, b'{"model": "gpt-5-5"}', 401, "invalid_api_key"),
    (
        "two keys",
        {"authorization": "Bearer ck_alice", "x-api-key": "ck_other"},
        b'{"model": "gpt-5-5"}',
        400,
        "conflicting_api_keys",
    ),
]


@pytest.mark.parametrize("path", [CHAT, MESSAGES, "/v1/messages"])
@pytest.mark.parametrize(
    ("name", "headers", "body", "status", "code"), CASES, ids=[c[0] for c in CASES]
)
async def test_bad_input(
    governor: Governor,
    path: str,
    name: str,
    headers: dict[str, str] | None,
    body: bytes,
    status: int,
    code: str,
) -> None:
    """Refused in the caller's shape, and the app never sees it."""
    app = EchoApp()
    result = await call(
        ContextMiddleware(app, governor=governor),
        path=path,
        headers=auth("ck_alice") if headers is None else headers,
        body=body,
    )
    error = assert_shape(result, path, status)
    if not path.startswith(("/v1/messages", MESSAGES)):
        assert error["code"] == code
    assert app.calls == []
    assert "ck_alice" not in result.body.decode(errors="replace")


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        ({"model": "gpt-image-2", "prompt": "p", "n": 0}, "invalid_value"),
        ({"model": "gpt-image-2", "prompt": "p", "n": 11}, "invalid_value"),
        ({"model": "gpt-image-2", "prompt": "p", "n": 2.5}, "invalid_type"),
        ({"model": "gpt-image-2"}, "invalid_prompt"),
        ({"model": "gpt-5-5", "prompt": "p"}, "model_not_image_capable"),
    ],
)
async def test_bad_image_requests(governor: Governor, payload: dict[str, Any], code: str) -> None:
    """Image counts out of range and non-image models on the images surface are 400."""
    app = EchoApp()
    result = await call(
        ContextMiddleware(app, governor=governor),
        path=IMAGES,
        headers=auth("ck_alice"),
        json_body=payload,
    )
    assert assert_shape(result, IMAGES, 400)["code"] == code
    assert app.calls == []


async def test_bad_modalities(governor: Governor) -> None:
    """``modalities`` that is not a list of strings is 400."""
    app = EchoApp()
    result = await call(
        ContextMiddleware(app, governor=governor),
        headers=auth("ck_alice"),
        json_body={"model": "nano-banana-2", "modalities": "image"},
    )
    assert assert_shape(result, CHAT, 400)["param"] == "modalities"


async def test_body_too_large_declared() -> None:
    """A Content-Length over the bound is 413 before the body is read."""
    governor = Governor(Config(demo_keys=True, max_body_bytes=100))
    app = EchoApp()
    result = await call(
        ContextMiddleware(app, governor=governor),
        path=MESSAGES,
        headers={**auth(), "content-length": "1000"},
        body=b"x" * 1000,
    )
    error = assert_shape(result, MESSAGES, 413)
    assert error["type"] == "request_too_large"
    assert app.calls == []


async def test_body_too_large_streamed() -> None:
    """A body that grows past the bound while streaming in is 413."""
    governor = Governor(Config(demo_keys=True, max_body_bytes=100))
    app = EchoApp()
    result = await call(
        ContextMiddleware(app, governor=governor), headers=auth(), chunks=[b"x" * 60, b"x" * 60]
    )
    assert assert_shape(result, CHAT, 413)["code"] == "request_too_large"
    assert app.calls == []


@pytest.mark.parametrize(
    ("method", "path"), [("GET", CHAT), ("PUT", MESSAGES), ("POST", "/v1/managed/models")]
)
async def test_wrong_method(governor: Governor, method: str, path: str) -> None:
    """A wrong method on a governed path is 405 with Allow."""
    app = EchoApp()
    result = await call(
        ContextMiddleware(app, governor=governor), method, path, headers=auth("ck_alice")
    )
    assert_shape(result, path, 405)
    assert result.header("allow") in ("POST", "GET")
    assert app.calls == []


async def test_bad_input_counted(governor: Governor) -> None:
    """Refusals while parsing are counted by code."""
    await call(
        ContextMiddleware(EchoApp(), governor=governor), headers=auth("ck_alice"), body=b"{nope"
    )
    value = governor.metrics.registry.get_sample_value(
        "governor_bad_requests_total", {"code": "invalid_json"}
    )
    assert value == 1


async def test_bad_input_consumes_nothing_in_the_full_stack(backend: Backend) -> None:
    """After a run of bad requests through every layer, a good request still sees the
    first slot, the first request of the minute and the untouched balance."""
    from governor import wrap
    from governor.billing import ledger_for

    config = Config(keys={"alice": KeyEntry(account="acme", key="ck_alice")})
    governor = Governor(config, backend=backend)
    app = wrap(EchoApp(), governor)
    bad = [
        (CHAT, b"{nope"),
        (CHAT, b"[]"),
        (MESSAGES, b'{"model": 5}'),
        (CHAT, b'{"model": "gpt-9"}'),
        (CHAT, b'{"model": "gpt-5-5", "max_tokens": -1}'),
        (IMAGES, b'{"model": "gpt-image-2", "prompt": "p", "n": 0}'),
    ]
    for path, body in bad:
        result = await call(app, path=path, headers=auth("ck_alice"), body=body)
        assert 400 <= result.status < 500
    result = await call(
        app, headers=auth("ck_alice"), json_body={"model": "gpt-5-5", "messages": []}
    )
    assert result.status == 200
    assert result.header("X-Hypereal-Managed-Model-RPM-Remaining") == "14999"
    assert result.header("X-Hypereal-Capacity-Requests-Remaining") == "9999"
    assert result.header("X-Hypereal-Managed-Model-Concurrency-Remaining") == "79"
    balance_after = result.json()["hypereal"]["billing"]["balance_before"]
    assert balance_after == governor.config.billing.default_balance
    assert await ledger_for(governor).balance("acme", 0) < balance_after
    await governor.aclose()
