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
import re
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from contextvars import ContextVar
from types import FrameType
from typing import Any

from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.outputs import ChatGeneration
from langchain_core.tools import BaseTool
from pydantic import BaseModel

from ..compat import (
    LANGCHAIN_SERIALIZE_VALUE_CODE,
    LANGCHAIN_TOOL_ARGS_METHOD,
    LANGCHAIN_TOOL_RUN_CODES,
    PYDANTIC_FIELD_SETATTR,
)
from ..engine.usage import NANO_PER_USD, MalformedUsage, Usage, nano_to_usd
from ..pricing.tools import METADATA_KEY, ToolPrice, tool_price_from_data

__all__ = [
    "OWNER",
    "Answer",
    "ToolOwner",
    "annotate",
    "annotate_message",
    "attempts",
    "cap_place",
    "choices",
    "cost_breakdown",
    "failed_before_running",
    "max_output",
    "model_name",
    "owning_gate",
    "priced_tool",
    "read_answer",
    "read_timeout",
    "retried",
    "tool_owned",
    "tool_result",
    "tool_run_frame",
    "with_output_cap",
]

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
    n = params.get("n")
    # (a plain int is tested inline: this runs on every guarded call, and a call per key
    # to _positive_int was most of its cost)
    n = n if type(n) is int and n > 0 else 1 if n is None else _positive_int(n) or 1
    for key in MAX_OUTPUT_KEYS:
        value = params.get(key)
        if value is None:
            continue
        if type(value) is int and value > 0:
            return value * n
        value = _positive_int(value)
        if value is not None:
            return value * n
    value = _positive_int(meta.get("ls_max_tokens"))
    return None if value is None else value * n


def cap_place(model: Any, settings: Mapping[str, Any]) -> str | None:
    """Where a call's output cap goes so that the request carries it: a cap key already
    in the call's settings, the model's cap attribute, or a cap key in its
    ``model_kwargs``; None when the model has none of these (a cap could only be passed
    as a call-time ``max_tokens`` its request may ignore)."""
    for key in MAX_OUTPUT_KEYS:
        if key in settings:
            return key
    fields = getattr(type(model), "model_fields", None)
    if isinstance(fields, Mapping):
        for name in _CAP_ATTRIBUTES:
            if name in fields:
                return name
        extra = getattr(model, "model_kwargs", None)
        if isinstance(extra, Mapping) and any(k in extra for k in MAX_OUTPUT_KEYS):
            return "model_kwargs"
    return None


def with_output_cap(model: Any, settings: Mapping[str, Any], per_choice: int
                    ) -> tuple[Any, dict[str, Any]]:
    """(model, call settings) whose request carries ``per_choice`` as its output cap.

    The cap goes where the provider's request builder reads it, not only into the call's
    ``max_tokens``: langchain-openai's Responses API payload lets the model's own
    ``max_tokens`` overwrite a call-time one, and other providers name the field
    otherwise. So the model's cap attribute is set on a copy of the model, a cap in its
    ``model_kwargs`` or in the call's settings is replaced, and only a model with none of
    these (:func:`cap_place` is None) gets ``max_tokens`` in its settings."""
    settings = dict(settings)
    if cap_place(model, settings) is None:
        settings["max_tokens"] = per_choice
        return model, settings
    for key in MAX_OUTPUT_KEYS:
        if key in settings:
            settings[key] = per_choice
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
    return model, settings


# One call, one owner. GuardMiddleware owns the model and tool calls it admits and
# counts (it can bound the request, and admits each attempt at its own price); while
# one runs, OWNER names the middleware's per-call gate (a model call) or a ToolOwner (a
# tool call). A GuardCallbackHandler whose guard keeps its books on the same ledger
# joins the gate's admission of that model run, and leaves that tool call uncounted,
# instead of charging either twice. Guards on other ledgers keep other budgets: each
# charges its own.
OWNER: ContextVar[Any] = ContextVar("agent_guard_owner", default=None)


class ToolOwner:
    """The middleware that counted the tool call ``tool_call_id`` (see ``OWNER``)."""

    __slots__ = ("guard", "tool_call_id")

    def __init__(self, guard: Any, tool_call_id: str | None) -> None:
        self.guard = guard
        self.tool_call_id = tool_call_id


