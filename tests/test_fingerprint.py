"""Fingerprint enforcement on the captured clients: who may use the -max models."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from governor import Governor, key_id, wrap
from governor.backends import Backend
from governor.clock import ManualClock
from governor.config import Config, FingerprintConfig
from governor.fingerprint import FingerprintMiddleware, Suspensions
from tests.apps import EchoApp, sse_app
from tests.fingerprint_support import (
    FOREIGN,
    GENUINE,
    Make,
    first,
    new_key,
    replay,
    requests,
    run,
    scope_for,
    set_header,
    stack_factory,
    with_version,
)


@pytest.fixture
def make(backend: Backend, clock: ManualClock, registry: CollectorRegistry) -> Make:
    return stack_factory(backend, clock, registry)


async def suspended(gov: Governor, key: str) -> bool:
    return await Suspensions(gov).get(key_id(key)) is not None


# --- every fixture as its file says ---------------------------------------------------


@pytest.mark.parametrize("name", GENUINE)
async def test_real_cli_fixture_allowed(make: Make, name: str) -> None:
    """Every request of a real Claude Code CLI capture is served and the key stays clean."""
    gov, app, echo = make()
    key = new_key()
    reqs = requests(name)
    for req in reqs:
        result = await replay(app, req, key)
        assert result.status == 200, (req["path"], result.body)
    assert len(echo.calls) == len(reqs)
    assert not await suspended(gov, key)


@pytest.mark.parametrize("name", FOREIGN)
async def test_foreign_fixture_blocked_and_suspended(make: Make, name: str) -> None:
    """SDKs, the Agent SDK, curl and wrappers are refused 403 and their key suspended."""
    gov, app, echo = make()
    for req in requests(name):
        key = new_key()
        result = await replay(app, req, key)
        assert result.status == 403, result.body
        assert "suspended" in result.body.decode()
        assert await suspended(gov, key)
    assert echo.calls == []


@pytest.mark.parametrize("name", GENUINE + FOREIGN)
async def test_standard_models_served_to_every_client(make: Make, name: str) -> None:
    """The same requests naming a standard model are served to every client."""
    gov, app, _ = make()
    key = new_key()
    for req in requests(name):
        req["body"]["model"] = "claude-opus-4-8" if "messages" in req["path"] else "gpt-5-5"
        result = await replay(app, req, key)
        assert result.status == 200, result.body
    assert not await suspended(gov, key)


async def test_qwen_max_is_a_standard_model(make: Make) -> None:
    """qwen3-7-max ends in -max but is no Claude CLI model: served on chat completions."""
    _, app, _ = make()
    req = first("openai-python-sdk-3.57.0")
    req["body"]["model"] = "qwen3-7-max"
    assert (await replay(app, req, new_key())).status == 200


async def test_refusal_shapes(make: Make) -> None:
    """Refusals come in the caller's shape: Anthropic on messages, OpenAI on chat."""
    _, app, _ = make()
    anthropic = await replay(app, first("curl"), new_key())
    assert anthropic.json()["type"] == "error"
    assert anthropic.json()["error"]["type"] == "permission_error"
    assert anthropic.header("x-should-retry") == "false"
    openai = await replay(app, first("openai-python-sdk-3.57.0"), new_key())
    assert openai.json()["error"]["code"] == "key_suspended"
    assert openai.json()["error"]["type"] == "permission_error"


# --- spoof variants ---------------------------------------------------------------------


async def test_header_names_read_case_insensitively(make: Make) -> None:
    """Header names in any case: the real CLI still passes, a spoof still fails."""
    _, app, _ = make()
    genuine = first("claude-code-2.1.197-print")
    genuine["headers"] = [[k.upper(), v] for k, v in genuine["headers"]]
    assert (await replay(app, genuine, new_key())).status == 200
    spoof = first("anthropic-node-sdk-1.14.0")
    spoof["headers"] = [[k.swapcase(), v] for k, v in spoof["headers"]]
    assert (await replay(app, spoof, new_key())).status == 403


async def test_duplicate_header_with_other_value_blocked(make: Make) -> None:
    """A second User-Agent with another value (in another case) is a forgery."""
    gov, app, _ = make()
    req = first("claude-code-2.1.197-print")
    req["headers"].append(["user-agent", "Anthropic/JS 1.14.0"])
    key = new_key()
    assert (await replay(app, req, key)).status == 403
    assert await suspended(gov, key)


