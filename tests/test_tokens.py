"""Token counts: bundled encodings, offline and verified; chat overhead; fallbacks.

Reference numbers are literals: the token counts published in OpenAI's cookbook "How to
count tokens with tiktoken" (including its prompt_tokens measured by the API), and
counts computed once with tiktoken on the bundled files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import (
    AIMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

from agent_guard import tokens
from agent_guard.tokens import (
    IMAGE_TOKENS_LOW_DETAIL,
    REPLY_PRIMING_TOKENS,
    TOKENS_PER_MESSAGE,
    TOKENS_PER_NAME,
    EncodingIntegrityError,
    TokenCounter,
    get_encoding,
)

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "agent_guard" / "tokens_data"

# The cookbook's example conversation; the API counted 124 prompt tokens on gpt-4o and
# gpt-4o-mini, 129 on gpt-4, gpt-4-0613 and gpt-3.5-turbo.
COOKBOOK_MESSAGES: list[dict[str, str]] = [
    {"role": "system", "content": "You are a helpful, pattern-following assistant that "
                                  "translates corporate jargon into plain English."},
    {"role": "system", "name": "example_user",
     "content": "New synergies will help drive top-line growth."},
    {"role": "system", "name": "example_assistant",
     "content": "Things working well together will increase revenue."},
    {"role": "system", "name": "example_user",
     "content": "Let's circle back when we have more bandwidth to touch base on "
                "opportunities for increased leverage."},
    {"role": "system", "name": "example_assistant",
     "content": "Let's talk later when we're less busy about how to do better."},
    {"role": "user", "content": "This late pivot means we don't have time to boil the ocean "
                                "for the client deliverable."},
]

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Get the current weather in a given location",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string",
                             "description": "The city and state, e.g. San Francisco, CA"},
                "unit": {"type": "string", "description": "The unit of temperature to return",
                         "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location"],
        },
    },
}


def _run(script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env,
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


NO_NETWORK = """
    import socket
    def refuse(*args, **kwargs):
        raise OSError("network access attempted in an offline test")
    class NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            refuse()
    socket.socket = NoSocket
    socket.create_connection = refuse
    socket.getaddrinfo = refuse
    import tiktoken.load
    tiktoken.load.read_file = refuse  # tiktoken's only way to fetch a file
