"""Prices per model: a bundled, dated LiteLLM snapshot plus user overrides."""

from .pricebook import CostBreakdown, ModelPrice, PriceBook, PriceTier, Rates

__all__ = ["CostBreakdown", "ModelPrice", "PriceBook", "PriceTier", "Rates"]
