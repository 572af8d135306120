"""Costs equal hand calculations; names resolve without guessing; overrides are checked.

Rates are typed here literally from the providers' price lists, never read
from the code under test.
"""

from __future__ import annotations

import json
from decimal import Decimal as D

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent_guard import PriceBook, UnknownModelPrice
from agent_guard.engine.usage import Usage, usd_to_nano
from agent_guard.pricing import pricebook as pricebook_module


@pytest.fixture(scope="module")
def book() -> PriceBook:
    return PriceBook.bundled()


def test_snapshot_is_dated_and_large(book: PriceBook) -> None:
    assert book.snapshot_date == "2026-12-02"
    assert len(book) > 1000
    assert PriceBook.bundled() is book  # loaded once


def test_gpt_4o_with_cached_input(book: PriceBook) -> None:
    # OpenAI counts the 1,024 cached tokens inside the 1,200 prompt tokens
    usage = Usage.from_openai({"prompt_tokens": 1200, "completion_tokens": 300,
                               "prompt_tokens_details": {"cached_tokens": 1024}})
    cost = book.cost("gpt-4o", usage)
    expected = 176 * D("2.5e-06") + 1024 * D("1.25e-06") + 300 * D("1e-05")
    assert cost.total_usd == expected == D("0.00472")
    assert cost.total_nano == 4_720_000
    assert cost.prompt_usd == 176 * D("2.5e-06") + 1024 * D("1.25e-06")


def test_anthropic_cache_writes_and_reads(book: PriceBook) -> None:
    # Anthropic reports cache reads and writes beside input_tokens, not inside
    usage = Usage.from_anthropic({"input_tokens": 50, "cache_creation_input_tokens": 2000,
                                  "cache_read_input_tokens": 8000, "output_tokens": 400})
    assert (usage.input_tokens, usage.uncached_input_tokens) == (10050, 50)
    cost = book.cost("claude-sonnet-4-5", usage)
    expected = (50 * D("3e-06") + 2000 * D("3.75e-06") + 8000 * D("3e-07")
                + 400 * D("1.5e-05"))
    assert cost.total_usd == expected == D("0.01605")
    assert cost.cache_creation_usd == 2000 * D("3.75e-06")
    assert book.cost("anthropic/claude-sonnet-4-5", usage).total_usd == expected


def test_reasoning_tokens_are_priced_once(book: PriceBook) -> None:
    # o3: reasoning tokens are part of completion_tokens, at the output rate
    usage = Usage.from_openai({"prompt_tokens": 2000, "completion_tokens": 1500,
                               "completion_tokens_details": {"reasoning_tokens": 1200}})
    assert book.cost("o3", usage).total_usd == 2000 * D("2e-06") + 1500 * D("8e-06")
    # a model with a separate reasoning rate: reasoning at that rate, the rest at output
    qwen = book.cost("dashscope/qwen-turbo", usage)
    assert qwen.total_usd == 2000 * D("5e-08") + 300 * D("2e-07") + 1200 * D("5e-07")
    assert qwen.reasoning_usd == 1200 * D("5e-07")


def test_prompt_above_a_threshold_switches_the_whole_request(book: PriceBook) -> None:
    above = book.cost("gemini-2.5-pro", Usage(input_tokens=200_001, output_tokens=1000))
    assert above.tier_threshold == 200_000
    assert above.total_usd == 200_001 * D("2.5e-06") + 1000 * D("1.5e-05")
    at = book.cost("gemini-2.5-pro", Usage(input_tokens=200_000, output_tokens=1000))
    assert at.tier_threshold is None
    assert at.total_usd == 200_000 * D("1.25e-06") + 1000 * D("1e-05")
    cached = book.cost("gemini-2.5-pro", Usage(input_tokens=300_000, output_tokens=0,
                                               cache_read_tokens=100_000))
    assert cached.total_usd == 200_000 * D("2.5e-06") + 100_000 * D("2.5e-07")


@pytest.mark.parametrize(("name", "resolved"), [
    ("gpt-4o-mini-2025-01-01", "gpt-4o-mini"),
    ("openai/gpt-4o", "gpt-4o"),
    ("openrouter/openai/gpt-4o", "gpt-4o"),
    ("GPT-4O-MINI", "gpt-4o-mini"),
    ("claude-sonnet-4-5@20250929", "claude-sonnet-4-5"),
    ("gpt-4o-mini", "gpt-4o-mini"),
    ("gpt-4o", "gpt-4o"),
])
def test_names_resolve(book: PriceBook, name: str, resolved: str) -> None:
    price = book.resolve(name)
    assert price is not None and price.model == resolved


@pytest.mark.parametrize("name", ["gpt-4o-mini-turbo-x", "gpt-4o-ultra", "acme-llm", "", "gpt"])
def test_no_fuzzy_matching(book: PriceBook, name: str) -> None:
    assert book.resolve(name) is None
    assert name not in book


def test_unknown_model_says_how_to_add_a_price(book: PriceBook) -> None:
    with pytest.raises(UnknownModelPrice) as info:
        book.price("acme-llm")
    assert "with_overrides" in str(info.value) and "AGENT_GUARD_PRICES" in str(info.value)


