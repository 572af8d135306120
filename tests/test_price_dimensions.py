"""Every billing dimension a provider bills is priced, and the worst case of a call is
priced at the dearest rate it could incur (issue 16, "Charged less").

Rates are typed literally from the providers' price lists (the same numbers as LiteLLM's
table), never read from the code under test.
"""

from __future__ import annotations

import base64
import struct
import zlib
from decimal import Decimal as D
from typing import Any

import pytest
from langchain_core.messages import HumanMessage, SystemMessage

from agent_guard import BudgetExceeded, Guard, Limits, PriceBook
from agent_guard.engine.admission import ModelCall
from agent_guard.engine.usage import Usage
from agent_guard.tokens import TokenCounter


@pytest.fixture(scope="module")
def book() -> PriceBook:
    return PriceBook.bundled()


# -- thresholds and tiers -------------------------------------------------------------------

def test_xai_threshold_is_inclusive_at_200k(book: PriceBook) -> None:
    # xAI bills the long-context rates from 200,000 prompt tokens on (LiteLLM marks the
    # provider's thresholds inclusive)
    at = book.cost("xai/grok-4.3", Usage(input_tokens=200_000, output_tokens=1000))
    assert at.total_usd == 200_000 * D("2.5e-06") + 1000 * D("5e-06")
    below = book.cost("xai/grok-4.3", Usage(input_tokens=199_999, output_tokens=1000))
    assert below.total_usd == 199_999 * D("1.25e-06") + 1000 * D("2.5e-06")


def test_other_providers_thresholds_stay_exclusive(book: PriceBook) -> None:
    at = book.cost("gemini-2.5-pro", Usage(input_tokens=200_000, output_tokens=1000))
    assert at.total_usd == 200_000 * D("1.25e-06") + 1000 * D("1e-05")


HAIKU_TIERS: dict[str, Any] = {
    "litellm_provider": "opencode_go", "mode": "chat",
    "input_cost_per_token": 1e-07, "output_cost_per_token": 5e-07,
    "cache_read_input_token_cost": 1e-08, "cache_creation_input_token_cost": 1.25e-07,
    "tiered_pricing": [
        {"range": [0, 100000], "input_cost_per_token": 1e-07, "output_cost_per_token": 5e-07,
         "cache_read_input_token_cost": 1e-08, "cache_creation_input_token_cost": 1.25e-07},
        {"range": [100000, 1000000], "input_cost_per_token": 5e-07,
         "output_cost_per_token": 2.5e-06, "cache_read_input_token_cost": 5e-08,
         "cache_creation_input_token_cost": 6.25e-07},
    ],
}


def test_tiered_pricing_ranges_are_kept() -> None:
    book = PriceBook.from_litellm({"opencode_go/claude-haiku-5-5": HAIKU_TIERS})
    first = book.cost("opencode_go/claude-haiku-5-5", Usage(input_tokens=100_000,
                                                            output_tokens=10))
    assert first.total_usd == 100_000 * D("1e-07") + 10 * D("5e-07")
    second = book.cost("opencode_go/claude-haiku-5-5",
                       Usage(input_tokens=150_000, output_tokens=10, cache_read_tokens=50_000))
    assert second.total_usd == (100_000 * D("5e-07") + 50_000 * D("5e-08")
                                + 10 * D("2.5e-06"))
    # above the last range: the last (dearest) tier
    beyond = book.cost("opencode_go/claude-haiku-5-5", Usage(input_tokens=2_000_000))
    assert beyond.total_usd == 2_000_000 * D("5e-07")


def test_a_model_priced_only_by_ranges_is_in_the_bundled_table(book: PriceBook) -> None:
    # dashscope/qwen-flash has no flat rate, only its range table
    cost = book.cost("dashscope/qwen-flash", Usage(input_tokens=300_000, output_tokens=100))
    assert cost.total_usd == 300_000 * D("2.5e-07") + 100 * D("2e-06")


# -- off-peak -------------------------------------------------------------------------------

SATURDAY_NOON = 1_796_472_000.0  # 2026-12-05 12:00 UTC: DeepSeek off-peak all day
WEDNESDAY_2AM = 1_796_176_800.0  # 2026-12-02 02:00 UTC: peak (off-peak 00-01, 04-06, 10-24)


