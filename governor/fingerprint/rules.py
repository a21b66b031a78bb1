"""The fingerprint rules as data: version tables, beta lists, wrapper blocklists.

The rules ship in ``rules.toml`` beside this module; ``fingerprint.rules_path`` in the
config (or ``FingerprintMiddleware(rules=...)``) points at a replacement file, so a new
CLI release needs a table entry, not a code change.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from governor.errors import ConfigurationError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

Version = tuple[int, ...]

_VERSION = re.compile(r"^v?(\d{1,6})\.(\d{1,6})\.(\d{1,6})$")


def parse_version(text: str) -> Version | None:
    """``"2.1.197"`` or ``"v26.3.0"`` as a comparable tuple; None if malformed."""
    m = _VERSION.match(text.strip())
    return tuple(int(g) for g in m.groups()) if m else None


@dataclasses.dataclass(frozen=True)
class VersionInfo:
    """What one CLI release sends (one ``[versions."x.y.z"]`` table)."""

    version: Version
    build: Literal["node", "bun"]
    stainless: Version
    runtime: Version | None
    session_header: bool
    user_id: Literal["legacy", "json"]
    billing: Literal["none", "cch", "plain"]
    helper_method: bool


@dataclasses.dataclass(frozen=True)
class WrapperRules:
    """Known wrappers' telltales."""

    user_agent: tuple[str, ...]
    headers: frozenset[str]
    header_prefixes: tuple[str, ...]
    system_phrases: tuple[str, ...]
    tools: frozenset[str]


@dataclasses.dataclass(frozen=True)
class Rules:
    """Everything the stateless layers compare a request with."""

    anthropic_version: str
    required_beta: str
    entrypoints: frozenset[str]
    ua_parts: frozenset[str]
    agent_sdk_parts: frozenset[str]
    identity_cli: str
    identity_sdk: str
    identity_sdk_append: str
    known_betas: frozenset[str]
    forbidden_betas: frozenset[str]
    forbidden_headers: frozenset[str]
    required_stainless: tuple[str, ...]
    node_only_headers: tuple[str, ...]
    node_runtime_min: Version
    node_runtime_max: Version
    wrappers: WrapperRules
    versions: tuple[VersionInfo, ...]  # sorted, oldest first

    @property
    def newest(self) -> VersionInfo:
        return self.versions[-1]

    def neighbours(self, version: Version) -> tuple[VersionInfo | None, VersionInfo | None]:
        """The known releases at or below and at or above *version* (equal when known)."""
        lower = upper = None
        for info in self.versions:
            if info.version <= version:
                lower = info
            if info.version >= version and upper is None:
                upper = info
        return lower, upper


def _strs(data: Mapping[str, Any], name: str, where: str) -> tuple[str, ...]:
    value = data.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigurationError(f"{where}.{name}: expected a list of strings")
    return tuple(value)


def _str(data: Mapping[str, Any], name: str, where: str) -> str:
    value = data.get(name)
    if not isinstance(value, str):
        raise ConfigurationError(f"{where}.{name}: expected a string")
    return value


def _ver(text: str, where: str) -> Version:
    v = parse_version(text)
    if v is None:
        raise ConfigurationError(f"{where}: not a version: {text!r}")
    return v


def _version_info(name: str, data: Mapping[str, Any], where: str) -> VersionInfo:
    where = f'{where}.versions."{name}"'
    build = data.get("build")
    user_id = data.get("user_id")
    billing = data.get("billing")
    if build not in ("node", "bun"):
        raise ConfigurationError(f"{where}.build: expected 'node' or 'bun'")
    if user_id not in ("legacy", "json"):
        raise ConfigurationError(f"{where}.user_id: expected 'legacy' or 'json'")
    if billing not in ("none", "cch", "plain"):
        raise ConfigurationError(f"{where}.billing: expected 'none', 'cch' or 'plain'")
    runtime = data.get("runtime")
    if build == "bun" and not isinstance(runtime, str):
        raise ConfigurationError(f"{where}.runtime: a bun build needs its runtime version")
    flags = {}
    for flag in ("session_header", "helper_method"):
        value = data.get(flag)
        if not isinstance(value, bool):
            raise ConfigurationError(f"{where}.{flag}: expected true or false")
        flags[flag] = value
    return VersionInfo(
        version=_ver(name, where),
        build=build,
        stainless=_ver(_str(data, "stainless", where), f"{where}.stainless"),
        runtime=_ver(runtime, f"{where}.runtime") if isinstance(runtime, str) else None,
        session_header=flags["session_header"],
        user_id=user_id,
        billing=billing,
        helper_method=flags["helper_method"],
    )


def rules_from_mapping(data: Mapping[str, Any], where: str = "rules") -> Rules:
    """Validate parsed rules data; raises :class:`ConfigurationError` naming the bad field."""
    wrappers = data.get("wrappers", {})
    versions = data.get("versions", {})
    if not isinstance(wrappers, dict) or not isinstance(versions, dict) or not versions:
        raise ConfigurationError(f"{where}: needs a [wrappers] table and [versions] entries")
    infos = sorted(
        (_version_info(str(k), v, where) for k, v in versions.items()), key=lambda i: i.version
    )
    w = f"{where}.wrappers"
    return Rules(
        anthropic_version=_str(data, "anthropic_version", where),
        required_beta=_str(data, "required_beta", where),
        entrypoints=frozenset(_strs(data, "entrypoints", where)),
        ua_parts=frozenset(_strs(data, "ua_parts", where)),
        agent_sdk_parts=frozenset(_strs(data, "agent_sdk_parts", where)),
        identity_cli=_str(data, "identity_cli", where),
        identity_sdk=_str(data, "identity_sdk", where),
        identity_sdk_append=_str(data, "identity_sdk_append", where),
        known_betas=frozenset(_strs(data, "known_betas", where)),
        forbidden_betas=frozenset(_strs(data, "forbidden_betas", where)),
        forbidden_headers=frozenset(h.lower() for h in _strs(data, "forbidden_headers", where)),
        required_stainless=tuple(h.lower() for h in _strs(data, "required_stainless", where)),
        node_only_headers=tuple(h.lower() for h in _strs(data, "node_only_headers", where)),
        node_runtime_min=_ver(_str(data, "node_runtime_min", where), f"{where}.node_runtime_min"),
        node_runtime_max=_ver(_str(data, "node_runtime_max", where), f"{where}.node_runtime_max"),
        wrappers=WrapperRules(
            user_agent=tuple(s.lower() for s in _strs(wrappers, "user_agent", w)),
            headers=frozenset(s.lower() for s in _strs(wrappers, "headers", w)),
            header_prefixes=tuple(s.lower() for s in _strs(wrappers, "header_prefixes", w)),
            system_phrases=tuple(s.lower() for s in _strs(wrappers, "system_phrases", w)),
            tools=frozenset(_strs(wrappers, "tools", w)),
        ),
        versions=tuple(infos),
    )


def load_rules(path: str | Path | None = None) -> Rules:
    """The rules in *path* (TOML), or the packaged ``rules.toml``."""
    if path is None:
        text = resources.files(__package__).joinpath("rules.toml").read_text(encoding="utf-8")
        where = "rules.toml"
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigurationError(f"fingerprint rules: cannot read {path}: {exc}") from None
        where = str(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{where}: not valid TOML: {exc}") from None
    return rules_from_mapping(data, where)
