"""Which limits a request meets, what each costs, and how a window's state reads out.

Every guard is one `limits` sliding-window-counter item: an amount per window, keyed
by what it counts (a model, an account, a key, a key on a model). The window maths
here (remaining, when capacity comes back) follows limits' own weighting:
``floor(previous * previous_ttl / window) + current``.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import math

from limits import RateLimitItem, RateLimitItemPerSecond

from governor.config import Config, ModelLimits
from governor.context import RequestContext, Surface

# Every rate key of one request must hash to one Redis Cluster slot, because the admit
# script touches them all. limits wraps each item key in braces (``{<key>}``); starting
# the namespace with ``{rl}`` makes the slot's hash tag ``{rl`` (the text between the
# first "{" and the first "}") for every rate key, so they share a slot.
NAMESPACE = "{rl}"


class Unit(enum.Enum):
    """What a guard counts."""

    REQUESTS = "requests"
    TOKENS = "tokens"
    IMAGES = "images"


class Guard(enum.Enum):
    """One rate guard: a unit counted over one scope."""

    MODEL_RPM = "model_rpm"
    ACCOUNT_RPM = "account_rpm"
    KEY_RPM = "key_rpm"
    KEY_MODEL_RPM = "key_model_rpm"
    MODEL_TPM = "model_tpm"
    KEY_TPM = "key_tpm"
    KEY_MODEL_TPM = "key_model_tpm"
    MODEL_IPM = "model_ipm"
    KEY_IPM = "key_ipm"
    KEY_MODEL_IPM = "key_model_ipm"

    @property
    def unit(self) -> Unit:
        return _UNITS[self.value[-3:]]

    def describe(self, model: str) -> str:
        per = {"rpm": "requests", "tpm": "tokens", "ipm": "images"}[self.value[-3:]]
        scope = {
            "model": f"model {model}",
            "account": "this account",
            "key": "this API key",
            "key_model": f"this API key on model {model}",
        }[self.value[:-4]]
        return f"{per} for {scope}"


_UNITS = {"rpm": Unit.REQUESTS, "tpm": Unit.TOKENS, "ipm": Unit.IMAGES}


@dataclasses.dataclass(frozen=True, slots=True)
class Limit:
    """One guard as it applies to one request: the limits item and its identifiers."""

    guard: Guard
    item: RateLimitItem
    ids: tuple[str, ...]
    # limits' key for this item and identifiers (before any storage prefix).
    key: str = dataclasses.field(init=False)
    # Read on every request: kept as plain fields rather than derived each time.
    amount: int = dataclasses.field(init=False)
    window: int = dataclasses.field(init=False)
    unit: Unit = dataclasses.field(init=False)
    name: str = dataclasses.field(init=False)  # the guard's name (its value)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", self.item.key_for(*self.ids))
        object.__setattr__(self, "amount", self.item.amount)
        object.__setattr__(self, "window", self.item.get_expiry())
        object.__setattr__(self, "unit", self.guard.unit)
        object.__setattr__(self, "name", self.guard.value)


@dataclasses.dataclass(frozen=True, slots=True)
class Hit:
    """A limit and what this request takes from it."""

    limit: Limit
    cost: int


@dataclasses.dataclass(slots=True)
class Window:
    """A sliding window's state, as limits' ``get_sliding_window`` reports it.

    *current_ttl* follows limits' convention: the current counter lives until its window
    ends plus one window (it then weighs as the previous window). *window_id* says which
    counter this request's hit landed in, for a later adjustment (None: not hit).
    """

    previous: int
    previous_ttl: float
    current: int
    current_ttl: float
    window_id: int | str | None = None

    def count(self, window: int) -> int:
        """The weighted count, as limits compares it with the amount."""
        return math.floor(self.previous * self.previous_ttl / window) + self.current

    def remaining(self, amount: int, window: int) -> int:
        return max(0, amount - self.count(window))

    def fits(self, amount: int, window: int, cost: int) -> bool:
        return cost <= amount and self.count(window) + cost <= amount

    def wait(self, window: int, below: float) -> float:
        """Seconds until the weighted count is below *below* (> 0), nothing else hitting.

        The previous window's weight decays linearly to zero over ``previous_ttl``; when
        the current window ends it becomes the previous one at full weight and decays
        over one more window.
        """
        w = self.previous * self.previous_ttl / window + self.current
        if w < below:
            return 0.0
        if self.current < below:
            # previous > 0 here, or w would already be below.
            return max(0.0, self.previous_ttl - (below - self.current) * window / self.previous)
        ends_in = max(0.0, self.current_ttl - window)
        return ends_in + window * (1 - below / self.current)

    def retry_after(self, amount: int, window: int, cost: int) -> float:
        """Seconds until *cost* fits: ``floor(w) + cost <= amount`` is ``w < amount-cost+1``."""
        if cost > amount:  # never fits; say the longest a window can take
            return 2.0 * window
        return self.wait(window, amount - cost + 1) + 0.001

    def reset(self, window: int) -> float:
        """Seconds until the limit is whole again (weighted count below one)."""
        return self.wait(window, 1)


@dataclasses.dataclass(slots=True)
class Decision:
    """What the store decided for one request's hits (same order as the hits)."""

    granted: bool
    windows: list[Window]
    # The amount each limit was enforced at and what each hit took: a fallback store
    # enforces a share of the amount and takes at most that share.
    amounts: list[int]
    costs: list[int]
    refused: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True, slots=True)
