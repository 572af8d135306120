"""Message content for spans, recorded only when the user opts in.

The GenAI semantic conventions put a model call's messages in
``gen_ai.input.messages`` / ``gen_ai.output.messages`` (and system prompts in
``gen_ai.system_instructions``) as lists of ``{"role", "parts"}`` objects, each
part a ``text``, ``tool_call`` or ``tool_call_response``; on spans they may be
JSON strings, which is what OTLP attributes can carry. Content is off by
default: prompts hold personal data and secrets. It is turned on by
``GuardTelemetry(capture_content=True)`` or by the conventions' environment
variable ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT`` (``true``,
``SPAN_ONLY`` or ``SPAN_AND_EVENT``). Long values are cut by the SDK's
``OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT`` like any attribute.

Messages are read by duck typing (``type``, ``content``, ``tool_calls``,
``tool_call_id``, as LangChain's messages have them), so this module does not
import LangChain.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["CAPTURE_CONTENT_ENV", "capture_content_from_env", "input_messages",
           "output_messages", "to_json"]

CAPTURE_CONTENT_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
_ON = {"true", "1", "yes", "on", "span_only", "span_and_event"}
_OFF = {"", "false", "0", "no", "off", "no_content", "event_only"}
# LangChain message types (and the ``role`` of a ChatMessage) -> the conventions' roles;
# chunks (``AIMessageChunk``...) are looked up without their suffix
_ROLES = {"human": "user", "user": "user", "ai": "assistant", "assistant": "assistant",
          "system": "system", "developer": "system", "tool": "tool", "function": "tool",
          "HumanMessage": "user", "AIMessage": "assistant", "SystemMessage": "system",
          "ToolMessage": "tool", "FunctionMessage": "tool"}


def capture_content_from_env() -> bool:
    """Whether ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT`` asks for content on
    spans. ``EVENT_ONLY`` does not: agent-guard records content on spans only."""
    value = os.environ.get(CAPTURE_CONTENT_ENV, "").strip().lower()
    if value in _ON:
        return True
    if value not in _OFF:
        raise ValueError(
            f"{CAPTURE_CONTENT_ENV}={os.environ[CAPTURE_CONTENT_ENV]!r} is not understood; "
            "use true/false, or NO_CONTENT, SPAN_ONLY, EVENT_ONLY or SPAN_AND_EVENT")
    return False


def _text_parts(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "content": content}] if content else []
    parts: list[dict[str, Any]] = []
    for block in content if isinstance(content, list) else [content]:
        if isinstance(block, str):
            parts.append({"type": "text", "content": block})
        elif isinstance(block, Mapping):
            kind = str(block.get("type") or "text")
            if kind == "text":
                parts.append({"type": "text", "content": str(block.get("text", ""))})
            elif kind in ("reasoning", "thinking"):
                text = block.get("reasoning") or block.get("thinking") or ""
                parts.append({"type": "reasoning", "content": str(text)})
            else:  # images, audio, files: say what they were, not their bytes
                parts.append({"type": kind})
        elif block is not None:
            parts.append({"type": "text", "content": str(block)})
    return parts


def _tool_call_parts(message: Any) -> list[dict[str, Any]]:
    parts = []
    for call in getattr(message, "tool_calls", None) or ():
        part: dict[str, Any] = {"type": "tool_call", "name": call.get("name"),
                                "arguments": call.get("args")}
        if call.get("id"):
            part["id"] = call["id"]
        parts.append(part)
    return parts


def _role(message: Any) -> str:
    kind = str(getattr(message, "type", "") or "").removesuffix("Chunk")
    if kind in ("chat", "ChatMessage"):  # a ChatMessage names its role
        kind = str(getattr(message, "role", "") or "user")
    return _ROLES.get(kind, kind or "user")


def _message(message: Any) -> dict[str, Any]:
    role = _role(message)
    content = getattr(message, "content", message)
    if role == "tool":
        response = content if isinstance(content, str) else _text_parts(content)
        part: dict[str, Any] = {"type": "tool_call_response", "response": response}
        call_id = getattr(message, "tool_call_id", None)
        if call_id:
            part["id"] = call_id
        return {"role": role, "parts": [part]}
    out: dict[str, Any] = {"role": role,
                           "parts": _text_parts(content) + _tool_call_parts(message)}
    name = getattr(message, "name", None)
    if name:
        out["name"] = name
    return out


def input_messages(messages: Iterable[Any]) -> tuple[list[dict[str, Any]],
                                                     list[dict[str, Any]]]:
    """(system instructions as parts, the other messages) of a model call's input."""
    system: list[dict[str, Any]] = []
    rest: list[dict[str, Any]] = []
    for message in messages:
        converted = _message(message)
        if converted["role"] == "system":
            system.extend(converted["parts"])
        else:
            rest.append(converted)
    return system, rest


def output_messages(messages: Iterable[Any], finish_reasons: list[str] | None = None
                    ) -> list[dict[str, Any]]:
    """One output message per choice the model returned."""
    out = []
    reasons = finish_reasons or []
    for i, message in enumerate(messages):
        converted = _message(message)
        converted["role"] = "assistant"
        converted["finish_reason"] = reasons[i] if i < len(reasons) else (
            reasons[0] if reasons else "stop")
        out.append(converted)
    return out


def to_json(value: Any) -> str:
    """Compact JSON; what JSON cannot hold (values, keys, cycles) is written as its
    ``str``. Never raises for a value whose ``str`` works."""
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
    except (TypeError, ValueError):  # non-string keys, a cycle
        return json.dumps(_plain(value, 0), ensure_ascii=False, separators=(",", ":"),
                          default=str)


def _plain(value: Any, depth: int) -> Any:
    """``value`` with string keys only, nested at most 32 deep (deeper, or a cycle: str)."""
    if depth > 32:
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, depth + 1) for v in value]
    return value
