"""What every breaker part shares: states, verdicts, decisions, and what counts as a failure."""

from __future__ import annotations

import dataclasses
import enum

from pybreaker import STATE_CLOSED, STATE_HALF_OPEN, STATE_OPEN

from governor.catalog import ModelSpec
from governor.config import BreakerConfig
from governor.context import RequestContext
from governor.response import Outcome

CLOSED: str = STATE_CLOSED
OPEN: str = STATE_OPEN
HALF_OPEN: str = STATE_HALF_OPEN
STATES = (CLOSED, HALF_OPEN, OPEN)
# Gauge values: the worse the state, the higher, so a fleet-wide max reads right.
STATE_CODE = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}

# Retry-After for a caller refused because the half-open probes are all in flight:
# their outcome is usually known within a second or so.
PROBES_BUSY_RETRY_S = 1.0


class Verdict(enum.Enum):
    """What one request tells the breaker."""

    SUCCESS = "success"
    FAILURE = "failure"
    NEUTRAL = "neutral"


def path_of(model: ModelSpec) -> str:
    """The breaker path of *model*: its id and the upstream it is served from."""
    return f"{model.id}@{model.upstream.value}"


def split_path(path: str) -> tuple[str, str]:
    model, _, upstream = path.rpartition("@")
    return model, upstream


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    """The shared state of one path as Redis last reported it."""

    state: str
    forced: str | None
    fails: int
    remaining_s: float  # until half-open, when open
    open_for_s: float  # how long the current (or next) open period lasts
    # Grows with every write (0: no state stored yet); the newest reply wins.
    version: int = 0

    @classmethod
    def from_reply(cls, reply: list[object], base_s: float) -> tuple[Snapshot, bool]:
        """Decode a Lua reply: state, fails, remaining ms, open ms, forced, granted, version."""
        state, fails, remaining, open_ms, forced, granted, version = (_text(v) for v in reply)
        snap = cls(
            state=state if state in STATE_CODE else CLOSED,
            forced=forced or None,
            fails=int(fails or 0),
            remaining_s=max(0.0, int(remaining or 0) / 1000),
            open_for_s=int(open_ms or 0) / 1000 or base_s,
            version=int(version or 0),
        )
        return snap, granted == "1"


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return "" if value is None or value is False else str(value)


@dataclasses.dataclass(slots=True)
class Admission:
    """A request let through: with which state, as a probe or not."""

    path: str
    state: str
    probe: bool = False
    gen: int = 0
    # False under a forced state: the operator's override, not the traffic, decides.
    record: bool = True
    # True when the shared (Redis) state admitted it; its outcome goes back to Redis.
    shared: bool = False
    probe_id: str = ""
    degraded: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Refusal:
    """A request refused at once: the state, seconds until worth retrying, a reason label."""

    state: str
    retry_after: float
    reason: str
    degraded: bool = False


def classify(
    ctx: RequestContext,
    exc: BaseException | None,
    passed_at: float,
    config: BreakerConfig,
) -> Verdict:
    """Success, failure or neither, from how the request ended.

    Failures: upstream 5xx (529, the demo forwarder's 502/504 included), 429 when
    ``count_429``, a 2xx JSON body that does not parse (billing sees it), the app raising
    (connection errors, timeouts), a stream broken mid-way, and a first byte slower than
    ``slow_first_byte_s``. Neutral: governor's own refusals,
    client disconnects, cancellation, and 4xx the request itself caused.
    """
    outcome = ctx.response.outcome(
        refused=ctx.refusal is not None, disconnected=ctx.disconnected, exc=exc
    )
    if outcome in (Outcome.REFUSED, Outcome.DISCONNECTED, Outcome.CANCELLED, Outcome.CLIENT_ERROR):
        return Verdict.NEUTRAL
    if outcome is Outcome.UPSTREAM_ERROR:
        if ctx.response.status == 429 and not config.count_429:
            return Verdict.NEUTRAL
        return Verdict.FAILURE
    if outcome in (Outcome.EXCEPTION, Outcome.STREAM_BROKEN):
        return Verdict.FAILURE
    slow = config.slow_first_byte_s
    first = ctx.response.first_byte_at
    if slow is not None and first is not None:
        # Measured from when the request passed the breaker, minus the admission queue's
        # wait (it sits inside): the upstream's own latency, not governor's.
        queued = float(ctx.notes.get("queue_wait_ms", 0) or 0) / 1000
        if first - passed_at - queued > slow:
            return Verdict.FAILURE
    return Verdict.SUCCESS
