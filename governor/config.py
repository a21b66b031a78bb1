"""Configuration: one TOML file plus environment overrides, validated field by field.

Every section is a frozen dataclass with documented defaults; ``load_config`` reads a
file, applies ``GOVERNOR_*`` environment overrides and raises
:class:`~governor.errors.ConfigurationError` naming the bad field
(``admission.max_wait_s: expected a number, got 'soon'``).

Environment overrides: ``GOVERNOR_BACKEND``, ``GOVERNOR_REDIS_URL``, and in general
``GOVERNOR_<SECTION>__<FIELD>=<TOML value>`` (``GOVERNOR_ADMISSION__MAX_WAIT_S=3``).
A value that does not parse as TOML is taken as a string.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from governor.catalog import DEFAULT_MODELS, Catalog, Kind, ModelSpec, Upstream
from governor.errors import ConfigurationError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

FailMode = Literal["open", "closed"]


@dataclasses.dataclass(frozen=True)
class RedisConfig:
    """The one Redis connection pool everything shares (used when ``backend = "redis"``).

    Explicit timeouts and retries: redis-py's hidden defaults (10 retries with backoff
    on ``Redis(host=...)``, none from a URL) do not suit a guard on the hot path.
    """

    url: str = "redis://127.0.0.1:6379/0"
    max_connections: int = 64
    socket_timeout_s: float = 0.5
    connect_timeout_s: float = 0.5
    pool_timeout_s: float = 1.0
    retries: int = 1
    key_prefix: str = "gov"
    # Script calls made in the same event-loop turn go to Redis as one pipeline
    # (auto-pipelining): far less CPU per call under load, one loop turn of delay.
    autopipeline: bool = True


@dataclasses.dataclass(frozen=True)
class AdmissionConfig:
    """Per-model concurrency slots behind a short wait queue."""

    enabled: bool = True
    max_wait_s: float = 5.0
    max_waiters: int = 1_000
    max_waiters_per_account: int = 100
    max_queued_tokens_per_account: int | None = None
    lease_ttl_s: float = 30.0
    heartbeat_s: float = 10.0
    # Redis mode: how often a worker re-checks its waiters when no wake-up arrives
    # (pub/sub is only a hint); jittered by +-20%.
    poll_s: float = 0.25
    fail_mode: FailMode = "open"
    # Redis down with fail_mode "open": each worker allows limit // live workers of the
    # model; this many workers are assumed when the live count was never seen.
    fallback_workers: int = 4


@dataclasses.dataclass(frozen=True)
class RateLimitConfig:
    """Requests, tokens and images per minute."""

    enabled: bool = True
    # Account-level request capacity per minute, across models
    # (X-Hypereal-Capacity-Requests-Remaining).
    account_rpm: int = 10_000
    # Output reserved for a request that sets no cap, before the upstream reports usage.
    default_output_reserve: int = 4_096
    # Redis down: "open" admits against a local in-memory limiter at a fair share of the
    # fleet limit (limit // fallback_workers per worker, at least 1); "closed" answers 503.
    fail_mode: FailMode = "open"
    # How many worker processes share the fleet's limits when they fall back to local
    # counting. Never 1 unless there truly is one worker: the full limit per worker is
    # N times the fleet limit (LiteLLM #35533).
    fallback_workers: int = 4


@dataclasses.dataclass(frozen=True)
class BreakerConfig:
    """Circuit breakers per model path."""

    enabled: bool = True
    failure_threshold: int = 5
    reset_timeout_s: float = 30.0
    max_reset_timeout_s: float = 300.0
    half_open_probes: int = 1
    count_429: bool = True
    slow_first_byte_s: float | None = None
    # Redis mode: a probe lease expires after this, so a crashed probe cannot wedge half-open.
    probe_lease_s: float = 120.0
    # Redis mode: how often a worker refreshes its cached copy of the shared state.
    sync_interval_s: float = 0.5
    # Redis mode: the longest a request waits on Redis; past it the worker decides locally.
    sync_timeout_s: float = 0.1
    # Redis unreachable: "open" keeps breaking locally per worker from the last shared
    # state seen; "closed" refuses with 503/529 until the shared state answers again.
    fail_mode: FailMode = "open"


@dataclasses.dataclass(frozen=True)
class FingerprintConfig:
    """Client-fingerprint enforcement for ``-max`` models (see docs/fingerprint.md)."""

    enabled: bool = True
    # User-Agent entrypoints that count as the official CLI: interactive and `-p`.
    official_entrypoints: tuple[str, ...] = ("cli", "sdk-cli")
    # Violations within strike_ttl_s before the key is suspended (1: the first one).
    strikes_to_suspend: int = 1
    strike_ttl_s: float = 30 * 86_400.0
    # Behaviour per key: distinct device ids, sessions and client addresses per window.
    max_devices_per_key: int = 8
    device_window_s: float = 3_600.0
    max_sessions_per_key: int = 64
    session_window_s: float = 600.0
    max_addresses_per_key: int = 16
    address_window_s: float = 3_600.0
    # Exceeding a behaviour limit: refuse ("block") or also strike ("suspend").
    behaviour_action: Literal["block", "suspend"] = "block"
    # The same -max body from another key or address within this window is a replay.
    replay_window_s: float = 600.0
    # How long a worker trusts that a key is not suspended before asking the backend
    # again: a suspension made on another worker applies here at most this much later
    # (0: ask on every request, one Redis round trip each).
    suspension_cache_s: float = 1.0
    # A replacement rules file (TOML); None: the packaged governor/fingerprint/rules.toml.
    rules_path: str | None = None
    # Bearer token of the suspension admin routes.
    admin_token: str | None = None
    # Redis down: "open" keeps the stateless checks and the suspensions this worker
    # knows; "closed" refuses with 503 what it cannot check.
    fail_mode: FailMode = "open"

    def __post_init__(self) -> None:
        if self.strikes_to_suspend < 1:
            raise ConfigurationError("fingerprint.strikes_to_suspend: must be >= 1")
        for name in (
            "strike_ttl_s",
            "max_devices_per_key",
            "device_window_s",
            "max_sessions_per_key",
            "session_window_s",
            "max_addresses_per_key",
            "address_window_s",
            "replay_window_s",
        ):
            if getattr(self, name) <= 0:
                raise ConfigurationError(f"fingerprint.{name}: must be > 0")


@dataclasses.dataclass(frozen=True)
class BillingConfig:
    """Credit billing."""

    enabled: bool = True
    # US dollars one credit is worth.
    credit_usd: float = 0.001
    # Balance an account starts with when the config does not name one (demo accounts).
    default_balance: int = 100_000
    # Output tokens reserved for a text request that sets no cap (worst-case estimate).
    default_output_reserve: int = 4_096
    # Output tokens reserved (and billed, if the upstream reports no usage) per image.
    image_output_tokens: int = 4_160
    # A reservation whose request never settles (a worker died) is released after this.
    reservation_ttl_s: float = 3_600.0
    # Backend down: "closed" refuses with 503/529; "open" serves the request unbilled.
    fail_mode: FailMode = "closed"


@dataclasses.dataclass(frozen=True)
class InsuranceConfig:
    """Latency insurance for slow successful requests."""

    enabled: bool = True
    threshold_ms: int = 90_000
    compensation_ratio: float = 0.25


@dataclasses.dataclass(frozen=True)
class UsageConfig:
    """Where usage records go."""

    enabled: bool = True
    sink: Literal["memory", "jsonl", "redis"] = "memory"
    path: str = "usage.jsonl"
    ring_size: int = 10_000
    stream_maxlen: int = 100_000
    # Per-key Redis stream length (what ``GET /v1/managed/usage`` reads).
    key_stream_maxlen: int = 1_000


@dataclasses.dataclass(frozen=True)
class ModelLimits:
    """Per-key limits on one model; each only ever lower than the model's own."""

    rpm: int | None = None
    tpm: int | None = None
    ipm: int | None = None
    concurrency: int | None = None


