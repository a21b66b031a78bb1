"""The input-token estimate."""

from __future__ import annotations

from governor.tokens import estimate_input_tokens


def test_chat_messages() -> None:
    payload = {
        "messages": [
            {"role": "system", "content": "a" * 40},
            {"role": "user", "content": [{"type": "text", "text": "b" * 40}]},
        ]
    }
    assert estimate_input_tokens(payload) == 10 + 10 + 2 * 4


def test_anthropic_system_and_images() -> None:
    payload = {
        "system": [{"type": "text", "text": "s" * 8}],
        "messages": [
            {"role": "user", "content": [{"type": "image", "source": {"data": "x" * 100000}}]}
        ],
    }
    assert estimate_input_tokens(payload) == 2 + 4 + 1000


def test_responses_input_string_and_prompt() -> None:
    assert estimate_input_tokens({"input": "abcd" * 3}) == 3
    assert estimate_input_tokens({"prompt": "abcde"}) == 2