def same_ledger(a: Any, b: Any) -> bool:
    """Whether two guards keep their books on the same ledger (one budget)."""
    return a is b or getattr(a, "_ledger_id", None) == getattr(b, "_ledger_id", 0)


def owning_gate(guard: Any) -> Any:
    """The GuardMiddleware gate of the model call running here, when it charges to
    ``guard``'s ledger; else None."""
    owner = OWNER.get()
    if owner is None or not hasattr(owner, "admission_for"):
        return None
    return owner if same_ledger(owner.guard, guard) else None


def tool_owned(guard: Any, tool_call_id: Any) -> bool:
    """Whether a GuardMiddleware on ``guard``'s ledger counted this tool call."""
    owner = OWNER.get()
    return (isinstance(owner, ToolOwner) and owner.tool_call_id is not None
            and owner.tool_call_id == tool_call_id and same_ledger(owner.guard, guard))


# Chat model classes whose provider SDK retries by itself when the model sets no
# max_retries (the openai, anthropic and groq clients: 2 retries)
_SDK_DEFAULT_RETRIES = {"ChatOpenAI": 2, "AzureChatOpenAI": 2, "ChatDeepSeek": 2,
                        "ChatXAI": 2, "ChatAnthropic": 2, "ChatGroq": 2}


def attempts(serialized: Mapping[str, Any] | None) -> int:
    """Requests the provider client may send for one call: 1 + its own retries (the
    model's ``max_retries``, else its SDK's default)."""
    if not serialized:
        return 1
    kwargs = serialized.get("kwargs")
    retries = kwargs.get("max_retries") if kwargs and isinstance(kwargs, Mapping) else None
    if retries is None:
        ident = serialized.get("id")
        if ident and isinstance(ident, (list, tuple)):  # (a tuple: no union made per call)
            return 1 + _SDK_DEFAULT_RETRIES.get(str(ident[-1]), 0)
        return 1
    if isinstance(retries, int) and not isinstance(retries, bool) and retries >= 0:
        return 1 + retries
    return 1


