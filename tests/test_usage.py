"""Usage from every surface's response, streaming and not, and the response observer."""

from __future__ import annotations

import json
from typing import Any

import pytest

from governor.response import Outcome, ResponseObserver
from governor.usage import Usage, from_body, from_event


@pytest.mark.parametrize(
    ("payload", "usage"),
    [
        (
            {
                "object": "chat.completion",
                "usage": {
                    "prompt_tokens": 100,
                    "completion_tokens": 20,
                    "prompt_tokens_details": {"cached_tokens": 60},
                },
            },
            Usage(40, 20, 60, 0),
        ),
        (
            {
                "object": "response",
                "usage": {
                    "input_tokens": 50,
                    "output_tokens": 5,
                    "input_tokens_details": {"cached_tokens": 10},
                },
            },
            Usage(40, 5, 10, 0),
        ),
        (
            {
                "type": "message",
                "usage": {
                    "input_tokens": 7,
                    "output_tokens": 3,
                    "cache_read_input_tokens": 100,
                    "cache_creation_input_tokens": 20,
                },
            },
            Usage(7, 3, 100, 20),
        ),
        ({"data": [], "usage": {"input_tokens": 12, "output_tokens": 4000}}, Usage(12, 4000, 0, 0)),
        ({"object": "chat.completion"}, None),
    ],
)
def test_from_body(payload: dict[str, Any], usage: Usage | None) -> None:
    """Cached input is split out of OpenAI's totals and kept apart for Anthropic."""
    assert from_body(payload) == usage


def test_anthropic_stream_events() -> None:
    """message_start gives input and cache; message_delta's cumulative output wins."""
    u = from_event(
        {
            "type": "message_start",
            "message": {
                "usage": {"input_tokens": 9, "cache_read_input_tokens": 50, "output_tokens": 1}
            },
        },
        None,
    )
    u = from_event({"type": "content_block_delta"}, u)
    u = from_event({"type": "message_delta", "usage": {"output_tokens": 42}}, u)
    assert u == Usage(9, 42, 50, 0)


def test_responses_stream_events() -> None:
    u = from_event(
        {
            "type": "response.completed",
            "response": {"usage": {"input_tokens": 10, "output_tokens": 2}},
        },
        None,
    )
    assert u == Usage(10, 2, 0, 0)


def feed(observer: ResponseObserver, ctype: bytes, chunks: list[bytes], status: int = 200) -> None:
    observer.on_start({"status": status, "headers": [(b"content-type", ctype)]}, 1.0)
    for i, chunk in enumerate(chunks):
        observer.on_body({"body": chunk, "more_body": i < len(chunks) - 1}, 2.0 + i)


def test_observer_json() -> None:
    observer = ResponseObserver()
    body = json.dumps({"usage": {"prompt_tokens": 3, "completion_tokens": 4}}).encode()
    feed(observer, b"application/json", [body[:10], body[10:]])
    assert observer.usage == Usage(3, 4, 0, 0)
    assert observer.complete
    assert observer.first_byte_at == 2.0
    assert observer.finished_at == 3.0
    assert observer.outcome(refused=False, disconnected=False, exc=None) is Outcome.SUCCESS


def test_observer_sse_split_lines() -> None:
    """An SSE usage chunk split across body messages is still read."""
    observer = ResponseObserver()
    line = b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":6}}\n\n'
    feed(
        observer,
        b"text/event-stream",
        [b'data: {"choices":[{}]}\n\n', line[:20], line[20:], b"data: [DONE]\n\n"],
    )
    assert observer.usage == Usage(5, 6, 0, 0)


def test_observer_stream_error_event() -> None:
    """An error event after a 200 marks the stream broken."""
    observer = ResponseObserver()
    feed(
        observer,
        b"text/event-stream",
        [b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error"}}\n\n'],
    )
    assert observer.stream_error
    assert observer.outcome(refused=False, disconnected=False, exc=None) is Outcome.STREAM_BROKEN


@pytest.mark.parametrize(
    ("status", "kwargs", "outcome"),
    [
        (500, {}, Outcome.UPSTREAM_ERROR),
        (529, {}, Outcome.UPSTREAM_ERROR),
        (429, {}, Outcome.UPSTREAM_ERROR),
        (400, {}, Outcome.CLIENT_ERROR),
        (429, {"refused": True}, Outcome.REFUSED),
    ],
)
def test_outcomes(status: int, kwargs: dict[str, bool], outcome: Outcome) -> None:
    observer = ResponseObserver()
    feed(observer, b"application/json", [b"{}"], status=status)
    args = {"refused": False, "disconnected": False, **kwargs}
    assert observer.outcome(exc=None, **args) is outcome


def test_outcome_disconnect_and_cancel() -> None:
    import asyncio

    observer = ResponseObserver()
    observer.on_start({"status": 200, "headers": []}, 1.0)
    observer.on_body({"body": b"x", "more_body": True}, 1.5)
    assert observer.outcome(refused=False, disconnected=True, exc=None) is Outcome.DISCONNECTED
    assert (
        observer.outcome(refused=False, disconnected=False, exc=asyncio.CancelledError())
        is Outcome.CANCELLED
    )
    assert (
        ResponseObserver().outcome(refused=False, disconnected=False, exc=RuntimeError())
        is Outcome.EXCEPTION
    )
