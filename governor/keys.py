"""API keys: their stable ids and how a key turns into a :class:`KeyPolicy`.

The raw key lives only in the request; everything governor writes (logs, metrics, usage
records, Redis keys, errors) uses :func:`key_id`, a truncated SHA-256.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from typing import Protocol

from governor.config import Config, KeyEntry, KeyPolicy

DEMO_PREFIX = "ck_"
_MAX_DEMO_POLICIES = 4096


@functools.lru_cache(maxsize=4096)
def key_hash(api_key: str) -> str:
    """The full SHA-256 hex digest of *api_key* (what ``key_sha256`` in the config holds).

    Cached: a gateway sees the same few keys over and over, and each request needs the
    hash for its id and its lookup.
    """
    return hashlib.sha256(api_key.encode("utf-8", "surrogatepass")).hexdigest()


def key_id(api_key: str) -> str:
    """A stable, non-reversible id for *api_key*: ``key_`` and 16 hex digits."""
    return "key_" + key_hash(api_key)[:16]


class KeyResolver(Protocol):
    """Turns an API key into its policy; ``None`` means the key is unknown (401).

    Library users plug in their own (a database, an auth service); it is awaited once
    per request, so it should cache.
    """

    async def resolve(self, api_key: str) -> KeyPolicy | None: ...


def policy_from_entry(name: str, entry: KeyEntry) -> KeyPolicy:
    return KeyPolicy(
        account=entry.account,
        name=name,
        models=frozenset(entry.models) if entry.models is not None else None,
        rpm=entry.rpm,
        tpm=entry.tpm,
        ipm=entry.ipm,
        model_limits=dict(entry.model_limits),
        spending_limit=entry.spending_limit,
        hourly_budget=entry.hourly_budget,
        daily_budget=entry.daily_budget,
    )


class ConfigKeyResolver:
    """Keys listed in the config file; in demo mode also any ``ck_<anything>`` key.

    A demo key is an account of its own (``demo-<key id>``), so every try starts fresh.
    """

    def __init__(self, keys: Mapping[str, KeyEntry], *, demo: bool = False) -> None:
        self._by_hash = {
            (entry.key_sha256 or key_hash(entry.key or "")).lower(): policy_from_entry(name, entry)
            for name, entry in keys.items()
        }
        self._demo = demo
        self._demo_policies: dict[str, KeyPolicy] = {}

    @classmethod
    def from_config(cls, config: Config) -> ConfigKeyResolver:
        return cls(config.keys, demo=config.demo_keys)

    async def resolve(self, api_key: str) -> KeyPolicy | None:
        policy = self._by_hash.get(key_hash(api_key))
        if policy is not None:
            return policy
        if self._demo and api_key.startswith(DEMO_PREFIX) and len(api_key) > len(DEMO_PREFIX):
            # One policy per demo key, made once (a policy is immutable).
            policy = self._demo_policies.get(api_key)
            if policy is None:
                if len(self._demo_policies) >= _MAX_DEMO_POLICIES:
                    self._demo_policies.clear()
                policy = self._demo_policies[api_key] = KeyPolicy(
                    account="demo-" + key_id(api_key)[4:], name="demo"
                )
            return policy
        return None
