"""``ModelRouter``: planning to cheap models, execution to strong ones, within the budget.

The router is a chat model that picks a *tier* for each call and hands the
call to that tier's model, unchanged:

1. an explicit role (``config["configurable"]["role"]`` or
   ``config["metadata"]["role"]``), a tag, the LangGraph node
   (``langgraph_node``) or the agent name, looked up in ``roles``;
2. else the first matching complexity rule (``rules``), then ``classifier``;
3. else ``default``.

With a guard, a tier whose worst case does not fit the session's remaining
dollars (or any tier while less than ``downgrade_below_usd`` is left) is
replaced by the strongest cheaper tier that fits. Provider errors (429, 5xx,
timeouts, connection errors) are retried with exponential backoff and jitter
(LangChain's ``with_retry``), then the call falls to the next cheaper tier that
fits. A guard refusal is never retried and never falls back.

Tiers are listed from the cheapest to the strongest. Each decision (tier, why,
worst-case cost of each option) travels in the call's metadata
(``agent_guard_tier``, ``agent_guard_route``) into the guard's records.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage, BaseMessageChunk
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig, ensure_config
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict, Field, PrivateAttr

from .compat import ls_params
from .context import session_of
from .engine.admission import ModelCall
from .engine.guard import Guard
from .engine.usage import nano_to_usd, usd_to_nano
from .errors import GuardError

__all__ = [
    "ModelRouter",
    "RouteContext",
    "RouteDecision",
    "Rule",
    "has_tools",
    "is_retryable",
    "mentions",
    "prompt_tokens_above",
    "when",
]

logger = logging.getLogger("agent_guard")


# -- complexity rules -----------------------------------------------------------------


@dataclass
class RouteContext:
    """What a rule sees of a call."""

    messages: list[BaseMessage]
    tools: list[dict[str, Any]]
    config: RunnableConfig
    model_for_counting: str
    _tokens: int | None = None
    _counter: Any = None

    @property
    def prompt_tokens(self) -> int:
        if self._tokens is None:
            from .tokens import TokenCounter

            counter = self._counter or TokenCounter()
            self._tokens = counter.count_messages(self.messages, self.model_for_counting,
                                                  tools=self.tools or None)
        return self._tokens

    @property
    def text(self) -> str:
        return "\n".join(m.text if hasattr(m, "text") else str(m.content)
                         for m in self.messages)


class Rule:
    """A predicate on a :class:`RouteContext`; compose with ``&``, ``|`` and ``~``,
    and pair with a tier with ``>>``: ``prompt_tokens_above(4000) >> "strong"``."""

    def __init__(self, test: Callable[[RouteContext], bool], name: str) -> None:
        self.test = test
        self.name = name

    def __call__(self, ctx: RouteContext) -> bool:
        return bool(self.test(ctx))

    def __and__(self, other: Rule) -> Rule:
        return Rule(lambda c: self(c) and other(c), f"({self.name} & {other.name})")

    def __or__(self, other: Rule) -> Rule:
        return Rule(lambda c: self(c) or other(c), f"({self.name} | {other.name})")

    def __invert__(self) -> Rule:
        return Rule(lambda c: not self(c), f"~{self.name}")

    def __rshift__(self, tier: str) -> tuple[Rule, str]:
        return (self, tier)

    def __repr__(self) -> str:
        return self.name


def prompt_tokens_above(n: int) -> Rule:
    return Rule(lambda c: c.prompt_tokens > n, f"prompt_tokens_above({n})")


def has_tools() -> Rule:
    return Rule(lambda c: bool(c.tools), "has_tools()")


def mentions(*words: str) -> Rule:
    lowered = [w.lower() for w in words]
    return Rule(lambda c: any(w in c.text.lower() for w in lowered),
                f"mentions({', '.join(map(repr, words))})")


def when(fn: Callable[[RouteContext], bool], name: str | None = None) -> Rule:
    return Rule(fn, name or str(getattr(fn, "__name__", "when(...)")))


# -- retries ----------------------------------------------------------------------------


def is_retryable(exc: BaseException) -> bool:
    """A provider error worth retrying or falling back from: 429, 5xx, timeouts,
    connection errors. Never a guard refusal."""
    if isinstance(exc, GuardError):
        return False
    status = getattr(exc, "status_code", None)
    if status is None:
        status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(status, int):
        return status == 429 or status >= 500
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"APITimeoutError", "APIConnectionError", "TimeoutError",
                         "ConnectionError", "TimeoutException", "ConnectError"})


# -- decisions ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RouteDecision:
    """Which tier a call went to and why, with each option's worst-case cost."""

    tier: str
    reason: str
    requested: str
    estimates_usd: Mapping[str, Decimal] = field(default_factory=dict)
    downgraded: bool = False

    def as_metadata(self) -> dict[str, Any]:
        return {"tier": self.tier, "reason": self.reason, "requested": self.requested,
                "downgraded": self.downgraded,
                "estimates_usd": {k: str(v) for k, v in self.estimates_usd.items()}}


