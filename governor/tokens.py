"""A cheap, documented estimate of a request's input tokens.

Method: the characters of every text a model reads (messages and their text parts,
``system``, ``instructions``, ``input``, ``prompt``, tool definitions as JSON) divided by
4, rounded up, plus 4 tokens of framing per message. Four characters per token is the
rule of thumb both OpenAI and Anthropic give for English and code; it errs high on
code-heavy prompts, which is the safe side for a reservation. Image parts count a flat
1,000 tokens each (base64 would otherwise count as text). The estimate is settled to
the upstream's reported usage when the response ends, so it only has to be close.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD = 4
IMAGE_PART_TOKENS = 1_000
_IMAGE_PART_TYPES = frozenset({"image", "image_url", "input_image"})


def _text_chars(content: Any) -> tuple[int, int]:
    """(characters of text, image parts) in a message content of any dialect."""
    if isinstance(content, str):
        return len(content), 0
    chars = images = 0
    if isinstance(content, list):
        for part in content:
            if isinstance(part, str):
                chars += len(part)
            elif isinstance(part, dict):
                if part.get("type") in _IMAGE_PART_TYPES:
                    images += 1
                    continue
                for field in ("text", "content", "input", "thinking"):
                    value = part.get(field)
                    if value is not None:
                        c, i = _text_chars(value)
                        chars += c
                        images += i
                if isinstance(part.get("input"), dict):
                    chars += len(json.dumps(part["input"]))
    elif isinstance(content, dict):
        return _text_chars([content])
    return chars, images


def estimate_input_tokens(payload: Mapping[str, Any]) -> int:
    """Estimated input tokens of a request *payload* of any surface."""
    chars = images = messages = 0
    for field in ("messages", "input"):
        value = payload.get(field)
        if isinstance(value, list):
            for message in value:
                messages += 1
                if isinstance(message, dict):
                    c, i = _text_chars(message.get("content"))
                else:
                    c, i = _text_chars(message)
                chars += c
                images += i
        elif value is not None:
            c, i = _text_chars(value)
            chars += c
            images += i
    for field in ("system", "instructions", "prompt"):
        c, i = _text_chars(payload.get(field))
        chars += c
        images += i
    tools = payload.get("tools")
    if isinstance(tools, list) and tools:
        chars += len(json.dumps(tools, separators=(",", ":")))
    tokens = -(-chars // CHARS_PER_TOKEN)
    return tokens + messages * MESSAGE_OVERHEAD + images * IMAGE_PART_TOKENS
