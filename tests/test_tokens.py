"""Token counts: bundled encodings, offline, verified; chat-format overhead; fallbacks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import threading

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage

from agent_guard import tokens
from agent_guard.tokens import (
    REPLY_PRIMING_TOKENS,
    TOKENS_PER_MESSAGE,
    EncodingIntegrityError,
    TokenCounter,
    get_encoding,
)


def test_counts_match_tiktoken_reference_values() -> None:
    counter = TokenCounter()
    # reference counts of the public encodings
    assert counter.count_text("hello world") == 2
    assert counter.count_text("hello world", "gpt-4") == 2
    assert counter.count_text("Ünïcödé façade — naïve café", "gpt-4o") == len(
        get_encoding("o200k_base").encode_ordinary("Ünïcödé façade — naïve café"))
    assert counter.encoding_name_for("gpt-4") == "cl100k_base"
    assert counter.encoding_name_for("gpt-3.5-turbo") == "cl100k_base"
    assert counter.encoding_name_for("gpt-4o-mini-2025-01-01") == "o200k_base"
    assert counter.encoding_name_for("openai/o3") == "o200k_base"
    assert counter.count_text("") == 0


def test_special_token_text_is_plain_text() -> None:
    assert TokenCounter().count_text("say <|endoftext|> please") > 3


def test_chat_format_overhead_follows_the_cookbook_rule() -> None:
    counter = TokenCounter()
    system, user = "You are a helpful assistant.", "What is the capital of France?"
    expected = (REPLY_PRIMING_TOKENS + 2 * TOKENS_PER_MESSAGE
                + counter.count_text("system") + counter.count_text(system)
                + counter.count_text("user") + counter.count_text(user))
    as_messages = counter.count_messages([SystemMessage(system), HumanMessage(user)])
    as_dicts = counter.count_messages([{"role": "system", "content": system},
                                       {"role": "user", "content": user}])
    assert as_messages == as_dicts == expected


def test_tools_tool_calls_and_images_add_tokens() -> None:
    counter = TokenCounter()
    base = [HumanMessage("look up order 42")]
    tool = {"type": "function", "function": {"name": "lookup", "description": "Find an order",
                                             "parameters": {"type": "object", "properties": {
                                                 "id": {"type": "string"}}}}}
    assert counter.count_messages(base, tools=[tool]) > counter.count_messages(base) + 10
    call = AIMessage("", tool_calls=[{"name": "lookup", "args": {"id": "42"}, "id": "c1"}])
    with_call = [*base, call, ToolMessage("shipped", tool_call_id="c1")]
    assert counter.count_messages(with_call) > counter.count_messages([*base, AIMessage("")])
    image = HumanMessage(content=[{"type": "text", "text": "what is this?"},
                                  {"type": "image_url", "image_url": {"url": "data:..."}}])
    assert counter.count_messages([image]) >= tokens.IMAGE_TOKENS
    assert counter.count_output(call) > 0


def test_other_providers_use_the_stated_fallback_factor() -> None:
    counter = TokenCounter(fallback_factor=1.5)
    text = "The quick brown fox jumps over the lazy dog. " * 20
    exact = counter.count_text(text, "gpt-4o")
    assert not counter.is_exact("claude-sonnet-4-5") and counter.is_exact("gpt-4o")
    assert counter.count_text(text, "claude-sonnet-4-5") == -(-exact * 3 // 2)
    with pytest.raises(ValueError):
        TokenCounter(fallback_factor=0.5)


def test_concurrent_first_load_builds_one_encoding(monkeypatch) -> None:
    monkeypatch.setattr(tokens, "_encodings", {})
    got = []
    barrier = threading.Barrier(16)

    def load() -> None:
        barrier.wait()
        got.append(get_encoding("cl100k_base"))

    threads = [threading.Thread(target=load) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(e) for e in got}) == 1


def test_a_tampered_encoding_file_is_refused(tmp_path) -> None:
    source = os.path.join(os.path.dirname(tokens.__file__), "tokens_data")
    shutil.copy(os.path.join(source, "cl100k_base.tiktoken"), tmp_path / "cl100k_base.tiktoken")
    data = bytearray((tmp_path / "cl100k_base.tiktoken").read_bytes())
    data[100] ^= 0x01
    (tmp_path / "cl100k_base.tiktoken").write_bytes(bytes(data))
    with pytest.raises(EncodingIntegrityError, match="Reinstall"):
        tokens._build("cl100k_base", tmp_path)


def test_loads_with_no_network_and_an_empty_tiktoken_cache(tmp_path) -> None:
    """A fresh interpreter with sockets disabled and an empty cache still counts."""
    script = textwrap.dedent("""
        import socket
        def refuse(*a, **k):
            raise OSError("network disabled in this test")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        from agent_guard.tokens import TokenCounter
        c = TokenCounter()
        print(c.count_text("hello world"), c.count_text("hello world", "gpt-4"))
    """)
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path), "DATA_GYM_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2", "2"]
    assert list(tmp_path.iterdir()) == []  # tiktoken's download cache was never used
