"""Fingerprint rules as data, config policy, and which requests the check applies to."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from governor import Governor, key_id
from governor.config import Config, FingerprintConfig, ModelEntry, load_config
from governor.context import Surface
from governor.errors import ConfigurationError
from governor.fingerprint import (
    FingerprintMiddleware,
    Inspector,
    Suspensions,
    canonical_route,
    load_rules,
)
from governor.fingerprint.rules import parse_version
from tests.apps import EchoApp
from tests.fingerprint_support import (
    first,
    get_header,
    new_key,
    replay,
    set_header,
    with_version,
)
from tests.helpers import auth, call, make_scope

RULES = Path(__file__).parents[1] / "governor" / "fingerprint" / "rules.toml"


def test_packaged_rules_load() -> None:
    """The packaged tables load, oldest version first."""
    rules = load_rules()
    versions = [i.version for i in rules.versions]
    assert versions == sorted(versions)
    assert rules.newest.version == (2, 1, 332)
    assert "oauth-2025-04-20" in rules.forbidden_betas


def test_new_release_is_one_table_entry(tmp_path: Path) -> None:
    """Adding a [versions] entry makes a new release known (and exact) without code."""
    path = tmp_path / "rules.toml"
    path.write_text(
        RULES.read_text() + '\n[versions."2.1.400"]\nbuild = "bun"\nstainless = "0.131.0"\n'
        'runtime = "v26.14.0"\nsession_header = true\nuser_id = "json"\n'
        'billing = "plain"\nhelper_method = false\n'
    )
    rules = load_rules(path)
    assert rules.newest.version == (2, 1, 400)
    req = first("claude-code-2.1.197-print")
    with_version(req, "2.1.400", stainless="0.131.0", runtime="v26.14.0")
    inspection = Inspector(rules, ("cli", "sdk-cli")).inspect(
        Surface.MESSAGES,
        b"beta=true",
        [(k.lower().encode(), v.encode()) for k, v in req["headers"]],
        req["body"],
    )
    assert inspection.table == "known"
    assert inspection.findings == []


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace('build = "bun"', 'build = "deno"', 1), "build"),
        (lambda t: t.replace('stainless = "0.94.0"', 'stainless = "soon"'), "stainless"),
        (lambda t: t.replace("anthropic_version =", "anthropic_versions ="), "anthropic_version"),
        (lambda t: t + "\n[[[", "not valid TOML"),
    ],
)
def test_bad_rules_rejected(tmp_path: Path, edit: object, message: str) -> None:
    """A broken rules file is a configuration error naming the field."""
    path = tmp_path / "rules.toml"
    path.write_text(edit(RULES.read_text()))  # type: ignore[operator]
    with pytest.raises(ConfigurationError, match=message):
        load_rules(path)


def test_rules_path_from_config(tmp_path: Path) -> None:
    """fingerprint.rules_path points the middleware at another rules file."""
    path = tmp_path / "rules.toml"
    path.write_text(RULES.read_text().replace('"oauth-2025-04-20", ', ""))
    config = Config(fingerprint=FingerprintConfig(rules_path=str(path)))
    middleware = FingerprintMiddleware(EchoApp(), governor=Governor(config))
    assert "oauth-2025-04-20" not in middleware.rules.forbidden_betas


def test_policy_from_config_file(tmp_path: Path) -> None:
    """Policy is config: TOML and GOVERNOR_FINGERPRINT__* overrides."""
    path = tmp_path / "governor.toml"
    path.write_text('[fingerprint]\nofficial_entrypoints = ["cli"]\nstrikes_to_suspend = 3\n')
    config = load_config(path, environ={"GOVERNOR_FINGERPRINT__BEHAVIOUR_ACTION": '"suspend"'})
    assert config.fingerprint.official_entrypoints == ("cli",)
    assert config.fingerprint.strikes_to_suspend == 3
    assert config.fingerprint.behaviour_action == "suspend"
    with pytest.raises(ConfigurationError, match="strikes_to_suspend"):
        load_config(path, environ={"GOVERNOR_FINGERPRINT__STRIKES_TO_SUSPEND": "0"})


def test_version_parsing() -> None:
    """Versions compare numerically: 2.1.100 is newer than 2.1.74."""
    assert parse_version("2.1.100") > parse_version("2.1.74")  # type: ignore[operator]
    assert parse_version("v26.3.0") == (26, 3, 0)
    assert parse_version("2.1") is None


def test_older_than_tables_is_soft() -> None:
    """A version older than the tables, consistent with the oldest, is only logged."""
    req = first("claude-code-2.1.74-print")
    with_version(req, "2.0.50", stainless="0.70.0")
    set_header(req, "x-stainless-helper-method", "stream")  # as 2.0.76 sends it
    system = req["body"]["system"]
    req["body"]["system"] = system[1:]  # no billing block before 2.1.74
    inspection = Inspector(load_rules(), ("cli", "sdk-cli")).inspect(
        Surface.MESSAGES,
        b"beta=true",
        [(k.lower().encode(), v.encode()) for k, v in req["headers"]],
        req["body"],
    )
    assert inspection.table == "older"
    assert {f.severity for f in inspection.findings} == {"soft"}, inspection.findings


async def test_config_added_max_claude_model_governed() -> None:
    """A -max Claude id added by config (no upstream set) is still CLI-only."""
    entry = ModelEntry(context_tokens=200_000, input_price=1.0, output_price=2.0)
    config = Config(demo_keys=True, models={"claude-opus-5-max": entry})
    gov = Governor(config, registry=CollectorRegistry())
    app = FingerprintMiddleware(EchoApp(), governor=gov)
    req = first("anthropic-python-sdk-2.14.0")
    req["body"]["model"] = "Claude-Opus-5-MAX "
    key = new_key()
    assert (await replay(app, req, key)).status == 403
    assert await Suspensions(gov).get(key_id(key)) is not None
    genuine = first("claude-code-2.1.197-print")
    genuine["body"]["model"] = "claude-opus-5-max"
    assert (await replay(app, genuine, new_key())).status == 200


async def test_ungoverned_paths_pass_through() -> None:
    """Paths governor does not govern (health, preconnect HEAD /) are untouched."""
    echo = EchoApp()
    app = FingerprintMiddleware(echo, governor=Governor(registry=CollectorRegistry()))
    assert (await call(app, "HEAD", "/", headers=auth("anything"))).status == 200
    assert (await call(app, "GET", "/health")).status == 200
    assert len(echo.calls) == 2


@pytest.mark.parametrize(
    ("path", "raw", "route"),
    [
        ("/v1/%6Dessages", b"/v1/%256Dessages", "/v1/messages"),
        ("/V1/MESSAGES/count_tokens", b"/V1/MESSAGES/count_tokens", "/v1/messages/count_tokens"),
        (
            "/v1/managed/chat/completions;a",
            b"/v1/managed/chat/completions;a",
            "/v1/managed/chat/completions",
        ),
        ("/health", b"/health", None),
    ],
)
def test_canonical_route(path: str, raw: bytes, route: str | None) -> None:
    """Disguised spellings of governed paths are recognised."""
    scope = make_scope(path=path)
    scope["raw_path"] = raw
    assert canonical_route(scope) == route


def test_fixture_user_agents_parse() -> None:
    """Every captured real-CLI User-Agent matches the grammar (sanity of the helpers)."""
    for name in ("claude-code-2.1.197-print", "claude-code-2.1.74-print"):
        ua = get_header(first(name), "user-agent") or ""
        assert ua.startswith("claude-cli/")
