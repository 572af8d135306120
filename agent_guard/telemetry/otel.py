"""OpenTelemetry spans and metrics for guarded runs, with cost.

Span names and attributes follow the OpenTelemetry GenAI semantic conventions
(defined here as constants: the ``opentelemetry-semantic-conventions`` GenAI
constants are deprecated in favour of a separate package):

- ``invoke_agent {name}`` (INTERNAL) per top-level run, carrying the session's
  cost and remaining budget in ``agent_guard.*`` (never ``gen_ai.usage.*``,
  which backends sum over spans);
- ``chat {model}`` (CLIENT) per model call, with usage, cost
  (``gen_ai.usage.cost`` for Langfuse, ``llm.cost.*`` for OpenInference),
  the router tier and why, and whether the usage was estimated;
- ``execute_tool {name}`` (INTERNAL) per tool call, with ``agent_guard.cache.hit``
  and, for a result served from agent-guard's result cache, what that saved
  (``agent_guard.cache.saved_usd``).

A call the guard refuses gets its span closed with an error status and an
``agent_guard.refusal`` event.

Message content (``gen_ai.input.messages``, ``gen_ai.output.messages``,
``gen_ai.system_instructions``, ``gen_ai.tool.call.arguments`` and
``gen_ai.tool.call.result``) is recorded only when the user opts in, with
``capture_content=True`` or the conventions' environment variable
``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT`` (see :mod:`.content`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal
from typing import Any
from uuid import UUID

from opentelemetry import metrics as metrics_api
from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from ..engine.records import CallRecord
from . import content as _content

__all__ = ["Attr", "ExportStatus", "GuardTelemetry", "configure_otlp", "exporter_names"]

logger = logging.getLogger("agent_guard")

TOKEN_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                 16777216, 67108864]
# the Phoenix project a span goes to (an OpenInference resource attribute)
PROJECT_NAME = "openinference.project.name"
DURATION_BUCKETS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                    40.96, 81.92]


class Attr:
    """Attribute names (GenAI semantic conventions, OpenInference, agent-guard)."""

    OPERATION = "gen_ai.operation.name"
    PROVIDER = "gen_ai.provider.name"
    REQUEST_MODEL = "gen_ai.request.model"
    RESPONSE_MODEL = "gen_ai.response.model"
    REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
    INPUT_TOKENS = "gen_ai.usage.input_tokens"
    OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
    CACHE_READ_TOKENS = "gen_ai.usage.cache_read.input_tokens"
    CACHE_CREATION_TOKENS = "gen_ai.usage.cache_creation.input_tokens"
    REASONING_TOKENS = "gen_ai.usage.reasoning.output_tokens"
    FINISH_REASONS = "gen_ai.response.finish_reasons"
    CONVERSATION_ID = "gen_ai.conversation.id"
    AGENT_NAME = "gen_ai.agent.name"
    TOOL_NAME = "gen_ai.tool.name"
    TOOL_CALL_ID = "gen_ai.tool.call.id"
    TOKEN_TYPE = "gen_ai.token.type"
    SESSION_ID = "session.id"
    COST = "gen_ai.usage.cost"
    LLM_COST_TOTAL = "llm.cost.total"
    LLM_COST_PROMPT = "llm.cost.prompt"
    LLM_COST_COMPLETION = "llm.cost.completion"
    TIER = "agent_guard.tier"
    ROUTE = "agent_guard.route"
    ESTIMATED = "agent_guard.usage_estimated"
    RESERVED_USD = "agent_guard.reserved_usd"
    SAVED_USD = "agent_guard.saved_usd"
    CACHE_HIT = "agent_guard.cache.hit"
    CACHE_SAVED_USD = "agent_guard.cache.saved_usd"
    OUTCOME = "agent_guard.outcome"
    SESSION_COST_USD = "agent_guard.session.cost_usd"
    SESSION_REMAINING_USD = "agent_guard.session.remaining_usd"
    SESSION_MODEL_CALLS = "agent_guard.session.model_calls"
    SESSION_TOOL_CALLS = "agent_guard.session.tool_calls"
    SESSION_STEPS = "agent_guard.session.steps"
    # who and what the call was for: user.id (OpenTelemetry, OpenInference, Langfuse), the
    # guard's other scopes as agent_guard.<kind> (team, tenant, feature, project...)
    USER_ID = "user.id"
    SCOPE_PREFIX = "agent_guard."
    # OpenInference (Phoenix, Arize)
    OI_SPAN_KIND = "openinference.span.kind"
    OI_METADATA = "metadata"
    LLM_MODEL_NAME = "llm.model_name"
    LLM_PROVIDER = "llm.provider"
    LLM_SYSTEM = "llm.system"
    LLM_TOKENS_PROMPT = "llm.token_count.prompt"
    LLM_TOKENS_COMPLETION = "llm.token_count.completion"
    LLM_TOKENS_TOTAL = "llm.token_count.total"
    LLM_TOKENS_CACHE_READ = "llm.token_count.prompt_details.cache_read"
    LLM_TOKENS_CACHE_WRITE = "llm.token_count.prompt_details.cache_write"
    LLM_TOKENS_REASONING = "llm.token_count.completion_details.reasoning"
    OI_TOOL_NAME = "tool.name"
    OI_TOOL_ID = "tool.id"
    # message content, recorded only with capture_content
    INPUT_MESSAGES = "gen_ai.input.messages"
    OUTPUT_MESSAGES = "gen_ai.output.messages"
    SYSTEM_INSTRUCTIONS = "gen_ai.system_instructions"
    TOOL_CALL_ARGUMENTS = "gen_ai.tool.call.arguments"
    TOOL_CALL_RESULT = "gen_ai.tool.call.result"


def scope_attribute(kind: str) -> str:
    """The span and metric attribute of a scope kind: ``user.id`` for ``user``,
    ``agent_guard.<kind>`` for the others (``agent_guard.team``...)."""
    return Attr.USER_ID if kind == "user" else Attr.SCOPE_PREFIX + kind


def _usd(value: Decimal) -> float:
    return float(value)


def _content_attributes(build: Callable[..., dict[str, str]], *args: Any) -> dict[str, str]:
    """Message-content attributes made by ``build``. Telemetry never fails the call it
    describes: content it cannot write is logged and left out."""
    try:
        return build(*args)
    except Exception:
        logger.warning("agent-guard: message content left off a span", exc_info=True)
        return {}


def _input_content(messages: Iterable[Any]) -> dict[str, str]:
    system, rest = _content.input_messages(messages)
    out = {Attr.INPUT_MESSAGES: _content.to_json(rest)}
    if system:
        out[Attr.SYSTEM_INSTRUCTIONS] = _content.to_json(system)
    return out


def _output_content(output: Iterable[Any], finish_reasons: list[str] | None
                    ) -> dict[str, str]:
    return {Attr.OUTPUT_MESSAGES: _content.to_json(
        _content.output_messages(output, finish_reasons))}


def _tool_content(name: str, value: Any) -> dict[str, str]:
    """A tool call's arguments or result: text as is, anything else as JSON."""
    return {name: value if isinstance(value, str) else _content.to_json(value)}


