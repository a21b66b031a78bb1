"""Every response header governor documents, spelled exactly as the spec spells them.

Names are kept as the spec writes them (``X-Hypereal-Managed-Governor``) for docs and
tests; on the wire ASGI wants lower-case bytes, which the ``*_B`` helpers give. HTTP
header names are case-insensitive, so clients see the same field either way.
"""

from __future__ import annotations

from collections.abc import Iterable

from governor.types import Message, RawHeaders

GOVERNOR = "X-Hypereal-Managed-Governor"
CONCURRENCY_LIMIT = "X-Hypereal-Managed-Model-Concurrency-Limit"
CONCURRENCY_REMAINING = "X-Hypereal-Managed-Model-Concurrency-Remaining"
RPM_LIMIT = "X-Hypereal-Managed-Model-RPM-Limit"
RPM_REMAINING = "X-Hypereal-Managed-Model-RPM-Remaining"
CAPACITY_REQUESTS_REMAINING = "X-Hypereal-Capacity-Requests-Remaining"
IPM_LIMIT = "X-Hypereal-Managed-Image-IPM-Limit"
IPM_REMAINING = "X-Hypereal-Managed-Image-IPM-Remaining"
CIRCUIT = "X-Hypereal-Managed-Circuit"
INSURANCE_STATUS = "X-Hypereal-Insurance-Status"
INSURANCE_TRIGGER = "X-Hypereal-Insurance-Trigger"
INSURANCE_LATENCY_MS = "X-Hypereal-Insurance-Latency-Ms"
INSURANCE_THRESHOLD_MS = "X-Hypereal-Insurance-Threshold-Ms"
INSURANCE_CREDITS = "X-Hypereal-Insurance-Credits"

# Headers of governor's own, in the same family (not in the spec).
REQUEST_ID = "X-Hypereal-Request-Id"
QUEUE_WAIT_MS = "X-Hypereal-Managed-Queue-Wait-Ms"
DEGRADED = "X-Hypereal-Managed-Degraded"

# Request headers governor reads and strips before forwarding.
CACHE = "X-Hypereal-Cache"
SESSION_ID = "X-Session-Id"
CLAUDE_CODE_SESSION_ID = "X-Claude-Code-Session-Id"

DOCUMENTED = (
    GOVERNOR,
    CONCURRENCY_LIMIT,
    CONCURRENCY_REMAINING,
    RPM_LIMIT,
    RPM_REMAINING,
    CAPACITY_REQUESTS_REMAINING,
    IPM_LIMIT,
    IPM_REMAINING,
    CIRCUIT,
    INSURANCE_STATUS,
    INSURANCE_TRIGGER,
    INSURANCE_LATENCY_MS,
    INSURANCE_THRESHOLD_MS,
    INSURANCE_CREDITS,
)


def wire(name: str) -> bytes:
    """The ASGI form of a header name: lower-case bytes."""
    return name.lower().encode("latin-1")


def header(name: str, value: str | int) -> tuple[bytes, bytes]:
    """One raw ASGI header pair."""
    return wire(name), str(value).encode("latin-1")


def get(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of *name* (lower-case bytes) in raw *headers*."""
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def first_values(headers: Iterable[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    """Lower-case name -> first value: one pass, so that later lookups cost a dict get
    instead of a scan that lower-cases every name (a Claude Code request carries ~20)."""
    found: dict[bytes, bytes] = {}
    for key, value in headers:
        found.setdefault(key.lower(), value)
    return found


def get_all(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    """Every value of *name* (lower-case bytes) in raw *headers*, in order."""
    return [value for key, value in headers if key.lower() == name]


def append(message: Message, extra: RawHeaders) -> None:
    """Add *extra* to an ``http.response.start`` *message* in place."""
    if extra:
        message["headers"] = [*message.get("headers", ()), *extra]


def replace(message: Message, extra: RawHeaders) -> None:
    """Set *extra* on an ``http.response.start`` *message*, dropping any earlier values."""
    names = {k for k, _ in extra}
    headers = message.get("headers", ())
    # Most responses carry none of these names: then a plain append does.
    for k, _ in headers:
        if k.lower() in names:
            headers = [(k, v) for k, v in headers if k.lower() not in names]
            break
    message["headers"] = [*headers, *extra]