async def test_identical_duplicate_header_allowed(make: Make) -> None:
    """The same header repeated with the same value (a proxy's doing) is only logged."""
    _, app, _ = make()
    req = first("claude-code-2.1.197-print")
    req["headers"].append(["X-App", "cli"])
    assert (await replay(app, req, new_key())).status == 200


async def test_duplicate_x_app_case_variant_blocked(make: Make) -> None:
    """`x-app: cli` and `X-APP: sdk` together are read as one conflicting header."""
    _, app, _ = make()
    req = first("claude-code-2.1.197-print")
    req["headers"].insert(0, ["X-APP", "sdk"])
    assert (await replay(app, req, new_key())).status == 403


@pytest.mark.parametrize("path", ["//v1/messages", "/v1/messages/", "/v1//messages//"])
async def test_path_spellings_still_checked(make: Make, path: str) -> None:
    """Slash tricks reach the same check: the SDK blocked, the real CLI allowed."""
    _, app, _ = make()
    assert (
        await replay(app, first("anthropic-node-sdk-1.14.0"), new_key(), path=path)
    ).status == 403
    genuine = first("claude-code-2.1.197-print")
    assert (await replay(app, genuine, new_key(), path=path)).status == 200


async def test_percent_encoded_path_still_checked(make: Make) -> None:
    """`/v1/%6Dessages` arrives decoded in scope['path']: still the messages check."""
    _, app, echo = make()
    raw = b"/v1/%6D%65ssages"
    result = await replay(app, first("curl"), new_key(), path="/v1/messages", raw_path=raw)
    assert result.status == 403
    assert echo.calls == []


async def test_percent_encoded_slash_reaches_chat_gate(make: Make) -> None:
    """`/v1/managed/chat%2Fcompletions` decodes to chat: a -max model there is blocked."""
    gov, app, _ = make()
    key = new_key()
    req = first("openai-python-sdk-3.57.0")
    raw = b"/v1/managed/chat%2Fcompletions"
    result = await replay(app, req, key, path="/v1/managed/chat/completions", raw_path=raw)
    assert result.status == 403
    assert await suspended(gov, key)


@pytest.mark.parametrize(
    ("path", "raw"),
    [
        ("/v1/%6Dessages", b"/v1/%256Dessages"),
        ("/V1/Messages", b"/V1/Messages"),
        ("/v1\\messages", b"/v1\\messages"),
        ("/v1/messages;x=1", b"/v1/messages;x=1"),
    ],
)
async def test_disguised_path_never_reaches_the_app(make: Make, path: str, raw: bytes) -> None:
    """A spelling that only a second decode would route is refused, not passed through."""
    _, app, echo = make()
    result = await replay(app, first("curl"), new_key(), path=path, raw_path=raw)
    assert result.status == 404
    assert result.json()["type"] == "error"
    assert echo.calls == []


@pytest.mark.parametrize(
    "model", ["Claude-Opus-4-7-MAX ", " claude-opus-4-7-max\t", "CLAUDE-SONNET-4-6-MAX"]
)
async def test_model_case_and_spacing_spoof_blocked(make: Make, model: str) -> None:
    """A -max id in another case or with white space is still a -max id."""
    gov, app, echo = make()
    req = first("anthropic-python-sdk-2.14.0")
    req["body"]["model"] = model
    key = new_key()
    assert (await replay(app, req, key)).status == 403
    assert await suspended(gov, key)
    assert echo.calls == []


async def test_cli_headers_on_sdk_blocked(make: Make) -> None:
    """The pi-ai/OpenClaw pattern: the Node SDK with Claude Code headers added."""
    _, app, _ = make()
    req = first("anthropic-node-sdk-1.14.0")
    for name, value in (
        ("user-agent", "claude-cli/2.1.2 (external, cli)"),
        ("x-app", "cli"),
        ("anthropic-dangerous-direct-browser-access", "true"),
        ("anthropic-beta", "claude-code-20250219,oauth-2025-04-20,interleaved-thinking-2025-05-14"),
    ):
        set_header(req, name, value)
    req["query"] = "beta=true"
    assert (await replay(app, req, new_key())).status == 403