class _DollarSums:
    """Cumulative dollars per metric attribute set, kept as exact integer nano-USD and
    read by an ObservableCounter at each collection.

    ``agent_guard.cost`` and ``agent_guard.saved_cost`` used to be synchronous counters:
    each ``add`` made the SDK build, clean, copy and hash a measurement on the model
    call's path. A cumulative monotonic Sum is exported either way (and a reader that
    prefers delta temporality gets the SDK's deltas of these sums), so the backend sees
    the same series; the call's path now only adds an integer under a lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nano: dict[tuple[tuple[str, Any], ...], list[Any]] = {}  # key -> [attrs, nano]

    def add(self, key: tuple[tuple[str, Any], ...], attributes: dict[str, Any],
            nano: int) -> None:
        with self._lock:
            entry = self._nano.get(key)
            if entry is None:
                self._nano[key] = [attributes, nano]
            else:
                entry[1] += nano

    def observe(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            points = [(attributes, nano) for attributes, nano in self._nano.values()]
        return [Observation(nano / 1e9, attributes) for attributes, nano in points]


# meter provider -> (cost sums, saved sums): one ObservableCounter per name and provider.
# The SDK keeps the first callback of an instrument name and ignores a second
# registration's, so every GuardTelemetry on a provider must feed the same sums.
_SUMS: weakref.WeakKeyDictionary[Any, tuple[_DollarSums, _DollarSums]] = (
    weakref.WeakKeyDictionary())
_SUMS_LOCK = threading.Lock()


def _dollar_sums(meter: Any, provider: Any) -> tuple[_DollarSums, _DollarSums]:
    with _SUMS_LOCK:
        try:
            found = _SUMS.get(provider)
        except TypeError:  # not weak-referenceable: this telemetry's own sums
            found, provider = None, None
        if found is None:
            found = (_DollarSums(), _DollarSums())
            meter.create_observable_counter(
                "agent_guard.cost", callbacks=[found[0].observe], unit="USD",
                description="Dollars spent on model calls")
            meter.create_observable_counter(
                "agent_guard.saved_cost", callbacks=[found[1].observe], unit="USD",
                description="Dollars saved by cache hits")
            if provider is not None:
                _SUMS[provider] = found
        return found


_MetricAttrs = tuple[dict[str, Any], dict[str, Any], dict[str, Any],
                     tuple[tuple[str, Any], ...]]


class GuardTelemetry:
    """Turns a guard's view of a run into spans and metrics.

    Uses the application's global ``TracerProvider``/``MeterProvider`` unless
    ones are given. ``cost_attributes`` picks which cost attribute names are
    written (all by default). ``capture_content`` records messages, tool
    arguments and tool results on the spans; ``None`` (the default) reads
    ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT``, which is off unless set.

    Every span carries who it was for: ``session.id``, ``user.id`` and the guard's
    other scopes (``agent_guard.team``, ``agent_guard.tenant``, ``agent_guard.feature``,
    ``agent_guard.project``, ``agent_guard.environment``...) read from the run's
    metadata, plus OpenInference's ``metadata`` JSON of them. Metrics are broken down
    by the scope kinds in ``metric_attributes`` only (``team`` and ``feature`` by
    default: a per-user breakdown is opt-in, its cardinality is the number of users).
    ``openinference`` (default on) also writes the OpenInference names Phoenix and
    Arize read (``openinference.span.kind``, ``llm.model_name``, ``llm.provider``,
    ``llm.token_count.*``, ``llm.cost.*``, ``tool.name``).
    """

    def __init__(self, tracer_provider: Any = None, meter_provider: Any = None, *,
                 cost_attributes: tuple[str, ...] = (Attr.COST, Attr.LLM_COST_TOTAL),
                 agent_name: str = "agent", capture_content: bool | None = None,
                 metric_attributes: Iterable[str] = ("team", "feature"),
                 openinference: bool = True) -> None:
        self.capture_content = (_content.capture_content_from_env()
                                if capture_content is None else bool(capture_content))
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        # set by configure_otlp: what its exporters did (see flush)
        self.export_status: ExportStatus | None = None
        self.tracer = trace.get_tracer("agent_guard", tracer_provider=tracer_provider)
        meter = metrics_api.get_meter("agent_guard", meter_provider=meter_provider)
        # a provider that is off (NoOp, e.g. configure_otlp(traces=False) or
        # metrics=False) gets no per-call work at all; a proxy of the global provider may
        # become real later, so it is used like a real one
        self._tracing = not isinstance(self.tracer, trace.NoOpTracer)
        self._metering = not isinstance(meter, metrics_api.NoOpMeter)
        self.token_usage = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}",
            description="Tokens used per model call",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS)
        self.duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s",
            description="Duration of model calls",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
        # agent_guard.cost and agent_guard.saved_cost: observable counters over sums
        # shared by every GuardTelemetry of this meter provider (see _DollarSums)
        self._cost_sums, self._saved_sums = _dollar_sums(
            meter, meter_provider if meter_provider is not None
            else metrics_api.get_meter_provider())
        self.cost_attributes = cost_attributes
        self.agent_name = agent_name
        self._spans: dict[UUID, Span] = {}
        # open model calls -> (their span, or None when it records nothing; the
        # requested model and the scope values the span started with)
        self._chats: dict[UUID, tuple[Span | None, str, Mapping[str, str] | None]] = {}
        self._anchor: dict[UUID, Span | None] = {}  # run -> the span its children go under
        self._roots: dict[UUID, str] = {}  # root run -> session
        self._lock = threading.Lock()
        self._llm_cost = Attr.LLM_COST_TOTAL in cost_attributes or openinference
        self.openinference = openinference
        self.metric_attributes = tuple(metric_attributes)
        for kind in self.metric_attributes:
            if not isinstance(kind, str) or not kind:
                raise ValueError(f"metric_attributes: {kind!r} is not a scope kind name")
        # scope values -> their span attributes, see _scope_span_attributes
        self._scope_attrs: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}
        # what a model call's span starts with, per (model, provider, max tokens, session,
        # scope values), see _chat_start_attributes
        self._start_attrs: dict[tuple[Any, ...], dict[str, Any]] = {}
        # (model, provider, tier) -> prebuilt metric attribute dicts, see _metric_attributes
        self._metric_attrs: dict[tuple[Any, ...], _MetricAttrs] = {}

    # -- attribution -------------------------------------------------------------------

    def _scope_span_attributes(self, scopes: Mapping[str, str] | None) -> dict[str, Any]:
        """``user.id``, ``agent_guard.<kind>`` and OpenInference ``metadata`` for a
        call's scope values, built once per distinct set."""
        if not scopes:
            return {}
        key = tuple(scopes.items())
        found = self._scope_attrs.get(key)
        if found is None:
            found = {scope_attribute(k): v for k, v in key}
            if self.openinference:
                found[Attr.OI_METADATA] = _content.to_json(dict(sorted(key)))
            with self._lock:
                if len(self._scope_attrs) >= 4096:
                    self._scope_attrs.clear()
                self._scope_attrs[key] = found
        return found

    # -- run tree --------------------------------------------------------------------

    def _parent(self, parent_run_id: UUID | None) -> Span | None:
        if parent_run_id is None:
            return None
        return self._anchor.get(parent_run_id)

    def chain_start(self, run_id: UUID, parent_run_id: UUID | None, name: str | None,
                    session: str, attributes: Mapping[str, str] | None = None) -> None:
        """``attributes``: the run's scope values (user, team...), read for a root run."""
        if not self._tracing:
            return
        if parent_run_id is None:
            span_attributes: dict[str, Any] = {
                Attr.OPERATION: "invoke_agent", Attr.AGENT_NAME: name or self.agent_name,
                Attr.CONVERSATION_ID: session, Attr.SESSION_ID: session}
            if self.openinference:
                span_attributes[Attr.OI_SPAN_KIND] = "AGENT"
            if attributes:
                span_attributes.update(self._scope_span_attributes(attributes))
            span = self.tracer.start_span(
                f"invoke_agent {name or self.agent_name}", kind=SpanKind.INTERNAL,
                attributes=span_attributes)
            with self._lock:
                self._spans[run_id] = span
                self._anchor[run_id] = span
                self._roots[run_id] = session
        else:
            with self._lock:
                self._anchor[run_id] = self._anchor.get(parent_run_id)

    def chain_end(self, run_id: UUID, usage: Any = None, error: BaseException | None = None,
                  *, keep_anchor: bool = False) -> None:
        """``keep_anchor``: spans started under the run after this keep going under its
        (ended) span, until a ``chain_end`` without it."""
        with self._lock:
            if not keep_anchor:
                self._anchor.pop(run_id, None)
            span = self._spans.pop(run_id, None) if run_id in self._roots else None
            self._roots.pop(run_id, None)
        if span is None:
            return
        if usage is not None:
            span.set_attributes({
                Attr.SESSION_COST_USD: _usd(usage.cost_usd),
                Attr.SESSION_MODEL_CALLS: usage.model_calls,
                Attr.SESSION_TOOL_CALLS: usage.tool_calls,
                Attr.SESSION_STEPS: usage.steps,
            })
            if usage.remaining_usd is not None:
                span.set_attribute(Attr.SESSION_REMAINING_USD, _usd(usage.remaining_usd))
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
            span.record_exception(error)
        span.end()

    # -- model calls -------------------------------------------------------------------

    def _chat_start_attributes(self, model: str, provider: str | None,
                               max_tokens: int | None, session: str,
                               scopes: Mapping[str, str] | None) -> dict[str, Any]:
        """A model call's start attributes, built once per distinct (model, provider, max
        tokens, session, scope values) and shared: the SDK copies what it keeps."""
        key = (model, provider, max_tokens, session, tuple(scopes.items()) if scopes else ())
        found = self._start_attrs.get(key)
        if found is None:
            found = {Attr.OPERATION: "chat", Attr.REQUEST_MODEL: model,
                     Attr.CONVERSATION_ID: session, Attr.SESSION_ID: session}
            if self.openinference:
                found[Attr.OI_SPAN_KIND] = "LLM"
                found[Attr.LLM_MODEL_NAME] = model
                if provider:
                    found[Attr.LLM_PROVIDER] = provider
                    found[Attr.LLM_SYSTEM] = provider
            if scopes:
                found.update(self._scope_span_attributes(scopes))
            if provider:
                found[Attr.PROVIDER] = provider
            if max_tokens:
                found[Attr.REQUEST_MAX_TOKENS] = max_tokens
            with self._lock:
                if len(self._start_attrs) >= 4096:
                    self._start_attrs.clear()
                self._start_attrs[key] = found
        return found

    def chat_start(self, run_id: UUID, parent_run_id: UUID | None, *, model: str,
                   provider: str | None, max_tokens: int | None, session: str,
                   messages: Iterable[Any] | None = None,
                   attributes: Mapping[str, str] | None = None) -> None:
        """``attributes``: the call's scope values (user, team, feature...). A run that
        has its span already (the callback and the middleware both telling this
        telemetry) keeps it."""
        if run_id in self._chats:
            return
        span: Span | None = None
        if self._tracing:
            parent = self._anchor.get(parent_run_id) if parent_run_id is not None else None
            ctx = trace.set_span_in_context(parent) if parent is not None else None
            start = self._chat_start_attributes(model, provider, max_tokens, session,
                                                attributes)
            if self.capture_content and messages is not None:
                start = {**start, **_content_attributes(_input_content, messages)}
            span = self.tracer.start_span("chat " + model, context=ctx,
                                          kind=SpanKind.CLIENT, attributes=start)
            if not span.is_recording():  # sampled out: nothing to describe
                span = None
        with self._lock:
            self._chats[run_id] = (span, model, attributes)

    def refused(self, run_id: UUID, exc: BaseException) -> None:
        with self._lock:
            span = self._spans.pop(run_id, None)
            self._anchor.pop(run_id, None)
            chat = self._chats.pop(run_id, None)
        if chat is not None:
            span = chat[0]
        if span is None:
            return
        span.add_event("agent_guard.refusal", {"agent_guard.reason": type(exc).__name__,
                                               "agent_guard.message": str(exc)[:500]})
        span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        span.end()

    def chat_end(self, run_id: UUID, record: CallRecord | None,
                 finish_reasons: list[str] | None = None,
                 breakdown: tuple[Decimal, Decimal] | None = None,
                 output: Iterable[Any] | None = None) -> None:
        """``output``: the messages the model returned, one per choice (recorded only
        with ``capture_content``)."""
        with self._lock:
            chat = self._chats.pop(run_id, None)
        if chat is None:
            return
        span, model, scopes = chat
        if record is not None and self._metering:
            self._measure(record)
        if span is None:
            return
        if self.capture_content and output is not None:
            span.set_attributes(_content_attributes(_output_content, output, finish_reasons))
        if record is None:
            if finish_reasons:
                span.set_attribute(Attr.FINISH_REASONS, finish_reasons)
            span.end()
            return
        u = record.usage
        inp, out = u.input_tokens, u.output_tokens
        cost = record.cost_nano / 1e9
        # one dict literal, amounts as floats straight from integer nano-USD (n / 1e9 is
        # the correctly rounded double, as float(Decimal(n) / 10**9) is)
        attrs: dict[str, Any] = {
            Attr.RESPONSE_MODEL: record.model, Attr.INPUT_TOKENS: inp,
            Attr.OUTPUT_TOKENS: out, Attr.ESTIMATED: record.usage_estimated,
            Attr.OUTCOME: record.outcome, Attr.RESERVED_USD: record.reserved_nano / 1e9,
            Attr.CACHE_HIT: record.outcome == "cache_hit"}
        for name in self.cost_attributes:
            attrs[name] = cost
        if self.openinference:
            attrs[Attr.LLM_TOKENS_PROMPT] = inp
            attrs[Attr.LLM_TOKENS_COMPLETION] = out
            attrs[Attr.LLM_TOKENS_TOTAL] = inp + out
            attrs[Attr.LLM_COST_TOTAL] = cost
            if record.model != model:  # the start wrote the requested one
                attrs[Attr.LLM_MODEL_NAME] = record.model
        # token details only when there are some: a 0 says nothing more than no
        # attribute, and each attribute costs the SDK some 6k instructions per call
        if u.cache_read_tokens or u.cache_creation_tokens or u.reasoning_tokens:
            attrs.update(self._token_details(u))
        if breakdown is not None and self._llm_cost:
            attrs[Attr.LLM_COST_PROMPT] = _usd(breakdown[0])
            attrs[Attr.LLM_COST_COMPLETION] = _usd(breakdown[1])
        if record.saved_nano:
            attrs[Attr.SAVED_USD] = record.saved_nano / 1e9
        if record.tier:
            attrs[Attr.TIER] = record.tier
        if record.route:
            attrs[Attr.ROUTE] = record.route
        if finish_reasons:
            attrs[Attr.FINISH_REASONS] = finish_reasons
        if record.attributes and record.attributes is not scopes and (
                record.attributes != scopes):  # the start wrote the call's scopes
            attrs.update(self._scope_span_attributes(record.attributes))
        span.set_attributes(attrs)
        if record.route and ("downgraded" in record.route or "fallback" in record.route):
            span.add_event("agent_guard.downgrade", {Attr.TIER: record.tier or "",
                                                     Attr.ROUTE: record.route})
        if record.outcome in ("error", "aborted"):
            span.set_status(Status(StatusCode.ERROR, record.outcome))
        span.end()

    def _token_details(self, u: Any) -> dict[str, int]:
        """The cache-read, cache-write and reasoning counts a call has, under the GenAI
        names and (with ``openinference``) OpenInference's."""
        out: dict[str, int] = {}
        for value, name, oi_name in (
                (u.cache_read_tokens, Attr.CACHE_READ_TOKENS, Attr.LLM_TOKENS_CACHE_READ),
                (u.cache_creation_tokens, Attr.CACHE_CREATION_TOKENS,
                 Attr.LLM_TOKENS_CACHE_WRITE),
                (u.reasoning_tokens, Attr.REASONING_TOKENS, Attr.LLM_TOKENS_REASONING)):
            if value:
                out[name] = value
                if self.openinference:
                    out[oi_name] = value
        return out

    def _metric_attributes(self, record: CallRecord) -> _MetricAttrs:
        """(common, input-token, output-token) metric attributes of a model and the
        common ones as a hashable key, built once per (model, provider, tier, values of
        the ``metric_attributes`` scopes) and reused: the instruments only read them."""
        scopes = record.attributes
        values = tuple(scopes.get(k) for k in self.metric_attributes) if scopes else ()
        key = (record.model, record.provider, record.tier, values)
        found = self._metric_attrs.get(key)
        if found is None:
            common: dict[str, Any] = {Attr.OPERATION: "chat", Attr.REQUEST_MODEL: record.model}
            if record.provider:
                common[Attr.PROVIDER] = record.provider
            if record.tier:
                common[Attr.TIER] = record.tier
            for kind, value in zip(self.metric_attributes, values, strict=False):
                if value is not None:
                    common[scope_attribute(kind)] = value
            found = (common, {**common, Attr.TOKEN_TYPE: "input"},
                     {**common, Attr.TOKEN_TYPE: "output"}, tuple(sorted(common.items())))
            with self._lock:
                if len(self._metric_attrs) >= 4096:
                    self._metric_attrs.clear()
                self._metric_attrs[key] = found
        return found

    def _measure(self, record: CallRecord) -> None:
        common, input_attrs, output_attrs, key = self._metric_attributes(record)
        u = record.usage
        self.token_usage.record(u.input_tokens, input_attrs)
        self.token_usage.record(u.output_tokens, output_attrs)
        self.duration.record(max(0.0, record.ended_at - record.started_at), common)
        if record.cost_nano > 0:
            self._cost_sums.add(key, common, record.cost_nano)
        if record.saved_nano > 0:
            self._saved_sums.add(key, common, record.saved_nano)

    # -- tools --------------------------------------------------------------------------

    def _tool_attributes(self, name: str, call_id: str | None, hit: bool,
                         session: str | None, scopes: Mapping[str, str] | None
                         ) -> dict[str, Any]:
        attributes: dict[str, Any] = {Attr.OPERATION: "execute_tool", Attr.TOOL_NAME: name,
                                      Attr.CACHE_HIT: hit}
        if self.openinference:
            attributes[Attr.OI_SPAN_KIND] = "TOOL"
            attributes[Attr.OI_TOOL_NAME] = name
            if call_id:
                attributes[Attr.OI_TOOL_ID] = call_id
        if call_id:
            attributes[Attr.TOOL_CALL_ID] = call_id
        if session is not None:
            attributes[Attr.SESSION_ID] = attributes[Attr.CONVERSATION_ID] = session
        if scopes:
            attributes.update(self._scope_span_attributes(scopes))
        return attributes

    def tool_start(self, run_id: UUID, parent_run_id: UUID | None, name: str,
                   call_id: str | None, arguments: Any = None, *, session: str | None = None,
                   attributes: Mapping[str, str] | None = None) -> None:
        """``attributes``: the call's scope values (user, team, feature...)."""
        if not self._tracing:
            return
        parent = self._parent(parent_run_id)
        ctx = trace.set_span_in_context(parent) if parent is not None else None
        attributes = self._tool_attributes(name, call_id, False, session, attributes)
        if self.capture_content and arguments is not None:
            attributes.update(_content_attributes(_tool_content, Attr.TOOL_CALL_ARGUMENTS,
                                                  arguments))
        span = self.tracer.start_span(f"execute_tool {name}", context=ctx,
                                      kind=SpanKind.INTERNAL, attributes=attributes)
        with self._lock:
            self._spans[run_id] = span
            self._anchor[run_id] = span  # runs inside the tool (an agent) go under it

    def reanchor(self, run_id: UUID, under: UUID) -> None:
        """Runs started under ``run_id`` from now on go under ``under``'s span (a tool
        call run again: the runs inside the new run go under its span)."""
        with self._lock:
            self._anchor[run_id] = self._anchor.get(under)

    def tool_cache_hit(self, run_id: UUID, saved_nano: int) -> None:
        """The open tool run ``run_id`` was answered from agent-guard's result cache."""
        span = self._spans.get(run_id)
        if span is not None:
            span.set_attributes({Attr.CACHE_HIT: True,
                                 Attr.CACHE_SAVED_USD: saved_nano / 1e9})

    def cached_tool_call(self, name: str, call_id: str | None, saved_nano: int,
                         parent_run_id: UUID | None = None, *, arguments: Any = None,
                         result: Any = None, session: str | None = None,
                         attributes: Mapping[str, str] | None = None) -> None:
        """A tool call answered from the cache without running the tool (so no tool run
        exists for a callback to see): one finished ``execute_tool`` span for it, with
        its arguments and cached result when content is captured."""
        if not self._tracing:
            return
        parent = self._parent(parent_run_id)
        ctx = trace.set_span_in_context(parent) if parent is not None else None
        attributes = self._tool_attributes(name, call_id, True, session, attributes)
        attributes[Attr.CACHE_SAVED_USD] = saved_nano / 1e9
        if self.capture_content:
            if arguments is not None:
                attributes.update(_content_attributes(_tool_content, Attr.TOOL_CALL_ARGUMENTS,
                                                      arguments))
            if result is not None:
                attributes.update(_content_attributes(_tool_content, Attr.TOOL_CALL_RESULT,
                                                      result))
        self.tracer.start_span(f"execute_tool {name}", context=ctx, kind=SpanKind.INTERNAL,
                               attributes=attributes).end()

    def tool_end(self, run_id: UUID, error: BaseException | None = None,
                 result: Any = None, record: CallRecord | None = None, *,
                 keep_anchor: bool = False) -> None:
        """End a tool's span; a priced call's ``record`` gives it the cost attributes of
        a model call's span (what it cost, what was reserved, whether estimated).
        ``keep_anchor``: runs started under ``run_id`` after this still have a parent
        (see :meth:`reanchor`), until a ``tool_end`` without it."""
        with self._lock:
            span = self._spans.pop(run_id, None)
            if not keep_anchor:
                self._anchor.pop(run_id, None)
        if span is None:
            return
        if record is not None and record.reserved_nano:
            cost = record.cost_nano / 1e9
            span.set_attributes({**dict.fromkeys(self.cost_attributes, cost),
                                 Attr.RESERVED_USD: record.reserved_nano / 1e9,
                                 Attr.ESTIMATED: record.usage_estimated,
                                 Attr.OUTCOME: record.outcome})
            if record.cost_nano > 0:  # the agent_guard.cost counter sums tools too
                common = {Attr.OPERATION: "execute_tool", Attr.TOOL_NAME: record.tool or ""}
                self._cost_sums.add(tuple(sorted(common.items())), common, record.cost_nano)
        if self.capture_content and result is not None:
            span.set_attributes(_content_attributes(_tool_content, Attr.TOOL_CALL_RESULT,
                                                    getattr(result, "content", result)))
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        span.end()

    def on_threshold(self, event: Any) -> None:
        """A :class:`~agent_guard.engine.guard.ThresholdEvent` as an event on the open root span
        of its session (give this to ``Guard(on_threshold=[...])``)."""
        with self._lock:
            roots = [self._spans[r] for r, s in self._roots.items()
                     if s == event.session and r in self._spans]
        attributes = {"agent_guard.dimension": event.dimension,
                      "agent_guard.threshold": float(event.threshold),
                      "agent_guard.spent": int(event.spent), "agent_guard.cap": int(event.cap)}
        for span in roots[:1] or [trace.get_current_span()]:
            span.add_event("agent_guard.threshold", attributes)

    def root_session(self, run_id: UUID) -> str | None:
        return self._roots.get(run_id)

    def traces(self, run_id: UUID | None) -> bool:
        """True when ``run_id`` is a run this telemetry follows (a callback handler with
        it saw the run start): its spans are the handler's to make."""
        return run_id is not None and self._anchor.get(run_id) is not None

    @property
    def tracing(self) -> bool:
        """False when the tracer provider records nothing (no span work to do)."""
        return self._tracing

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Export what is buffered now. False when a provider could not finish in
        ``timeout_s`` or, for telemetry set up by :func:`configure_otlp`, when an export
        failed since the previous flush (the failure itself is logged)."""
        ok = True
        for provider in (self._tracer_provider or trace.get_tracer_provider(),
                         self._meter_provider or metrics_api.get_meter_provider()):
            force_flush = getattr(provider, "force_flush", None)
            if callable(force_flush):
                ok = force_flush(int(timeout_s * 1000)) is not False and ok
        if self.export_status is not None:
            ok = self.export_status.take_ok() and ok
        return ok

    def open_spans(self) -> int:
        """Spans started and not yet ended (should be 0 between runs)."""
        return len(self._spans) + len(self._chats)


_EXPORTERS = ("otlp", "console", "none")


def exporter_names(variable: str, switch: bool | None, *,
                   environ: Mapping[str, str] | None = None) -> list[str]:
    """The exporters ``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER`` ask for, as the
    OpenTelemetry SDK reads them (a comma-separated list; ``otlp`` when unset; ``none``
    for nothing), overridden by an explicit ``switch``: ``False`` exports nothing,
    ``True`` exports even when the variable says ``none`` (by OTLP then)."""
    env = os.environ if environ is None else environ
    raw = env.get(variable)
    names = [n.strip().lower() for n in (raw or "otlp").split(",") if n.strip()]
    for name in names:
        if name not in _EXPORTERS:
            raise ValueError(
                f"{variable}={raw!r}: configure_otlp sets up otlp, console or none "
                f"(comma-separated); install your own providers for {name!r}")
    names = [n for n in dict.fromkeys(names) if n != "none"]
    if switch is False:
        return []
    if switch is True and not names:
        return ["otlp"]
    return names


class ExportStatus:
    """What the exporters set up by :func:`configure_otlp` have done: each failure is
    logged once per failing streak (``WARNING`` on logger ``agent_guard``), naming the
    signal, the endpoint, the collector's answer and the usual fix."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.exported = {"traces": 0, "metrics": 0}
        self.failures = {"traces": 0, "metrics": 0}
        self.last_error: str | None = None
        self._failing: set[str] = set()
        self._failed_since_flush = False

    def note(self, signal: str, endpoint: str, ok: bool, items: int, reason: str) -> None:
        with self._lock:
            if ok:
                self.exported[signal] += items
                recovered = signal in self._failing
                self._failing.discard(signal)
            else:
                self.failures[signal] += 1
                self._failed_since_flush = True
                first = signal not in self._failing
                self._failing.add(signal)
                self.last_error = f"{signal} to {endpoint}: {reason}"
        if ok:
            if recovered:
                logger.warning("agent-guard: %s export to %s works again", signal, endpoint)
            return
        if first:
            hint = ("the collector may take traces only (Phoenix, Jaeger): pass "
                    "configure_otlp(metrics=False) or set OTEL_METRICS_EXPORTER=none"
                    if signal == "metrics" else
                    "is the collector running there, and does it take OTLP/HTTP?")
            lost = f"; {items} spans lost" if signal == "traces" else ""
            logger.warning("agent-guard: %s export to %s failed (%s)%s; %s",
                           signal, endpoint, reason, lost, hint)

    def take_ok(self) -> bool:
        """True when no export failed since the last call."""
        with self._lock:
            ok = not self._failed_since_flush
            self._failed_since_flush = False
            return ok