def test_off_peak_rates_apply_to_a_call_wholly_off_peak(book: PriceBook) -> None:
    price = book.price("deepseek/deepseek-v4-flash")
    usage = Usage(input_tokens=10_000, output_tokens=1000, cache_read_tokens=4000)
    standard = 6000 * D("3e-07") + 4000 * D("6e-09") + 1000 * D("1.2e-06")
    off = 6000 * D("1.5e-07") + 4000 * D("3e-09") + 1000 * D("6e-07")
    assert price.cost(usage).total_usd == standard  # no time given: the dearer rates
    assert price.cost(usage, (SATURDAY_NOON, SATURDAY_NOON + 60)).total_usd == off
    assert price.cost(usage, (WEDNESDAY_2AM, WEDNESDAY_2AM + 60)).total_usd == standard
    # started at peak (03:59), ended off-peak (04:01): the standard rates
    assert price.cost(usage, (WEDNESDAY_2AM + 7140, WEDNESDAY_2AM + 7260)).total_usd == standard


@pytest.mark.parametrize(("start", "off_peak"), [(SATURDAY_NOON, True), (WEDNESDAY_2AM, False)])
def test_the_guard_settles_off_peak_calls_at_off_peak_rates(start: float, off_peak: bool) -> None:
    now = [start]
    guard = Guard(Limits(max_cost_usd=1), clock=lambda: now[0])
    call = ModelCall(session="s", model="deepseek/deepseek-v4-flash",
                     messages=[HumanMessage("hi")], max_output_tokens=1000)
    admission = guard.before_model_call(call)
    now[0] += 30
    record = guard.after_model_call(admission, Usage(input_tokens=10_000, output_tokens=1000))
    expected = (10_000 * D("1.5e-07") + 1000 * D("6e-07")) if off_peak else (
        10_000 * D("3e-07") + 1000 * D("1.2e-06"))
    assert record.cost_nano == expected * 10**9
    # the reservation was the standard (dearer) price: the worst case
    assert admission.reserved_nano >= (10 * D("3e-07") + 1000 * D("1.2e-06")) * 10**9


# -- cache writes ---------------------------------------------------------------------------

def test_one_hour_cache_writes_are_priced_as_one_hour(book: PriceBook) -> None:
    # langchain-anthropic: cache_creation 0, the writes by duration beside it
    um = {"input_tokens": 48_715, "output_tokens": 100, "total_tokens": 48_815,
          "input_token_details": {"cache_read": 0, "cache_creation": 0,
                                  "ephemeral_5m_input_tokens": 0,
                                  "ephemeral_1h_input_tokens": 48_615}}
    usage = Usage.from_usage_metadata(um)
    assert usage.cache_creation_tokens == 48_615
    assert usage.cache_creation_1h_tokens == 48_615
    cost = book.cost("claude-sonnet-4-5", usage)
    assert cost.total_usd == 100 * D("3e-06") + 48_615 * D("6e-06") + 100 * D("1.5e-05")


def test_five_minute_and_one_hour_writes_together(book: PriceBook) -> None:
    um = {"input_tokens": 3000, "output_tokens": 0,
          "input_token_details": {"cache_creation": 2000, "ephemeral_5m_input_tokens": 1500,
                                  "ephemeral_1h_input_tokens": 500}}
    usage = Usage.from_usage_metadata(um)
    cost = book.cost("claude-sonnet-4-5", usage)
    assert cost.total_usd == 1000 * D("3e-06") + 1500 * D("3.75e-06") + 500 * D("6e-06")


def _anthropic_call(ttl: str | None) -> ModelCall:
    marker: dict[str, Any] = {"type": "ephemeral"}
    if ttl:
        marker["ttl"] = ttl
    big = "lorem ipsum dolor sit amet " * 400
    return ModelCall(session="s", model="claude-sonnet-4-5", provider="anthropic",
                     messages=[SystemMessage(content=[{"type": "text", "text": big,
                                                       "cache_control": marker}]),
                               HumanMessage("hi")],
                     max_output_tokens=10)


@pytest.mark.parametrize(("ttl", "rate"), [(None, D("3.75e-06")), ("5m", D("3.75e-06")),
                                            ("1h", D("6e-06"))])
