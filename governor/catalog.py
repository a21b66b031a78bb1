"""The model catalog: the spec's twelve models plus ``claude-haiku-4-5-max``.

Prices are US dollars per million tokens, per token class, as the spec's table shows
them ("n/a" is ``None``: that class is billed at the input price, see billing).
Capacity ceilings are the spec's where it gives them (``gpt-5-5`` and ``gpt-image-2``)
and stated defaults elsewhere: text models 15,000 RPM / 40,000,000 TPM with a
15,000,000,000-token queue like ``gpt-5-5``; image models 250 IPM / 8,000,000 TPM
like ``gpt-image-2``; 80 concurrency slots per model everywhere.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Iterator, Mapping


class Kind(enum.Enum):
    """What a model produces."""

    TEXT = "text"
    IMAGE = "image"


class Upstream(enum.Enum):
    """Which upstream API a model path goes to."""

    OPENAI = "openai"
    ANTHROPIC = "anthropic"


@dataclasses.dataclass(frozen=True, slots=True)
class ModelSpec:
    """One model of the catalog, its prices and its capacity ceilings."""

    id: str
    name: str
    context_tokens: int
    input_price: float
    cache_read_price: float | None
    cache_write_price: float | None
    output_price: float
    kind: Kind = Kind.TEXT
    upstream: Upstream = Upstream.OPENAI
    concurrency: int = 80
    rpm: int = 15_000
    tpm: int = 40_000_000
    ipm: int | None = None
    queue_tokens: int | None = 15_000_000_000
    max_output_tokens: int = 128_000

    @property
    def cli_only(self) -> bool:
        """``-max`` models are served only to the official Claude Code CLI."""
        return self.id.endswith("-max") and self.upstream is Upstream.ANTHROPIC


def _claude(id: str, name: str, ctx: int, prices: tuple[float, float, float, float]) -> ModelSpec:
    return ModelSpec(id, name, ctx, *prices, upstream=Upstream.ANTHROPIC, max_output_tokens=128_000)


_OPUS = (5.25, 0.525, 6.56, 26.25)
_SONNET = (3.15, 0.315, 3.94, 15.75)
_HAIKU = (1.05, 0.105, 1.31, 5.25)


def _image(
    id: str, name: str, ctx: int, prices: tuple[float, float | None, float | None, float]
) -> ModelSpec:
    return ModelSpec(
        id,
        name,
        ctx,
        *prices,
        kind=Kind.IMAGE,
        rpm=250,
        ipm=250,
        tpm=8_000_000,
        queue_tokens=None,
    )


DEFAULT_MODELS: tuple[ModelSpec, ...] = (
    _claude("claude-opus-4-8", "Claude Opus 4.8", 1_000_000, _OPUS),
    _claude("claude-sonnet-4-7", "Claude Sonnet 4.7", 1_000_000, _SONNET),
    _claude("claude-haiku-latest", "Claude Haiku Latest", 200_000, _HAIKU),
    _claude("claude-opus-4-7-max", "Claude Opus 4.7", 200_000, _OPUS),
    _claude("claude-sonnet-4-6-max", "Claude Sonnet 4.6", 200_000, _SONNET),
    # Not in the spec's table, but its Claude Code settings name it: the CLI sends its
    # side requests (titles, summaries) to the Haiku slot.
    _claude("claude-haiku-4-5-max", "Claude Haiku 4.5", 200_000, _HAIKU),
    ModelSpec("gpt-5-5", "GPT-5.5", 1_000_000, 5.25, 0.525, None, 31.50),
    ModelSpec("deepseek-v4-pro", "DeepSeek V4 Pro", 1_000_000, 0.4567, 0.0038, None, 0.9135),
    ModelSpec("qwen3-7-max", "Qwen3.7 Max", 200_000, 1.31, 0.2625, 1.64, 3.94),
    ModelSpec("qwen3-7-plus", "Qwen3.7 Plus", 1_000_000, 0.42, 0.084, 0.525, 1.68),
    ModelSpec("kimi-latest", "Kimi Latest", 256_000, 0.7182, 0.1512, None, 3.59),
    _image("nano-banana-2", "Nano Banana 2", 131_000, (0.525, None, None, 3.15)),
    _image("gpt-image-2", "GPT Image 2", 272_000, (8.40, 2.10, None, 31.50)),
)


class Catalog(Mapping[str, ModelSpec]):
    """Models by id. Lookups are exact: model ids are case-sensitive on the wire."""

    def __init__(self, models: Iterable[ModelSpec] = DEFAULT_MODELS) -> None:
        self._models = {m.id: m for m in models}

    def __getitem__(self, model_id: str) -> ModelSpec:
        return self._models[model_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._models)

    def __len__(self) -> int:
        return len(self._models)
