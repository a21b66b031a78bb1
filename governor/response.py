"""What the downstream app answered: status, timing, usage, and how the response ended.

One :class:`ResponseObserver` per request, fed by the send wrapper the request context
installs, so that every governor middleware reads the same facts however many are
stacked, and the body is parsed once.

Streams are scanned line by line for ``data:`` events; only events that can carry
usage or an error are decoded, so the cost per chunk stays small whatever the length.
"""

from __future__ import annotations

import enum
import json
from typing import Any

from governor import headers as h
from governor import usage as usage_mod
from governor.types import Message
from governor.usage import Usage

# Non-streaming bodies are buffered up to this size to read their usage; image
# responses with base64 payloads are the largest we expect.
MAX_BUFFERED_BODY = 64 * 1024 * 1024


class Outcome(enum.Enum):
    """How a request ended, as the breaker, billing and usage logs see it."""

    SUCCESS = "success"  # 2xx and the body sent to the end
    REFUSED = "refused"  # governor refused it (any middleware)
    CLIENT_ERROR = "client_error"  # upstream 4xx caused by the request itself
    # Upstream 5xx, 529, 429, or a 2xx JSON body that does not parse.
    UPSTREAM_ERROR = "upstream_error"
    STREAM_BROKEN = "stream_broken"  # started, then failed mid-way
    DISCONNECTED = "disconnected"  # the client went away
    CANCELLED = "cancelled"  # the task was cancelled
    EXCEPTION = "exception"  # the app raised before answering


class ResponseObserver:
    """Records one response as it passes through ``send``."""

    __slots__ = (
        "_buffer",
        "_buffered",
        "_pending",
        "body_bytes",
        "complete",
        "finished_at",
        "first_byte_at",
        "is_sse",
        "malformed",
        "started_at",
        "status",
        "stream_error",
        "usage",
    )

    def __init__(self) -> None:
        self.status: int | None = None
        self.started_at: float | None = None
        self.first_byte_at: float | None = None
        self.finished_at: float | None = None
        self.complete = False
        self.body_bytes = 0
        self.is_sse = False
        self.usage: Usage | None = None
        self.stream_error = False
        # A 2xx JSON body that does not parse (set by billing, which parses it in
        # full): the upstream failed, whatever its status said.
        self.malformed = False
        self._buffer: list[bytes] | None = None
        self._buffered = 0
        self._pending = b""

    @property
    def started(self) -> bool:
        return self.status is not None

    def on_start(self, message: Message, now: float) -> None:
        self.status = int(message["status"])
        self.started_at = now
        ctype = h.get(message.get("headers", ()), b"content-type") or b""
        self.is_sse = ctype.startswith(b"text/event-stream")
        if not self.is_sse and b"json" in ctype:
            self._buffer = []
            self._buffered = 0

    def on_body(self, message: Message, now: float) -> None:
        body: bytes = message.get("body", b"")
        if body:
            if self.first_byte_at is None:
                self.first_byte_at = now
            self.body_bytes += len(body)
            if self.is_sse:
                self._scan_sse(body)
            elif self._buffer is not None:
                self._buffered += len(body)
                if self._buffered > MAX_BUFFERED_BODY:
                    self._buffer = None
                else:
                    self._buffer.append(body)
        if not message.get("more_body", False):
            self.complete = True
            self.finished_at = now
            if self._buffer:
                self._parse_body(b"".join(self._buffer))
            self._buffer = None

    def _parse_body(self, body: bytes) -> None:
        self.usage = usage_mod.from_json_bytes(body)

    def _scan_sse(self, chunk: bytes) -> None:
        data = self._pending + chunk
        lines = data.split(b"\n")
        self._pending = lines.pop()
        for line in lines:
            if line.startswith(b"event:") and b"error" in line:
                self.stream_error = True
            elif line.startswith(b"data:") and (b"usage" in line or b"error" in line):
                self._on_event(line[5:].strip())
        if len(self._pending) > MAX_BUFFERED_BODY:
            self._pending = b""

    def _on_event(self, data: bytes) -> None:
        try:
            event: Any = json.loads(data)
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        if event.get("type") == "error" or event.get("error"):
            self.stream_error = True
            return
        self.usage = usage_mod.from_event(event, self.usage)

    def outcome(self, *, refused: bool, disconnected: bool, exc: BaseException | None) -> Outcome:
        """Classify the end of the request (see :class:`Outcome`)."""
        if refused:
            return Outcome.REFUSED
        if isinstance(exc, BaseException) and not isinstance(exc, Exception):
            return Outcome.CANCELLED
        if disconnected and not self.complete:
            return Outcome.DISCONNECTED
        if self.status is None:
            return Outcome.EXCEPTION
        if self.status == 429 or self.status >= 500:
            return Outcome.UPSTREAM_ERROR
        if self.status >= 400:
            return Outcome.CLIENT_ERROR
        if self.malformed:
            return Outcome.UPSTREAM_ERROR
        if exc is not None or not self.complete or self.stream_error:
            return Outcome.STREAM_BROKEN
        return Outcome.SUCCESS
