"""Upstream faults through the mock upstream and the demo forwarder: no charge for a
failure, the breaker counts it, the usage record says how it ended, and the caller gets
an error in its own API's shape."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import aiohttp
import pytest

from examples.serving import serve
from governor.types import Receive, Scope, Send
from tests.fault_support import (
    CHAT,
    MESSAGES,
    OPENING,
    chat,
    error_shape,
    full_stack,
    make_config,
    message,
)
from tests.faults_report import _Recorder


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    path: str
    stream: bool
    headers: dict[str, str]
    status: int
    outcome: str
    verdict: str
    charged: bool = False
    error: bool = True  # the caller gets an error body (or stream event) in its shape


CASES = [
    Case("upstream 500", CHAT, False, {"x-mock-status": "500"}, 500, "upstream_error", "failure"),
    Case("upstream 503", CHAT, False, {"x-mock-status": "503"}, 503, "upstream_error", "failure"),
    Case(
        "upstream 529 (Anthropic overloaded)",
        MESSAGES,
        False,
        {"x-mock-status": "529"},
        529,
        "upstream_error",
        "failure",
    ),
    Case(
        "upstream 429 with retry-after",
        CHAT,
        False,
        {"x-mock-status": "429", "x-mock-retry-after": "3"},
        429,
        "upstream_error",
        "failure",
    ),
    Case(
        "upstream timeout (no first byte)",
        CHAT,
        False,
        {"x-mock-first-byte-ms": "3000"},
        504,
        "upstream_error",
        "failure",
    ),
    Case(
        "upstream timeout (Anthropic)",
        MESSAGES,
        False,
        {"x-mock-first-byte-ms": "3000"},
        504,
        "upstream_error",
        "failure",
    ),
    Case(
        "connection cut mid-stream",
        CHAT,
        True,
        {"x-mock-drop-after-chunks": "2"},
        200,
        "stream_broken",
        "failure",
    ),
    Case(
        "connection cut mid-stream (Anthropic)",
        MESSAGES,
        True,
        {"x-mock-drop-after-chunks": "2"},
        200,
        "stream_broken",
        "failure",
    ),
    Case(
        "connection cut mid-body (non-streaming)",
        CHAT,
        False,
        {"x-mock-drop-after-chunks": "1"},
        0,
        "exception",
        "failure",
        error=False,
    ),
    Case(
        "missing usage (non-streaming)",
        CHAT,
        False,
        {"x-mock-no-usage": "1"},
        200,
        "success",
        "success",
        charged=True,
        error=False,
    ),
    Case(
        "missing usage (stream)",
        MESSAGES,
        True,
        {"x-mock-no-usage": "1"},
        200,
        "success",
        "success",
        charged=True,
        error=False,
    ),
]


def _body(case: Case) -> dict[str, Any]:
    return chat(stream=case.stream) if case.path == CHAT else message(stream=case.stream)


def _upstream(path: str) -> str:
    return "openai" if path == CHAT else "anthropic"


def _model(path: str) -> str:
    return "gpt-5-5" if path == CHAT else "claude-sonnet-4-7"


def _stream_error_in_shape(body: bytes, path: str) -> bool:
    """The broken stream ends with an error event in the caller's dialect."""
    last = body.rstrip().rsplit(b"\n\n", 1)[-1]
    event, _, data = last.partition(b"data: ")
    try:
        payload = json.loads(data)
    except ValueError:
        return False
    if path == CHAT:
        return not event.strip() and isinstance(payload.get("error"), dict)
    return (
        event.strip() == b"event: error"
        and payload.get("type") == "error"
        and isinstance(payload.get("error"), dict)
    )


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_upstream_fault(case: Case, faults: _Recorder) -> None:
    """Each upstream fault: charge, breaker verdict, record outcome and error shape."""
    async with full_stack(make_config(), read_timeout_s=0.3) as stack:
        try:
            result = await stack.call(case.path, _body(case), headers=case.headers)
        except aiohttp.ClientPayloadError:
            # A JSON body cut short: the gateway aborts the connection (nothing better
            # to say once a 200 may be on its way); the client sees a cut.
            status = 0
        else:
            status = result.status
        assert status == case.status
        if case.error and not case.stream:
            assert error_shape(result, case.path) is None
        elif case.error:
            assert _stream_error_in_shape(result.body, case.path), result.body[-300:]
        (record,) = await stack.records()
        assert record.outcome == case.outcome
        balance, held, live = await stack.ledger()
        assert (held, live) == (0, 0)
        assert await stack.slots(_model(case.path)) == (0, 0)
        if case.charged:
            assert record.credits_charged == record.credits_reserved > 0
            assert balance == OPENING - record.credits_charged
        else:
            assert record.credits_charged == 0
            assert balance == OPENING
        verdicts = {
            v: stack.metric(
                "governor_breaker_outcomes_total",
                model=_model(case.path),
                upstream=_upstream(case.path),
                verdict=v,
            )
            for v in ("success", "failure", "neutral")
        }
        assert verdicts[case.verdict] == 1, verdicts
    charge = f"charged the reservation ({record.credits_charged})" if case.charged else "0 charged"
    faults.record(
        case.name,
        f"billing, breaker, usage log / mock upstream ({_upstream(case.path)})",
        "charged the reservation (the documented worst case); breaker success"
        if case.charged
        else "no charge for a failure; breaker counts it; caller gets its own error shape",
        f"{case.status or 'connection aborted'} to the caller"
        f"{' in its shape' if case.error else ''}; {charge}; "
        f"0 slots or credits held; breaker `{case.verdict}`; record `{case.outcome}`",
    )


async def _malformed(scope: Scope, receive: Receive, send: Send) -> None:
    """An upstream answering 200 with a JSON body cut short."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    body = b'{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,'
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def test_malformed_body(faults: _Recorder) -> None:
    """A 2xx body that is not JSON is passed on untouched and not charged."""
    async with serve(_malformed) as url, full_stack(make_config(), upstream_url=url) as stack:
        result = await stack.call(CHAT, chat())
        assert result.status == 200
        assert result.body.startswith(b'{"id":"chatcmpl-1"')
        with pytest.raises(json.JSONDecodeError):
            json.loads(result.body)
        (record,) = await stack.records()
        balance, held, live = await stack.ledger()
        assert (balance, held, live) == (OPENING, 0, 0)
        assert record.credits_charged == 0
    faults.record(
        "malformed body (2xx JSON cut short)",
        "billing, usage log / custom upstream",
        "passed on untouched; not charged",
        f"200 passed on byte for byte; 0 charged, 0 held; record `{record.outcome}`",
    )
