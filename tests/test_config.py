"""Config: the spec's defaults, TOML and environment, errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from governor.catalog import DEFAULT_MODELS, Kind, Upstream
from governor.config import Config, config_from_mapping, load_config
from governor.errors import ConfigurationError


def test_default_catalog_has_the_spec_models() -> None:
    """Twelve models of the spec's table plus claude-haiku-4-5-max."""
    ids = {m.id for m in DEFAULT_MODELS}
    assert len(ids) == 13
    assert "claude-haiku-4-5-max" in ids
    catalog = Config().catalog()
    gpt = catalog["gpt-5-5"]
    assert (gpt.rpm, gpt.tpm, gpt.queue_tokens, gpt.concurrency) == (
        15_000,
        40_000_000,
        15_000_000_000,
        80,
    )
    image = catalog["gpt-image-2"]
    assert (image.ipm, image.tpm, image.kind) == (250, 8_000_000, Kind.IMAGE)
    sonnet = catalog["claude-sonnet-4-7"]
    assert (
        sonnet.input_price,
        sonnet.cache_read_price,
        sonnet.cache_write_price,
        sonnet.output_price,
        sonnet.context_tokens,
    ) == (3.15, 0.315, 3.94, 15.75, 1_000_000)
    assert sonnet.upstream is Upstream.ANTHROPIC
    assert catalog["claude-haiku-4-5-max"].cli_only
    assert not sonnet.cli_only
    assert catalog["deepseek-v4-pro"].cache_write_price is None


def test_toml_file(tmp_path: Path) -> None:
    """A TOML file sets sections, models, accounts and keys."""
    path = tmp_path / "governor.toml"
    path.write_text(
        """
backend = "redis"
[redis]
url = "redis://example:6379/2"
[admission]
max_wait_s = 2.5
[models.gpt-5-5]
concurrency = 10
[models.my-model]
context_tokens = 1000
input_price = 1.0
output_price = 2.0
[accounts.acme]
rpm = 500
balance = 1000
[keys.alice]
key = "ck_alice"
account = "acme"
models = ["gpt-5-5"]
rpm = 100
[keys.alice.model_limits.gpt-5-5]
rpm = 50
"""
    )
    config = load_config(path, environ={})
    assert config.backend == "redis"
    assert config.redis.url == "redis://example:6379/2"
    assert config.admission.max_wait_s == 2.5
    catalog = config.catalog()
    assert catalog["gpt-5-5"].concurrency == 10
    assert catalog["my-model"].input_price == 1.0
    assert config.account_rpm("acme") == 500
    assert config.keys["alice"].model_limits["gpt-5-5"].rpm == 50


def test_environment_overrides(tmp_path: Path) -> None:
    """GOVERNOR_* variables override the file."""
    path = tmp_path / "g.toml"
    path.write_text("[admission]\nmax_wait_s = 2.5\n")
    config = load_config(
        path,
        environ={
            "GOVERNOR_ADMISSION__MAX_WAIT_S": "7",
            "GOVERNOR_BACKEND": "redis",
            "GOVERNOR_REDIS_URL": "redis://h:1/0",
            "GOVERNOR_BREAKER__COUNT_429": "false",
        },
    )
    assert config.admission.max_wait_s == 7.0
    assert config.backend == "redis"
    assert config.redis.url == "redis://h:1/0"
    assert config.breaker.count_429 is False


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"admission": {"max_wait_s": "soon"}}, "admission.max_wait_s: expected a number"),
        ({"admission": {"max_wait_s": -1}}, "admission.max_wait_s: must be > 0"),
        ({"admision": {}}, "admision: unknown setting"),
        ({"backend": "etcd"}, "backend: expected one of"),
        ({"ratelimit": {"account_rpm": True}}, "ratelimit.account_rpm: expected an integer"),
        ({"keys": {"a": {"account": "x"}}}, "keys.a: set exactly one of key or key_sha256"),
        (
            {"keys": {"a": {"account": "x", "key": "k", "models": ["gpt-9"]}}},
            "keys.a.models: unknown model 'gpt-9'",
        ),
        (
            {
                "keys": {
                    "a": {"account": "x", "key": "k", "model_limits": {"gpt-5-5": {"rpm": 20000}}}
                }
            },
            "keys.a.model_limits.gpt-5-5.rpm: 20000 is above the model's own limit",
        ),
        ({"keys": {"a": {"account": "x", "key": "k", "rpm": 10001}}}, "keys.a.rpm: 10001 is above"),
        (
            {"keys": {"a": {"account": "x", "key": "k"}, "b": {"account": "y", "key": "k"}}},
            "keys.b: the same key as keys.a",
        ),
        ({"models": {"new": {"input_price": 1.0}}}, "models.new: a model not in the catalog"),
        ({"insurance": {"compensation_ratio": 2.0}}, "insurance.compensation_ratio"),
        ({"admission": {"heartbeat_s": 60}}, "admission.heartbeat_s"),
    ],
)
def test_invalid_config_names_the_field(data: dict[str, object], message: str) -> None:
    """Validation errors say which field is wrong."""
    with pytest.raises(ConfigurationError, match=message.replace(".", r"\.").replace("(", r"\(")):
        config_from_mapping(data)


def test_missing_file() -> None:
    with pytest.raises(ConfigurationError, match="not found"):
        load_config("/nonexistent/governor.toml", environ={})


def test_bad_toml(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("this is = = not toml")
    with pytest.raises(ConfigurationError, match="not valid TOML"):
        load_config(path, environ={})


def test_example_config_loads() -> None:
    """examples/governor.toml stays valid."""
    path = Path(__file__).parent.parent / "examples" / "governor.toml"
    config = load_config(path, environ={})
    assert config.keys, "the example config shows keys"
