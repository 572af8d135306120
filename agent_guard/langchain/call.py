"""What both LangChain adapters share: describing a model call and reading its answer.

``GuardCallbackHandler`` (from callback events) and ``GuardMiddleware`` (from a
``ModelRequest``) describe a call with the same rules (model name, output cap times
``n`` choices) and read the answer with the same rules (usage in every shape LangChain
gives, the ``llm_output`` fallback, malformed usage logged and counted instead), so what
one fixes the other gets. The middleware also lowers or sets a call's output cap, in the
field the provider's request really carries (:func:`with_output_cap`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.outputs import ChatGeneration
from langchain_core.tools import BaseTool

from ..pricing.tools import METADATA_KEY, ToolPrice, tool_price_from_data
from ..usage import MalformedUsage, Usage

__all__ = ["Answer", "choices", "max_output", "model_name", "priced_tool", "read_answer",
           "tool_result", "with_output_cap"]

logger = logging.getLogger("agent_guard")

# request parameters that carry a call's output cap, in order of preference
MAX_OUTPUT_KEYS = ("max_completion_tokens", "max_tokens", "max_output_tokens",
                   "num_predict", "maxOutputTokens", "max_new_tokens")
# the model attributes that hold it (ChatOpenAI and ChatAnthropic: max_tokens; Google:
# max_output_tokens; Ollama: num_predict; Hugging Face: max_new_tokens)
_CAP_ATTRIBUTES = ("max_tokens", "max_completion_tokens", "max_output_tokens",
                   "num_predict", "max_new_tokens")
_MODEL_KEYS = ("model", "model_name", "model_id", "deployment_name")


def _positive_int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def choices(params: Mapping[str, Any]) -> int:
    """How many choices the call asks for (``n``), at least 1."""
    return _positive_int(params.get("n")) or 1


def model_name(params: Mapping[str, Any], meta: Mapping[str, Any],
               serialized: Mapping[str, Any] | None = None) -> str:
    """The call's model: its request parameters, else ``ls_model_name``, else the
    serialized model's kwargs."""
    for key in _MODEL_KEYS:
        value = params.get(key)
        if isinstance(value, str) and value:
            return value
    value = meta.get("ls_model_name")
    if isinstance(value, str) and value:
        return value
    kwargs = (serialized or {}).get("kwargs") or {}
    for key in _MODEL_KEYS:
        value = kwargs.get(key)
        if isinstance(value, str) and value:
            return value
    return "unknown"


def max_output(params: Mapping[str, Any], meta: Mapping[str, Any]) -> int | None:
    """The call's worst-case output: its max tokens, times ``n`` choices."""
    n = choices(params)
    for key in MAX_OUTPUT_KEYS:
        value = _positive_int(params.get(key))
        if value is not None:
            return value * n
    value = _positive_int(meta.get("ls_max_tokens"))
    return None if value is None else value * n


def with_output_cap(model: Any, settings: Mapping[str, Any], per_choice: int
                    ) -> tuple[Any, dict[str, Any]]:
    """(model, call settings) whose request carries ``per_choice`` as its output cap.

    The cap goes where the provider's request builder reads it, not only into the call's
    ``max_tokens``: langchain-openai's Responses API payload lets the model's own
    ``max_tokens`` overwrite a call-time one, and other providers name the field
    otherwise. So the model's cap attribute is set on a copy of the model, a cap in its
    ``model_kwargs`` or in the call's settings is replaced, and only a model with none of
    these gets ``max_tokens`` in its settings."""
    settings = dict(settings)
    placed = False
    for key in MAX_OUTPUT_KEYS:
        if key in settings:
            settings[key] = per_choice
            placed = True
    fields = getattr(type(model), "model_fields", None)
    update: dict[str, Any] = {}
    if isinstance(fields, Mapping):
        for name in _CAP_ATTRIBUTES:
            if name in fields:
                update[name] = per_choice
                break
        extra = getattr(model, "model_kwargs", None)
        if isinstance(extra, Mapping) and any(k in extra for k in MAX_OUTPUT_KEYS):
            update["model_kwargs"] = {k: per_choice if k in MAX_OUTPUT_KEYS else v
                                      for k, v in extra.items()}
    if update and hasattr(model, "model_copy"):
        model = model.model_copy(update=update)
        placed = True
    if not placed:
        settings["max_tokens"] = per_choice
    return model, settings


class Answer:
    """What a model call's answer says: ``usage`` reported (or None), the response's
    model, whether LangChain's cache answered, and the output counted when the provider
    reported no usage."""

    __slots__ = ("cache_hit", "counted", "model", "usage")

    def __init__(self, usage: Usage | None, model: str | None, cache_hit: bool,
                 counted: int) -> None:
        self.usage = usage
        self.model = model
        self.cache_hit = cache_hit
        self.counted = counted

    def as_tuple(self) -> tuple[Usage | None, str | None, bool, int]:
        return self.usage, self.model, self.cache_hit, self.counted


