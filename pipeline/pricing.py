"""What tokens cost: USD per million tokens for models whose price we know; other models show no cost.

Prices are the standard tier's; the Batch API and flex processing bill the same tokens at half of it.
"""

from __future__ import annotations

from typing import Final, Literal

Tier = Literal["standard", "batch", "flex"]

# (input, output) USD per million tokens, standard tier.
PRICES: Final[dict[str, tuple[float, float]]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5-nano": (0.05, 0.40),
}
# Share of the standard price each tier bills.
TIER_FACTOR: Final[dict[str, float]] = {"standard": 1.0, "batch": 0.5, "flex": 0.5}


def price_of(model: str) -> tuple[float, float] | None:
    """Known price of a model or of its dated snapshot (gpt-4o-mini-2024-07-18 → gpt-4o-mini)."""
    for name in sorted(PRICES, key=len, reverse=True):
        if model == name or model.startswith(name + "-2"):
            return PRICES[name]
    return None


def cost_of(model: str, prompt_tokens: int, completion_tokens: int, *, tier: Tier = "standard") -> float | None:
    """USD for these tokens at the model's price in `tier`, or None when the price is unknown."""
    price = price_of(model)
    if price is None:
        return None
    factor = TIER_FACTOR.get(tier)
    if factor is None:
        raise ValueError(f"unknown price tier {tier!r}; known: {sorted(TIER_FACTOR)}")
    return (prompt_tokens * price[0] + completion_tokens * price[1]) * factor / 1e6
