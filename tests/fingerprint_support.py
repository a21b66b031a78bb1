"""Replaying the captured client requests (tests/fixtures/clients, copied from
shared/fixtures/clients) against governor as raw ASGI requests.

Headers keep their captured order and case (a server lower-cases names; these tests also
check that governor reads them case-insensitively). The API key is replaced by a test
key; the body is the captured JSON re-serialised compactly (the captures redact long
prose, so the compact form is the exact bytes only for the small bodies) and sent as is.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from governor import ContextMiddleware, Governor
from governor.backends import Backend
from governor.clock import ManualClock
from governor.config import Config, FingerprintConfig
from governor.fingerprint import FingerprintMiddleware
from governor.types import ASGIApp
from tests.apps import EchoApp
from tests.helpers import Result, run_scope

FIXTURES = Path(__file__).parent / "fixtures" / "clients"
CAPTURED_KEY = "ck_test"

# The real CLI: interactive, -p, -p with x-api-key, subagents, an old Node build.
GENUINE = (
    "claude-code-2.1.197-interactive",
    "claude-code-2.1.197-print",
    "claude-code-2.1.197-print-x-api-key",
    "claude-code-2.1.197-subagent",
    "claude-code-2.1.74-print",
)
# SDKs, the Agent SDK (not an official entrypoint), curl, a wrapper.
FOREIGN = (
    "anthropic-node-sdk-1.14.0",
    "anthropic-python-sdk-2.14.0",
    "claude-agent-sdk-ts-0.3.332",
    "curl",
    "hermes-oauth-style-reconstructed",
    "openai-python-sdk-3.57.0",
)


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    return data


def requests(name: str) -> list[dict[str, Any]]:
    """The POST requests of fixture *name* (deep copies: tests may edit them)."""
    return [copy.deepcopy(r) for r in load(name)["requests"] if r["method"] == "POST"]


def first(name: str) -> dict[str, Any]:
    return requests(name)[0]


def new_key() -> str:
    return f"ck_fp_{uuid.uuid4().hex}"


def body_bytes(req: dict[str, Any]) -> bytes:
    if "raw_body" in req:
        raw: bytes = req["raw_body"]
        return raw
    return json.dumps(req["body"], separators=(",", ":"), ensure_ascii=False).encode()


def set_header(req: dict[str, Any], name: str, value: str | None) -> None:
    """Replace (or with None remove) every *name* header, keeping the first's position."""
    out: list[list[str]] = []
    placed = False
    for k, v in req["headers"]:
        if k.lower() == name.lower():
            if value is not None and not placed:
                out.append([k, value])
                placed = True
            continue
        out.append([k, v])
    if value is not None and not placed:
        out.append([name, value])
    req["headers"] = out


def get_header(req: dict[str, Any], name: str) -> str | None:
    return next((v for k, v in req["headers"] if k.lower() == name.lower()), None)


def headers_for(req: dict[str, Any], key: str, body: bytes) -> list[tuple[bytes, bytes]]:
    out = []
    for name, value in req["headers"]:
        lname = name.lower()
        if lname in ("authorization", "x-api-key"):
            value = value.replace(CAPTURED_KEY, key)
        elif lname == "content-length":
            value = str(len(body))
        out.append((name.encode("latin-1"), value.encode("latin-1")))
    return out


def scope_for(
    req: dict[str, Any],
    key: str,
    body: bytes,
    *,
    path: str | None = None,
    raw_path: bytes | None = None,
    client: tuple[str, int] = ("10.0.0.1", 50000),
) -> dict[str, Any]:
    path = path if path is not None else req["path"]
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": req["method"],
        "scheme": "http",
        "path": path,
        "raw_path": raw_path if raw_path is not None else path.encode(),
        "query_string": req["query"].encode(),
        "root_path": "",
        "headers": headers_for(req, key, body),
        "client": client,
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


Make = Callable[..., tuple[Governor, ASGIApp, EchoApp]]


def stack_factory(backend: Backend, clock: ManualClock, registry: CollectorRegistry) -> Make:
    """A builder of (governor, Context + Fingerprint over an echo app, the echo app),
    taking ``FingerprintConfig`` options."""

    def build(**options: Any) -> tuple[Governor, ASGIApp, EchoApp]:
        config = Config(demo_keys=True, fingerprint=FingerprintConfig(**options))
        gov = Governor(config, backend=backend, clock=clock, registry=registry)
        echo = EchoApp()
        app = ContextMiddleware(FingerprintMiddleware(echo, governor=gov), governor=gov)
        return gov, app, echo

    return build


async def run(app: ASGIApp, scope: dict[str, Any], body: bytes) -> Result:
    """Send one request with *body* to *app*; record the answer."""
    return await run_scope(app, scope, [body])


async def replay(
    app: ASGIApp,
    req: dict[str, Any],
    key: str,
    *,
    path: str | None = None,
    raw_path: bytes | None = None,
    client: tuple[str, int] = ("10.0.0.1", 50000),
) -> Result:
    """Replay captured request *req* with *key* instead of the captured one."""
    body = body_bytes(req)
    return await run(
        app, scope_for(req, key, body, path=path, raw_path=raw_path, client=client), body
    )


def error_code(result: Result) -> str | None:
    """The error code/type of a refusal in either shape."""
    data = result.json()
    err = data.get("error", {})
    if data.get("type") == "error":  # Anthropic shape: no code field; message says
        return "key_suspended" if "suspended" in err.get("message", "") else err.get("type")
    code: str | None = err.get("code")
    return code


def with_version(
    req: dict[str, Any],
    version: str,
    *,
    stainless: str | None = None,
    runtime: str | None = None,
) -> None:
    """Rewrite a captured CLI request to claim another CLI version, consistently."""
    ua = get_header(req, "user-agent") or ""
    rest = ua.split(" ", 1)[1]
    set_header(req, "User-Agent", f"claude-cli/{version} {rest}")
    if stainless is not None:
        set_header(req, "X-Stainless-Package-Version", stainless)
    if runtime is not None:
        set_header(req, "X-Stainless-Runtime-Version", runtime)
    system = req["body"].get("system")
    if isinstance(system, list) and system and "cc_version=" in system[0].get("text", ""):
        text = system[0]["text"]
        _, _, tail = text.partition("cc_version=")
        old = tail.split(";", 1)[0]
        suffix = old.rsplit(".", 1)[1]
        system[0]["text"] = text.replace(f"cc_version={old}", f"cc_version={version}.{suffix}")


def iter_fixture_names() -> Iterator[str]:
    yield from GENUINE
    yield from FOREIGN