def test_overrides_from_dict_json_yaml_and_env(tmp_path, monkeypatch, book: PriceBook) -> None:
    mine = {"input_cost_per_token": "1e-06", "output_cost_per_token": 2e-06}
    assert book.with_overrides({"acme": mine}).cost("acme", Usage(10, 10)).total_usd == D(
        "0.00003")
    (tmp_path / "p.json").write_text(json.dumps({"acme": mine}))
    (tmp_path / "p.yaml").write_text("acme:\n  input_cost_per_token: 1.0e-06\n"
                                     "  output_cost_per_token: 2.0e-06\n"
                                     "gpt-4o:\n  output_cost_per_token: 2.0e-05\n")
    for path in ("p.json", "p.yaml"):
        assert book.with_overrides(tmp_path / path).price("acme").output == D("2e-06")
    merged = book.with_overrides(tmp_path / "p.yaml").price("gpt-4o")
    assert (merged.input, merged.output) == (D("2.5e-06"), D("2e-05"))  # field-wise merge
    monkeypatch.setenv("AGENT_GUARD_PRICES", str(tmp_path / "p.yaml"))
    assert PriceBook.default().price("acme").input == D("1e-06")
    assert "acme" not in PriceBook.bundled()


@pytest.mark.parametrize(("fields", "message"), [
    ({"input_cost_per_token": -1, "output_cost_per_token": 1}, ">= 0"),
    ({"input_cost_per_token": "nan", "output_cost_per_token": 1}, "finite"),
    ({"input_cost_per_token": "cheap", "output_cost_per_token": 1}, "must be a number"),
    ({"input_cost_per_token": True, "output_cost_per_token": 1}, "must be a number"),
    ({"output_cost_per_token": 1e-06}, "needs 'input_cost_per_token'"),
])
def test_bad_overrides_are_refused(book: PriceBook, fields, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        book.with_overrides({"acme": fields})
    assert "acme" in str(info.value)


def test_bad_override_file(tmp_path, book: PriceBook) -> None:
    (tmp_path / "p.txt").write_text("x")
    with pytest.raises(ValueError, match=r"\.json, \.yaml or \.yml"):
        book.with_overrides(tmp_path / "p.txt")


usages = st.builds(
    lambda inp, out, cr, cc, rs: Usage(inp + cr + cc, out + rs, cr, cc, rs),
    *(st.integers(0, 2_000_000) for _ in range(5)),
)


@given(usage=usages, extra=st.integers(1, 10_000),
       model=st.sampled_from(["gpt-4o", "claude-sonnet-4-5", "gemini-2.5-pro",
                              "dashscope/qwen-turbo", "o3"]))
def test_cost_is_exact_and_monotonic(usage: Usage, extra: int, model: str) -> None:
    book = PriceBook.bundled()
    cost = book.cost(model, usage)
    assert cost.total_usd * 10**9 <= cost.total_nano < cost.total_usd * 10**9 + 1
    more_output = Usage(usage.input_tokens, usage.output_tokens + extra, usage.cache_read_tokens,
                        usage.cache_creation_tokens, usage.reasoning_tokens)
    assert book.cost(model, more_output).total_usd > cost.total_usd
    more_input = Usage(usage.input_tokens + extra, usage.output_tokens, usage.cache_read_tokens,
                       usage.cache_creation_tokens, usage.reasoning_tokens)
    assert book.cost(model, more_input).total_usd > cost.total_usd
    assert book.cost(model, Usage()).total_nano == 0



def test_a_longer_prompt_never_costs_less_across_a_threshold() -> None:
    """LiteLLM's table prices gemini-2.5-pro's cache writes above 200k at 2.5e-7, under it
    at the input rate (1.25e-6): taken as is, 200,001 written tokens cost less than
    190,001, and a reservation from an estimate above the real prompt could be below the
    bill. (Found by hypothesis on the example below.)"""
    book = PriceBook.bundled()
    small = Usage(190_001, 0, 0, 190_001, 0)
    large = Usage(200_001, 0, 0, 190_001, 0)
    assert book.cost("gemini-2.5-pro", large).total_nano > book.cost(
        "gemini-2.5-pro", small).total_nano


@given(usage=usages,
       model=st.sampled_from(["gpt-4o", "claude-sonnet-4-5", "gemini-2.5-pro",
                              "dashscope/qwen-turbo", "o3", "gpt-4o-mini"]))
def test_cost_nano_is_the_breakdowns_total(usage: Usage, model: str) -> None:
    """The fast path the guard reserves and settles with equals the breakdown's total
    (tiers, cache rates and reasoning rates included)."""
    price = PriceBook.bundled().price(model)
    assert price.cost_nano(usage) == price.cost(usage).total_nano

def test_usd_to_nano_rounds_up_exactly() -> None:
    assert usd_to_nano("0.1") == 100_000_000
    assert usd_to_nano(0.1) == 100_000_000
    assert usd_to_nano(D("3.75e-08")) == 38  # 37.5 nano-USD rounds up
    with pytest.raises(ValueError):
        usd_to_nano(float("inf"))


def test_malformed_provider_usage_is_refused() -> None:
    from agent_guard.engine.usage import MalformedUsage

    for bad in ({"input_tokens": -1}, {"input_tokens": "12"}, {"input_tokens": float("nan")},
                {"input_tokens": 5, "input_token_details": {"cache_read": 9}}):
        with pytest.raises(MalformedUsage):
            Usage.from_usage_metadata(bad)


def test_module_cache_is_shared(monkeypatch) -> None:
    monkeypatch.setattr(pricebook_module, "_BUNDLED", None)
    first = PriceBook.bundled()
    assert PriceBook.bundled() is first


def test_the_snapshot_carries_upstreams_fix_of_jais(book: PriceBook) -> None:
    # LiteLLM 1.109.1 listed azure_ai/jais-30b-chat at 1000x its price ($3,200/M input)
    jais = book.price("azure_ai/jais-30b-chat")
    assert (jais.input, jais.output) == (D("3.2e-06"), D("9.71e-06"))
