"""Token usage as the upstream reports it, in one normalised form.

``input_tokens`` is *uncached* input: OpenAI counts cached tokens inside
``prompt_tokens``/``input_tokens`` (``*_tokens_details.cached_tokens``), Anthropic
reports them apart (``cache_read_input_tokens``, ``cache_creation_input_tokens``);
both become the same four classes here, which is what prices are per.

Parsed JSON is made of plain dicts, so checks use ``dict`` (an ABC ``Mapping`` check
costs several times more on this per-request path).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True, slots=True)
class Usage:
    """Tokens of one response, per price class."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0

    @property
    def total_input(self) -> int:
        return self.input_tokens + self.cache_read_tokens + self.cache_write_tokens

    @property
    def total(self) -> int:
        return self.total_input + self.output_tokens


def _int(obj: Mapping[str, Any] | None, key: str) -> int:
    if not isinstance(obj, dict):
        return 0
    value = obj.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def from_openai(usage: Mapping[str, Any]) -> Usage:
    """Chat completions (``prompt_tokens``), Responses and images (``input_tokens``)."""
    if "prompt_tokens" in usage:
        prompt = _int(usage, "prompt_tokens")
        cached = _int(usage.get("prompt_tokens_details"), "cached_tokens")
        output = _int(usage, "completion_tokens")
    else:
        prompt = _int(usage, "input_tokens")
        cached = _int(usage.get("input_tokens_details"), "cached_tokens")
        output = _int(usage, "output_tokens")
    cached = min(cached, prompt)
    return Usage(input_tokens=prompt - cached, output_tokens=output, cache_read_tokens=cached)


def from_anthropic(usage: Mapping[str, Any], base: Usage | None = None) -> Usage:
    """Anthropic ``usage``; *base* carries what ``message_start`` said, for ``message_delta``."""
    base = base or Usage()
    return Usage(
        input_tokens=_int(usage, "input_tokens") or base.input_tokens,
        output_tokens=_int(usage, "output_tokens") or base.output_tokens,
        cache_read_tokens=_int(usage, "cache_read_input_tokens") or base.cache_read_tokens,
        cache_write_tokens=_int(usage, "cache_creation_input_tokens") or base.cache_write_tokens,
    )


def from_usage(usage: dict[str, Any]) -> Usage:
    """A ``usage`` object of any dialect: Anthropic's names its cache classes apart."""
    if "cache_read_input_tokens" in usage or "cache_creation_input_tokens" in usage:
        return from_anthropic(usage)
    return from_openai(usage)


_DECODER = json.JSONDecoder()
_TOKEN_FIELDS = ("prompt_tokens", "input_tokens", "output_tokens", "completion_tokens")


def from_json_bytes(body: bytes) -> Usage | None:
    """Usage of a non-streaming JSON response body, without parsing the whole body.

    Image responses carry megabytes of base64; only the ``usage`` object is decoded. The
    last unescaped ``"usage"`` key is taken (inside a JSON string its quotes would be
    escaped); if what follows is not an object with token fields, the body is parsed
    whole instead.
    """
    at = body.rfind(b'"usage"')
    if at >= 0:
        start = body.find(b"{", at + 7)
        if start > 0 and body[at + 7 : start].strip() == b":":
            try:
                usage, _ = _DECODER.raw_decode(body[start:].decode("utf-8"))
            except ValueError:
                usage = None
            if isinstance(usage, dict) and any(f in usage for f in _TOKEN_FIELDS):
                return from_usage(usage)
    try:
        return from_body(json.loads(body))
    except ValueError:
        return None


def from_body(payload: Any) -> Usage | None:
    """Usage of a non-streaming JSON response of any surface, or None if it has none."""
    if not isinstance(payload, dict):
        return None
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        return None
    if payload.get("type") == "message":
        return from_anthropic(usage)
    return from_usage(usage)


def from_event(event: Any, current: Usage | None) -> Usage | None:
    """Fold one streaming event into *current*; returns the new usage (or *current*).

    OpenAI chat: the final chunk's ``usage``. Responses: ``response.completed``'s
    ``response.usage``. Anthropic: ``message_start``'s ``message.usage`` then the
    cumulative ``message_delta.usage``.
    """
    if not isinstance(event, dict):
        return current
    kind = event.get("type")
    if kind == "message_start":
        message = event.get("message")
        if isinstance(message, dict) and isinstance(message.get("usage"), dict):
            return from_anthropic(message["usage"])
        return current
    if kind == "message_delta":
        if isinstance(event.get("usage"), dict):
            return from_anthropic(event["usage"], current)
        return current
    if isinstance(kind, str) and kind.startswith("response."):
        response = event.get("response")
        if isinstance(response, dict) and isinstance(response.get("usage"), dict):
            return from_openai(response["usage"])
        return current
    usage = event.get("usage")
    if isinstance(usage, dict):
        return from_openai(usage)
    return current
