"""Bad input against the full stack (demo gateway, every governor layer, mock upstream):
arbitrary bytes, JSON and headers on every governed surface. Never a 5xx, never a held
reservation or a rate hit without an upstream call, errors always in the caller's shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from governor.context import ROUTES
from tests.fault_support import KEY, Stack, asgi_call, error_shape, full_stack, make_config
from tests.faults_report import _Recorder

MODELS = ["gpt-5-5", "claude-sonnet-4-7", "gpt-image-2", "nano-banana-2", "claude-opus-4-7-max"]
PATHS = sorted(ROUTES)
EXAMPLES = 200

_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_FIELDS = {
    "model": st.sampled_from(MODELS) | st.text(max_size=30) | _JSON,
    "messages": st.just([{"role": "user", "content": "Hi"}]) | _JSON,
    "input": st.just("Hi") | _JSON,
    "prompt": st.just("a cat") | _JSON,
    "max_tokens": st.integers(min_value=-10, max_value=10**12) | _JSON,
    "max_completion_tokens": st.integers(min_value=-10, max_value=10**9) | _JSON,
    "max_output_tokens": st.integers(min_value=-10, max_value=10**9) | _JSON,
    "stream": st.booleans() | _JSON,
    "stream_options": st.just({"include_usage": True}) | _JSON,
    "n": st.integers(min_value=-2, max_value=100) | _JSON,
    "modalities": st.just(["image", "text"]) | _JSON,
    "system": st.text(max_size=20) | _JSON,
    "tools": _JSON,
    "metadata": _JSON,
}
# Near-valid bodies: a real request with some fields missing or replaced by junk.
_NEAR = st.fixed_dictionaries(
    {"model": st.sampled_from(MODELS)},
    optional={name: strategy for name, strategy in _FIELDS.items() if name != "model"},
).map(lambda d: json.dumps(d).encode())
# Valid requests with small variations, so admitted requests are fuzzed too.
_VALID = st.fixed_dictionaries(
    {
        "model": st.sampled_from(MODELS[:4]),
        "messages": st.just([{"role": "user", "content": "Hi"}]),
        "input": st.just("Hi"),
        "prompt": st.just("a cat"),
        "max_tokens": st.integers(min_value=1, max_value=2_000),
    },
    optional={"stream": st.booleans(), "n": st.integers(min_value=1, max_value=2)},
).map(lambda d: json.dumps(d).encode())
_ANY_JSON = _JSON.map(lambda v: json.dumps(v).encode())
_BYTES = st.binary(max_size=200)
_BODY = st.one_of(_VALID, _NEAR, _ANY_JSON, _BYTES)

# What an HTTP server lets through to the app: token header names, visible ASCII values
# (a server refuses anything else before governor sees it).
_TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_TOKEN = st.text(alphabet=_TCHAR, min_size=1, max_size=20).filter(
    lambda n: not n.lower().startswith("x-mock")  # the mock's own fault switches
)
_VALUE = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40).map(
    str.strip
)
_NAMES = st.sampled_from(
    [
        "content-type",
        "content-length",
        "user-agent",
        "anthropic-version",
        "anthropic-beta",
        "x-app",
        "x-session-id",
        "x-claude-code-session-id",
        "x-hypereal-cache",
        "x-stainless-lang",
        "accept-encoding",
    ]
)
_HEADERS = st.lists(st.tuples(_NAMES | _TOKEN, _VALUE), max_size=5)
_AUTH = st.sampled_from(
    [
        [("authorization", f"Bearer {KEY}")],
        [("authorization", f"Bearer {KEY}")],
        [("x-api-key", KEY)],
        [("x-api-key", KEY)],
        [("authorization", f"Bearer {KEY}"), ("x-api-key", KEY)],
        [("authorization", f"bearer {KEY}")],
        [("authorization", KEY)],
        [("authorization", "Bearer ck_wrong")],
        [("x-api-key", "")],
        [],
    ]
)


@contextlib.contextmanager
def running_stack() -> Iterator[tuple[asyncio.AbstractEventLoop, Stack]]:
    """One full stack on one loop for every example (a stack per example costs ~50 ms)."""
    loop = asyncio.new_event_loop()
    cm = full_stack(make_config(), keep=100_000)
    try:
        stack = loop.run_until_complete(cm.__aenter__())
        yield loop, stack
    finally:
        loop.run_until_complete(cm.__aexit__(None, None, None))
        loop.close()


def rate_hits(stack: Stack) -> float:
    """Model RPM hits still standing (admitted minus given back), every model."""
    total = 0.0
    for metric in stack.registry.collect():
        if metric.name == "governor_ratelimit_hits":
            total += sum(
                s.value
                for s in metric.samples
                if s.name.endswith("_total") and s.labels.get("guard") == "model_rpm"
            )
        elif metric.name == "governor_ratelimit_refunds":
            total -= sum(
                s.value
                for s in metric.samples
                if s.name.endswith("_total") and s.labels.get("guard") == "model_rpm"
            )
    return total


async def _check(stack: Stack, path: str, body: bytes, headers: list[tuple[str, str]]) -> int:
    method = ROUTES[path][1]
    upstream_before = len(stack.mock.requests)
    hits_before = rate_hits(stack)
    result = await asgi_call(stack.app, method, path, headers, body if method == "POST" else b"")
    assert result.status < 500, (result.status, result.body[:300])
    if result.status >= 400:
        assert error_shape(result, path) is None, error_shape(result, path)
    _, held, live = await stack.ledger()
    assert (held, live) == (0, 0), "a reservation leaked"
    assert await stack.all_slots() == (0, 0), "a slot leaked"
    reached = len(stack.mock.requests) - upstream_before
    assert rate_hits(stack) - hits_before == reached, "rate budget taken without an upstream call"
    return int(result.status)


@pytest.mark.parametrize("path", PATHS)
def test_fuzz_surface(path: str, faults: _Recorder) -> None:
    """Arbitrary bodies and headers on one surface: never 5xx, nothing leaked, right shape."""
    statuses: dict[int, int] = {}
    with running_stack() as (loop, stack):

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
            database=None,
        )
        @given(body=_BODY, headers=_HEADERS, auth=_AUTH)
        def run(body: bytes, headers: list[tuple[str, str]], auth: list[tuple[str, str]]) -> None:
            status = loop.run_until_complete(_check(stack, path, body, [*auth, *headers]))
            statuses[status] = statuses.get(status, 0) + 1

        run()
    seen = ", ".join(f"{s}x{n}" for s, n in sorted(statuses.items()))
    faults.record(
        f"fuzzed input on {path}",
        "every layer / memory backend, mock upstream",
        "never 5xx; no slot, reservation or rate hit leaked; errors in the caller's shape",
        f"{sum(statuses.values())} requests ({seen}); 0 slots and 0 credits held after "
        "each; rate hits == upstream calls",
    )
