"""Prices per model: a bundled, dated LiteLLM snapshot plus user overrides."""

from .pricebook import CostBreakdown, ModelPrice, PriceBook, PriceTier, Rates
from .tools import ToolPrice, ToolUse

__all__ = ["CostBreakdown", "ModelPrice", "PriceBook", "PriceTier", "Rates", "ToolPrice",
           "ToolUse"]
