"""A scripted chat model with realistic usage, for demos and tests without a provider.

Unlike LangChain's fakes it reports a model name and provider the way real
integrations do, counts usage with the same tokenizer the guard uses, keeps
usage and tool calls when streaming (usage on the last chunk), supports
``bind_tools``, and honours ``max_tokens`` by cutting the answer short.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import Field, PrivateAttr

from ..tokens import TokenCounter

__all__ = ["ScriptedChatModel"]

Reply = str | AIMessage
_counter = TokenCounter()


class ScriptedChatModel(BaseChatModel):
    """Answers from a script: ``responses`` in order (cycling), or ``respond(messages)``.

    ``calls`` counts the generations actually made, so a test can assert that a
    refused call never reached the model.
    """

    model_name: str = "gpt-4o-mini"
    provider: str = "openai"
    max_tokens: int | None = None
    responses: list[str | AIMessage] = Field(default_factory=list)
    respond: Callable[[list[BaseMessage]], Reply] | None = None
    cached_fraction: float = 0.0
    stream_usage: bool = True
    latency_s: float = 0.0
    chunk_chars: int = 8

    _calls: int = PrivateAttr(default=0)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @property
    def _llm_type(self) -> str:
        return "scripted-chat-model"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "max_tokens": self.max_tokens}

    @property
    def calls(self) -> int:
        return self._calls

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(ls_provider=self.provider, ls_model_type="chat",
                                 ls_model_name=self.model_name)
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens:
            params["ls_max_tokens"] = max_tokens
        return params

    def _get_invocation_params(self, stop: list[str] | None = None, **kwargs: Any
                               ) -> dict[str, Any]:
        params = super()._get_invocation_params(stop=stop, **kwargs)
        params["model"] = self.model_name
        if self.max_tokens is not None:
            params.setdefault("max_tokens", self.max_tokens)
        return params

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        formatted = [convert_to_openai_tool(t) for t in tools]
        if tool_choice is not None:
            kwargs["tool_choice"] = tool_choice
        return self.bind(tools=formatted, **kwargs)

    # -- the script ---------------------------------------------------------------------

    def _next(self, messages: list[BaseMessage]) -> AIMessage:
        with self._lock:
            index = self._calls
            self._calls += 1
        if self.respond is not None:
            reply = self.respond(messages)
        elif self.responses:
            reply = self.responses[index % len(self.responses)]
        else:
            reply = "ok"
        if isinstance(reply, str):
            reply = AIMessage(content=reply)
        return reply

    def _answer(self, messages: list[BaseMessage], tools: Any, max_tokens: int | None
                ) -> AIMessage:
        reply = self._next(messages)
        content = reply.content if isinstance(reply.content, str) else str(reply.content)
        finish = "tool_calls" if reply.tool_calls else "stop"
        cap = max_tokens or self.max_tokens
        if cap is not None and _counter.count_text(content, self.model_name) > cap:
            enc = _encoding(self.model_name)
            content = enc.decode(enc.encode_ordinary(content)[:cap])
            finish = "length"
        usage = reply.usage_metadata or self._usage(messages, tools, content, reply)
        return AIMessage(
            content=content,
            tool_calls=list(reply.tool_calls),
            usage_metadata=usage,
            response_metadata={"model_name": self.model_name, "finish_reason": finish,
                               "model_provider": self.provider,
                               **(reply.response_metadata or {})},
        )

    def _usage(self, messages: list[BaseMessage], tools: Any, content: str,
               reply: AIMessage) -> UsageMetadata:
        prompt = _counter.count_messages(messages, self.model_name, tools=tools)
        output = _counter.count_output(AIMessage(content=content, tool_calls=reply.tool_calls),
                                       self.model_name)
        cached = int(prompt * self.cached_fraction)
        usage = UsageMetadata(input_tokens=prompt, output_tokens=output,
                              total_tokens=prompt + output)
        if cached:
            usage["input_token_details"] = {"cache_read": cached}
        return usage

    # -- generation -----------------------------------------------------------------------

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.latency_s:
            time.sleep(self.latency_s)
        message = self._answer(messages, kwargs.get("tools"), kwargs.get("max_tokens"))
        return ChatResult(generations=[ChatGeneration(message=message)])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        message = self._answer(messages, kwargs.get("tools"), kwargs.get("max_tokens"))
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _chunks(self, message: AIMessage) -> Iterator[AIMessageChunk]:
        text = message.content if isinstance(message.content, str) else ""
        step = max(1, self.chunk_chars)
        pieces = [text[i:i + step] for i in range(0, len(text), step)] or [""]
        for piece in pieces:
            yield AIMessageChunk(content=piece)
        tool_chunks = [
            {"name": tc["name"], "args": _json(tc["args"]), "id": tc.get("id"), "index": i,
             "type": "tool_call_chunk"}
            for i, tc in enumerate(message.tool_calls)
        ]
        yield AIMessageChunk(
            content="",
            tool_call_chunks=tool_chunks,  # type: ignore[arg-type]
            usage_metadata=message.usage_metadata if self.stream_usage else None,
            response_metadata=message.response_metadata,
            chunk_position="last",
        )

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        if self.latency_s:
            time.sleep(self.latency_s)
        message = self._answer(messages, kwargs.get("tools"), kwargs.get("max_tokens"))
        for chunk in self._chunks(message):
            generation = ChatGenerationChunk(message=chunk)
            if run_manager is not None:
                run_manager.on_llm_new_token(str(chunk.content), chunk=generation)
            yield generation

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        message = self._answer(messages, kwargs.get("tools"), kwargs.get("max_tokens"))
        for chunk in self._chunks(message):
            generation = ChatGenerationChunk(message=chunk)
            if run_manager is not None:
                await run_manager.on_llm_new_token(str(chunk.content), chunk=generation)
            yield generation


def _json(value: Any) -> str:
    import json

    return value if isinstance(value, str) else json.dumps(value)


def _encoding(model: str) -> Any:
    from ..tokens import get_encoding

    return get_encoding(_counter.encoding_name_for(model))