def _spoof(edit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    req = first("claude-code-2.1.197-print")
    edit(req)
    return req


def _system(req: dict[str, Any]) -> list[dict[str, Any]]:
    system: list[dict[str, Any]] = req["body"]["system"]
    return system


def _set(name: str, value: str) -> Callable[[dict[str, Any]], None]:
    return lambda r: set_header(r, name, value)


def _billing(text: str) -> Callable[[dict[str, Any]], None]:
    return lambda r: _system(r)[0].update(text=text)


def _claim_cli(r: dict[str, Any]) -> None:
    set_header(r, "User-Agent", "claude-cli/2.1.197 (external, cli)")
    _system(r)[0].update(text=_system(r)[0]["text"].replace("sdk-cli", "cli"))


_BILLING = "x-anthropic-billing-header: cc_version=2.1.197.123; cc_entrypoint=sdk-cli;"
_SESSION = "11111111-2222-4333-8444-555555555555"
_BETAS = (
    "claude-code-20250219,interleaved-thinking-2025-05-14,thinking-token-count-2026-05-13,"
    "context-management-2025-06-27,prompt-caching-scope-2026-01-05,effort-2025-11-24"
)

# name -> (edit of a genuine `claude -p` 2.1.197 request, the reason it must be caught by)
SPOOFS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "no_beta_query": (lambda r: r.update(query=""), "beta_query"),
    "stale_stainless": (_set("X-Stainless-Package-Version", "0.112.1"), "stainless_version"),
    "host_node_on_bun_build": (_set("X-Stainless-Runtime-Version", "v22.11.0"), "runtime_version"),
    "python_stainless": (_set("X-Stainless-Lang", "python"), "stainless_runtime"),
    "python_sdk_header": (_set("X-Stainless-Async", "false"), "sdk_headers"),
    "helper_method": (_set("x-stainless-helper-method", "stream"), "helper_method"),
    "undici_headers": (_set("sec-fetch-mode", "cors"), "undici_headers"),
    "oauth_beta": (_set("anthropic-beta", _BETAS + ",oauth-2025-04-20"), "forbidden_beta"),
    "beta_not_first": (
        _set("anthropic-beta", "interleaved-thinking-2025-05-14,claude-code-20250219"),
        "claude_code_beta",
    ),
    "beta_missing": (_set("anthropic-beta", "interleaved-thinking-2025-05-14"), "claude_code_beta"),
    "anthropic_version": (_set("anthropic-version", "2026-10-21"), "anthropic_version"),
    "no_browser_access": (
        _set("anthropic-dangerous-direct-browser-access", "1"),
        "browser_access_header",
    ),
    "x_app": (_set("x-app", "sdk"), "x_app"),
    "ua_no_parenthetical": (_set("User-Agent", "claude-cli/2.1.197"), "user_agent"),
    "claude_code_ua_family": (
        _set("User-Agent", "claude-code/2.1.197 (external, sdk-cli)"),
        "wrapper_user_agent",
    ),
    "both_credentials": (
        lambda r: r["headers"].append(["x-api-key", "ck_test"]),
        "credential_headers",
    ),
    "session_mismatch": (_set("X-Claude-Code-Session-Id", _SESSION), "session_mismatch"),
    "session_not_uuid": (_set("X-Claude-Code-Session-Id", "session-1"), "session_id_format"),
    "billing_version": (_billing(_BILLING.replace("2.1.197", "2.1.280")), "billing_version"),
    "billing_entrypoint": (_billing(_BILLING.replace("=sdk-cli", "=cli")), "billing_entrypoint"),
    "billing_cch_on_bun": (_billing(_BILLING + " cch=00000;"), "billing_cch"),
    "billing_subagent": (_billing(_BILLING + " cc_is_subagent=true;"), "billing_subagent"),
    "legacy_user_id": (
        lambda r: r["body"]["metadata"].update(
            user_id="user_" + "a" * 64 + "_account__session_" + _SESSION
        ),
        "user_id_form",
    ),
    "no_metadata": (lambda r: r["body"].pop("metadata"), "user_id_missing"),
    "wrapper_phrase": (
        lambda r: _system(r)[-1].update(
            text="You are a personal assistant running inside OpenClaw."
        ),
        "wrapper_prompt",
    ),
    "wrapper_header": (
        lambda r: r["headers"].append(["X-Title", "Hermes Agent"]),
        "wrapper_header",
    ),
    "wrapper_tool": (
        lambda r: r["body"]["tools"].append({"name": "mcp__context_notes"}),
        "wrapper_tool",
    ),
    "sdk_identity_claiming_cli": (_claim_cli, "identity_entrypoint"),
    "unknown_entrypoint": (
        _set("User-Agent", "claude-cli/2.1.197 (external, bot)"),
        "unknown_entrypoint",
    ),
    "ide_entrypoint": (
        _set("User-Agent", "claude-cli/2.1.197 (external, claude-desktop)"),
        "entrypoint_not_official",
    ),
    "agent_sdk_part": (
        _set("User-Agent", "claude-cli/2.1.197 (external, sdk-cli, agent-sdk/0.3.197)"),
        "agent_sdk",
    ),
}