@dataclasses.dataclass(frozen=True)
class KeyPolicy:
    """What one API key may do. Budgets are in credits; ``None`` means no limit."""

    account: str
    name: str = ""
    models: frozenset[str] | None = None
    rpm: int | None = None
    tpm: int | None = None
    ipm: int | None = None
    model_limits: Mapping[str, ModelLimits] = dataclasses.field(default_factory=dict)
    spending_limit: int | None = None
    hourly_budget: int | None = None
    daily_budget: int | None = None

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


@dataclasses.dataclass(frozen=True)
class KeyEntry:
    """A key as written in the config file: the raw key or its SHA-256, and its policy."""

    account: str
    key: str | None = None
    key_sha256: str | None = None
    models: tuple[str, ...] | None = None
    rpm: int | None = None
    tpm: int | None = None
    ipm: int | None = None
    model_limits: dict[str, ModelLimits] = dataclasses.field(default_factory=dict)
    spending_limit: int | None = None
    hourly_budget: int | None = None
    daily_budget: int | None = None


@dataclasses.dataclass(frozen=True)
class AccountEntry:
    """An account: its request capacity per minute and its opening credit balance."""

    rpm: int | None = None
    balance: int | None = None


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """A model in the config: overrides of a catalog model, or a new one (all prices set)."""

    name: str | None = None
    context_tokens: int | None = None
    input_price: float | None = None
    cache_read_price: float | None = None
    cache_write_price: float | None = None
    output_price: float | None = None
    kind: Literal["text", "image"] | None = None
    upstream: Literal["openai", "anthropic"] | None = None
    concurrency: int | None = None
    rpm: int | None = None
    tpm: int | None = None
    ipm: int | None = None
    queue_tokens: int | None = None
    max_output_tokens: int | None = None


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything governor reads, with the defaults of the spec."""

    backend: Literal["memory", "redis"] = "memory"
    # Largest request body read, in bytes; larger bodies get 413.
    max_body_bytes: int = 32 * 1024 * 1024
    # Open demo mode: any key of the form ck_<anything> is an account of its own.
    demo_keys: bool = False
    redis: RedisConfig = RedisConfig()
    admission: AdmissionConfig = AdmissionConfig()
    ratelimit: RateLimitConfig = RateLimitConfig()
    breaker: BreakerConfig = BreakerConfig()
    fingerprint: FingerprintConfig = FingerprintConfig()
    billing: BillingConfig = BillingConfig()
    insurance: InsuranceConfig = InsuranceConfig()
    usage: UsageConfig = UsageConfig()
    models: dict[str, ModelEntry] = dataclasses.field(default_factory=dict)
    accounts: dict[str, AccountEntry] = dataclasses.field(default_factory=dict)
    keys: dict[str, KeyEntry] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        _validate(self)

    def catalog(self) -> Catalog:
        """The default catalog with this config's model entries applied."""
        return build_catalog(self.models)

    def account_rpm(self, account: str) -> int:
        entry = self.accounts.get(account)
        if entry is not None and entry.rpm is not None:
            return entry.rpm
        return self.ratelimit.account_rpm