class Adjustment:
    """Change what an earlier hit took: *delta* < 0 refunds, > 0 charges more."""

    limit: Limit
    window_id: int | str
    delta: int


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class Guards:
    """The limits one (model, key, account) meets, by unit, built once (see :class:`Items`).

    Request guards cost 1 whatever the request, so their hits are built once too.
    """

    requests: tuple[Hit, ...]
    tokens: tuple[Limit, ...]
    images: tuple[Limit, ...]
    # The smallest token limit (None: no token guard).
    token_ceiling: int | None


class Items:
    """limits items by (amount, unit), limits by guard and identifiers, and the guards of
    each (model, key, account), built once each: a limits key is a string join per call,
    and a request's plan is the same for every request of its key on its model."""

    MAX_LIMITS = 100_000

    def __init__(self, window: int) -> None:
        self.window = window
        self._items: dict[tuple[int, str], RateLimitItem] = {}
        self._limits: dict[tuple[Guard, int, tuple[str, ...]], Limit] = {}
        self._guards: dict[tuple[object, ...], Guards] = {}

    def limit(self, guard: Guard, amount: int, ids: tuple[str, ...]) -> Limit:
        found = self._limits.get((guard, amount, ids))
        if found is None:
            found = Limit(guard, self.get(amount, guard.value[-3:]), ids)
            if len(self._limits) >= self.MAX_LIMITS:  # keys and accounts come and go
                self._limits.clear()
            self._limits[(guard, amount, ids)] = found
        return found

    def get(self, amount: int, unit: str) -> RateLimitItem:
        item = self._items.get((amount, unit))
        if item is None:
            item = RateLimitItemPerSecond(amount, self.window, namespace=f"{NAMESPACE}/{unit}")
            self._items[(amount, unit)] = item
        return item

    def guards(self, ctx: RequestContext, config: Config) -> Guards:
        """The guards *ctx* meets (its model, key and account, with their amounts)."""
        model = ctx.model
        assert model is not None
        policy = ctx.policy
        per_model = policy.model_limits.get(model.id) if policy.model_limits else None
        account_rpm = config.account_rpm(ctx.account)
        # Every amount is part of the key: a changed limit is a new entry, never a
        # stale one.
        key: tuple[object, ...] = (
            model.id,
            ctx.key_id,
            ctx.account,
            model.rpm,
            model.tpm,
            model.ipm,
            account_rpm,
            policy.rpm,
            policy.tpm,
            policy.ipm,
            None if per_model is None else (per_model.rpm, per_model.tpm, per_model.ipm),
        )
        found = self._guards.get(key)
        if found is None:
            found = self._build(ctx, account_rpm, per_model)
            if len(self._guards) >= self.MAX_LIMITS:
                self._guards.clear()
            self._guards[key] = found
        return found

    def _build(
        self, ctx: RequestContext, account_rpm: int, per_model: ModelLimits | None
    ) -> Guards:
        model = ctx.model
        assert model is not None
        policy = ctx.policy
        on_model = ("model", model.id)
        on_key = ("key", ctx.key_id)
        on_key_model = ("key", ctx.key_id, "model", model.id)

        def limits(*specs: tuple[Guard, int | None, tuple[str, ...]]) -> tuple[Limit, ...]:
            return tuple(self.limit(g, a, ids) for g, a, ids in specs if a is not None)

        requests = limits(
            (Guard.MODEL_RPM, model.rpm, on_model),
            (Guard.ACCOUNT_RPM, account_rpm, ("account", ctx.account)),
            (Guard.KEY_RPM, policy.rpm, on_key),
            (Guard.KEY_MODEL_RPM, per_model.rpm if per_model else None, on_key_model),
        )
        tokens = limits(
            (Guard.MODEL_TPM, model.tpm, on_model),
            (Guard.KEY_TPM, policy.tpm, on_key),
            (Guard.KEY_MODEL_TPM, per_model.tpm if per_model else None, on_key_model),
        )
        images = limits(
            (Guard.MODEL_IPM, model.ipm, on_model),
            (Guard.KEY_IPM, policy.ipm, on_key),
            (Guard.KEY_MODEL_IPM, per_model.ipm if per_model else None, on_key_model),
        )
        ceiling = min((limit.amount for limit in tokens), default=None)
        return Guards(tuple(Hit(limit, 1) for limit in requests), tokens, images, ceiling)