def test_the_worst_case_reserves_marked_prompts_at_the_write_rate(ttl: str | None,
                                                                   rate: D) -> None:
    guard = Guard(Limits(max_cost_usd=100))
    admission = guard.before_model_call(_anthropic_call(ttl))
    prompt = guard.tokens.count_messages(_anthropic_call(ttl).messages, "claude-sonnet-4-5")
    # every reserved prompt token may be written to the cache
    assert admission.reserved_nano >= prompt * rate * 10**9
    guard.after_model_call(admission, Usage(input_tokens=prompt, output_tokens=10,
                                            cache_creation_tokens=prompt - 10,
                                            cache_creation_1h_tokens=(prompt - 10) if ttl == "1h"
                                            else 0))


def test_a_cache_write_never_passes_a_cap_the_reservation_fitted() -> None:
    # the case: a cap between the plain price of the prompt and its write price
    call = _anthropic_call(None)
    guard = Guard(Limits(max_cost_usd=1))
    prompt = guard.tokens.count_messages(call.messages, call.model)
    plain = prompt * D("3e-06") + 10 * D("1.5e-05")
    written = prompt * D("3.75e-06") + 10 * D("1.5e-05")
    cap = (plain + written) / 2
    guard = Guard(Limits(max_cost_usd=cap, input_margin=0))
    with pytest.raises(BudgetExceeded):  # today's code reserved the plain price: admitted
        guard.before_model_call(call)


# -- service tiers --------------------------------------------------------------------------

def _lc_usage(raw: dict[str, Any], tier: str | None) -> dict[str, Any]:
    from langchain_openai.chat_models.base import _create_usage_metadata

    return dict(_create_usage_metadata(raw, tier))


RAW = {"prompt_tokens": 10_000, "completion_tokens": 2000, "total_tokens": 12_000,
       "prompt_tokens_details": {"cached_tokens": 4000},
       "completion_tokens_details": {"reasoning_tokens": 500}}


def test_priority_usage_keys_are_priced_at_priority_rates(book: PriceBook) -> None:
    usage = Usage.from_usage_metadata(_lc_usage(RAW, "priority"))
    assert usage.service_tier == "priority"
    assert (usage.cache_read_tokens, usage.reasoning_tokens) == (4000, 500)
    cost = book.cost("gpt-4o", usage)
    assert cost.total_usd == 6000 * D("4.25e-06") + 4000 * D("2.125e-06") + 2000 * D("1.7e-05")


def test_flex_usage_is_priced_at_flex_rates(book: PriceBook) -> None:
    usage = Usage.from_usage_metadata(_lc_usage(RAW, "flex"))
    assert usage.service_tier == "flex"
    cost = book.cost("o3", usage)
    assert cost.total_usd == 6000 * D("1e-06") + 4000 * D("2.5e-07") + 2000 * D("4e-06")


def test_standard_usage_is_unchanged(book: PriceBook) -> None:
    usage = Usage.from_usage_metadata(_lc_usage(RAW, None))
    assert usage.service_tier is None
    cost = book.cost("gpt-4o", usage)
    assert cost.total_usd == 6000 * D("2.5e-06") + 4000 * D("1.25e-06") + 2000 * D("1e-05")


def test_a_priority_request_is_reserved_at_priority_rates() -> None:
    guard = Guard(Limits(max_cost_usd=100))
    call = ModelCall(session="s", model="gpt-4o", messages=[HumanMessage("hi")],
                     max_output_tokens=1000, params={"service_tier": "priority"})
    admission = guard.before_model_call(call)
    assert admission.reserved_nano >= 1000 * D("1.7e-05") * 10**9
    plain = guard.before_model_call(ModelCall(session="t", model="gpt-4o",
                                              messages=[HumanMessage("hi")],
                                              max_output_tokens=1000))
    assert plain.reserved_nano < 1000 * D("1.7e-05") * 10**9


# -- audio ----------------------------------------------------------------------------------

def test_audio_tokens_in_and_out_are_priced_at_audio_rates(book: PriceBook) -> None:
    um = {"input_tokens": 1200, "output_tokens": 6000, "total_tokens": 7200,
          "input_token_details": {"audio": 1000}, "output_token_details": {"audio": 5800}}
    usage = Usage.from_usage_metadata(um)
    assert (usage.audio_input_tokens, usage.audio_output_tokens) == (1000, 5800)
    cost = book.cost("gpt-audio", usage)
    assert cost.total_usd == (200 * D("2.5e-06") + 1000 * D("3.2e-05")
                              + 200 * D("1e-05") + 5800 * D("6.4e-05"))