"""


# -- offline loading ---------------------------------------------------------------------------


def test_loads_with_no_network_and_an_empty_tiktoken_cache(tmp_path: Path) -> None:
    """A fresh interpreter with sockets and tiktoken's fetcher disabled and an empty
    tiktoken cache counts with both encodings, and writes nothing to that cache."""
    script = NO_NETWORK + """
    from agent_guard import tokens
    assert tokens._encodings == {}, "importing loaded an encoding"
    c = tokens.TokenCounter()
    print(c.count_text("hello world"), c.count_text("お誕生日おめでとう"),
          c.count_text("お誕生日おめでとう", "gpt-4"))
    import tiktoken
    try:  # control: tiktoken's own loader is really cut off here
        tiktoken.get_encoding("r50k_base")
    except OSError as exc:
        print("blocked" if "offline test" in str(exc) else exc)
    """
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    out = _run(script, {"TIKTOKEN_CACHE_DIR": str(cache), "DATA_GYM_CACHE_DIR": str(cache)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2", "8", "9", "blocked"]
    assert list(cache.iterdir()) == []


def test_the_encoding_is_the_one_tiktoken_builds_itself(tmp_path: Path) -> None:
    """tiktoken's own get_encoding, fed the same files through its cache, agrees on the
    regex, the special tokens and the tokens of a tricky text."""
    urls = {"o200k_base": "https://openaipublic.blob.core.windows.net/encodings/"
                          "o200k_base.tiktoken",
            "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/"
                           "cl100k_base.tiktoken"}
    for name, url in urls.items():
        shutil.copy(DATA / f"{name}.tiktoken", tmp_path / hashlib.sha1(url.encode()).hexdigest())
    script = NO_NETWORK + """
    import tiktoken
    from agent_guard.tokens import get_encoding
    text = "Ünïcödé façade — naïve café 12345 <|endoftext|>\\r\\n\\tdef f(x):  return x**2 🙂"
    for name in ("o200k_base", "cl100k_base"):
        ours, theirs = get_encoding(name), tiktoken.get_encoding(name)
        assert ours is not theirs
        assert ours._pat_str == theirs._pat_str, name
        assert ours._special_tokens == theirs._special_tokens, name
        assert ours.n_vocab == theirs.n_vocab, name
        assert ours.encode_ordinary(text) == theirs.encode_ordinary(text), name
        assert ours.encode(text, allowed_special="all") == theirs.encode(
            text, allowed_special="all"), name
    print("same")
    """
    out = _run(script, {"TIKTOKEN_CACHE_DIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "same"


def test_a_tampered_encoding_file_is_refused(tmp_path: Path) -> None:
    data = bytearray((DATA / "cl100k_base.tiktoken").read_bytes())
    data[100] ^= 0x01
    (tmp_path / "cl100k_base.tiktoken").write_bytes(bytes(data))
    with pytest.raises(EncodingIntegrityError, match="Reinstall") as info:
        tokens._build("cl100k_base", tmp_path)
    assert str(tmp_path / "cl100k_base.tiktoken") in str(info.value)
    assert "damaged" in str(info.value)


def test_a_missing_encoding_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(EncodingIntegrityError, match="Reinstall") as info:
        tokens._build("o200k_base", tmp_path)
    assert "o200k_base.tiktoken" in str(info.value)


def test_unknown_encoding_names_are_refused() -> None:
    with pytest.raises(ValueError, match="no bundled encoding"):
        get_encoding("r50k_base")


def test_concurrent_first_load_builds_one_encoding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens, "_encodings", {})
    real_build = tokens._build
    builds: list[str] = []

    def counting_build(name: str, directory: Any = None) -> Any:
        builds.append(name)
        return real_build(name, directory)

    monkeypatch.setattr(tokens, "_build", counting_build)
    got: list[object] = []
    barrier = threading.Barrier(16)

    def load() -> None:
        barrier.wait()
        got.append(get_encoding("cl100k_base"))

    threads = [threading.Thread(target=load) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 16
    assert len({id(e) for e in got}) == 1
    assert builds == ["cl100k_base"]


# -- text --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "o200k", "cl100k"), [
    ("hello world", 2, 2),
    ("tiktoken is great!", 6, 6),  # cookbook
    ("antidisestablishmentarianism", 6, 6),  # cookbook
    ("2 + 2 = 4", 7, 7),  # cookbook
    ("お誕生日おめでとう", 8, 9),  # cookbook
    ("The quick brown fox jumps over the lazy dog.", 10, 10),
    ("", 0, 0),
])
def test_text_counts_match_reference_values(text: str, o200k: int, cl100k: int) -> None:
    counter = TokenCounter()
    assert counter.count_text(text) == o200k
    assert counter.count_text(text, "gpt-4o-mini") == o200k
    assert counter.count_text(text, "gpt-4") == cl100k
    assert counter.count_text(text, "gpt-3.5-turbo") == cl100k


def test_special_token_text_is_counted_as_plain_text() -> None:
    counter = TokenCounter()
    assert counter.count_text("<|endoftext|>") == 7
    assert counter.count_text("say <|endoftext|> please") == 9
    assert counter.count_text("say <|endoftext|> please", "gpt-4") == 8


@pytest.mark.parametrize(("model", "encoding", "exact"), [
    ("gpt-4o", "o200k_base", True),
    ("gpt-4o-mini-2024-07-18", "o200k_base", True),
    ("chatgpt-4o-latest", "o200k_base", True),
    ("gpt-4.1-nano", "o200k_base", True),
    ("gpt-5", "o200k_base", True),
    ("gpt-5-mini-2025-08-07", "o200k_base", True),
    ("o1", "o200k_base", True),
    ("o3-mini", "o200k_base", True),
    ("o4-mini-2025-04-16", "o200k_base", True),
    ("openai/gpt-4o", "o200k_base", True),
    ("azure/gpt-4.1", "o200k_base", True),
    ("ft:gpt-4o-mini-2024-07-18:acme::abc123", "o200k_base", True),
    ("gpt-4", "cl100k_base", True),
    ("gpt-4-turbo", "cl100k_base", True),
    ("gpt-4-0613", "cl100k_base", True),
    ("azure/gpt-35-turbo", "cl100k_base", True),
    ("gpt-3.5-turbo", "cl100k_base", True),
    ("ft:gpt-3.5-turbo-0125:acme::abc123", "cl100k_base", True),
    ("text-embedding-3-small", "cl100k_base", True),
    ("claude-sonnet-4-5", "o200k_base", False),
    ("anthropic/claude-3-5-haiku-latest", "o200k_base", False),
    ("gemini-2.5-pro", "o200k_base", False),
    ("mistral-large-latest", "o200k_base", False),
    ("meta-llama/Llama-3.1-70B-Instruct", "o200k_base", False),
    ("some-model-nobody-knows", "o200k_base", False),
])
def test_model_families(model: str, encoding: str, exact: bool) -> None:
    counter = TokenCounter()
    assert counter.encoding_name_for(model) == encoding
    assert counter.is_exact(model) is exact


def test_claude_uses_its_own_stated_factor_and_counts_other_scripts_more() -> None:
    """Claude: o200k plus a third of the non-ASCII bytes, times claude_factor (1.6): at
    or above what Claude's published tokenizer counts on prose, code, JSON and other
    languages (scripts/claude_token_factor.py, docs/anthropic.md)."""
    text = "The quick brown fox jumps over the lazy dog. " * 20
    exact = TokenCounter().count_text(text, "gpt-4o")
    assert TokenCounter().count_text(text, "claude-sonnet-4-5") == -(-exact * 8 // 5)
    assert TokenCounter(claude_factor=2).count_text(text, "claude-opus-4-5") == exact * 2
    russian = "Комиссия рассмотрела квартальные показатели. " * 20
    o200k = TokenCounter().count_text(russian, "gpt-4o")
    extra = len(russian.encode()) - len(russian)
    assert TokenCounter(claude_factor=1).count_text(russian, "claude-haiku-4-5") == (
        o200k + -(-extra // 3))
    # the cheap bound stays above the count
    counter = TokenCounter()
    messages = [HumanMessage(russian * 10)]
    bound, counted = counter.estimate_messages(messages, "claude-sonnet-4-5")
    assert not counted and bound >= counter.count_messages(messages, "claude-sonnet-4-5")
    with pytest.raises(ValueError, match="claude_factor"):
        TokenCounter(claude_factor=0.9)


def test_claude_prompts_are_counted_by_anthropic_when_asked() -> None:
    asked: list[Any] = []

    def count(messages: Any, tools: Any) -> int:
        asked.append((messages, tools))
        return 4321

    counter = TokenCounter(claude_prompt_counter=count)
    assert counter.count_messages([HumanMessage("hi")], "claude-sonnet-4-5") == 4321
    assert counter.estimate_messages([HumanMessage("hi")], "claude-sonnet-4-5") == (4321, True)
    assert counter.count_messages([HumanMessage("hi")], "gpt-4o") != 4321  # Claude only

    def broken(messages: Any, tools: Any) -> int:
        raise OSError("no network")

    fallback = TokenCounter(claude_prompt_counter=broken)
    assert fallback.count_messages([HumanMessage("hi")], "claude-sonnet-4-5") == (
        TokenCounter().count_messages([HumanMessage("hi")], "claude-sonnet-4-5"))


def test_other_providers_use_the_stated_fallback_factor() -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 20
    exact = TokenCounter().count_text(text, "gpt-4o")
    assert TokenCounter().count_text(text, "gemini-2.5-pro") == -(-exact * 6 // 5)
    counter = TokenCounter(fallback_factor=1.5)
    assert counter.count_text(text, "gemini-2.5-pro") == -(-exact * 3 // 2)
    # ceil(5 * 1.2) is 6; in floats 5 * 1.2 is 6.000000000000001
    assert TokenCounter().count_text("hello world how are you", "mistral-large") == 6
    assert TokenCounter(1.0).count_text(text, "mistral-large") == exact
    messages = [HumanMessage("hi there")]
    assert counter.count_messages(messages, "mistral-large-latest") == -(
        -counter.count_messages(messages, "gpt-4o") * 3 // 2)
    for bad in (0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="fallback_factor"):
            TokenCounter(fallback_factor=bad)


# -- messages ----------------------------------------------------------------------------------


def test_the_cookbook_conversation_matches_the_api_counts() -> None:
    counter = TokenCounter()
    assert counter.count_messages(COOKBOOK_MESSAGES, "gpt-4o") == 124
    assert counter.count_messages(COOKBOOK_MESSAGES, "gpt-4o-mini") == 124
    assert counter.count_messages(COOKBOOK_MESSAGES, "gpt-4") == 129
    assert counter.count_messages(COOKBOOK_MESSAGES, "gpt-3.5-turbo") == 129
    as_langchain = [
        SystemMessage(m["content"], name=m.get("name")) for m in COOKBOOK_MESSAGES[:-1]
    ] + [HumanMessage(COOKBOOK_MESSAGES[-1]["content"])]
    assert counter.count_messages(as_langchain, "gpt-4o") == 124


def test_two_messages_follow_the_cookbook_formula() -> None:
    counter = TokenCounter()
    system, user = "You are a helpful assistant.", "What is the capital of France?"
    text = counter.count_text
    expected = (REPLY_PRIMING_TOKENS
                + TOKENS_PER_MESSAGE + text("system") + text(system)
                + TOKENS_PER_MESSAGE + text("user") + text(user))
    assert expected == 3 + 3 + 1 + 6 + 3 + 1 + 7  # the per-string counts, by hand
    as_messages = counter.count_messages([SystemMessage(system), HumanMessage(user)])
    as_dicts = counter.count_messages([{"role": "system", "content": system},
                                       {"role": "user", "content": user}])
    assert as_messages == as_dicts == expected == 24
    named = counter.count_messages([{"role": "user", "name": "bob", "content": user}])
    assert named == REPLY_PRIMING_TOKENS + TOKENS_PER_MESSAGE + text("user") + text(user) + (
        TOKENS_PER_NAME + text("bob"))


def test_dicts_and_langchain_messages_count_the_same() -> None:
    counter = TokenCounter()
    args = {"city": "Paris", "unit": "celsius"}
    as_langchain = [
        SystemMessage("You are terse."),
        HumanMessage("Weather in Paris?", name="alice"),
        AIMessage("", tool_calls=[{"name": "weather", "args": args, "id": "call_1"}]),
        ToolMessage("18C and sunny", tool_call_id="call_1"),
        AIMessage("It is 18C and sunny."),
        ChatMessage(role="user", content=[{"type": "text", "text": "Thanks!"}]),
    ]
    as_dicts = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "name": "alice", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "weather",
                          "arguments": json.dumps(args, separators=(",", ":"))}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C and sunny"},
        {"role": "assistant", "content": "It is 18C and sunny."},
        {"role": "user", "content": [{"type": "text", "text": "Thanks!"}]},
    ]
    for model in ("gpt-4o", "gpt-4", "claude-sonnet-4-5"):
        assert counter.count_messages(as_langchain, model) == counter.count_messages(
            as_dicts, model)
    # LangChain's other message-like inputs
    assert counter.count_messages(["hi"]) == counter.count_messages([("user", "hi")]) == (
        counter.count_messages([HumanMessage("hi")]))


def test_tool_calls_tool_results_and_tools_add_tokens() -> None:
    counter = TokenCounter()
    base = [HumanMessage("look up order 42")]
    plain = counter.count_messages(base)
    with_tools = counter.count_messages(base, tools=[WEATHER_TOOL])
    # OpenAI models: the schemas as OpenAI renders them, plus the block's framing
    namespace = tokens._functions_namespace([WEATHER_TOOL])
    assert namespace.startswith("namespace functions {") and "unit?: " in namespace
    assert with_tools == plain + counter.count_text(namespace) + tokens.FUNCTIONS_BLOCK_TOKENS
    two_tools = counter.count_messages(base, tools=[WEATHER_TOOL, {**WEATHER_TOOL}])
    assert two_tools == plain + counter.count_text(tokens._functions_namespace(
        [WEATHER_TOOL, WEATHER_TOOL])) + tokens.FUNCTIONS_BLOCK_TOKENS
    # other providers: the compact JSON of each schema, framed, times the factor
    schema = json.dumps(WEATHER_TOOL["function"], separators=(",", ":"))
    claude = counter.count_messages(base, "claude-sonnet-4-5", tools=[WEATHER_TOOL])
    claude_plain = counter.count_messages(base, "claude-sonnet-4-5")
    # ... and Anthropic's hidden tool-use system prompt (346 tokens on Claude 4.x)
    assert claude >= claude_plain + tokens.TOOLS_BLOCK_TOKENS + tokens.TOKENS_PER_TOOL_SCHEMA + (
        counter.count_text(schema)) + 346
    for model, hidden in (("claude-3-opus-20240229", 530), ("anthropic/claude-3-5-haiku", 340),
                          ("bedrock/anthropic.claude-sonnet-4-5-v1:0", 346),
                          ("claude-next", 530), ("gemini-2.5-pro", 0)):
        assert tokens.anthropic_tool_system_tokens(model) == hidden, model

    call = AIMessage("", tool_calls=[{"name": "lookup", "args": {"id": "42"}, "id": "c1"}])
    no_call = counter.count_messages([*base, AIMessage("")])
    assert counter.count_messages([*base, call]) == no_call + tokens.TOKENS_PER_TOOL_CALL + (
        counter.count_text("lookup") + counter.count_text('{"id":"42"}'))
    result = counter.count_messages([*base, call, ToolMessage("shipped", tool_call_id="c1")])
    assert result > counter.count_messages([*base, call]) + TOKENS_PER_MESSAGE


def test_the_tool_estimate_is_the_api_count() -> None:
    """The cookbook's tools example cost 101 prompt tokens on gpt-4o and 105 on gpt-4
    (API); the estimate reproduces both."""
    counter = TokenCounter()
    messages = [{"role": "system", "content": "You are a helpful assistant that can answer "
                                              "to questions about the weather."},
                {"role": "user", "content": "What's the weather like in San Francisco?"}]
    # the API's prompt_tokens as the cookbook prints them, per model
    for model, api in (("gpt-4o", 101), ("gpt-4o-mini", 101), ("gpt-4", 105),
                       ("gpt-3.5-turbo", 105)):
        assert counter.count_messages(messages, model, tools=[WEATHER_TOOL]) == api, model
        estimate, exact = counter.estimate_messages(messages, model, tools=[WEATHER_TOOL])
        assert (estimate, exact) == (api, True)


def test_tool_schema_counts_are_memoised_by_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    counter = TokenCounter()
    tool = json.loads(json.dumps(WEATHER_TOOL))  # a fresh object
    first = counter.count_messages([], "claude-sonnet-4-5", tools=[tool])
    assert first == -(-(REPLY_PRIMING_TOKENS + tokens.TOOLS_BLOCK_TOKENS + 346 + 85) * 16 // 10)
    assert tokens._tool_memo[(id(tool), "claude")] == (tool, 85)  # 7 + 78 (JSON)
    on_4o = counter.count_messages([], "gpt-4o", tools=[tool])
    assert tokens._render_memo[id(tool)][0] is tool

    def no_serialising(value: Any) -> str:
        raise AssertionError("a memoised schema was serialised again")

    monkeypatch.setattr(tokens, "_json", no_serialising)
    monkeypatch.setattr(tokens, "_render_function", no_serialising)
    assert counter.count_messages([], "claude-sonnet-4-5", tools=[tool]) == first
    assert counter.count_messages([], "gpt-4o", tools=[tool]) == on_4o
    monkeypatch.undo()
    fresh = json.loads(json.dumps(WEATHER_TOOL))
    assert counter.count_messages([], "claude-sonnet-4-5", tools=[fresh]) == first
    assert counter.count_messages([], "gpt-4o", tools=[fresh]) == on_4o


def test_langchain_tools_are_counted_as_their_openai_schema() -> None:
    from langchain_core.tools import tool
    from langchain_core.utils.function_calling import convert_to_openai_tool

    @tool
    def get_current_weather(location: str, unit: str = "celsius") -> str:
        """Get the current weather in a given location."""
        return "sunny"

    counter = TokenCounter()
    assert counter.count_messages([], tools=[get_current_weather]) == counter.count_messages(
        [], tools=[convert_to_openai_tool(get_current_weather)])


def test_content_blocks_images_and_unknown_blocks() -> None:
    counter = TokenCounter()
    question = {"type": "text", "text": "what is this?"}
    text_only = counter.count_messages([HumanMessage(content=[question])])
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    low = {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}}
    v1_image = {"type": "image", "url": "https://x/y.png"}
    largest = 85 + 8 * 170  # gpt-4o, size unknown: the largest image high detail allows
    assert counter.count_messages([HumanMessage(content=[question, image])]) == (
        text_only + largest)
    assert counter.count_messages([HumanMessage(content=[question, low])]) == (
        text_only + IMAGE_TOKENS_LOW_DETAIL)
    assert counter.count_messages([HumanMessage(content=[question, v1_image])]) == (
        text_only + largest)
    odd = {"type": "reasoning", "reasoning": "think step by step"}
    assert counter.count_messages([HumanMessage(content=[question, odd])]) == (
        text_only + counter.count_text(json.dumps(odd, separators=(",", ":"))))
    assert counter.count_messages([HumanMessage(content=["plain", question])]) == (
        text_only + counter.count_text("plain"))


def test_count_output_counts_text_and_tool_calls() -> None:
    counter = TokenCounter()
    assert counter.count_output("hello world") == 2
    assert counter.count_output("hello world", "claude-3-haiku") == 4  # ceil(2 x 1.6)
    call = {"name": "lookup", "args": {"id": "42"}, "id": "c1"}
    message = AIMessage("Let me check.", tool_calls=[call])
    expected = (counter.count_text("Let me check.") + tokens.TOKENS_PER_TOOL_CALL
                + counter.count_text("lookup") + counter.count_text('{"id":"42"}'))
    assert counter.count_output(message) == expected
    as_dict = {"role": "assistant", "content": "Let me check.", "tool_calls": [
        {"id": "c1", "type": "function",
         "function": {"name": "lookup", "arguments": '{"id":"42"}'}}]}
    assert counter.count_output(as_dict) == expected
    assert counter.count_output(AIMessage("")) == 0


def test_counting_is_thread_safe_and_stable() -> None:
    counter = TokenCounter()
    conversation = [HumanMessage(f"message number {i} " * (i + 1)) for i in range(50)]
    expected = counter.count_messages(conversation, tools=[WEATHER_TOOL])
    results: list[int] = []

    def work() -> None:
        for _ in range(20):
            results.append(counter.count_messages(conversation, tools=[WEATHER_TOOL]))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected] * 160
