"""Property tests: no mutation of a genuine CLI request makes the check crash or let a
non-CLI answer through unchecked."""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from governor import ContextMiddleware, Governor
from governor.config import Config
from governor.fingerprint import FingerprintMiddleware
from tests.apps import EchoApp
from tests.fingerprint_support import first, new_key, replay

_REQ = first("claude-code-2.1.197-print")
_NAMES = sorted({k.lower() for k, _ in _REQ["headers"]})
_REQUIRED = {
    "user-agent",
    "x-app",
    "anthropic-version",
    "anthropic-dangerous-direct-browser-access",
    "anthropic-beta",
    "authorization",
    "x-claude-code-session-id",
    "x-stainless-lang",
    "x-stainless-runtime",
    "x-stainless-package-version",
    "x-stainless-runtime-version",
    "x-stainless-os",
    "x-stainless-arch",
    "x-stainless-retry-count",
}
_FIELDS = ["system", "metadata", "tools", "thinking", "stream", "messages", "max_tokens"]
_JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.text(max_size=30),
    st.lists(st.text(max_size=5), max_size=3),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
)
_HEADER_VALUE = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    drop=st.lists(st.sampled_from(_NAMES), max_size=3),
    change=st.dictionaries(st.sampled_from(_NAMES), _HEADER_VALUE, max_size=3),
    fields=st.dictionaries(st.sampled_from(_FIELDS), _JUNK, max_size=3),
)
def test_mutated_cli_request_never_crashes(
    drop: list[str], change: dict[str, str], fields: dict[str, Any]
) -> None:
    """Any header dropped or changed, any body field of any type: a 2xx/4xx, never a crash."""
    req = first("claude-code-2.1.197-print")
    req["headers"] = [
        [k, change.get(k.lower(), v)] for k, v in req["headers"] if k.lower() not in drop
    ]
    req["body"].update(fields)
    gov = Governor(Config(demo_keys=True), registry=CollectorRegistry())
    echo = EchoApp()
    app = ContextMiddleware(FingerprintMiddleware(echo, governor=gov), governor=gov)
    result = asyncio.run(replay(app, req, new_key()))
    assert result.status in (200, 400, 401, 403, 404), result.body
    if result.status == 200:
        # Served only if nothing the checks require was dropped.
        assert not set(drop) & _REQUIRED
