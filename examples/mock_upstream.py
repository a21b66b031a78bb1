"""A fast mock of the OpenAI and Anthropic APIs, with fault injection per request.

``python examples/mock_upstream.py --port 9000`` serves, at its root:

- ``POST /v1/chat/completions``: chat completions with ``usage``; streaming ends with
  the usage chunk when ``stream_options.include_usage`` is set, then ``data: [DONE]``;
  ``modalities: ["image", "text"]`` adds a base64 PNG data URL to the message
  (``message.images``, as OpenAI-compatible image gateways answer);
- ``POST /v1/responses``: the Responses API, plain or streamed (``response.created`` …
  ``response.output_text.delta`` … ``response.completed`` with usage);
- ``POST /v1/images/generations``: ``b64_json`` images with gpt-image usage;
- ``POST /v1/messages``: Anthropic messages with usage (cache read/creation fields
  included) and the full event sequence when streaming (``message_start``,
  ``content_block_start``, ``ping``, ``content_block_delta``…, ``content_block_stop``,
  ``message_delta`` with usage, ``message_stop``);
- ``POST /v1/messages/count_tokens``: ``{"input_tokens": n}``.

Usage is a deterministic function of the request: input tokens are the body's length
in bytes / 4 (at least 1; with ``cache_control`` in an Anthropic body, half of it is
reported as a cache read and a quarter as a cache write; with ``prompt_cache_key`` in an
OpenAI body, half is reported as cached); output tokens are the number of reply
chunks (``X-Mock-Chunks``, default 4), capped by the request's ``max_tokens``.

Fault injection, by request header (milliseconds as numbers):

``X-Mock-Latency-Ms``        total time: before the answer, or spread over a stream
``X-Mock-First-Byte-Ms``     wait before the response starts
``X-Mock-Chunk-Delay-Ms``    wait between stream chunks
``X-Mock-Chunks``            how many text chunks (and output tokens)
``X-Mock-Status``            answer this status with a body in the API's error shape
``X-Mock-Retry-After``       ``retry-after`` value sent with an ``X-Mock-Status`` error
``X-Mock-Drop-After-Chunks`` cut the connection after this many chunks
``X-Mock-No-Usage``          leave usage out of the answer

Load statistics, for the benchmarks' invariant checks (the mock is one process, so
they are exact whatever sits in front of it): ``GET /mock/stats[?window_s=60]`` answers
the requests answered, in flight now and the highest in flight since the last reset,
in all and per model, with the requests per fixed window since the reset and the most
seen in any sliding window of ``window_s``; ``POST /mock/stats/reset`` starts afresh.

In-process use (tests, the demo): :class:`MockUpstream` is the ASGI app and records
what it saw (``requests``, ``disconnects``; events ``arrived`` and ``left``);
``examples.serving.serve(app)`` runs it on a free port of the running loop,
``ServerThread(app).start()`` on a thread of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import logging
import time
import urllib.parse
import uuid
from collections.abc import Callable, Mapping
from typing import Any

if __package__ in (None, ""):  # run as a script: make the `examples` package importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.serving import DropFilter
from governor.types import Message, Receive, Scope, Send

# A 1x1 PNG: the smallest image every decoder accepts.
PNG_B64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQ"
    "GAhKmMIQAAAABJRU5ErkJggg=="
)
WORDS = ("Hello", "from", "the", "mock", "upstream,", "a", "deterministic", "reply.")
DEFAULT_CHUNKS = 4
# Output tokens one generated image costs (gpt-image-1 at low quality, 1024x1024).
IMAGE_OUTPUT_TOKENS = 272

OPENAI_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}
ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}


class MockDrop(Exception):
    """Raised to make the server cut the connection (X-Mock-Drop-After-Chunks)."""


_DROP_FILTER = DropFilter(MockDrop)


@dataclasses.dataclass(frozen=True)
class SeenRequest:
    """One request the mock received, for tests to inspect."""

    method: str
    path: str
    query: str
    headers: Mapping[str, str]
    body: bytes


@dataclasses.dataclass(frozen=True)
class Faults:
    """The fault-injection headers of one request."""

    latency_ms: float = 0.0
    first_byte_ms: float | None = None
    chunk_delay_ms: float | None = None
    chunks: int = DEFAULT_CHUNKS
    status: int | None = None
    retry_after: str | None = None
    drop_after: int | None = None
    no_usage: bool = False

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> Faults:
        def number(name: str) -> float | None:
            raw = headers.get(name)
            return float(raw) if raw not in (None, "") else None

        chunks = number("x-mock-chunks")
        status = number("x-mock-status")
        drop = number("x-mock-drop-after-chunks")
        return cls(
            latency_ms=number("x-mock-latency-ms") or 0.0,
            first_byte_ms=number("x-mock-first-byte-ms"),
            chunk_delay_ms=number("x-mock-chunk-delay-ms"),
            chunks=max(1, int(chunks)) if chunks is not None else DEFAULT_CHUNKS,
            status=int(status) if status is not None else None,
            retry_after=headers.get("x-mock-retry-after"),
            drop_after=int(drop) if drop is not None else None,
            no_usage=headers.get("x-mock-no-usage", "").lower() not in ("", "0", "false"),
        )

    def first_byte_s(self, stream: bool, chunks: int) -> float:
        if self.first_byte_ms is not None:
            return self.first_byte_ms / 1000
        if not stream:
            return self.latency_ms / 1000
        return self.latency_ms / 1000 / (chunks + 1)

    def chunk_delay_s(self, chunks: int) -> float:
        if self.chunk_delay_ms is not None:
            return self.chunk_delay_ms / 1000
        return self.latency_ms / 1000 / (chunks + 1)


@dataclasses.dataclass
class Reply:
    """What the mock generates for one request: its text chunks and token counts."""

    model: str
    chunks: list[str]
    input_tokens: int
    cache_read: int
    cache_write: int
    truncated: bool

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    @property
    def output_tokens(self) -> int:
        return len(self.chunks)


def make_reply(payload: Mapping[str, Any], body: bytes, faults: Faults, anthropic: bool) -> Reply:
    count = faults.chunks
    cap = payload.get("max_tokens") or payload.get("max_completion_tokens")
    cap = cap or payload.get("max_output_tokens")
    truncated = False
    if isinstance(cap, int) and 0 < cap < count:
        count, truncated = cap, True
    chunks = [WORDS[i % len(WORDS)] + (" " if i < count - 1 else "") for i in range(count)]
    tokens = max(1, len(body) // 4)
    cache_read = cache_write = 0
    if anthropic and b'"cache_control"' in body:
        cache_read, cache_write = tokens // 2, tokens // 4
    elif not anthropic and b'"prompt_cache_key"' in body:
        cache_read = tokens // 2
    model = payload.get("model")
    return Reply(
        model=model if isinstance(model, str) else "mock",
        chunks=chunks,
        input_tokens=tokens,
        cache_read=cache_read,
        cache_write=cache_write,
        truncated=truncated,
    )


def _id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


def _json(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def _sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


# A stream event: its bytes, and whether it is a text chunk (delays and drops count those).
Event = tuple[bytes, bool]


def _mark(head: list[bytes], text: list[bytes], tail: list[bytes]) -> list[Event]:
    return [(e, False) for e in head] + [(e, True) for e in text] + [(e, False) for e in tail]


# --- OpenAI ---------------------------------------------------------------------------


def chat_usage(reply: Reply) -> dict[str, Any]:
    return {
        "prompt_tokens": reply.input_tokens,
        "completion_tokens": reply.output_tokens,
        "total_tokens": reply.input_tokens + reply.output_tokens,
        "prompt_tokens_details": {"cached_tokens": reply.cache_read, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    }


def chat_images(payload: Mapping[str, Any]) -> list[dict[str, Any]]:
    modalities = payload.get("modalities")
    if not isinstance(modalities, list) or "image" not in modalities:
        return []
    n = payload.get("n")
    count = n if isinstance(n, int) and n > 0 else 1
    url = "data:image/png;base64," + PNG_B64
    return [{"type": "image_url", "image_url": {"url": url}} for _ in range(count)]


def chat_body(payload: Mapping[str, Any], reply: Reply, faults: Faults) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.text, "refusal": None}
    images = chat_images(payload)
    if images:
        message["images"] = images
    body: dict[str, Any] = {
        "id": _id("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": reply.model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": "length" if reply.truncated else "stop",
            }
        ],
        "system_fingerprint": "fp_mock",
    }
    if not faults.no_usage:
        body["usage"] = chat_usage(reply)
    return body


def chat_events(payload: Mapping[str, Any], reply: Reply, faults: Faults) -> list[Event]:
    base = {
        "id": _id("chatcmpl-"),
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": reply.model,
        "system_fingerprint": "fp_mock",
    }

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return _sse({**base, "choices": [choice]})

    events = [(chunk({"role": "assistant", "content": ""}), False)]
    events += [(chunk({"content": text}), True) for text in reply.chunks]
    images = chat_images(payload)
    if images:
        events.append((chunk({"images": images}), False))
    events.append((chunk({}, "length" if reply.truncated else "stop"), False))
    options = payload.get("stream_options")
    if isinstance(options, Mapping) and options.get("include_usage") and not faults.no_usage:
        events.append((_sse({**base, "choices": [], "usage": chat_usage(reply)}), False))
    events.append((b"data: [DONE]\n\n", False))
    return events


def responses_usage(reply: Reply) -> dict[str, Any]:
    return {
        "input_tokens": reply.input_tokens,
        "input_tokens_details": {"cached_tokens": reply.cache_read},
        "output_tokens": reply.output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": reply.input_tokens + reply.output_tokens,
    }


def response_object(
    reply: Reply, faults: Faults, *, resp_id: str, item_id: str, done: bool
) -> dict[str, Any]:
    item = {
        "type": "message",
        "id": item_id,
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": reply.text, "annotations": []}],
    }
    return {
        "id": resp_id,
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed" if done else "in_progress",
        "model": reply.model,
        "output": [item] if done else [],
        "usage": responses_usage(reply) if done and not faults.no_usage else None,
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "metadata": {},
        "parallel_tool_calls": True,
        "temperature": 1.0,
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
    }


def responses_body(payload: Mapping[str, Any], reply: Reply, faults: Faults) -> dict[str, Any]:
    obj = response_object(reply, faults, resp_id=_id("resp_"), item_id=_id("msg_"), done=True)
    if faults.no_usage:
        obj.pop("usage")
    return obj


def responses_events(payload: Mapping[str, Any], reply: Reply, faults: Faults) -> list[Event]:
    resp_id, item_id = _id("resp_"), _id("msg_")
    seq = 0

    def event(kind: str, **fields: Any) -> bytes:
        nonlocal seq
        seq += 1
        return _sse({"type": kind, "sequence_number": seq - 1, **fields}, kind)

    started = response_object(reply, faults, resp_id=resp_id, item_id=item_id, done=False)
    finished = response_object(reply, faults, resp_id=resp_id, item_id=item_id, done=True)
    if faults.no_usage:
        finished.pop("usage")
    part = {"type": "output_text", "text": "", "annotations": []}
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    item = {**finished["output"][0], "status": "in_progress", "content": []}
    head = [
        event("response.created", response=started),
        event("response.in_progress", response=started),
        event("response.output_item.added", output_index=0, item=item),
        event("response.content_part.added", **where, part=part),
    ]
    text = [
        event("response.output_text.delta", **where, delta=t, logprobs=[]) for t in reply.chunks
    ]
    tail = [
        event("response.output_text.done", **where, text=reply.text, logprobs=[]),
        event("response.content_part.done", **where, part={**part, "text": reply.text}),
        event("response.output_item.done", output_index=0, item=finished["output"][0]),
        event("response.completed", response=finished),
    ]
    return _mark(head, text, tail)


def images_body(payload: Mapping[str, Any], reply: Reply, faults: Faults) -> dict[str, Any]:
    n = payload.get("n")
    count = n if isinstance(n, int) and n > 0 else 1
    body: dict[str, Any] = {
        "created": int(time.time()),
        "data": [{"b64_json": PNG_B64} for _ in range(count)],
        "background": "opaque",
        "output_format": "png",
        "quality": "low",
        "size": payload.get("size", "1024x1024"),
    }
    if not faults.no_usage:
        output = IMAGE_OUTPUT_TOKENS * count
        body["usage"] = {
            "input_tokens": reply.input_tokens,
            "input_tokens_details": {"text_tokens": reply.input_tokens, "image_tokens": 0},
            "output_tokens": output,
            "total_tokens": reply.input_tokens + output,
        }
    return body


# --- Anthropic ------------------------------------------------------------------------


def anthropic_usage(reply: Reply, output: int) -> dict[str, Any]:
    return {
        "input_tokens": reply.input_tokens - reply.cache_read - reply.cache_write,
        "cache_creation_input_tokens": reply.cache_write,
        "cache_read_input_tokens": reply.cache_read,
        "output_tokens": output,
        "service_tier": "standard",
    }


def messages_body(payload: Mapping[str, Any], reply: Reply, faults: Faults) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": _id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": reply.model,
        "content": [{"type": "text", "text": reply.text}],
        "stop_reason": "max_tokens" if reply.truncated else "end_turn",
        "stop_sequence": None,
    }
    if not faults.no_usage:
        body["usage"] = anthropic_usage(reply, reply.output_tokens)
    return body


def messages_events(payload: Mapping[str, Any], reply: Reply, faults: Faults) -> list[Event]:
    start = messages_body(payload, reply, faults)
    start.update(content=[], stop_reason=None)
    if not faults.no_usage:
        start["usage"] = anthropic_usage(reply, 1)
    delta: dict[str, Any] = {
        "type": "message_delta",
        "delta": {"stop_reason": "max_tokens" if reply.truncated else "end_turn"},
    }
    delta["delta"]["stop_sequence"] = None
    if not faults.no_usage:
        delta["usage"] = {"output_tokens": reply.output_tokens}
    head = [
        _sse({"type": "message_start", "message": start}, "message_start"),
        _sse(
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
            "content_block_start",
        ),
        _sse({"type": "ping"}, "ping"),
    ]
    text = [
        _sse(
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}},
            "content_block_delta",
        )
        for t in reply.chunks
    ]
    tail = [
        _sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
        _sse(delta, "message_delta"),
        _sse({"type": "message_stop"}, "message_stop"),
    ]
    return _mark(head, text, tail)


def count_tokens_body(payload: Mapping[str, Any], reply: Reply, faults: Faults) -> dict[str, Any]:
    return {"input_tokens": reply.input_tokens}


# --- the app --------------------------------------------------------------------------

Builder = Callable[[Mapping[str, Any], Reply, Faults], Any]


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """One API route of the mock: its dialect and how it answers."""

    anthropic: bool
    body: Builder
    events: Callable[[Mapping[str, Any], Reply, Faults], list[Event]] | None = None


ENDPOINTS: dict[str, Endpoint] = {
    "/v1/chat/completions": Endpoint(False, chat_body, chat_events),
    "/v1/responses": Endpoint(False, responses_body, responses_events),
    "/v1/images/generations": Endpoint(False, images_body),
    "/v1/messages": Endpoint(True, messages_body, messages_events),
    "/v1/messages/count_tokens": Endpoint(True, count_tokens_body),
}


def error_payload(status: int, message: str, anthropic: bool, request_id: str) -> bytes:
    if anthropic:
        kind = ANTHROPIC_ERROR_TYPES.get(status, "api_error")
        return _json(
            {"type": "error", "error": {"type": kind, "message": message}, "request_id": request_id}
        )
    kind = OPENAI_ERROR_TYPES.get(
        status, "server_error" if status >= 500 else "invalid_request_error"
    )
    return _json({"error": {"message": message, "type": kind, "param": None, "code": None}})


class LoadStats:
    """In-flight peaks and arrival times of answered requests, in all and per model."""

    def __init__(self, *, keep: int = 1_000_000) -> None:
        self.keep = keep
        self.in_flight: collections.Counter[str] = collections.Counter()
        self.reset()

    def reset(self) -> None:
        self.started = time.monotonic()
        # Requests still in flight stay counted: a peak starts from what is running now.
        self.peak: dict[str, int] = {m: n for m, n in self.in_flight.items() if n}
        self.total_in_flight_peak = sum(self.in_flight.values())
        self.arrivals: dict[str, collections.deque[float]] = {}

    def enter(self, model: str) -> None:
        now = time.monotonic()
        times = self.arrivals.get(model)
        if times is None:
            times = self.arrivals[model] = collections.deque(maxlen=self.keep)
        times.append(now)
        self.in_flight[model] += 1
        if self.in_flight[model] > self.peak.get(model, 0):
            self.peak[model] = self.in_flight[model]
        total = sum(self.in_flight.values())
        if total > self.total_in_flight_peak:
            self.total_in_flight_peak = total

    def leave(self, model: str) -> None:
        self.in_flight[model] -= 1

    def snapshot(self, window_s: float = 60.0) -> dict[str, Any]:
        models: dict[str, Any] = {}
        for model in sorted(set(self.arrivals) | set(self.peak)):
            times = list(self.arrivals.get(model, ()))
            windows: collections.Counter[int] = collections.Counter(
                int((t - self.started) // window_s) for t in times
            )
            models[model] = {
                "requests": len(times),
                "in_flight": self.in_flight[model],
                "peak_in_flight": self.peak.get(model, 0),
                "per_window": [windows[i] for i in range(max(windows, default=-1) + 1)],
                "max_in_sliding_window": max_in_window(times, window_s),
            }
        return {
            "since_s": round(time.monotonic() - self.started, 3),
            "window_s": window_s,
            "requests": sum(m["requests"] for m in models.values()),
            "in_flight": sum(self.in_flight.values()),
            "peak_in_flight": self.total_in_flight_peak,
            "models": models,
        }


def max_in_window(times: list[float], window_s: float) -> int:
    """The most of the sorted *times* that fall in any half-open window of *window_s*."""
    best = start = 0
    for end, t in enumerate(times):
        while t - times[start] >= window_s:
            start += 1
        best = max(best, end - start + 1)
    return best


class MockUpstream:
    """The mock API as a raw ASGI app. Records the requests it saw and clients that left."""

    def __init__(self, *, keep: int = 1_000) -> None:
        self.requests: collections.deque[SeenRequest] = collections.deque(maxlen=keep)
        self.disconnects = 0
        self.active = 0
        self.stats = LoadStats()
        self.left = asyncio.Event()  # set when a client leaves mid-answer
        self.arrived = asyncio.Event()  # set when a request is recorded
        logger = logging.getLogger("uvicorn.error")
        if _DROP_FILTER not in logger.filters:
            logger.addFilter(_DROP_FILTER)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path = scope["path"].rstrip("/") or "/"
        if path == "/healthz":
            await _respond(send, 200, b'{"ok":true}', [])
            return
        if path.startswith("/mock/stats"):
            await self._stats(scope, send, path)
            return
        body = await _read_body(receive)
        if body is None:
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        query = scope.get("query_string", b"").decode("latin-1")
        self.requests.append(SeenRequest(scope["method"], path, query, headers, body))
        self.arrived.set()
        endpoint = ENDPOINTS.get(path)
        anthropic = path.startswith("/v1/messages")
        request_id = _id("req_")
        id_header = (b"request-id" if anthropic else b"x-request-id", request_id.encode())
        if endpoint is None or scope["method"] != "POST":
            error = error_payload(
                404, f"No route for {scope['method']} {path}", anthropic, request_id
            )
            await _respond(send, 404, error, [id_header])
            return
        try:
            faults = Faults.from_headers(headers)
        except ValueError:
            error = error_payload(400, "An X-Mock-* header is not a number.", anthropic, request_id)
            await _respond(send, 400, error, [id_header])
            return
        try:
            payload = json.loads(body)
            if not isinstance(payload, dict):
                raise ValueError("not an object")
        except ValueError:
            error = error_payload(400, "The body is not a JSON object.", anthropic, request_id)
            await _respond(send, 400, error, [id_header])
            return
        reply = make_reply(payload, body, faults, endpoint.anthropic)
        self.active += 1
        self.stats.enter(reply.model)
        try:
            await self._answer(receive, send, endpoint, payload, reply, faults, id_header)
        finally:
            self.active -= 1
            self.stats.leave(reply.model)

    async def _stats(self, scope: Scope, send: Send, path: str) -> None:
        method = scope["method"]
        if path == "/mock/stats/reset" and method == "POST":
            self.stats.reset()
            await _respond(send, 200, b'{"reset":true}', [])
            return
        if path == "/mock/stats" and method == "GET":
            query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
            try:
                window_s = float(query.get("window_s", ["60"])[0])
                if window_s <= 0:
                    raise ValueError(window_s)
            except ValueError:
                await _respond(send, 400, b'{"error":"window_s: a positive number"}', [])
                return
            await _respond(send, 200, _json(self.stats.snapshot(window_s)), [])
            return
        await _respond(send, 404, b'{"error":"not found"}', [])

    async def _answer(
        self,
        receive: Receive,
        send: Send,
        endpoint: Endpoint,
        payload: Mapping[str, Any],
        reply: Reply,
        faults: Faults,
        id_header: tuple[bytes, bytes],
    ) -> None:
        stream = payload.get("stream") is True and endpoint.events is not None
        count = len(reply.chunks)
        first_byte = faults.first_byte_s(stream, count)
        gap = faults.chunk_delay_s(count) if stream else 0.0
        watcher: asyncio.Task[None] | None = None
        if first_byte > 0 or gap > 0:
            watcher = asyncio.ensure_future(_until_disconnect(receive))
        try:
            if await self._pause(first_byte, watcher):
                return
            if faults.status is not None:
                extra = [id_header]
                if faults.retry_after is not None:
                    extra.append((b"retry-after", faults.retry_after.encode()))
                message = f"Mock upstream error {faults.status}."
                error = error_payload(
                    faults.status, message, endpoint.anthropic, id_header[1].decode()
                )
                await _respond(send, faults.status, error, extra)
                return
            if not stream:
                data = _json(endpoint.body(payload, reply, faults))
                if faults.drop_after is not None:
                    await _start(send, 200, "application/json", [id_header], len(data))
                    await send({"type": "http.response.body", "body": data[: len(data) // 2]})
                    raise MockDrop("dropped mid-body")
                await _respond(send, 200, data, [id_header])
                return
            assert endpoint.events is not None
            events = endpoint.events(payload, reply, faults)
            await _start(send, 200, "text/event-stream; charset=utf-8", [id_header], None)
            sent_chunks = 0
            for event, is_text in events:
                if is_text and sent_chunks and await self._pause(gap, watcher):
                    return
                if faults.drop_after is not None and is_text and sent_chunks >= faults.drop_after:
                    raise MockDrop(f"dropped after {sent_chunks} chunks")
                await send({"type": "http.response.body", "body": event, "more_body": True})
                if is_text:
                    sent_chunks += 1
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if watcher is not None:
                watcher.cancel()

    async def _pause(self, seconds: float, watcher: asyncio.Task[None] | None) -> bool:
        """Wait *seconds*; True if the client left meanwhile (it is then recorded)."""
        if seconds <= 0 or watcher is None:
            return False
        done, _ = await asyncio.wait((watcher,), timeout=seconds)
        if done:
            self.disconnects += 1
            self.left.set()
            return True
        return False


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _read_body(receive: Receive) -> bytes | None:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _start(
    send: Send, status: int, ctype: str, extra: list[tuple[bytes, bytes]], length: int | None
) -> None:
    headers = [(b"content-type", ctype.encode()), *extra]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    else:
        headers.append((b"cache-control", b"no-cache"))
    await send({"type": "http.response.start", "status": status, "headers": headers})


async def _respond(send: Send, status: int, data: bytes, extra: list[tuple[bytes, bytes]]) -> None:
    await _start(send, status, "application/json", extra, len(data))
    await send({"type": "http.response.body", "body": data})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="A mock of the OpenAI and Anthropic APIs.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args(argv)
    print(f"mock upstream on http://{args.host}:{args.port}  (OpenAI base: /v1)", flush=True)
    uvicorn.run(
        MockUpstream(),
        host=args.host,
        port=args.port,
        http="httptools",
        loop="auto",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