# --- building the catalog -------------------------------------------------------------


def build_catalog(entries: Mapping[str, ModelEntry]) -> Catalog:
    models = {m.id: m for m in DEFAULT_MODELS}
    for model_id, entry in entries.items():
        changes = {
            f.name: getattr(entry, f.name)
            for f in dataclasses.fields(entry)
            if getattr(entry, f.name) is not None
        }
        if "kind" in changes:
            changes["kind"] = Kind(changes["kind"])
        if "upstream" in changes:
            changes["upstream"] = Upstream(changes["upstream"])
        base = models.get(model_id)
        if base is not None:
            models[model_id] = dataclasses.replace(base, **changes)
            continue
        missing = [n for n in ("context_tokens", "input_price", "output_price") if n not in changes]
        if missing:
            raise ConfigurationError(
                f"models.{model_id}: a model not in the catalog needs {', '.join(missing)}"
            )
        changes.setdefault("name", model_id)
        changes.setdefault("cache_read_price", None)
        changes.setdefault("cache_write_price", None)
        models[model_id] = ModelSpec(id=model_id, **changes)
    return Catalog(models.values())


# --- validation -----------------------------------------------------------------------


def _positive(path: str, value: float | None, *, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigurationError(f"{path}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _validate(cfg: Config) -> None:
    for section in ("redis", "admission", "ratelimit", "breaker", "billing", "insurance", "usage"):
        obj = getattr(cfg, section)
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                _positive(f"{section}.{f.name}", value, allow_zero=f.name == "retries")
    if cfg.insurance.compensation_ratio > 1:
        raise ConfigurationError("insurance.compensation_ratio: must be between 0 and 1")
    if cfg.admission.heartbeat_s >= cfg.admission.lease_ttl_s:
        raise ConfigurationError("admission.heartbeat_s: must be shorter than lease_ttl_s")
    _positive("max_body_bytes", cfg.max_body_bytes)
    catalog = build_catalog(cfg.models)
    for model_id, m in catalog.items():
        for name in ("concurrency", "rpm", "tpm", "ipm", "queue_tokens", "max_output_tokens"):
            _positive(f"models.{model_id}.{name}", getattr(m, name))
    for name, acct in cfg.accounts.items():
        _positive(f"accounts.{name}.rpm", acct.rpm)
        _positive(f"accounts.{name}.balance", acct.balance, allow_zero=True)
    seen: dict[str, str] = {}
    for name, key in cfg.keys.items():
        where = f"keys.{name}"
        if (key.key is None) == (key.key_sha256 is None):
            raise ConfigurationError(f"{where}: set exactly one of key or key_sha256")
        ident = key.key_sha256 or key.key or ""
        if ident in seen:
            raise ConfigurationError(f"{where}: the same key as keys.{seen[ident]}")
        seen[ident] = name
        for model_id in key.models or ():
            if model_id not in catalog:
                raise ConfigurationError(f"{where}.models: unknown model {model_id!r}")
        for field_name in ("spending_limit", "hourly_budget", "daily_budget"):
            _positive(f"{where}.{field_name}", getattr(key, field_name), allow_zero=True)
        for field_name in ("rpm", "tpm", "ipm"):
            value = getattr(key, field_name)
            _positive(f"{where}.{field_name}", value)
            ceiling = max((getattr(m, field_name) or 0 for m in catalog.values()), default=0)
            if field_name == "rpm":
                ceiling = cfg.account_rpm(key.account)
            if value is not None and value > ceiling:
                raise ConfigurationError(
                    f"{where}.{field_name}: {value} is above the ceiling it sits under ({ceiling})"
                )
        for model_id, limits in key.model_limits.items():
            if model_id not in catalog:
                raise ConfigurationError(f"{where}.model_limits: unknown model {model_id!r}")
            model = catalog[model_id]
            for field_name in ("rpm", "tpm", "ipm", "concurrency"):
                value = getattr(limits, field_name)
                _positive(f"{where}.model_limits.{model_id}.{field_name}", value)
                ceiling = getattr(model, field_name)
                if value is not None and ceiling is not None and value > ceiling:
                    raise ConfigurationError(
                        f"{where}.model_limits.{model_id}.{field_name}: {value} is above "
                        f"the model's own limit ({ceiling}); per-key limits may only be lower"
                    )


# --- loading --------------------------------------------------------------------------

_T = typing.TypeVar("_T")


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, str(tp)
    )


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path)
            except ConfigurationError as exc:
                errors.append(str(exc))
        raise ConfigurationError(errors[0])
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigurationError(
                f"{path}: expected one of {', '.join(map(repr, allowed))}, got {value!r}"
            )
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigurationError(f"{path}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1]
        return tuple(_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigurationError(f"{path}: expected a table, got {value!r}")
        _, vt = typing.get_args(tp)
        return {str(k): _convert(vt, v, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise ConfigurationError(f"{path}: expected a table, got {value!r}")
        return _build(tp, value, path)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool):
        raise ConfigurationError(f"{path}: expected an integer, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigurationError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    return value


def _build(cls: type[_T], data: Mapping[str, Any], path: str = "") -> _T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        if key not in names:
            raise ConfigurationError(f"{where}: unknown setting")
        kwargs[key] = _convert(hints[key], value, where)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigurationError(f"{path or 'config'}: {exc}") from None


def _env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    shortcuts = {"GOVERNOR_BACKEND": ("backend",), "GOVERNOR_REDIS_URL": ("redis", "url")}
    for name, raw in environ.items():
        if name in shortcuts:
            parts: tuple[str, ...] = shortcuts[name]
        elif name.startswith("GOVERNOR_") and "__" in name:
            parts = tuple(p.lower() for p in name[len("GOVERNOR_") :].split("__"))
        else:
            continue
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigurationError(f"{name}: {part} is not a table")
        node[parts[-1]] = _env_value(raw) if parts != ("redis", "url") else raw


def config_from_mapping(data: Mapping[str, Any]) -> Config:
    """Build a validated :class:`Config` from a parsed TOML mapping."""
    return _build(Config, data)


def load_config(
    path: str | os.PathLike[str] | None = None, *, environ: Mapping[str, str] | None = None
) -> Config:
    """Read *path* (TOML; none: defaults), apply ``GOVERNOR_*`` overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigurationError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigurationError(f"{path}: not valid TOML: {exc}") from None
    _apply_env(data, os.environ if environ is None else environ)
    return config_from_mapping(data)