@pytest.mark.parametrize("spoof", sorted(SPOOFS))
async def test_spoof_variant_blocked_and_suspended(
    make: Make, spoof: str, caplog: pytest.LogCaptureFixture
) -> None:
    """One forged detail on an otherwise genuine CLI request: blocked, key suspended."""
    gov, app, echo = make()
    edit, reason = SPOOFS[spoof]
    key = new_key()
    caplog.set_level("DEBUG", logger="governor.fingerprint")
    result = await replay(app, _spoof(edit), key)
    assert result.status == 403, spoof
    assert await suspended(gov, key)
    assert echo.calls == []
    decision = next(r for r in caplog.records if hasattr(r, "fingerprint"))
    assert reason in decision.fingerprint["reasons"]


# --- versions -------------------------------------------------------------------------


async def test_newer_version_allowed_and_logged(
    make: Make, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    """A CLI newer than the tables that otherwise looks genuine is allowed, not suspended."""
    gov, app, _ = make()
    req = first("claude-code-2.1.197-print")
    with_version(req, "2.1.400", stainless="0.131.0", runtime="v26.14.0")
    key = new_key()
    caplog.set_level("INFO", logger="governor.fingerprint")
    assert (await replay(app, req, key)).status == 200
    assert not await suspended(gov, key)
    assert any("unknown_version" in r.getMessage() for r in caplog.records)
    labels = {"verdict": "allow", "reason": "unknown_version"}
    assert registry.get_sample_value("governor_fingerprint_decisions_total", labels) == 1


async def test_newer_version_with_older_sdk_allowed_and_logged(
    make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    """A newer version keeping an older SDK/runtime than the newest known: allowed, logged."""
    gov, app, _ = make()
    req = first("claude-code-2.1.197-interactive")
    with_version(req, "2.2.0")  # keeps 2.1.197's 0.94.0 and v26.3.0
    key = new_key()
    caplog.set_level("INFO", logger="governor.fingerprint")
    assert (await replay(app, req, key)).status == 200
    assert not await suspended(gov, key)
    decision = next(r for r in caplog.records if hasattr(r, "fingerprint"))
    assert {"unknown_version", "stainless_version", "runtime_version"} <= set(
        decision.fingerprint["soft"]
    )


async def test_newer_version_forgery_still_caught(make: Make) -> None:
    """A newer version does not excuse what is not table-derived: a stale anthropic-version."""
    gov, app, _ = make()
    req = first("claude-code-2.1.197-print")
    with_version(req, "2.1.400", stainless="0.131.0", runtime="v26.14.0")
    set_header(req, "anthropic-version", "2026-10-21")
    key = new_key()
    assert (await replay(app, req, key)).status == 403
    assert await suspended(gov, key)


async def test_version_between_known_ones_allowed(make: Make) -> None:
    """An unlisted release between two known ones, with values between theirs, passes."""
    _, app, _ = make()
    req = first("claude-code-2.1.197-print")
    with_version(req, "2.1.250", stainless="0.100.0", runtime="v26.3.0")
    assert (await replay(app, req, new_key())).status == 200


async def test_known_version_with_neighbours_sdk_suspended(make: Make) -> None:
    """A known version with another release's SDK version is forged."""
    gov, app, _ = make()
    req = first("claude-code-2.1.197-print")
    with_version(req, "2.1.332")  # 2.1.332 bundles 0.128.0, not 0.94.0
    key = new_key()
    assert (await replay(app, req, key)).status == 403
    assert await suspended(gov, key)


# --- policy ---------------------------------------------------------------------------


async def test_strict_policy_refuses_print_mode(make: Make) -> None:
    """official_entrypoints = ["cli"]: `claude -p` (sdk-cli) is refused, interactive is not."""
    _, app, _ = make(official_entrypoints=("cli",))
    assert (await replay(app, first("claude-code-2.1.197-print"), new_key())).status == 403
    assert (await replay(app, first("claude-code-2.1.197-interactive"), new_key())).status == 200


async def test_agent_sdk_entrypoint_can_be_admitted(make: Make) -> None:
    """Entrypoints are policy: admitting sdk-ts still refuses the agent-sdk UA part."""
    _, app, _ = make(official_entrypoints=("cli", "sdk-cli", "sdk-ts"))
    assert (await replay(app, first("claude-agent-sdk-ts-0.3.332"), new_key())).status == 403


async def test_strikes_before_suspension(make: Make) -> None:
    """strikes_to_suspend = 3: two violations are blocked, the third suspends."""
    gov, app, _ = make(strikes_to_suspend=3)
    key = new_key()
    for _ in range(2):
        result = await replay(app, first("curl"), key)
        assert result.status == 403
        assert "suspended" not in result.body.decode()
        assert not await suspended(gov, key)
    assert (await replay(app, first("curl"), key)).status == 403
    assert await suspended(gov, key)


async def test_disabled_in_wrap(backend: Backend, registry: CollectorRegistry) -> None:
    """wrap() mounts the middleware when enabled, and not when disabled."""
    on = Governor(Config(demo_keys=True), backend=backend, registry=registry)
    assert (await replay(wrap(EchoApp(), on), first("curl"), new_key())).status == 403
    off_config = Config(demo_keys=True, fingerprint=FingerprintConfig(enabled=False))
    off = Governor(off_config, backend=backend, registry=CollectorRegistry())
    assert (await replay(wrap(EchoApp(), off), first("curl"), new_key())).status == 200


async def test_streaming_response_stays_streaming(
    backend: Backend, registry: CollectorRegistry
) -> None:
    """An allowed CLI request's SSE answer arrives chunk by chunk."""
    gov = Governor(Config(demo_keys=True), backend=backend, registry=registry)
    app = FingerprintMiddleware(sse_app([{"n": 1}, {"n": 2}]), governor=gov)
    req = first("claude-code-2.1.197-print")
    result = await replay(app, req, new_key())
    assert result.status == 200
    assert len([c for c in result.chunks if c]) == 3


async def test_body_replayed_byte_for_byte(make: Make) -> None:
    """The app receives the exact body bytes the CLI sent."""
    _, app, echo = make()
    req = first("claude-code-2.1.197-print")
    body = json.dumps(req["body"], indent=1).encode()  # not the compact form
    result = await run(app, scope_for(req, new_key(), body), body)
    assert result.status == 200
    assert echo.calls[0][1] == body


async def test_newer_version_unknown_entrypoint_not_struck(make: Make) -> None:
    """A newer release's unknown entrypoint is refused (not official) without a strike."""
    gov, app, _ = make()
    req = first("claude-code-2.1.197-print")
    with_version(req, "2.1.400", stainless="0.131.0", runtime="v26.14.0")
    set_header(req, "User-Agent", "claude-cli/2.1.400 (external, cli-next)")
    _system(req)[0]["text"] = _system(req)[0]["text"].replace("sdk-cli", "cli-next")
    key = new_key()
    assert (await replay(app, req, key)).status == 403
    assert not await suspended(gov, key)


async def test_workload_part_allowed(make: Make) -> None:
    """UA parts the CLI adds (workload/…) are fine, whatever their value."""
    _, app, _ = make()
    req = first("claude-code-2.1.197-print")
    set_header(req, "User-Agent", "claude-cli/2.1.197 (external, sdk-cli, workload/anonymous)")
    assert (await replay(app, req, new_key())).status == 200


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"claude-opus-4-7-max","model":"claude-opus-4-8","max_tokens":5,"messages":[]}',
        b'{"model":"claude-opus-4-8","max_tokens":5,"mod\\u0065l":"claude-opus-4-8",'
        b'"model":"claude-opus-4-7-max","messages":[]}',
        b'{"model":"Claude-Opus-4-7-MAX ","model":"claude-opus-4-8","max_tokens":5,"messages":[]}',
    ],
)
async def test_duplicate_model_keys_smuggling_blocked(make: Make, body: bytes) -> None:
    """A -max id hidden behind a duplicate "model" key is still a -max request."""
    gov, app, echo = make()
    req = first("anthropic-python-sdk-2.14.0")
    req["raw_body"] = body
    key = new_key()
    assert (await replay(app, req, key)).status == 403
    assert await suspended(gov, key)
    assert echo.calls == []


async def test_model_word_in_content_is_no_duplicate(make: Make) -> None:
    """A "model" string inside the messages is not a second model key."""
    _, app, _ = make()
    req = first("anthropic-python-sdk-2.14.0")
    req["body"]["model"] = "claude-opus-4-8"
    req["body"]["messages"] = [{"role": "user", "content": {"model": "claude-opus-4-7-max"}}]
    req["body"]["tools"] = [{"name": "t", "input_schema": {"properties": {"model": {}}}}]
    assert (await replay(app, req, new_key())).status == 200