def test_an_audio_answer_is_reserved_at_the_audio_output_rate() -> None:
    guard = Guard(Limits(max_cost_usd=100))
    call = ModelCall(session="s", model="gpt-audio", messages=[HumanMessage("speak")],
                     max_output_tokens=1000, params={"modalities": ["text", "audio"]})
    assert guard.before_model_call(call).reserved_nano >= 1000 * D("6.4e-05") * 10**9


# -- images ---------------------------------------------------------------------------------

def png(width: int, height: int) -> str:
    """A data URL of a real (tiny, blank) PNG header of this size."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    data = (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
            + struct.pack(">I", zlib.crc32(chunk)))
    return "data:image/png;base64," + base64.b64encode(data).decode()


def image_message(url: str, detail: str | None = None) -> HumanMessage:
    spec: dict[str, Any] = {"url": url}
    if detail:
        spec["detail"] = detail
    return HumanMessage(content=[{"type": "image_url", "image_url": spec}])


@pytest.mark.parametrize(("model", "size", "detail", "tokens"), [
    ("gpt-4o-mini", (1024, 1024), "high", 25_501),  # 2833 + 4 x 5667
    ("gpt-4o-mini", (1024, 1024), "low", 2_833),
    ("gpt-4o", (1024, 1024), "high", 765),  # 85 + 4 x 170
    ("gpt-4o", (2048, 4096), "high", 1_105),  # 768 x 1536 -> 6 tiles
    ("gpt-4o", (1024, 1024), "low", 85),
    ("gpt-4o", (1024, 1024), None, 765),  # auto: counted as high
    ("gpt-4.1-mini", (1024, 1024), "high", 1_659),  # 1024 patches x 1.62
])
def test_images_are_counted_by_size_and_detail(model: str, size: tuple[int, int],
                                               detail: str | None, tokens: int) -> None:
    counter = TokenCounter()
    empty = counter.count_messages([HumanMessage(content=[])], model)
    with_image = counter.count_messages([image_message(png(*size), detail)], model)
    assert with_image - empty == tokens


def test_an_image_of_unknown_size_is_counted_at_its_family_bound() -> None:
    counter = TokenCounter()
    empty = counter.count_messages([HumanMessage(content=[])], "gpt-4o-mini")
    unknown = counter.count_messages([image_message("https://example.com/x.png", "high")],
                                     "gpt-4o-mini")
    assert unknown - empty >= 2833 + 8 * 5667  # the largest image high detail allows


def test_four_images_on_gpt_4o_mini_do_not_pass_the_cap() -> None:
    guard = Guard(Limits(max_cost_usd=0.005))
    msg = HumanMessage(content=[{"type": "image_url",
                                 "image_url": {"url": png(1024, 1024), "detail": "high"}}] * 4)
    call = ModelCall(session="s", model="gpt-4o-mini", messages=[msg], max_output_tokens=100)
    with pytest.raises(BudgetExceeded):
        guard.before_model_call(call)  # 4 x 25,501 tokens at $0.15/M = $0.0153


# -- structured output ------------------------------------------------------------------------

SCHEMA = {"type": "json_schema", "json_schema": {"name": "Answer", "strict": True, "schema": {
    "type": "object",
    "properties": {f"field_{i}": {"type": "string", "description": f"the {i}th detail of the "
                                  "answer, in one plain sentence"} for i in range(40)},
    "required": [f"field_{i}" for i in range(40)], "additionalProperties": False}}}


def test_a_json_schema_response_format_is_in_the_prompt_estimate() -> None:
    counter = TokenCounter()
    messages = [HumanMessage("fill the form")]
    plain = counter.count_messages(messages, "gpt-4o")
    with_format = counter.count_messages(messages, "gpt-4o", params={"response_format": SCHEMA})
    schema_tokens = counter.count_text(str(SCHEMA["json_schema"]["schema"]))  # type: ignore[index]
    assert with_format - plain >= schema_tokens * 0.5
    estimate, _ = counter.estimate_messages(messages, "gpt-4o",
                                            params={"response_format": SCHEMA})
    assert estimate == with_format


# -- through LangChain: what the provider is sent reaches the estimate and the worst case --------

@pytest.fixture
def server():  # type: ignore[no-untyped-def]
    from agent_guard.testing import FakeOpenAIServer

    with FakeOpenAIServer(['{"field_0": "x"}']) as s:
        yield s


@pytest.mark.parametrize("path", ["invoke", "ainvoke"])
def test_structured_output_schema_is_reserved_through_the_callback(server, path: str) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    from langchain_openai import ChatOpenAI

    from agent_guard import GuardCallbackHandler

    seen: list[Any] = []
    handler = GuardCallbackHandler(limits=Limits(max_cost_usd=1), session_id="s")
    original = handler.guard.before_model_call
    handler.guard.before_model_call = lambda call: seen.append(call) or original(call)  # type: ignore[method-assign]
    llm = ChatOpenAI(model="gpt-4o", base_url=server.base_url, api_key="x", max_tokens=50)
    structured = llm.with_structured_output(SCHEMA["json_schema"]["schema"] | {  # type: ignore[index]
        "title": "Answer", "description": "the form"}, method="json_schema")
    config = {"callbacks": [handler]}
    if path == "invoke":
        structured.invoke("fill the form", config=config)
    else:
        asyncio.run(structured.ainvoke("fill the form", config=config))
    [call] = seen
    counter = TokenCounter()
    plain = counter.count_messages(call.messages, "gpt-4o")
    assert counter.count_messages(call.messages, "gpt-4o", params=call.params) - plain > 300


@pytest.mark.parametrize("adapter", ["callback", "middleware"])
@pytest.mark.parametrize("feature", ["priority", "structured", "audio_answer"])
def test_what_the_provider_is_sent_reaches_the_worst_case(server, adapter: str,  # type: ignore[no-untyped-def]
                                                          feature: str) -> None:
    """A priority tier, a json_schema response format and an audio answer set on the
    model reach the guard's reservation, through the callback and the middleware."""
    from langchain.agents import create_agent
    from langchain_openai import ChatOpenAI

    from agent_guard import GuardCallbackHandler, GuardMiddleware

    kwargs: dict[str, Any] = {"max_tokens": 1000}
    if feature == "priority":
        kwargs["service_tier"] = "priority"
    elif feature == "structured":
        kwargs["model_kwargs"] = {"response_format": SCHEMA}
    else:
        kwargs["model_kwargs"] = {"modalities": ["text", "audio"]}
    model = "gpt-audio" if feature == "audio_answer" else "gpt-4o"
    llm = ChatOpenAI(model=model, base_url=server.base_url, api_key="x", **kwargs)
    plain_llm = ChatOpenAI(model=model, base_url=server.base_url, api_key="x", max_tokens=1000)
    reserved: dict[str, list[Any]] = {"with": [], "plain": []}

    def spy(guard: Guard, into: list[Any]) -> None:
        original = guard.before_model_call
        guard.before_model_call = lambda call: (  # type: ignore[method-assign]
            lambda a: into.append(a) or a)(original(call))

    for key, chat in (("with", llm), ("plain", plain_llm)):
        if adapter == "callback":
            handler = GuardCallbackHandler(limits=Limits(max_cost_usd=10), session_id=key)
            spy(handler.guard, reserved[key])
            chat.invoke("hi", config={"callbacks": [handler]})
        else:
            mw = GuardMiddleware(limits=Limits(max_cost_usd=10))
            spy(mw.guard, reserved[key])
            create_agent(chat, [], middleware=[mw]).invoke(
                {"messages": [("user", "hi")]}, {"configurable": {"thread_id": key}})
    with_feature, plain = reserved["with"][0], reserved["plain"][0]
    # (the adapter may reserve several attempts of a call: compare with the same call
    # without the feature)
    if feature == "priority":  # $17/M output instead of $10/M
        assert with_feature.reserved_nano >= 1000 * D("1.7e-05") * 10**9
        assert with_feature.reserved_nano * 10 >= plain.reserved_nano * 16
    elif feature == "structured":
        assert with_feature.estimated_input_tokens - plain.estimated_input_tokens > 300
    else:  # $64/M audio output instead of $10/M text
        assert with_feature.reserved_nano >= 1000 * D("6.4e-05") * 10**9
        assert with_feature.reserved_nano >= plain.reserved_nano * 5


