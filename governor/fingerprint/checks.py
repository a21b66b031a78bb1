"""The stateless layers: hard requirements, consistency with the version tables, and the
wrapper blocklist. Pure functions of one request and the :class:`~governor.fingerprint.rules.Rules`.

Every finding has a severity:

- ``violation``: clear evidence the client is not the official CLI (or is an entrypoint
  the policy does not admit). A strike against the key; suspension per policy.
- ``block``: refuse, without a strike: an entrypoint unknown to the tables on a release
  newer than them (it is not an official one either way), behaviour limits.
- ``soft``: logged and counted, never refused on its own (header order, a missing
  billing block, unknown betas, ...): proxies and settings can cause them.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal
from urllib.parse import parse_qsl

from governor.context import Surface
from governor.fingerprint.rules import Rules, Version, VersionInfo, parse_version

Severity = Literal["violation", "block", "soft"]

_UA = re.compile(r"^claude-cli/(\d+\.\d+\.\d+) \(external, ([A-Za-z0-9_.-]+)((?:, [^,()]+)*)\)$")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_LEGACY_USER = re.compile(
    r"^user_([0-9a-f]{64})_account_((?:[0-9a-f-]{36})?)_session_([0-9a-f-]{36})$"
)
_AGENT_ID = re.compile(r"^a[0-9a-f]{16}$")
_CC_VERSION = re.compile(r"^(\d+\.\d+\.\d+)\.[0-9a-f]{3}$")
BILLING_PREFIX = "x-anthropic-billing-header:"

# Headers whose duplicates matter: everything the checks read, and credentials.
_WATCHED_PREFIXES = ("x-stainless-", "anthropic-", "x-claude-code-")
_WATCHED = frozenset({"user-agent", "x-app", "authorization", "x-api-key", "content-type", "host"})


@dataclasses.dataclass(frozen=True, slots=True)
class Finding:
    """One observation about a request."""

    code: str
    severity: Severity
    detail: str = ""


@dataclasses.dataclass(slots=True)
class Inspection:
    """What the stateless layers found, and the identifiers the behavioural layer uses."""

    findings: list[Finding] = dataclasses.field(default_factory=list)
    version: str | None = None
    entrypoint: str | None = None
    # "known", "between", "newer", "older" relative to the version table.
    table: str | None = None
    device_id: str | None = None
    session_id: str | None = None

    def add(self, code: str, severity: Severity, detail: str = "") -> None:
        self.findings.append(Finding(code, severity, detail))


def header_map(raw: Sequence[tuple[bytes, bytes]]) -> tuple[dict[str, list[str]], list[str]]:
    """Values by lower-cased name (received order kept), and the names in order."""
    values: dict[str, list[str]] = {}
    order: list[str] = []
    for name, value in raw:
        key = name.decode("latin-1").strip().lower()
        values.setdefault(key, []).append(value.decode("latin-1").strip())
        order.append(key)
    return values, order


def _watched(name: str) -> bool:
    return name in _WATCHED or name.startswith(_WATCHED_PREFIXES)


def _system_texts(payload: Mapping[str, Any]) -> list[str]:
    system = payload.get("system")
    if isinstance(system, str):
        return [system]
    if isinstance(system, list):
        blocks = [b for b in system if isinstance(b, Mapping)]
        return [b["text"] for b in blocks if isinstance(b.get("text"), str)]
    return []


def _tool_names(payload: Mapping[str, Any]) -> list[str] | None:
    tools = payload.get("tools")
    if not isinstance(tools, list):
        return None
    return [t["name"] for t in tools if isinstance(t, Mapping) and isinstance(t.get("name"), str)]


class Inspector:
    """Runs the stateless layers for one policy and one rule set."""

    def __init__(self, rules: Rules, official_entrypoints: Sequence[str]) -> None:
        self.rules = rules
        self.official = frozenset(official_entrypoints)

    def inspect(
        self,
        surface: Surface,
        query_string: bytes,
        raw_headers: Sequence[tuple[bytes, bytes]],
        payload: Mapping[str, Any],
    ) -> Inspection:
        out = Inspection()
        if surface not in (Surface.MESSAGES, Surface.COUNT_TOKENS):
            out.add("wrong_path", "violation", f"surface {surface.value}")
            return out
        headers, order = header_map(raw_headers)
        self._duplicates(headers, out)
        one = {name: vals[0] for name, vals in headers.items()}
        self._query(query_string, out)
        self._credentials(headers, out)
        self._wrappers(one, headers, payload, out)
        ua = self._user_agent(one.get("user-agent", ""), out)
        self._basics(one, surface, out)
        self._betas(one.get("anthropic-beta"), surface, payload, out)
        info = self._version(ua, out)
        self._entrypoint(out)
        self._runtime(one, info, out)
        self._session(one, surface, payload, info, out)
        if surface is Surface.MESSAGES:
            self._billing(one, payload, out, info)
            self._body_shape(payload, out)
        self._transport(one, order, out)
        return out

    # --- hard requirements ------------------------------------------------------------

    def _duplicates(self, headers: Mapping[str, list[str]], out: Inspection) -> None:
        for name, vals in headers.items():
            if len(vals) > 1 and _watched(name):
                if len(set(vals)) > 1:
                    out.add("duplicate_header", "violation", name)
                else:
                    out.add("repeated_header", "soft", name)

    def _query(self, query_string: bytes, out: Inspection) -> None:
        params = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
        beta = [v for k, v in params if k == "beta"]
        if beta != ["true"]:
            out.add("beta_query", "violation", "query must carry beta=true once")
        if len(params) > len(beta):
            out.add("extra_query", "soft")

    def _credentials(self, headers: Mapping[str, list[str]], out: Inspection) -> None:
        styles = [n for n in ("authorization", "x-api-key", "anthropic-api-key") if n in headers]
        if styles not in (["authorization"], ["x-api-key"]):
            out.add("credential_headers", "violation", ",".join(styles))

    def _wrappers(
        self,
        one: Mapping[str, str],
        headers: Mapping[str, list[str]],
        payload: Mapping[str, Any],
        out: Inspection,
    ) -> None:
        w = self.rules.wrappers
        ua = " ".join(headers.get("user-agent", [])).lower()
        hit = next((s for s in w.user_agent if s in ua), None)
        if hit:
            out.add("wrapper_user_agent", "violation", hit)
        for name in headers:
            if name in w.headers or name.startswith(w.header_prefixes):
                out.add("wrapper_header", "violation", name)
        system = "\n".join(_system_texts(payload)).lower()
        phrase = next((p for p in w.system_phrases if p in system), None)
        if phrase:
            out.add("wrapper_prompt", "violation", phrase)
        tools = _tool_names(payload) or []
        tool = next((t for t in tools if t in w.tools), None)
        if tool:
            out.add("wrapper_tool", "violation", tool)
        if tools and all(t.startswith("mcp__") for t in tools):
            out.add("mcp_only_tools", "soft")

    def _user_agent(self, ua: str, out: Inspection) -> tuple[str, str] | None:
        m = _UA.match(ua)
        if m is None:
            out.add("user_agent", "violation", ua[:120])
            return None
        version, entrypoint, rest = m.group(1), m.group(2), m.group(3)
        out.version, out.entrypoint = version, entrypoint
        for part in filter(None, (p.strip() for p in rest.split(","))):
            name = part.partition("/")[0]
            if name in self.rules.agent_sdk_parts:
                out.add("agent_sdk", "violation", name)
            elif name not in self.rules.ua_parts:
                out.add("unknown_ua_part", "soft", name[:40])
        return version, entrypoint

    def _entrypoint(self, out: Inspection) -> None:
        entrypoint = out.entrypoint
        if entrypoint is None:
            return
        if entrypoint not in self.rules.entrypoints:
            # A release newer than the tables may add entrypoints: refuse, never strike.
            sev: Severity = "block" if out.table == "newer" else "violation"
            out.add("unknown_entrypoint", sev, entrypoint[:40])
        elif entrypoint not in self.official:
            out.add("entrypoint_not_official", "violation", entrypoint)

    def _basics(self, one: Mapping[str, str], surface: Surface, out: Inspection) -> None:
        r = self.rules
        if one.get("x-app") != "cli":
            out.add("x_app", "violation")
        if one.get("anthropic-version") != r.anthropic_version:
            out.add("anthropic_version", "violation", one.get("anthropic-version", "")[:20])
        if one.get("anthropic-dangerous-direct-browser-access") != "true":
            out.add("browser_access_header", "violation")
        missing = [n for n in r.required_stainless if n not in one]
        if missing:
            out.add("stainless_missing", "violation", ",".join(missing))
        if one.get("x-stainless-lang", "js") != "js" or one.get("x-stainless-runtime", "node") != (
            "node"
        ):
            out.add("stainless_runtime", "violation")
        extra = sorted(n for n in r.forbidden_headers if n in one)
        if extra:
            out.add("sdk_headers", "violation", ",".join(extra))
        if surface is Surface.MESSAGES and "x-stainless-timeout" not in one:
            out.add("stainless_timeout_missing", "soft")
        agent = one.get("x-claude-code-agent-id")
        if agent is not None and not _AGENT_ID.match(agent):
            out.add("agent_id_format", "soft")

    def _betas(
        self, value: str | None, surface: Surface, payload: Mapping[str, Any], out: Inspection
    ) -> None:
        r = self.rules
        betas = [b.strip() for b in (value or "").split(",") if b.strip()]
        forbidden = sorted(set(betas) & r.forbidden_betas)
        if forbidden:
            out.add("forbidden_beta", "violation", ",".join(forbidden))
        # Side queries (titles, summaries) carry no claude-code beta: no tools, no thinking.
        thinking = payload.get("thinking")
        side_query = (
            surface is Surface.MESSAGES
            and payload.get("tools") in (None, [])
            and (
                thinking is None
                or (isinstance(thinking, Mapping) and thinking.get("type") == "disabled")
            )
        )
        if r.required_beta not in betas:
            if not side_query:
                out.add("claude_code_beta", "violation", "missing")
        elif betas[0] != r.required_beta:
            out.add("claude_code_beta", "violation", "not first")
        unknown = sorted(set(betas) - r.known_betas - r.forbidden_betas)
        if unknown:
            out.add("unknown_beta", "soft", ",".join(unknown)[:200])
        if len(set(betas)) != len(betas):
            out.add("repeated_beta", "soft")

    # --- consistency with the version tables ----------------------------------------

    def _version(self, ua: tuple[str, str] | None, out: Inspection) -> VersionInfo | None:
        """Classify the claimed version; returns its table entry when known exactly."""
        if ua is None:
            return None
        version = parse_version(ua[0])
        assert version is not None  # the UA pattern only matches x.y.z
        lower, upper = self.rules.neighbours(version)
        if lower is not None and lower is upper:
            out.table = "known"
            return lower
        if upper is None:
            out.table = "newer"
            out.add("unknown_version", "soft", ua[0])
        elif lower is None:
            out.table = "older"
            out.add("unknown_version", "soft", ua[0])
        else:
            out.table = "between"
        return None

    def _range(self, out: Inspection) -> tuple[VersionInfo | None, VersionInfo | None]:
        version = parse_version(out.version or "")
        return self.rules.neighbours(version) if version else (None, None)

    def _table_severity(self, out: Inspection) -> Severity:
        # A release newer than the tables may legitimately differ from them (a new
        # SDK, runtime or header): the tables cannot judge it, so only log.
        return "soft" if out.table == "newer" else "violation"

    def _runtime(self, one: Mapping[str, str], info: VersionInfo | None, out: Inspection) -> None:
        if out.table is None:
            return
        r = self.rules
        lower, upper = self._range(out)
        sev = self._table_severity(out)
        stainless = parse_version(one.get("x-stainless-package-version", ""))
        runtime = parse_version(one.get("x-stainless-runtime-version", ""))
        if stainless is None:
            out.add("stainless_version", "violation", "malformed")
        elif not _within(
            stainless, lower.stainless if lower else None, upper.stainless if upper else None
        ):
            out.add("stainless_version", sev, one.get("x-stainless-package-version", "")[:20])
        bun_only = _all_bun(lower, upper, out.table)
        if runtime is None:
            out.add("runtime_version", "violation", "malformed")
        elif bun_only:
            lo = lower.runtime if lower else None
            hi = upper.runtime if upper else None
            if not _within(runtime, lo, hi):
                out.add("runtime_version", sev, one.get("x-stainless-runtime-version", "")[:20])
        elif not r.node_runtime_min <= runtime <= r.node_runtime_max:
            out.add("runtime_version", sev, one.get("x-stainless-runtime-version", "")[:20])
        if bun_only and "sec-fetch-mode" in one:
            out.add("undici_headers", sev)
        helper = "x-stainless-helper-method" in one
        allowed = {i.helper_method for i in (lower, upper) if i is not None}
        if helper not in allowed:
            out.add("helper_method", sev)

    def _session(
        self,
        one: Mapping[str, str],
        surface: Surface,
        payload: Mapping[str, Any],
        info: VersionInfo | None,
        out: Inspection,
    ) -> None:
        header = one.get("x-claude-code-session-id")
        if header is not None:
            if not _UUID.match(header):
                out.add("session_id_format", "violation")
            out.session_id = header
        lower, upper = self._range(out)
        expected = {i.session_header for i in (lower, upper) if i is not None}
        if out.table is not None and (header is not None) not in expected:
            sev: Severity = "soft" if out.table == "newer" else "violation"
            out.add("session_header", sev, "missing" if header is None else "unexpected")
        if surface is not Surface.MESSAGES:
            return
        metadata = payload.get("metadata")
        user_id = metadata.get("user_id") if isinstance(metadata, Mapping) else None
        if not isinstance(user_id, str):
            out.add("user_id_missing", "violation")
            return
        form, device, session = _parse_user_id(user_id)
        if form is None:
            out.add("user_id_format", "violation")
            return
        out.device_id = device
        if header is None:
            out.session_id = session
        elif session != header:
            out.add("session_mismatch", "violation")
        forms = {i.user_id for i in (lower, upper) if i is not None}
        if out.table is not None and form not in forms:
            out.add("user_id_form", "soft" if out.table == "newer" else "violation", form)

    def _billing(
        self,
        one: Mapping[str, str],
        payload: Mapping[str, Any],
        out: Inspection,
        info: VersionInfo | None,
    ) -> None:
        r = self.rules
        texts = _system_texts(payload)
        lower, upper = self._range(out)
        kinds = {i.billing for i in (lower, upper) if i is not None}
        has_block = bool(texts) and texts[0].startswith(BILLING_PREFIX)
        identity_at = 1 if has_block else 0
        identity = texts[identity_at] if len(texts) > identity_at else None
        if identity not in (r.identity_cli, r.identity_sdk, r.identity_sdk_append):
            out.add("identity_unknown", "soft")
        elif out.entrypoint == "cli" and identity == r.identity_sdk:
            out.add("identity_entrypoint", "violation")
        if any(BILLING_PREFIX in t for t in texts[1:]):
            out.add("billing_position", "soft")
        if not has_block:
            if out.table is not None and "none" not in kinds:
                out.add("billing_missing", "soft")
            return
        fields = _billing_fields(texts[0][len(BILLING_PREFIX) :])
        if fields is None:
            out.add("billing_format", "violation")
            return
        m = _CC_VERSION.match(fields.get("cc_version", ""))
        if m is None or m.group(1) != out.version:
            out.add("billing_version", "violation")
        if fields.get("cc_entrypoint") != out.entrypoint:
            out.add("billing_entrypoint", "violation")
        if out.table is None:
            return
        subagent = fields.get("cc_is_subagent") == "true"
        if subagent != ("x-claude-code-agent-id" in one):
            # Seen together from the Bun builds on; older builds are not pinned.
            bun = _all_bun(lower, upper, out.table)
            sev_sub: Severity = "soft" if not bun else self._table_severity(out)
            out.add("billing_subagent", sev_sub)
        sev: Severity = "soft" if out.table == "newer" else "violation"
        if "none" in kinds and len(kinds) == 1:
            out.add("billing_unexpected", sev)
        elif "cch" in fields and "cch" not in kinds:
            out.add("billing_cch", sev)

    def _body_shape(self, payload: Mapping[str, Any], out: Inspection) -> None:
        keys = list(payload)
        if keys[:2] != ["model", "messages"]:
            out.add("body_key_order", "soft")
        if payload.get("stream") is not True:
            out.add("not_streaming", "soft")
        thinking = payload.get("thinking")
        if isinstance(thinking, Mapping) and thinking.get("display") == "summarized":
            out.add("thinking_summarized", "soft")

    def _transport(self, one: Mapping[str, str], order: list[str], out: Inspection) -> None:
        # Soft: reverse proxies and HTTP/2 front ends reorder and rewrite these.
        encoding = one.get("accept-encoding", "")
        bun = encoding == "gzip, deflate, br, zstd" and "accept-language" not in one
        node = (
            bool(order)
            and order[0] == "host"
            and one.get("accept-language") == "*"
            and one.get("sec-fetch-mode") == "cors"
        )
        if not (bun or node):
            out.add("transport_profile", "soft")


def _within(value: Version, lo: Version | None, hi: Version | None) -> bool:
    return (lo is None or value >= lo) and (hi is None or value <= hi)


def _all_bun(lower: VersionInfo | None, upper: VersionInfo | None, table: str | None) -> bool:
    """Whether only Bun builds exist around the claimed version (npm moved to Bun)."""
    if table == "older":
        return False
    return all(i.build == "bun" for i in (lower, upper) if i is not None)


def _parse_user_id(value: str) -> tuple[str | None, str | None, str | None]:
    """(form, device_id, session_id) of ``metadata.user_id``."""
    m = _LEGACY_USER.match(value)
    if m:
        return "legacy", m.group(1), m.group(3)
    if len(value) > 512 or not value.startswith('{"device_id":'):
        return None, None, None
    try:
        data = json.loads(value)
    except (ValueError, RecursionError):
        return None, None, None
    if not isinstance(data, dict) or list(data) != ["device_id", "account_uuid", "session_id"]:
        return None, None, None
    device, session = data["device_id"], data["session_id"]
    if not (isinstance(device, str) and _HEX64.match(device)):
        return None, None, None
    if not (isinstance(session, str) and _UUID.match(session)):
        return None, None, None
    if not isinstance(data["account_uuid"], str):
        return None, None, None
    return "json", device, session


def _billing_fields(text: str) -> dict[str, str] | None:
    fields: dict[str, str] = {}
    for part in text.strip().split(";"):
        part = part.strip()
        if not part:
            continue
        name, eq, value = part.partition("=")
        if not eq or not name:
            return None
        fields[name.strip()] = value.strip()
    return fields if "cc_version" in fields and "cc_entrypoint" in fields else None