def _reason(result: Any) -> str:
    if result is None:
        return "no answer"
    status, why, error = (getattr(result, "status_code", None), getattr(result, "reason", None),
                          getattr(result, "error", None))
    if status is not None:
        return f"HTTP {status} {why or ''}".strip()
    return str(error or why or "no answer")


def _watched(exporter: Any, signal: str, status: ExportStatus, count: Callable[[Any], int]
             ) -> Any:
    """``exporter`` whose exports report to ``status`` (the collector's answer is read
    from the OTLP/HTTP client when it has one)."""
    endpoint = str(getattr(exporter, "_endpoint", "") or "the collector")
    client = getattr(exporter, "_client", None)
    answers: list[Any] = []
    send = getattr(client, "export", None)
    if callable(send):
        def export_and_keep(data: Any, *args: Any, **kwargs: Any) -> Any:
            result = send(data, *args, **kwargs)
            answers[:] = [result]
            return result
        with contextlib.suppress(AttributeError):
            client.export = export_and_keep  # type: ignore[union-attr]
    export = exporter.export

    def watched_export(batch: Any, *args: Any, **kwargs: Any) -> Any:
        answers.clear()
        result = export(batch, *args, **kwargs)
        ok = getattr(result, "name", "") == "SUCCESS"
        status.note(signal, endpoint, ok, count(batch),
                    "" if ok else _reason(answers[0] if answers else None))
        return result

    exporter.export = watched_export
    return exporter


