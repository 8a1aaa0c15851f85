"""What tokens cost: USD per million tokens from an editable price table (`configs/prices.toml`).

The table names, per model, the price of input, cached input and output tokens, and multipliers for the
batch and flex tiers. It is read from `--prices FILE` or `$LABELSTREAM_PRICES` when given, else from the
checkout's `configs/prices.toml`. A model the table does not know has no price: its tokens are still
counted, and every cost shown for it says "no price" instead of a number.
"""

from __future__ import annotations

import functools
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from pipeline.errors import ConfigError

Tier = Literal["standard", "batch", "flex"]
TIERS: Final = ("standard", "batch", "flex")
PRICES_ENV: Final = "LABELSTREAM_PRICES"
DEFAULT_PRICES: Final = Path(__file__).resolve().parents[2] / "configs" / "prices.toml"
_MODEL_KEYS: Final = {"input", "cached_input", "output", "batch", "flex"}


@dataclass(frozen=True, slots=True)
class Price:
    """One model's prices (USD per million tokens) and its tier multipliers (None: tier not offered)."""

    model: str
    input: float
    cached_input: float
    output: float
    tiers: Mapping[str, float | None] = field(default_factory=dict)

    def cost(
        self, prompt_tokens: int, completion_tokens: int, *, tier: str = "standard", cached_tokens: int = 0
    ) -> float | None:
        """USD for these tokens at `tier`, or None when the provider does not offer that tier for the model.

        `cached_tokens` are the part of `prompt_tokens` the provider served from its prompt cache.
        """
        factor = self.factor(tier)
        if factor is None:
            return None
        cached = min(max(cached_tokens, 0), prompt_tokens)
        dollars = (prompt_tokens - cached) * self.input + cached * self.cached_input + completion_tokens * self.output
        return dollars * factor / 1e6

    def factor(self, tier: str) -> float | None:
        """The multiplier of `tier` (1 for standard), None when not offered."""
        if tier not in TIERS:
            raise ValueError(f"unknown service tier {tier!r}; known: {', '.join(TIERS)}")
        return 1.0 if tier == "standard" else self.tiers.get(tier)


@dataclass(frozen=True, slots=True)
class PriceTable:
    """A price table as read from its file: where it came from, how current it is, the models it prices."""

    path: Path | None
    as_of: str | None = None
    source: str | None = None
    models: Mapping[str, Price] = field(default_factory=dict)

    def price_of(self, model: str) -> Price | None:
        """The price of a model or of its dated snapshot (gpt-4o-mini-2024-07-18 → gpt-4o-mini)."""
        if (price := self.models.get(model)) is not None:
            return price
        for name in sorted(self.models, key=len, reverse=True):
            if model.startswith(name + "-2"):
                return self.models[name]
        return None

    @property
    def provenance(self) -> str:
        """One line naming the file, its date and its source, for the places that show a cost."""
        where = _shown(self.path) if self.path else "no price table"
        parts = [f"prices as of {self.as_of}" if self.as_of else "prices (undated)", where]
        if self.source:
            parts.append(self.source)
        return "; ".join(parts)


def _shown(path: Path) -> str:
    """A path as people like to read it: relative to the working directory when it is under it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def prices_path() -> Path | None:
    """The price file in force: $LABELSTREAM_PRICES, else the checkout's configs/prices.toml (None: neither)."""
    given = os.environ.get(PRICES_ENV)
    if given:
        return Path(given)
    return DEFAULT_PRICES if DEFAULT_PRICES.is_file() else None


def load_prices(path: str | Path | None = None) -> PriceTable:
    """The price table at `path`, or the one in force (see `prices_path`); read once per path."""
    chosen = Path(path) if path is not None else prices_path()
    if chosen is None:
        return PriceTable(path=None)
    return _read(chosen.resolve())


@functools.cache
def _read(path: Path) -> PriceTable:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"price file {path} not found. Pass --prices with a file like configs/prices.toml, or unset {PRICES_ENV}."
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read price file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"price file {path} is not valid TOML: {exc}") from None
    return parse_prices(raw, path=path)


def parse_prices(raw: Mapping[str, Any], *, path: Path | None = None) -> PriceTable:
    """Validate a parsed price table; every problem names the key and what is allowed."""
    where = str(path) if path else "<prices>"
    tiers_raw = raw.get("tiers", {})
    if not isinstance(tiers_raw, Mapping):
        raise ConfigError(f"{where}: [tiers] must be a table like batch = 0.5, flex = 0.5.")
    defaults = {tier: _factor(tiers_raw.get(tier), f"{where}: [tiers] {tier}") for tier in TIERS[1:]}
    models_raw = raw.get("models", {})
    if not isinstance(models_raw, Mapping):
        raise ConfigError(f"{where}: [models] must hold one table per model, like [models.gpt-4o-mini].")
    models: dict[str, Price] = {}
    for name, spec in models_raw.items():
        at = f"{where}: [models.{name}]"
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{at} must be a table with input, cached_input and output prices.")
        if unknown := sorted(set(spec) - _MODEL_KEYS):
            raise ConfigError(f"{at} has unknown key {unknown[0]!r}; allowed keys are {sorted(_MODEL_KEYS)}.")
        input_price = _usd(spec.get("input"), f"{at} input")
        tiers = {tier: _factor(spec[tier], f"{at} {tier}") if tier in spec else defaults[tier] for tier in TIERS[1:]}
        models[str(name)] = Price(
            model=str(name),
            input=input_price,
            # Without a cached price, cached tokens cost what other input tokens cost (no discount assumed).
            cached_input=_usd(spec.get("cached_input", input_price), f"{at} cached_input"),
            output=_usd(spec.get("output"), f"{at} output"),
            tiers=tiers,
        )
    as_of, source = raw.get("as_of"), raw.get("source")
    return PriceTable(
        path=path,
        as_of=str(as_of) if as_of is not None else None,
        source=str(source) if source is not None else None,
        models=models,
    )


def _usd(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{what} must be a price in USD per million tokens (a number ≥ 0), got {value!r}.")
    return float(value)


def _factor(value: Any, what: str) -> float | None:
    if value is None or value is False:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 10:
        raise ConfigError(f"{what} must be a price multiplier such as 0.5 (or false: not offered), got {value!r}.")
    return float(value)


def price_of(model: str) -> Price | None:
    """The price of `model` in the table in force, or None when it has none."""
    return load_prices().price_of(model)


def cost_of(
    model: str, prompt_tokens: int, completion_tokens: int, *, tier: str = "standard", cached_tokens: int = 0
) -> float | None:
    """USD for these tokens at the model's price and `tier`, or None when there is no price for it.

    `cached_tokens` are the part of `prompt_tokens` served from the provider's prompt cache
    (`usage.prompt_tokens_details.cached_tokens`), billed at the cached-input price.
    """
    price = price_of(model)
    if price is None:
        return None
    return price.cost(prompt_tokens, completion_tokens, tier=tier, cached_tokens=cached_tokens)
