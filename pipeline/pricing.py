"""What tokens cost: USD per million tokens for models whose price we know; other models show no cost."""

from __future__ import annotations

from typing import Final

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


def price_of(model: str) -> tuple[float, float] | None:
    """Known price of a model or of its dated snapshot (gpt-4o-mini-2024-07-18 → gpt-4o-mini)."""
    for name in sorted(PRICES, key=len, reverse=True):
        if model == name or model.startswith(name + "-2"):
            return PRICES[name]
    return None


def cost_of(model: str, prompt_tokens: int, completion_tokens: int) -> float | None:
    """USD for these tokens at the model's price, or None when the price is unknown."""
    price = price_of(model)
    if price is None:
        return None
    return (prompt_tokens * price[0] + completion_tokens * price[1]) / 1e6