def _seconds(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    return None


_HTTPX_TIMEOUT = re.compile(r"\b(timeout|read)=([0-9.eE+-]+)")


def client_retries(serialized: Mapping[str, Any] | None) -> tuple[int, float | None]:
    """``(attempts(serialized), read_timeout(serialized))``, remembered per serialized
    model: LangChain hands every call of a model the same dict (its ``_serialized``
    is a cached property), so a model's calls read it once."""
    if serialized is None:
        return 1, None
    key = id(serialized)
    known = _CLIENT_RETRIES.get(key)
    if known is not None and known[0] is serialized:
        return known[1]
    found = attempts(serialized), read_timeout(serialized)
    if len(_CLIENT_RETRIES) >= 256:  # models made per call: forget them all
        _CLIENT_RETRIES.clear()
    _CLIENT_RETRIES[key] = (serialized, found)  # kept: its id is not reused meanwhile
    return found


_CLIENT_RETRIES: dict[int, tuple[Any, tuple[int, float | None]]] = {}


def read_timeout(serialized: Mapping[str, Any] | None) -> float | None:
    """The client's read timeout in seconds: the time one attempt waits for an answer
    before the SDK retries. A number; a ``(connect, read, ...)`` sequence; an
    ``httpx.Timeout`` (serialized as its repr: ``read=``, else ``timeout=``)."""
    kwargs = (serialized or {}).get("kwargs")
    if not kwargs or not isinstance(kwargs, Mapping):
        return None
    for key in ("request_timeout", "timeout", "default_request_timeout"):
        value = kwargs.get(key)
        if value is None:
            continue
        if isinstance(value, list | tuple) and value:
            return _seconds(value[1] if len(value) > 1 else value[0])
        if isinstance(value, Mapping) and value.get("id") == ["httpx", "Timeout"]:
            found = dict(_HTTPX_TIMEOUT.findall(str(value.get("repr") or "")))
            try:
                return _seconds(float(found.get("read", found.get("timeout", "")) or ""))
            except ValueError:
                return None
        if (seconds := _seconds(value)) is not None:
            return seconds
    return None


def retried(started: float, first_chunk: float, timeout: float | None, attempts: int
            ) -> int:
    """Attempts before the answer that may have been billed: the client's retries happen
    inside one LangChain call, each after one whole read timeout without an answer. So
    the wait for the answer (for a stream, for its first chunk: a stream is not retried
    once it has started) holds one timed-out attempt per whole timeout. Times are
    ``time.monotonic()``; ``first_chunk`` 0 means none (the answer is now)."""
    if timeout is None or attempts <= 1:
        return 0
    answered = first_chunk or time.monotonic()
    return int((answered - started) // timeout)


class Answer:
    """What a model call's answer says: ``usage`` reported (or None), the response's
    model, whether LangChain's cache answered, and the output counted when the provider
    reported no usage. ``message``: the one answer, when the answer was one prompt's
    one choice with its usage (the message :func:`annotate` writes to), else None."""

    __slots__ = ("cache_hit", "counted", "message", "model", "usage")

    def __init__(self, usage: Usage | None, model: str | None, cache_hit: bool,
                 counted: int, message: AIMessage | None = None) -> None:
        self.usage = usage
        self.model = model
        self.cache_hit = cache_hit
        self.counted = counted
        self.message = message

    def as_tuple(self) -> tuple[Usage | None, str | None, bool, int]:
        return self.usage, self.model, self.cache_hit, self.counted


def read_answer(prompts: Iterable[Sequence[Any]], llm_output: Mapping[str, Any] | None,
                model: str, counter: Any, streamed: int = 0) -> Answer:
    """Read an answer: ``prompts`` holds, per prompt, its choices (``ChatGeneration``,
    ``Generation`` or ``AIMessage``). The answer is only counted (with ``counter``, a
    :class:`~agent_guard.tokens.TokenCounter`) when the provider reported no usage, or
    "0 tokens" for a call that may have produced output."""
    if type(prompts) is list and len(prompts) == 1 and len(prompts[0]) == 1:
        # one prompt, one choice (nearly every call): its usage as reported, if any
        item = prompts[0][0]
        # (_message's common case first, without its call)
        message = item.message if type(item) is ChatGeneration and \
            type(item.message) is AIMessage else _message(item)
        if message is not None:
            um = message.usage_metadata
            if um is not None and um.get("total_cost") != 0:
                try:
                    one = Usage.from_usage_metadata(um)
                except MalformedUsage:  # the general path below logs it, once
                    one = None
                # (total_tokens, without the property's call)
                if one is not None and one.input_tokens + one.output_tokens > 0:
                    meta = message.response_metadata or {}
                    found = meta.get("model_name") or meta.get("model")
                    if found is None and llm_output:
                        found = llm_output.get("model_name")
                    return Answer(one, found, False, streamed, message)
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
    if type(item) is ChatGeneration and type(item.message) is AIMessage:
        return item.message  # the common case, without pydantic's ABC isinstance checks
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
# LangChain's serialiser of dict values (dumpd, as its tracer uses): the one reader of
# CostedUsage.items() that gets the costs; None when a release moves it (then none does)
_SERIALIZE = LANGCHAIN_SERIALIZE_VALUE_CODE


class CostedUsage(dict):  # type: ignore[type-arg]
    """An answer's ``usage_metadata``: the token counts are the dict's contents;
    agent-guard's costs (``input_cost``, ``output_cost``, ``total_cost``: floats,
    dollars) sit beside them, where LangSmith reads a model run's cost.

    LangChain's own arithmetic (``add_usage``, ``AIMessageChunk + AIMessageChunk``,
    ``get_usage_metadata_callback``) adds every key of the dict and refuses floats, so
    the costs are not among its keys: they are read by key (``usage["total_cost"]``,
    ``.get``, ``in``) and written by LangChain's serialiser (``dumpd``: what LangSmith's
    tracer sends; its ``items()`` call is told apart from every other reader). A
    message rebuilt from its fields (``AIMessage(usage_metadata=...)``, pydantic's
    ``model_dump``, ``json``, a LangGraph checkpoint) keeps the token counts, ints, and
    drops the costs: they never become plain keys a later sum would trip on. ``pickle``
    and ``copy`` keep both."""

    __slots__ = ("costs",)
    costs: dict[str, float]

    def __init__(self, usage: Mapping[str, Any] = {},  # read, never kept
                 costs: Mapping[str, float] = {}) -> None:
        super().__init__(usage)
        if not COST_KEYS.isdisjoint(dict.keys(self)):
            _drop_costs(self)
        self.costs = dict(costs)

    def __getitem__(self, key: Any) -> Any:
        if key in COST_KEYS and key in self.costs:
            return self.costs[key]
        return dict.__getitem__(self, key)

    def __setitem__(self, key: Any, value: Any) -> None:
        if key in COST_KEYS:
            self.costs[key] = value
        else:
            dict.__setitem__(self, key, value)

    def __contains__(self, key: object) -> bool:
        return key in self.costs or dict.__contains__(self, key)

    def get(self, key: Any, default: Any = None) -> Any:
        return self[key] if key in self else default  # noqa: SIM401 - self.get is this

    def items(self) -> Any:  # type: ignore[override]
        if _SERIALIZE is not None and sys._getframe(1).f_code is _SERIALIZE:
            return [*dict.items(self), *self.costs.items()]
        return dict.items(self)

    def copy(self) -> CostedUsage:
        return CostedUsage(self, self.costs)

    def __reduce__(self) -> Any:
        return CostedUsage, (dict(dict.items(self)), self.costs)


_new_dict = dict.__new__
# pydantic's own __setattr__ (a message class that overrides it is set the usual way)
_MODEL_SETATTR = BaseModel.__setattr__


def _drop_costs(usage: CostedUsage) -> None:
    for key in COST_KEYS:
        dict.pop(usage, key, None)


def annotate(generations: Iterable[Any], guard: Any, record: Any,
             split: tuple[Any, Any] | None) -> None:
    """Write a settled call's cost where LangSmith reads it: the first answer's
    ``usage_metadata`` gets ``input_cost``, ``output_cost`` and ``total_cost`` (kept out
    of the dict's iteration, see :class:`CostedUsage`) and its ``response_metadata``
    the guard's view (``agent_guard``: session, tier, route, cost, cap). The message is
    changed in place: LangChain's tracer, the caller and the agent's state hold the
    same object, and no copy of it is made here."""
    for generation in generations:
        message = _message(generation)
        if message is not None:
            annotate_message(message, guard, record, split)
            return  # one answer per call: LangChain's tracer adds the answers' usage up


def annotate_message(message: AIMessage, guard: Any, record: Any,
                     split: tuple[Any, Any] | None) -> None:
    """:func:`annotate` the answer ``message`` (the first of the call's answers)."""
    global _cap_text
    nano = record.cost_nano
    usage = message.usage_metadata
    if usage is not None and split is not None:
        # CostedUsage(usage, costs), keeping the costs dict (not a copy), made here:
        # no type.__call__ dispatching to a Python __init__, no helper's frame
        costed: CostedUsage = _new_dict(CostedUsage)
        dict.update(costed, usage)  # what dict.__init__ does
        if not COST_KEYS.isdisjoint(costed):  # (its keys: CostedUsage iterates as a dict)
            _drop_costs(costed)
        costed.costs = {
            "input_cost": float(split[0]), "output_cost": float(split[1]),
            # the exact dollars to the nearest float: int / int rounds correctly,
            # as float(Decimal(nano) / 10**9) does
            "total_cost": nano / 1_000_000_000}
        if PYDANTIC_FIELD_SETATTR is not None and type(message).__setattr__ is \
                _MODEL_SETATTR and message.__pydantic_setattr_handlers__.get(
                    "usage_metadata") is PYDANTIC_FIELD_SETATTR:
            # what pydantic's __setattr__ would call (the handler it memoised for this
            # field of this class), done here: two Python calls fewer per answer
            message.__dict__["usage_metadata"] = costed
            message.__pydantic_fields_set__.add("usage_metadata")
        else:
            message.usage_metadata = costed  # type: ignore[assignment]
    # str(record.cost_usd), i.e. str(nano_to_usd(nano)), without Decimal arithmetic
    # where the text is plain digits (here, not in a helper: one call fewer per answer):
    # the decimal digits cut at the point, no trailing zeros after it (below 1,000
    # nano-USD Decimal prints an exponent; beyond its 28 digits it would round)
    if 1000 <= nano < 10**27:
        digits = str(nano)
        if nano < NANO_PER_USD:  # (nano >= 1000: a digit stays after the strip)
            cost_text = "0." + digits.rjust(9, "0").rstrip("0")
        else:
            fraction = digits[-9:].rstrip("0")
            cost_text = f"{digits[:-9]}.{fraction}" if fraction else digits[:-9]
    else:
        cost_text = str(nano_to_usd(nano))
    # str(cap): the guard's limits keep one Decimal, so the text of the last one is
    # reused while the cap is that same object (one tuple, swapped whole: thread-safe)
    cap = guard.limits.max_cost_usd
    known = _cap_text
    if known[0] is not cap:
        known = _cap_text = (cap, None if cap is None else str(cap))
    message.response_metadata["agent_guard"] = {
        "session": record.session, "tier": record.tier, "route": record.route,
        "cost_usd": cost_text, "usage_estimated": record.usage_estimated,
        "cap_usd": known[1],
    }


#: (cap, str(cap)) of the last answer annotate_message annotated
_cap_text: tuple[Any, str | None] = (None, None)


def tool_result(output: Any) -> Any:
    """What a tool returned, for its price (:class:`~agent_guard.pricing.ToolUse`): a
    ``ToolMessage``'s artifact when it has one, else its content; a ``Command``: None."""
    if isinstance(output, ToolMessage):
        return output.artifact if output.artifact is not None else output.content
    if type(output).__name__ == "Command":
        return None
    return output


def failed_before_running(error: BaseException) -> bool:
    """Whether a tool call's error was raised before the tool ran: while LangChain
    checked its arguments (``BaseTool.run`` / ``arun`` calling
    ``_to_args_and_kwargs``, where a ``ValidationError`` for a missing or mistyped
    argument comes from), so it reached no paid API. An error raised inside the tool,
    a ``ValidationError`` included, may have been billed."""
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code in LANGCHAIN_TOOL_RUN_CODES:
            below = tb.tb_next
            return below is not None and \
                below.tb_frame.f_code.co_name == LANGCHAIN_TOOL_ARGS_METHOD
        tb = tb.tb_next
    return False


def tool_run_frame() -> FrameType | None:
    """The frame of the synchronous ``BaseTool.run`` the caller (a callback of that
    tool's start) runs in, or None (an async run: the callback runs in a thread)."""
    frame: FrameType | None = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            return None
        if frame.f_code in LANGCHAIN_TOOL_RUN_CODES:
            return frame
        frame = frame.f_back
    return None


def priced_tool(tool: BaseTool, price: ToolPrice | Mapping[str, Any]) -> BaseTool:
    """Declare ``tool``'s price on the tool itself (in its ``metadata``, where the
    callback handler and the middleware read it): ``priced_tool(search,
    ToolPrice(per_call_usd="0.01"))``. Returns the same tool."""
    if not isinstance(price, ToolPrice):
        price = tool_price_from_data(tool.name, price)
    tool.metadata = {**(tool.metadata or {}), METADATA_KEY: price}
    return tool


def cost_breakdown(guard: Any, record: Any, planned: Any = None) -> tuple[float, float] | None:
    """(prompt, completion) dollars of a settled call, for its run and span (the
    callback's and the middleware's); None for a failed or free call.

    ``planned``: the call's admission when ``guard`` planned it (not one it joined):
    its price is what ``guard.prices`` resolved for the call's model, so an answer from
    that model is not looked up again (the stated ``unknown_price`` stands for a model
    that resolved to no price)."""
    if record.outcome != "ok" or record.cost_nano == 0:
        return None
    if planned is not None and record.model == planned.call.model:
        price = planned.price
        if price is guard._unknown_price:
            return None
    else:
        price = guard.prices.resolve(record.model, record.provider)
    if price is None:
        return None
    return price.prompt_completion_usd(record.usage)  # type: ignore[no-any-return]
