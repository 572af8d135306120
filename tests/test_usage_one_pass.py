"""The one-pass read of ``usage_metadata`` gives what the general reader gives, for
every shape (and refuses what it refuses)."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from agent_guard.engine.usage import MalformedUsage, Usage

counts = st.one_of(st.integers(0, 10**6), st.integers(-5, -1), st.none(), st.just(True),
                   st.just(3.0), st.just("7"))
in_keys = st.sampled_from(["audio", "cache_read", "cache_creation", "image",
                           "ephemeral_1h_input_tokens", "ephemeral_5m_input_tokens",
                           "priority_cache_read", "flex", "other"])
out_keys = st.sampled_from(["audio", "reasoning", "image", "priority_reasoning", "other"])
details = lambda keys: st.one_of(st.none(), st.just({}), st.just(0),  # noqa: E731
                                 st.dictionaries(keys, counts, max_size=4))


@st.composite
def usage_metadata(draw: Any) -> dict[str, Any]:
    um: dict[str, Any] = {}
    for key in ("input_tokens", "output_tokens", "total_tokens"):
        if draw(st.booleans()) or key != "total_tokens":
            um[key] = draw(st.one_of(st.integers(0, 10**7), counts))
    if draw(st.booleans()):
        um["input_token_details"] = draw(details(in_keys))
    if draw(st.booleans()):
        um["output_token_details"] = draw(details(out_keys))
    return um


def read(reader: Any, um: dict[str, Any]) -> Any:
    try:
        return reader(um)
    except MalformedUsage:
        return MalformedUsage


@settings(max_examples=600, deadline=None)
@given(usage_metadata())
def test_one_pass_reads_as_the_general_reader(um: dict[str, Any]) -> None:
    assert read(Usage.from_usage_metadata, um) == read(Usage._from_usage_metadata, um)


def test_openai_shape_reads_its_details() -> None:
    um = {"input_tokens": 100, "output_tokens": 30, "total_tokens": 130,
          "input_token_details": {"audio": 0, "cache_read": 60},
          "output_token_details": {"audio": 0, "reasoning": 10}}
    assert Usage.from_usage_metadata(um) == Usage(100, 30, cache_read_tokens=60,
                                                  reasoning_tokens=10)