def _metric_batch_size(data: Any) -> int:
    return 1


def configure_otlp(endpoint: str | None = None, *, service_name: str | None = None,
                   project: str | None = None, metrics: bool | None = None,
                   traces: bool | None = None,
                   resource_attributes: Mapping[str, Any] | None = None,
                   metrics_interval_s: float = 10.0, **telemetry_options: Any
                   ) -> GuardTelemetry:
    """Export a guard's spans and metrics over OTLP/HTTP (Jaeger, Phoenix, Langfuse, an
    OpenTelemetry Collector...), set up from the standard variables as the SDK would.

    - ``endpoint``: the collector's base URL (``http://localhost:4318``); ``None`` lets
      ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_{TRACES,METRICS}_ENDPOINT``
      and the other ``OTEL_EXPORTER_OTLP_*`` variables decide.
    - ``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER``: ``otlp`` (default),
      ``console`` or ``none``. ``metrics=False`` / ``traces=False`` turn a signal off
      whatever they say; a traces-only collector (Phoenix, Jaeger) wants
      ``metrics=False``.
    - The resource: ``OTEL_RESOURCE_ATTRIBUTES`` and ``OTEL_SERVICE_NAME`` are read;
      ``service_name`` (else ``agent-guard`` when neither names one) and
      ``resource_attributes`` are added over them; ``project`` (else
      ``PHOENIX_PROJECT_NAME``) is the Phoenix project (``openinference.project.name``).
    - A failed export is logged once per failing streak, with the collector's answer;
      ``telemetry.flush()`` returns False after one.

    Global providers are installed only if the application has none (an application
    that set up OpenTelemetry keeps its own). Other keyword arguments go to
    :class:`GuardTelemetry` (``metric_attributes``, ``capture_content``...).
    """
    from opentelemetry.sdk.resources import Resource

    trace_exporters = exporter_names("OTEL_TRACES_EXPORTER", traces)
    metric_exporters = exporter_names("OTEL_METRICS_EXPORTER", metrics)
    for signal, names in (("TRACES", trace_exporters), ("METRICS", metric_exporters)):
        if "otlp" in names:
            _check_protocol(signal)
    attributes: dict[str, Any] = dict(resource_attributes or {})
    if service_name is not None:
        attributes["service.name"] = service_name
    elif not os.environ.get("OTEL_SERVICE_NAME") and "service.name=" not in (
            os.environ.get("OTEL_RESOURCE_ATTRIBUTES") or ""):
        attributes.setdefault("service.name", "agent-guard")
    project = project or os.environ.get("PHOENIX_PROJECT_NAME")
    if project:
        attributes[PROJECT_NAME] = project
    resource = Resource.create(attributes)
    base = endpoint.rstrip("/") if endpoint else None
    status = ExportStatus()

    tracer_provider: Any = trace.NoOpTracerProvider()
    if trace_exporters:
        tracer_provider = trace.get_tracer_provider()
        if not _is_sdk(tracer_provider, "trace"):
            tracer_provider = _tracer_provider(resource, trace_exporters, base, status)
            trace.set_tracer_provider(tracer_provider)
    meter_provider: Any = metrics_api.NoOpMeterProvider()
    if metric_exporters:
        meter_provider = metrics_api.get_meter_provider()
        if not _is_sdk(meter_provider, "metrics"):
            meter_provider = _meter_provider(resource, metric_exporters, base, status,
                                             metrics_interval_s)
            metrics_api.set_meter_provider(meter_provider)
    telemetry = GuardTelemetry(tracer_provider, meter_provider, **telemetry_options)
    telemetry.export_status = status
    return telemetry