def read_answer(prompts: Iterable[Sequence[Any]], llm_output: Mapping[str, Any] | None,
                model: str, counter: Any, streamed: int = 0) -> Answer:
    """Read an answer: ``prompts`` holds, per prompt, its choices (``ChatGeneration``,
    ``Generation`` or ``AIMessage``). The answer is only counted (with ``counter``, a
    :class:`~agent_guard.tokens.TokenCounter`) when the provider reported no usage, or
    "0 tokens" for a call that may have produced output."""
    usage: Usage | None = None
    response_model: str | None = None
    cache_hit = False
    everything: list[Any] = []
    for group in prompts:
        seen: list[Any] = []
        for item in group:
            everything.append(item)
            message = _message(item)
            if message is None:
                continue
            meta = message.response_metadata or {}
            response_model = response_model or meta.get("model_name") or meta.get("model")
            um = message.usage_metadata
            if um is None or um in seen:
                # n > 1: providers (OpenAI) attach the request's whole usage to every
                # choice; the same usage twice is one request's, counted once
                continue
            seen.append(um)
            # LangChain's LLM cache replays the original usage with total_cost 0
            cache_hit = cache_hit or um.get("total_cost") == 0  # type: ignore[comparison-overlap]
            usage = _add(usage, parse_usage(um, model))
    if usage is None:
        usage = usage_from_llm_output(llm_output, model)
    if response_model is None and llm_output:
        response_model = llm_output.get("model_name")
    if usage is not None and (usage.total_tokens > 0 or cache_hit):
        return Answer(usage, response_model, cache_hit, streamed)
    counted = 0
    for item in everything:
        message = _message(item)
        if message is not None:
            counted += counter.count_output(message, model)
        else:
            counted += counter.count_text(getattr(item, "text", "") or "", model)
    return Answer(None, response_model, cache_hit, max(counted, streamed))


def _message(item: Any) -> AIMessage | None:
    if isinstance(item, AIMessage):
        return item
    message = item.message if isinstance(item, ChatGeneration) else None
    return message if isinstance(message, AIMessage) else None


def _add(a: Usage | None, b: Usage | None) -> Usage | None:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def parse_usage(um: Mapping[str, Any], model: str) -> Usage | None:
    try:
        return Usage.from_usage_metadata(um)
    except MalformedUsage as exc:
        logger.warning("agent-guard: unreadable usage for %s (%s); counting tokens instead",
                       model, exc)
        return None


def usage_from_llm_output(llm_output: Mapping[str, Any] | None, model: str) -> Usage | None:
    raw = (llm_output or {}).get("token_usage")
    if not isinstance(raw, Mapping) or "prompt_tokens" not in raw:
        return None
    try:
        return Usage.from_openai(raw)
    except MalformedUsage as exc:
        logger.warning("agent-guard: unreadable token_usage for %s (%s)", model, exc)
        return None


COST_KEYS = frozenset({"input_cost", "output_cost", "total_cost"})


class CostedUsage(dict):  # type: ignore[type-arg]
    """An answer's ``usage_metadata`` with agent-guard's costs (floats, dollars) beside
    the token counts, where LangSmith reads a model run's cost.

    LangChain's own arithmetic (``add_usage``, ``AIMessageChunk + AIMessageChunk``,
    ``get_usage_metadata_callback``) adds every key it iterates and refuses floats, so
    iteration shows the token counts only; the costs stay readable by key
    (``usage["total_cost"]``) and in every serialisation (JSON, orjson, ``dumpd``,
    pickle), which read the dict's items directly."""

    __slots__ = ()

    def __iter__(self) -> Any:
        return (k for k in dict.__iter__(self) if k not in COST_KEYS)


def with_costs(usage: Mapping[str, Any], costs: Mapping[str, float]) -> CostedUsage:
    """``usage`` with ``costs`` (``input_cost``, ``output_cost``, ``total_cost``)."""
    costed = CostedUsage((k, v) for k, v in usage.items() if k not in COST_KEYS)
    for key, value in costs.items():
        dict.__setitem__(costed, key, value)
    return costed


def tool_result(output: Any) -> Any:
    """What a tool returned, for its price (:class:`~agent_guard.pricing.ToolUse`): a
    ``ToolMessage``'s artifact when it has one, else its content; a ``Command``: None."""
    if isinstance(output, ToolMessage):
        return output.artifact if output.artifact is not None else output.content
    if type(output).__name__ == "Command":
        return None
    return output


def priced_tool(tool: BaseTool, price: ToolPrice | Mapping[str, Any]) -> BaseTool:
    """Declare ``tool``'s price on the tool itself (in its ``metadata``, where the
    callback handler and the middleware read it): ``priced_tool(search,
    ToolPrice(per_call_usd="0.01"))``. Returns the same tool."""
    if not isinstance(price, ToolPrice):
        price = tool_price_from_data(tool.name, price)
    tool.metadata = {**(tool.metadata or {}), METADATA_KEY: price}
    return tool


def cost_breakdown(guard: Any, record: Any) -> tuple[float, float] | None:
    """(prompt, completion) dollars of a settled call, for its run and span (the
    callback's and the middleware's); None for a failed or free call."""
    if record.outcome != "ok" or record.cost_nano == 0:
        return None
    price = guard.prices.resolve(record.model, record.provider)
    if price is None:
        return None
    return price.prompt_completion_usd(record.usage)  # type: ignore[no-any-return]