def _base_model(runnable: Any) -> Any:
    while hasattr(runnable, "bound") and not isinstance(runnable, BaseChatModel):
        runnable = runnable.bound
    return runnable


def _ls(model: Any) -> dict[str, Any]:
    base = _base_model(model)
    if isinstance(base, BaseChatModel):
        return ls_params(base)
    return {}


class ModelRouter(BaseChatModel):
    """A chat model that sends each call to one of several tiers (cheapest first)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    tiers: dict[str, Any]
    roles: dict[str, str] = Field(default_factory=dict)
    default: str | None = None
    rules: list[tuple[Rule, str]] = Field(default_factory=list)
    classifier: Callable[[RouteContext], str | None] | None = None
    guard: Guard | None = None
    downgrade_below_usd: Decimal | str | float | None = None
    retry_attempts: int = 3
    retry_initial_delay: float = 1.0
    retry_max_delay: float = 30.0
    fallback: bool = True
    session_id: str | None = None
    bound_tools: tuple[Any, ...] | None = None
    _bound: dict[str, Any] = PrivateAttr(default_factory=dict)
    # shared by every copy (bind_tools, with_structured_output...): a guard given to the
    # router later (guarded_graph(router=...)) reaches the copies made before
    _family: dict[str, Any] = PrivateAttr(default_factory=dict)

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name == "guard":
            self._family["guard"] = value

    def _guard(self) -> Guard | None:
        """This router's guard, or the one its family (the router it was copied from,
        or a copy) was given since."""
        return self.guard if self.guard is not None else self._family.get("guard")

    def model_post_init(self, __context: Any) -> None:
        if not self.tiers:
            raise ValueError("ModelRouter needs at least one tier")
        names = list(self.tiers)
        for where, tier in [("default", self.default), *[(f"roles[{r!r}]", t)
                            for r, t in self.roles.items()],
                            *[(f"rule {r!r}", t) for r, t in self.rules]]:
            if tier is not None and tier not in self.tiers:
                raise ValueError(f"ModelRouter {where} names tier {tier!r}; tiers are {names}")
        if self.default is None:
            self.default = names[-1]
        if self.guard is not None:
            self._family["guard"] = self.guard

    @property
    def _llm_type(self) -> str:
        return "agent-guard-model-router"

    # -- choosing --------------------------------------------------------------------

    def _role_tier(self, config: RunnableConfig) -> tuple[str, str] | None:
        meta = config.get("metadata") or {}
        explicit = (config.get("configurable") or {}).get("role") or meta.get("role")
        if explicit is not None:
            if explicit in self.roles:
                return self.roles[explicit], f"role {explicit!r}"
            if explicit in self.tiers:
                return explicit, f"role names tier {explicit!r}"
        for tag in config.get("tags") or ():
            if tag in self.roles:
                return self.roles[tag], f"tag {tag!r}"
        for key in ("langgraph_node", "lc_agent_name"):
            value = meta.get(key)
            if value in self.roles:
                return self.roles[value], f"{key.removeprefix('lc_').replace('_', ' ')} {value!r}"
        return None

    def _context(self, messages: list[BaseMessage], config: RunnableConfig) -> RouteContext:
        guard = self._guard()
        counter = guard.tokens if guard is not None else None
        model = _ls(self.tiers[self.default]).get("ls_model_name") or "gpt-4o"  # type: ignore[index]
        return RouteContext(messages, self._tool_schemas(), config, str(model),
                            _counter=counter)

    def _tool_schemas(self) -> list[dict[str, Any]]:
        if not self.bound_tools:
            return []
        tools = self.bound_tools[0]
        return [t if isinstance(t, dict) else convert_to_openai_tool(t) for t in tools]

    def _estimate(self, tier: str, ctx: RouteContext, session: str) -> int | None:
        guard = self._guard()
        if guard is None:
            return None
        ls = _ls(self.tiers[tier])
        call = ModelCall(session=session, model=str(ls.get("ls_model_name") or tier),
                         provider=ls.get("ls_provider"), messages=ctx.messages,
                         tools=ctx.tools or None, max_output_tokens=ls.get("ls_max_tokens"))
        try:
            return guard.estimate_model_call(call)
        except GuardError:
            return None

    def route(self, input: LanguageModelInput, config: RunnableConfig | None = None,
              *, usage: Any = None) -> RouteDecision:
        """Decide the tier of a call (without making it)."""
        config = ensure_config(config)
        ctx = self._context(self._convert_input(input).to_messages(), config)
        chosen = self._role_tier(config)
        if chosen is None:
            for rule, tier in self.rules:
                if rule(ctx):
                    chosen = (tier, f"rule {rule!r}")
                    break
        if chosen is None and self.classifier is not None:
            picked = self.classifier(ctx)
            if picked is not None:
                if picked not in self.tiers:
                    raise ValueError(f"the classifier chose unknown tier {picked!r}")
                chosen = (picked, "classifier")
        if chosen is None:
            chosen = (str(self.default), "default")
        return self._fit(chosen[0], chosen[1], ctx, config,
                         usage if usage is not None else self._usage(config))

    async def aroute(self, input: LanguageModelInput, config: RunnableConfig | None = None
                     ) -> RouteDecision:
        """:meth:`route` reading the budget with the async ledger operations."""
        config = ensure_config(config)
        usage = None
        guard = self._guard()
        if guard is not None and guard.limits.max_cost_nano is not None:
            usage = await guard.ausage(self._session(config))
        return self.route(input, config, usage=usage)

    def _session(self, config: RunnableConfig) -> str:
        return session_of(config, self.session_id)

    def _usage(self, config: RunnableConfig) -> Any:
        guard = self._guard()
        if guard is None or guard.limits.max_cost_nano is None:
            return None
        return guard.usage(self._session(config))

    def _fit(self, tier: str, reason: str, ctx: RouteContext, config: RunnableConfig,
             usage: Any) -> RouteDecision:
        """Step down to the strongest cheaper tier that fits the remaining budget."""
        if usage is None:
            return RouteDecision(tier, reason, tier)
        session = self._session(config)
        remaining = (usage.cap_nano or 0) - usage.cost_nano - usage.reserved_nano
        names = list(self.tiers)
        estimates = {t: self._estimate(t, ctx, session) for t in names[: names.index(tier) + 1]}
        shown = {t: nano_to_usd(n) for t, n in estimates.items() if n is not None}
        floor = (usd_to_nano(self.downgrade_below_usd)
                 if self.downgrade_below_usd is not None else None)
        candidates = names[: names.index(tier) + 1][::-1]
        for i, t in enumerate(candidates):
            cost = estimates[t]
            low = floor is not None and remaining < floor and t == tier and len(candidates) > 1
            if (cost is None or cost <= remaining) and not low:
                if i == 0:
                    return RouteDecision(t, reason, tier, shown)
                why = (f"downgraded from {tier!r}: ${nano_to_usd(remaining)} left"
                       + (f" < ${nano_to_usd(floor)}" if floor is not None and remaining < floor
                          else f", {tier!r} may cost ${nano_to_usd(estimates[tier] or 0)}"))
                return RouteDecision(t, f"{reason}; {why}", tier, shown, downgraded=True)
        return RouteDecision(tier, f"{reason}; no tier fits the budget", tier, shown)

    # -- calling --------------------------------------------------------------------------

    def _runnable(self, tier: str, kwargs: Mapping[str, Any]) -> Runnable:
        """The tier's model with the router's tools (bound once per tier) and kwargs."""
        model = self._bound.get(tier)
        if model is None:
            model = self.tiers[tier]
            if self.bound_tools is not None:
                tools, tool_choice, extra = self.bound_tools
                model = model.bind_tools(tools, tool_choice=tool_choice, **extra)
            self._bound[tier] = model
        return model.bind(**kwargs) if kwargs else model

    def _config_for(self, config: RunnableConfig, decision: RouteDecision) -> RunnableConfig:
        meta = {**(config.get("metadata") or {}), "agent_guard_tier": decision.tier,
                "agent_guard_route": decision.reason}
        return {**config, "metadata": meta}

    def _plan(self, input: LanguageModelInput, config: RunnableConfig | None
              ) -> tuple[RunnableConfig, RouteDecision, list[str]]:
        config = ensure_config(config)
        return config, *self._fallbacks(self.route(input, config))

    async def _aplan(self, input: LanguageModelInput, config: RunnableConfig | None
                     ) -> tuple[RunnableConfig, RouteDecision, list[str]]:
        config = ensure_config(config)
        return config, *self._fallbacks(await self.aroute(input, config))

    def _fallbacks(self, decision: RouteDecision) -> tuple[RouteDecision, list[str]]:
        names = list(self.tiers)
        fallbacks = names[: names.index(decision.tier)][::-1] if self.fallback else []
        return decision, fallbacks

    def _retrying(self, runnable: Runnable) -> Runnable:
        """LangChain's with_retry for the attempts after the first (the first is made
        directly, so a call that succeeds pays nothing for the retry machinery)."""
        return runnable.with_retry(
            retry_if_exception_type=is_retryable, stop_after_attempt=self.retry_attempts - 1,
            exponential_jitter_params={  # type: ignore[arg-type]
                "multiplier": self.retry_initial_delay, "max": self.retry_max_delay,
                "jitter": self.retry_initial_delay})

    def _call(self, tier: str, kwargs: Mapping[str, Any], input: LanguageModelInput,
              config: RunnableConfig) -> AIMessage:
        runnable = self._runnable(tier, kwargs)
        try:
            return runnable.invoke(input, config)
        except Exception as exc:
            if self.retry_attempts <= 1 or not is_retryable(exc):
                raise
        return self._retrying(runnable).invoke(input, config)

    async def _acall(self, tier: str, kwargs: Mapping[str, Any], input: LanguageModelInput,
                     config: RunnableConfig) -> AIMessage:
        runnable = self._runnable(tier, kwargs)
        try:
            return await runnable.ainvoke(input, config)
        except Exception as exc:
            if self.retry_attempts <= 1 or not is_retryable(exc):
                raise
        return await self._retrying(runnable).ainvoke(input, config)

    def _fallen(self, decision: RouteDecision, tier: str, exc: BaseException) -> RouteDecision:
        logger.warning("agent-guard: tier %r failed (%r); falling back to %r",
                       decision.tier, exc, tier)
        return RouteDecision(tier, f"{decision.reason}; fallback after {type(exc).__name__} "
                             f"from {decision.tier!r}", decision.requested,
                             decision.estimates_usd, downgraded=True)

    def invoke(self, input: LanguageModelInput, config: RunnableConfig | None = None, *,
               stop: list[str] | None = None, **kwargs: Any) -> AIMessage:
        config, decision, fallbacks = self._plan(input, config)
        if stop is not None:
            kwargs["stop"] = stop
        while True:
            try:
                return self._call(decision.tier, kwargs, input,
                                  self._config_for(config, decision))
            except Exception as exc:
                if not fallbacks or not is_retryable(exc):
                    raise
                decision = self._fallen(decision, fallbacks.pop(0), exc)

    async def ainvoke(self, input: LanguageModelInput, config: RunnableConfig | None = None, *,
                      stop: list[str] | None = None, **kwargs: Any) -> AIMessage:
        config, decision, fallbacks = await self._aplan(input, config)
        if stop is not None:
            kwargs["stop"] = stop
        while True:
            try:
                return await self._acall(decision.tier, kwargs, input,
                                         self._config_for(config, decision))
            except Exception as exc:
                if not fallbacks or not is_retryable(exc):
                    raise
                decision = self._fallen(decision, fallbacks.pop(0), exc)

    def stream(  # type: ignore[override]  # the chunks are the tier model's, not only AI
            self, input: LanguageModelInput, config: RunnableConfig | None = None, *,
            stop: list[str] | None = None, **kwargs: Any) -> Iterator[BaseMessageChunk]:
        config, decision, _ = self._plan(input, config)
        if stop is not None:
            kwargs["stop"] = stop
        yield from self._runnable(decision.tier, kwargs).stream(
            input, self._config_for(config, decision))

    async def astream(  # type: ignore[override]  # as stream
            self, input: LanguageModelInput, config: RunnableConfig | None = None,
            *, stop: list[str] | None = None, **kwargs: Any
            ) -> AsyncIterator[BaseMessageChunk]:
        config, decision, _ = await self._aplan(input, config)
        if stop is not None:
            kwargs["stop"] = stop
        async for chunk in self._runnable(decision.tier, kwargs).astream(
                input, self._config_for(config, decision)):
            yield chunk

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any
                  ) -> ChatResult:
        message = self.invoke(messages, stop=stop, **kwargs)
        return ChatResult(generations=[ChatGeneration(message=message)])

    def bind_tools(self, tools: Sequence[Any], *, tool_choice: str | None = None,
                   **kwargs: Any) -> ModelRouter:
        """Every tier gets the tools, bound its own way."""
        copy = self.model_copy(update={"bound_tools": (list(tools), tool_choice, kwargs)})
        copy._bound = {}  # model_copy shares private attributes; tiers are bound anew
        return copy