def _check_protocol(signal: str) -> None:
    """configure_otlp exports OTLP over HTTP with protobuf; refuse a variable asking for
    another protocol rather than send HTTP to a gRPC port."""
    for variable in (f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        value = (os.environ.get(variable) or "").strip()
        if value:
            if value.lower() != "http/protobuf":
                raise ValueError(
                    f"{variable}={value!r}: configure_otlp exports OTLP over HTTP "
                    "(http/protobuf, port 4318); for gRPC set up your own providers with "
                    "the gRPC exporter and pass them to GuardTelemetry")
            return


def _is_sdk(provider: Any, signal: str) -> bool:
    if signal == "trace":
        from opentelemetry.sdk.trace import TracerProvider
        return isinstance(provider, TracerProvider)
    from opentelemetry.sdk.metrics import MeterProvider
    return isinstance(provider, MeterProvider)


def _tracer_provider(resource: Any, names: list[str], base: str | None,
                     status: ExportStatus) -> Any:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )

    provider = TracerProvider(resource=resource)
    for name in names:
        if name == "console":
            provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
            continue
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=f"{base}/v1/traces" if base else None)
        provider.add_span_processor(BatchSpanProcessor(
            _watched(exporter, "traces", status, len)))
    return provider


def _meter_provider(resource: Any, names: list[str], base: str | None,
                    status: ExportStatus, interval_s: float) -> Any:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import (
        ConsoleMetricExporter,
        PeriodicExportingMetricReader,
    )

    readers = []
    for name in names:
        if name == "console":
            exporter: Any = ConsoleMetricExporter()
        else:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter,
            )

            exporter = _watched(
                OTLPMetricExporter(endpoint=f"{base}/v1/metrics" if base else None),
                "metrics", status, _metric_batch_size)
        readers.append(PeriodicExportingMetricReader(
            exporter, export_interval_millis=int(interval_s * 1000)))
    return MeterProvider(resource=resource, metric_readers=readers)