# -- prices update ----------------------------------------------------------------------------

def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """Print the CLI's lines 200 columns wide, unwrapped. The CLI prints through one rich
    ``Console`` made when ``agent_guard.cli`` is imported, which keeps the ``COLUMNS`` set
    then: a ``CliRunner(env={"COLUMNS": ...})`` cannot widen it later (pytest-xdist's
    workers, for one, start with ``COLUMNS=80``)."""
    from rich.console import Console

    from agent_guard import cli

    monkeypatch.setattr(cli, "console", Console(width=200))

def test_prices_update_writes_the_table_the_guard_reads(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import json as _json

    from typer.testing import CliRunner

    from agent_guard.cli import app

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("AGENT_GUARD_PRICES", raising=False)
    source = tmp_path / "litellm.json"
    source.write_text(_json.dumps({"acme-chat": {
        "litellm_provider": "acme", "mode": "chat", "input_cost_per_token": 1e-06,
        "output_cost_per_token": 2e-06, "input_cost_per_token_priority": 3e-06},
        "acme-embed": {"mode": "embedding", "input_cost_per_token": 1e-08}}))
    result = CliRunner().invoke(app, ["prices", "update", "--from", str(source)])
    assert result.exit_code == 0, result.output
    assert "1 models" in result.output and "1 added" in result.output
    book = PriceBook.default()
    assert book.price("acme-chat").fields["input_cost_per_token_priority"] == D("3e-06")
    assert "gpt-4o" not in book  # the written table replaces the bundled one
    shown = CliRunner().invoke(app, ["price", "acme-chat"])
    assert "prices as of" in shown.output and "input_cost_per_token_priority" in shown.output
    bad = CliRunner().invoke(app, ["prices", "update", "--from", str(tmp_path / "none.json")])
    assert bad.exit_code != 0 and "cannot read prices" in bad.output


def test_price_shows_the_age_of_the_prices_and_warns_when_old(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from agent_guard.cli import app
    from agent_guard.pricing.refresh import dump_snapshot

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("AGENT_GUARD_PRICES", raising=False)
    fresh = CliRunner().invoke(app, ["price", "gpt-4o"])
    assert "prices as of " + PriceBook.bundled().snapshot_date in fresh.output  # type: ignore[operator]
    path = PriceBook.user_prices_path()
    path.parent.mkdir(parents=True)
    path.write_text(dump_snapshot({"gpt-4o": {"input_cost_per_token": D("2.5e-06"),
                                              "output_cost_per_token": D("1e-05")}},
                                  version="1.0.0", date="2025-01-01"))
    wide_console(monkeypatch)
    old = CliRunner().invoke(app, ["price", "gpt-4o"])
    assert "prices as of 2025-01-01" in old.output and "warning" in old.output
    assert "agent-guard prices update" in old.output


def test_prices_update_reads_a_url_and_dry_run_writes_nothing(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import http.server
    import json as _json
    import threading

    from typer.testing import CliRunner

    from agent_guard.cli import app

    body = _json.dumps({"gpt-4o": {"litellm_provider": "openai", "mode": "chat",
                                   "input_cost_per_token": 3e-06,
                                   "output_cost_per_token": 1e-05}}).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
        monkeypatch.delenv("AGENT_GUARD_PRICES", raising=False)
        url = f"http://127.0.0.1:{server.server_address[1]}/prices.json"
        wide_console(monkeypatch)
        dry = CliRunner().invoke(app, ["prices", "update", "--from", url, "--dry-run"])
        assert dry.exit_code == 0, dry.output
        assert "input_cost_per_token 0.0000025 -> 0.000003" in dry.output  # what changed
        assert not PriceBook.user_prices_path().exists()
        out = tmp_path / "mine.json"
        done = CliRunner().invoke(app, ["prices", "update", "--from", url, "--out", str(out)])
        assert done.exit_code == 0 and out.exists()
        monkeypatch.setenv("AGENT_GUARD_PRICES", str(out))
        assert PriceBook.default().price("gpt-4o").input == D("3e-06")
        import datetime as dt

        assert PriceBook.default().snapshot_date == dt.date.today().isoformat()  # fetched now
        # rebuilding from one of our snapshots keeps its date (its prices are that old)
        again = tmp_path / "again.json"
        old = tmp_path / "old.json"
        old.write_text(out.read_text().replace(dt.date.today().isoformat(), "2025-01-01"))
        CliRunner().invoke(app, ["prices", "update", "--from", str(old), "--out", str(again)])
        monkeypatch.setenv("AGENT_GUARD_PRICES", str(again))
        assert PriceBook.default().snapshot_date == "2025-01-01"
    finally:
        server.shutdown()
        server.server_close()
