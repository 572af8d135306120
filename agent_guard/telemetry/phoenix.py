"""Arize Phoenix: give it the guard's prices so its own cost columns match the ledger.

Phoenix (20.x) computes each LLM span's cost itself, from the span's
``llm.model_name``, ``llm.provider`` and ``llm.token_count.*`` and the price of a
model it knows; it does not read a cost written on the span (``llm.cost.*``,
``gen_ai.usage.cost``). A model that is not in Phoenix's built-in table, or whose
price you negotiated, shows cost ``None`` (or Phoenix's list price). This registers
the guard's price of each model with Phoenix (its GraphQL ``createModel`` /
``updateModel``), so that Phoenix's span, trace, session and project costs equal what
the guard charged.

Phoenix prices tokens linearly per type (input, output, cache read, cache write,
reasoning); a model with tiered prices (a different rate above a prompt size) is
registered at its base rates, with a warning.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any

import httpx

__all__ = ["name_pattern", "register_prices"]

logger = logging.getLogger("agent_guard")

_MODELS = """query($after: String) { generativeModels(first: 100, after: $after) {
  edges { node { id name provider kind } } pageInfo { hasNextPage endCursor } } }"""
_CREATE = """mutation($input: CreateModelMutationInput!) {
  createModel(input: $input) { model { id name } } }"""
_UPDATE = """mutation($input: UpdateModelMutationInput!) {
  updateModel(input: $input) { model { id name } } }"""


def name_pattern(model: str) -> str:
    """The Phoenix name pattern of ``model``: the name itself or a dated snapshot of it
    (``gpt-4o`` and ``gpt-4o-2024-08-06``), as the guard's price book resolves them."""
    return rf"^{re.escape(model)}(-\d{{4}}-\d{{2}}-\d{{2}})?$"


def _per_million(rate: Decimal) -> float:
    return float(rate * 1_000_000)


def _costs(price: Any) -> list[dict[str, Any]]:
    costs = [{"tokenType": "input", "kind": "PROMPT",
              "costPerMillionTokens": _per_million(price.input)},
             {"tokenType": "output", "kind": "COMPLETION",
              "costPerMillionTokens": _per_million(price.output)}]
    # the guard bills cache reads and writes at the input rate when it has no rate of
    # their own, and reasoning at the output rate: Phoenix does the same by fallback
    for token_type, kind, rate in (("cache_read", "PROMPT", price.cache_read),
                                   ("cache_write", "PROMPT", price.cache_creation),
                                   ("reasoning", "COMPLETION", price.reasoning)):
        if rate is not None:
            costs.append({"tokenType": token_type, "kind": kind,
                          "costPerMillionTokens": _per_million(rate)})
    return costs


def _graphql(client: httpx.Client, query: str, variables: Mapping[str, Any]) -> Any:
    response = client.post("/graphql", json={"query": query, "variables": dict(variables)})
    response.raise_for_status()
    body = response.json()
    if body.get("errors"):
        raise RuntimeError(f"Phoenix refused the request: {body['errors'][0].get('message')}")
    return body["data"]


def register_prices(endpoint: str, prices: Any, models: Iterable[str], *,
                    provider: str | None = None, headers: Mapping[str, str] | None = None,
                    timeout_s: float = 10.0) -> dict[str, str]:
    """Create (or update) a Phoenix model for each of ``models`` at the price ``prices``
    (the guard's :class:`~agent_guard.pricing.PriceBook`, ``guard.prices``) gives it.

    ``endpoint`` is Phoenix's base URL (``http://localhost:6006``); ``headers`` carry an
    API key where Phoenix has authentication on (``{"Authorization": "Bearer ..."}``).
    ``provider`` restricts a model to spans of that ``llm.provider``. Returns
    ``{model: Phoenix model id}``. Phoenix picks up new prices within a few seconds and
    applies them to spans it receives from then on.
    """
    wanted = {}
    for model in models:
        price = prices.resolve(model, provider)
        if price is None:
            raise ValueError(f"register_prices: the price book has no price for {model!r}")
        if price.tiers:
            logger.warning("agent-guard: %s has tiered prices; Phoenix gets its base rates "
                           "and will show less than the ledger above %d prompt tokens",
                           model, price.tiers[0].threshold_tokens)
        wanted[model] = price
    out: dict[str, str] = {}
    with httpx.Client(base_url=endpoint.rstrip("/"), headers=dict(headers or {}),
                      timeout=timeout_s) as client:
        existing: dict[str, str] = {}
        after = None
        while True:
            page = _graphql(client, _MODELS, {"after": after})["generativeModels"]
            for edge in page["edges"]:
                node = edge["node"]
                if node["kind"] == "CUSTOM":
                    existing[node["name"]] = node["id"]
            if not page["pageInfo"]["hasNextPage"]:
                break
            after = page["pageInfo"]["endCursor"]
        for model, price in wanted.items():
            fields = {"name": model, "provider": provider or "",
                      "namePattern": name_pattern(model), "costs": _costs(price)}
            if model in existing:
                data = _graphql(client, _UPDATE, {"input": {"id": existing[model], **fields}})
                out[model] = data["updateModel"]["model"]["id"]
            else:
                data = _graphql(client, _CREATE, {"input": fields})
                out[model] = data["createModel"]["model"]["id"]
    return out