@dataclasses.dataclass(slots=True)
class Plan:
    """The hits one request makes, and the token reservation they carry."""

    hits: list[Hit]
    reserved_tokens: int
    too_large: Hit | None = None


def plan(ctx: RequestContext, config: Config, items: Items) -> Plan:
    """Every guard that applies to *ctx*, with its cost.

    Tokens: the input estimate plus the output reserve (the caller's cap, else the
    configured default, within the model's maximum), clamped to the smallest token
    limit that applies so that a generous ``max_tokens`` never makes a request that
    could fit impossible; the reservation is settled to the real usage afterwards.
    ``count_tokens`` generates nothing: it only counts as a request.
    """
    guards = items.guards(ctx, config)
    hits = list(guards.requests)
    reserved = 0
    too_large: Hit | None = None
    ceiling = guards.token_ceiling
    if ceiling is not None and ctx.surface is not Surface.COUNT_TOKENS:
        reserve = ctx.output_reserve(config.ratelimit.default_output_reserve)
        reserved = min(ctx.input_tokens + reserve, ceiling)
        for limit in guards.tokens:
            hit = Hit(limit, reserved)
            hits.append(hit)
            if too_large is None and ctx.input_tokens > limit.amount:
                too_large = hit
    n = ctx.image_count
    if n > 0:
        for limit in guards.images:
            hit = Hit(limit, n)
            hits.append(hit)
            if too_large is None and n > limit.amount:
                too_large = hit
    return Plan(hits, reserved, too_large)


# --- header formats -------------------------------------------------------------------


def go_duration(seconds: float) -> str:
    """A Go-style duration as OpenAI's reset headers write it: ``12ms``, ``1s``, ``6m0s``.

    Below a second in whole milliseconds, above it in whole seconds, rounded up so that
    a client never comes back early.
    """
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    total = math.ceil(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def rfc3339(wall: float) -> str:
    """An RFC 3339 UTC timestamp in whole seconds (rounded up), as Anthropic's resets."""
    moment = datetime.datetime.fromtimestamp(math.ceil(wall), tz=datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


# Header values recur: the same few durations and, within a second, the same stamps.
_FORMATTED_MAX = 4096
_durations: dict[int, bytes] = {}
_stamps: dict[int, bytes] = {}


def go_duration_bytes(seconds: float) -> bytes:
    """:func:`go_duration` as header bytes, cached by what it rounds to."""
    if seconds <= 0:
        return b"0s"
    key = math.ceil(seconds * 1000) if seconds < 1 else -math.ceil(seconds)
    found = _durations.get(key)
    if found is None:
        found = go_duration(seconds).encode()
        if len(_durations) >= _FORMATTED_MAX:
            _durations.clear()
        _durations[key] = found
    return found


def rfc3339_bytes(wall: float) -> bytes:
    """:func:`rfc3339` as header bytes, cached by the second it rounds to."""
    key = math.ceil(wall)
    found = _stamps.get(key)
    if found is None:
        found = rfc3339(key).encode()
        if len(_stamps) >= _FORMATTED_MAX:
            _stamps.clear()
        _stamps[key] = found
    return found
