"""A scripted chat model with realistic usage, for demos and tests without a provider.

Unlike LangChain's fake models it reports a model name and provider the way
real integrations do (``ls_model_name``, ``ls_provider``, ``ls_max_tokens``,
``response_metadata["model_name"]``), reports ``usage_metadata`` counted from
the actual prompt and answer, keeps usage and tool calls when streaming (usage
on the last chunk, like ``ChatOpenAI(stream_usage=True)``), supports
``bind_tools`` (so ``create_agent`` works), and honours ``max_tokens`` by
cutting the answer short with ``finish_reason="length"``.

Token counts come from :class:`agent_guard.tokens.TokenCounter` (tiktoken)
when it is importable, and otherwise from a heuristic of 4 characters per
token (see :mod:`agent_guard.testing.openai_server`).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ToolCall
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import ToolCallChunk
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict, Field, PrivateAttr, model_validator

from .openai_server import count_output, count_prompt, truncate_to_tokens

__all__ = ["ScriptedChatModel"]

Reply = str | AIMessage


class ScriptedChatModel(BaseChatModel):
    """A chat model that answers from a script, with realistic ``usage_metadata``.

    Replies come from ``respond(messages)`` if given, else from ``responses`` in
    order, **cycling** when the list is exhausted (an empty script answers
    ``"ok"``). A reply is a ``str`` or an ``AIMessage`` (with ``tool_calls`` to
    make an agent call tools; a tool call without an id gets one). The answer's
    ``id`` is always left ``None`` so LangChain assigns ``lc_run--...`` ids and a
    cycled reply never overwrites an earlier one in a graph's state.

    ``usage_metadata``: a scripted ``AIMessage`` that carries one is reported as
    given. Otherwise input tokens are the prompt's (messages plus bound tools)
    and output tokens the answer's (text plus tool calls), of which
    ``cached_fraction`` of the input is reported as ``cache_read``.

    ``max_tokens`` (field, or per call / ``bind``) caps the answer as a provider
    does: the text is cut to the cap, tool calls that do not fit are dropped,
    output tokens equal the cap and ``finish_reason`` is ``"length"``. ``stop``
    sequences cut the text too.

    ``calls`` counts the generations actually made (thread-safe), so a test can
    assert that a refused call never reached the model.

    Example:
        >>> model = ScriptedChatModel(model_name="gpt-4o", responses=["Hello!"])
        >>> model.invoke("hi").usage_metadata["output_tokens"]
        2
    """

    model_config = ConfigDict(populate_by_name=True)

    model_name: str = Field(default="gpt-4o-mini", alias="model")
    """Reported as ``ls_model_name`` and ``response_metadata["model_name"]``."""
    provider: str = "openai"
    """Reported as ``ls_provider`` and ``response_metadata["model_provider"]``."""
    max_tokens: int | None = None
    """Output cap, reported as ``ls_max_tokens`` and ``invocation_params["max_tokens"]``."""
    # str first: pydantic would otherwise feed a str to AIMessage's validator, which crashes
    responses: list[str | AIMessage] = Field(default_factory=list)
    """Replies in order, cycled."""
    respond: Callable[[list[BaseMessage]], str | AIMessage] | None = None
    """Dynamic replies: a function of the input messages (takes precedence)."""
    cached_fraction: float = Field(default=0.0, ge=0.0, le=1.0)
    """Share of the input tokens reported as ``input_token_details["cache_read"]``."""
    stream_usage: bool = True
    """Put ``usage_metadata`` on the last streamed chunk (per call: ``stream_usage=``)."""
    latency_s: float = Field(default=0.0, ge=0.0)
    """Seconds each generation waits before answering."""
    chunk_chars: int = Field(default=8, ge=1)
    """Characters per streamed text chunk."""

    _calls: int = PrivateAttr(default=0)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @model_validator(mode="after")
    def _one_script(self) -> ScriptedChatModel:
        if self.respond is not None and self.responses:
            raise ValueError("give either responses or respond, not both")
        return self

    # -- what LangChain and callbacks see ---------------------------------------------

    @property
    def _llm_type(self) -> str:
        return "scripted-chat-model"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "provider": self.provider,
                "max_tokens": self.max_tokens}

    @property
    def calls(self) -> int:
        """How many generations were made (each ``invoke``/``stream`` that reached the model)."""
        with self._lock:
            return self._calls

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(ls_provider=self.provider, ls_model_type="chat",
                                 ls_model_name=self._model(kwargs))
        max_tokens = self._cap(kwargs)
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        if stop:
            params["ls_stop"] = stop
        return params

    def _get_invocation_params(self, stop: list[str] | None = None, **kwargs: Any
                               ) -> dict[str, Any]:
        params = super()._get_invocation_params(stop=stop, **kwargs)
        params["model"] = self._model(kwargs)
        cap = self._cap(kwargs)
        if cap is not None:
            params["max_tokens"] = cap
        return params

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: dict[str, Any] | str | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools in OpenAI format, as ``ChatOpenAI`` does (``invocation_params["tools"]``).

        ``tool_choice`` and other keyword arguments (``strict``, ``parallel_tool_calls``)
        are bound as given; the script decides which tools are called.
        """
        formatted = [convert_to_openai_tool(t) for t in tools]
        if tool_choice is not None:
            kwargs["tool_choice"] = tool_choice
        return self.bind(tools=formatted, **kwargs)

    # -- the script -------------------------------------------------------------------

    def _model(self, kwargs: dict[str, Any]) -> str:
        model = kwargs.get("model")
        return model if isinstance(model, str) and model else self.model_name

    def _cap(self, kwargs: dict[str, Any]) -> int | None:
        cap = kwargs.get("max_tokens")
        return cap if isinstance(cap, int) else self.max_tokens

    def _next_reply(self, messages: list[BaseMessage]) -> AIMessage:
        with self._lock:
            index = self._calls
            self._calls += 1
        if self.respond is not None:
            reply: Reply = self.respond(messages)
        elif self.responses:
            reply = self.responses[index % len(self.responses)]
        else:
            reply = "ok"
        if isinstance(reply, str):
            return AIMessage(content=reply)
        if not isinstance(reply, AIMessage):
            raise TypeError(f"a scripted reply must be an AIMessage or a str, "
                            f"got {type(reply).__name__}")
        return reply

    def _answer(self, messages: list[BaseMessage], stop: list[str] | None,
                kwargs: dict[str, Any]) -> AIMessage:
        """The next scripted reply, cut by ``stop`` and ``max_tokens``, with usage."""
        reply = self._next_reply(messages)
        model, cap = self._model(kwargs), self._cap(kwargs)
        content = reply.content
        tool_calls = [ToolCall(name=tc["name"], args=tc["args"], type="tool_call",
                               id=tc.get("id") or f"call_{uuid.uuid4().hex[:24]}")
                      for tc in reply.tool_calls]
        finish = "tool_calls" if tool_calls else "stop"
        if stop and isinstance(content, str):
            cut = min((i for i in (content.find(s) for s in stop if s) if i >= 0),
                      default=-1)
            if cut >= 0:
                content, tool_calls, finish = content[:cut], [], "stop"
        output = count_output(content, tool_calls, model)
        truncated = False
        if cap is not None and output > cap:
            if isinstance(content, str):
                content = truncate_to_tokens(content, cap, model)
            tool_calls, output, finish, truncated = [], cap, "length", True
        if reply.usage_metadata is not None:
            usage = UsageMetadata(**reply.usage_metadata)
        else:
            prompt = count_prompt(messages, model, tools=kwargs.get("tools"))
            usage = UsageMetadata(input_tokens=prompt, output_tokens=output,
                                  total_tokens=prompt + output)
            cached = int(prompt * self.cached_fraction)
            if cached:
                usage["input_token_details"] = {"cache_read": cached}
        metadata = {"model_name": model, "finish_reason": finish,
                    "model_provider": self.provider, **reply.response_metadata}
        if truncated:
            metadata["finish_reason"] = "length"
        return AIMessage(
            content=content,
            tool_calls=tool_calls,
            invalid_tool_calls=list(reply.invalid_tool_calls),
            additional_kwargs=dict(reply.additional_kwargs),
            usage_metadata=usage,
            response_metadata=metadata,
            name=reply.name,
        )

    def _chunks(self, message: AIMessage, kwargs: dict[str, Any]) -> Iterator[AIMessageChunk]:
        """Text in ``chunk_chars`` pieces, then a last chunk with tool calls,
        metadata and (if ``stream_usage``) usage."""
        content = message.content
        if isinstance(content, str):
            step = self.chunk_chars
            for i in range(0, len(content), step):
                yield AIMessageChunk(content=content[i:i + step])
        else:
            yield AIMessageChunk(content=content)
        stream_usage = kwargs.get("stream_usage")
        if not isinstance(stream_usage, bool):
            stream_usage = self.stream_usage
        yield AIMessageChunk(
            content="" if isinstance(content, str) else [],
            tool_call_chunks=[
                ToolCallChunk(name=tc["name"], args=_json(tc["args"]), id=tc["id"], index=i,
                              type="tool_call_chunk")
                for i, tc in enumerate(message.tool_calls)
            ],
            additional_kwargs=message.additional_kwargs,
            usage_metadata=message.usage_metadata if stream_usage else None,
            response_metadata=message.response_metadata,
            name=message.name,
            chunk_position="last",
        )

    # -- generation -------------------------------------------------------------------

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.latency_s:
            time.sleep(self.latency_s)
        return ChatResult(generations=[ChatGeneration(message=self._answer(messages, stop,
                                                                            kwargs))])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        return ChatResult(generations=[ChatGeneration(message=self._answer(messages, stop,
                                                                            kwargs))])

    # LangChain calls on_llm_new_token for each chunk itself; _stream must not.
    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        if self.latency_s:
            time.sleep(self.latency_s)
        message = self._answer(messages, stop, kwargs)
        for chunk in self._chunks(message, kwargs):
            yield ChatGenerationChunk(message=chunk)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        message = self._answer(messages, stop, kwargs)
        for chunk in self._chunks(message, kwargs):
            yield ChatGenerationChunk(message=chunk)


def _json(value: Any) -> str:
    import json

    return value if isinstance(value, str) else json.dumps(value)
