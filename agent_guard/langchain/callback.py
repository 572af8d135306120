"""``GuardCallbackHandler``: enforce a Guard from LangChain callbacks alone.

Add it to ``callbacks=[...]`` of any chat model, chain, agent or compiled
graph. It is a *sync* handler with ``raise_error=True`` on purpose: LangChain
swallows exceptions from async handlers called from sync code, while a sync
handler's exception propagates from both ``invoke`` and ``ainvoke`` (it runs
in an executor thread under ``ainvoke``).

- ``on_chat_model_start`` estimates the prompt, reserves the call's worst
  case and raises :class:`~agent_guard.errors.BudgetExceeded` when it does not
  fit: the provider is never contacted.
- ``on_llm_new_token`` counts streamed output and stops the stream once it
  passes what was reserved.
- ``on_llm_end`` settles from ``usage_metadata``; without usage it settles
  from its own count of the answer and marks the record as estimated.
- ``on_llm_error`` releases the hold only when the provider certainly did not
  bill (an HTTP status error, a connection never made); a timeout, a reset or a
  cancellation is charged the reserved worst case, marked estimated.
- ``on_tool_start`` counts a tool call, refusing before the tool runs.

Every reservation ends exactly once, also on the paths where LangChain skips
``on_llm_end``/``on_llm_error`` (cancellation, another handler's exception): an
open model run is ended when its parent run ends, or when the asyncio task or the
stack frame it ran in is gone (:mod:`agent_guard.engine.keeper`, which also renews the
hold of a call that runs longer than its lease). See docs/money-truth.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import sys
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, fields, replace
from types import FrameType
from typing import Any, cast
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler, BaseCallbackManager
from langchain_core.messages import BaseMessage
from langchain_core.outputs import LLMResult
from langchain_core.runnables.config import var_child_runnable_config

from .._frozen import fields_maker
from ..cache.result import CACHE_HIT_EVENT
from ..compat import (
    LANGCHAIN_DISPATCH_CORO_NAMES,
    LANGCHAIN_GATHERED_START_CORO_NAMES,
    LANGCHAIN_MODEL_CODE_DIR,
    LANGCHAIN_SHIELDED_CORO_NAMES,
    STREAM_STEP_CORO_NAMES,
)
from ..context import named_session, session_from_metadata
from ..engine.admission import Admission, ModelCall, ToolAdmission
from ..engine.budgets import Budgets, attributes_from_metadata, metadata_keys
from ..engine.guard import Guard
from ..engine.keeper import Watch, executing, keeper
from ..engine.limits import Limits
from ..engine.records import CallRecord, Outcome
from ..errors import GuardError, OutputCapExceeded
from ..ledger import Ledger
from ..pricing.tools import declared_price
from ..telemetry.langsmith import note_tool_cost
from .call import (
    OWNER,
    annotate,
    annotate_message,
    client_retries,
    cost_breakdown,
    failed_before_running,
    max_output,
    model_name,
    owning_gate,
    read_answer,
    retried,
    tool_owned,
    tool_result,
    tool_run_frame,
)
from .dispatch import dispatching_async_end, ends_inline, go_first

# _start builds a ModelCall with its fields by position, in this order
_MODEL_CALL_FIELDS = ("session", "model", "provider", "messages", "tools", "max_output_tokens",
                      "input_tokens", "run_id", "node", "tags", "can_shrink", "tier", "route",
                      "attributes", "params", "attempts")
if tuple(f.name for f in fields(ModelCall)) != _MODEL_CALL_FIELDS or hasattr(
        ModelCall, "__post_init__"):  # pragma: no cover
    raise ImportError("agent_guard.langchain.callback: ModelCall's fields changed; update "
                      "_MODEL_CALL_FIELDS and GuardCallbackHandler._start")
# ModelCall has no __post_init__, so its fields_maker builds the same object as its
# __init__, without type.__call__ and with one class switch instead of two
_new_call = fields_maker(ModelCall)

try:  # uuid-utils: a UUID whose __str__ is Rust's (same text as uuid.UUID's)
    from uuid_utils import UUID as _RustUUID

    _uuid_text: Callable[[int], Any] | None = _RustUUID.from_int  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - langchain-core depends on it
    _uuid_text = None

__all__ = ["GuardCallbackHandler", "OutputCapExceeded", "session_from_metadata"]

logger = logging.getLogger("agent_guard")

# How many open model runs a handler remembers; beyond, the oldest is ended as abandoned
_MAX_OPEN_RUNS = 10_000
# how far up from the handler a sync stream's generator frame is looked for (see _making)
_STREAM_EVENT_DEPTH = 16
# How many chain/tool runs (for their parent links) and refused batches it remembers
_MAX_PARENTS = 10_000
_MAX_REFUSED_BATCHES = 1024
# LangChain's chat and LLM model code: the frame a synchronous model call runs in
_MODEL_CODE_DIR = LANGCHAIN_MODEL_CODE_DIR
# The asyncio task that dispatched a callback event (see GuardCallbackHandler.run_inline)
_CALLING_TASK: ContextVar[Any] = ContextVar("agent_guard_calling_task", default=None)
# LangChain's own dispatch tasks, and the tasks that step a stream once (a stream read
# by RunnableParallel.astream or a wait_for per chunk), which are not the task the model
# call runs in: a call first seen in one keeps the task noted before (its caller's),
# else is watched by its streamed chunks
_DISPATCH_CORO_NAMES = (LANGCHAIN_DISPATCH_CORO_NAMES | LANGCHAIN_SHIELDED_CORO_NAMES
                        | STREAM_STEP_CORO_NAMES)


class _Run(Watch):
    """An open model run (a plain slotted object: one is made per guarded call). It is
    also the lease keeper's watch of the run (no other object per call): its ``guard``,
    ``admission`` and liveness (``task``, ``thread_id``, ``frame``) are the keeper's,
    and :meth:`stopped` is what the keeper calls when the run's call is gone."""

    __slots__ = ("asked", "batch", "first_chunk", "handler", "parent", "planned", "run_id",
                 "started", "stream", "streamed_texts", "streamed_tokens",
                 "streamed_unscaled", "timeout")

    def __init__(self, handler: GuardCallbackHandler, run_id: UUID, admission: Admission,
                 parent: UUID | None, batch: Any, started: float, timeout: float | None,
                 planned: bool, asked: Any) -> None:
        self.handler = handler
        self.run_id = run_id
        self.admission = admission
        # the prompt object LangChain dispatched the start with: one request's start
        # reaching this handler twice (listed twice) passes the same object
        self.asked = asked
        # the handler's guard planned the admission (not joined: its price is the guard's)
        self.planned = planned
        self.streamed_tokens = 0  # streamed output as charged (tokenizer factor applied)
        self.streamed_unscaled = 0  # the same, counted without the factor
        self.parent = parent
        # the invocation_params object every prompt of one generate() shares (kept, so
        # its id stays unique while the run is open), or None for a single prompt
        self.batch = batch
        self.started = started  # time.monotonic()
        self.timeout = timeout  # the client's read timeout, for retried attempts
        self.first_chunk = 0.0  # time.monotonic() of the first streamed chunk, 0 before
        # what was streamed, for an exact count when the per-chunk sum passes the cap
        self.streamed_texts: list[str] = []
        # the keeper's fields (see Watch; GuardCallbackHandler._watch sets the liveness;
        # the handler is the keeper's source of its open runs: nothing else registers it)
        self.guard = guard = handler.guard
        self.on_stop = None
        self.task = None
        self.thread_id = None
        self.frame = None
        # a sync stream's generator frame (not liveness: suspended between chunks), to
        # tell its chunks and end from another request's given the same run id
        self.stream: FrameType | None = None
        self.touched = False
        self.renew_at = started + guard.limits.lease_seconds / 3
        self._renewed = None

    def stopped(self) -> None:
        self.handler._stopped(self.run_id, self)


# streamed content blocks whose text is generated output (tool-call blocks are counted
# from the chunk's tool_call_chunks, once)
_TEXT_BLOCK_KEYS = {"text": "text", "output_text": "text", "refusal": "refusal",
                    "thinking": "thinking", "reasoning": "reasoning"}


def _streamed_texts(message: Any, token: Any) -> list[str]:
    """The generated text of one streamed chunk, in every content shape: a plain string,
    content blocks (text, refusal, reasoning with its summary, Anthropic thinking), and
    reasoning that providers put beside the content (``reasoning_content``)."""
    content = getattr(message, "content", None) if message is not None else token
    texts: list[str] = []
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for block in content:
            if isinstance(block, str):
                texts.append(block)
            elif isinstance(block, Mapping):
                texts.extend(_block_texts(block))
    extra = getattr(message, "additional_kwargs", None) or {}
    if isinstance(extra.get("reasoning_content"), str):  # DeepSeek, vLLM, OpenRouter...
        texts.append(extra["reasoning_content"])
    if isinstance(extra.get("reasoning"), Mapping):  # Responses API, output_version v0
        texts.extend(_block_texts({**extra["reasoning"], "type": "reasoning"}))
    return texts


def _block_texts(block: Mapping[str, Any]) -> list[str]:
    kind = block.get("type")
    key = _TEXT_BLOCK_KEYS.get(kind) if isinstance(kind, str) else None
    texts = []
    if key is not None and isinstance(block.get(key), str):
        texts.append(block[key])
    if kind == "reasoning":  # the Responses API's summary parts
        for part in block.get("summary") or ():
            if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                texts.append(part["text"])
    return texts


@dataclass(frozen=True, slots=True)
class _Tool:
    """A tool run between its start and end, for its usage record."""

    session: str
    name: str
    started_at: float
    attributes: Mapping[str, str]
    node: str | None
    tags: tuple[str, ...]
    cache_hit: bool = False  # a cached_tool answered from its cache (CACHE_HIT_EVENT)
    saved_nano: int = 0
    admission: ToolAdmission | None = None  # holds a priced tool's worst case
    metadata: dict[str, Any] | None = None  # the run's metadata (LangSmith reads its cost)
    handlers: list[Any] | None = None  # the run's handlers (its tracers keep its run)


class GuardCallbackHandler(BaseCallbackHandler):
    """Enforces a :class:`~agent_guard.Guard` on every model and tool call it sees.

    Give it a ``guard``, or ``limits`` and ``ledger`` to build one. The
    session is the LangGraph ``thread_id`` of the run, else
    ``config["metadata"]["session_id"]``, else ``session_id`` given here.
    ``telemetry`` (a :class:`~agent_guard.telemetry.GuardTelemetry`) turns the
    runs it sees into OpenTelemetry spans and metrics. With ``annotate_runs``
    (default) each answer's ``usage_metadata`` gets ``input_cost``,
    ``output_cost`` and ``total_cost`` (what LangSmith shows as the run's cost)
    and its ``response_metadata["agent_guard"]`` the session, tier and cap;
    put this handler before any LangSmith tracer in ``callbacks``.
    """

    raise_error: bool = True
    # set on the handler guarded_graph adds; it stands down for a per-run handler
    _graph_default: bool = False
    # what BaseCallbackHandler's properties answer, as plain class attributes: LangChain
    # reads one per event it dispatches (a property is a Python call each time)
    ignore_llm = ignore_chat_model = ignore_chain = ignore_agent = False
    ignore_retriever = ignore_retry = ignore_custom_event = False

    @property  # LangChain declares a plain attribute; a property reads the moment it is read
    def run_inline(self) -> bool:  # type: ignore[override]
        """False: on async paths the handler runs in an executor thread, off the loop
        (``on_llm_end`` says True and still runs in a thread: it writes the cost
        before LangSmith's tracer reads the answer, see :mod:`.dispatch`).

        LangChain's async dispatch reads this attribute in the task that makes the
        call, just before it copies the context for the executor; the handler notes
        that task there, so a call cancelled with its task (``asyncio.wait_for``, a
        stream closed early, a failed sibling branch), whose end callbacks never come,
        is still ended (``agent_guard.engine.keeper``)."""
        _note_calling_task()
        return dispatching_async_end()

    def __init__(
        self,
        guard: Guard | None = None,
        *,
        limits: Limits | Budgets | None = None,
        ledger: str | Ledger | None = None,
        session_id: str | None = None,
        count_tools: bool = True,
        telemetry: Any = None,
        annotate_runs: bool = True,
    ) -> None:
        super().__init__()
        if guard is None:
            guard = Guard(limits=limits, ledger=ledger if ledger is not None else "memory://")
        elif limits is not None or ledger is not None:
            raise ValueError("pass either guard=... or limits=/ledger=..., not both")
        self.guard = guard
        self.session_id = session_id
        self.count_tools = count_tools
        self.telemetry = telemetry  # agent_guard.telemetry.GuardTelemetry, optional
        self.annotate_runs = annotate_runs
        # open model runs by their run id's int: a UUID's own hash is a Python call
        # (uuid.UUID.__hash__ hashes its int), an int's is not; a run id that is no
        # UUID (LangChain always passes one) is its own key (see _run_key)
        self._runs: dict[Any, _Run] = {}
        # further requests started with a run id open already (a config with a run_id
        # reused by two callers at once): run key -> those runs, each admitted on its own
        self._twins: dict[Any, list[_Run]] = {}
        self._lock = threading.Lock()
        # open Runnable.with_fallbacks runs -> the refusal raised inside (or None): the
        # fallback model of a refused call is refused the same way
        self._fallback_runs: OrderedDict[UUID, GuardError | None] = OrderedDict()
        # chain runs (and nested with_fallbacks runs) inside an open with_fallbacks run
        self._inside_fallbacks: OrderedDict[UUID, UUID] = OrderedDict()
        self._tools: OrderedDict[UUID, _Tool] = OrderedDict()
        # chain and tool runs -> their parent run, to end the model runs under a run
        # that ended; generate() batches one of whose prompts was refused
        self._parents: OrderedDict[UUID, UUID | None] = OrderedDict()
        self._refused_batches: OrderedDict[int, tuple[Any, GuardError]] = OrderedDict()
        # whether the lease keeper reads the open runs from here now (open_watches: no
        # watch per run; see engine.keeper)
        self.kept = False
        # the metadata keys that can carry one of the guard's scope attributes
        self._scope_keys = metadata_keys(guard.attribute_names)

    # -- model calls -------------------------------------------------------------

    def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._start(serialized, run_id, parent_run_id, tags, metadata, kwargs,
                    messages[0] if len(messages) == 1 else
                    [m for prompt in messages for m in prompt])

    def _start(self, serialized: dict[str, Any] | None, run_id: UUID,
               parent_run_id: UUID | None, tags: list[str] | None,
               metadata: dict[str, Any] | None, kwargs: Mapping[str, Any],
               messages: list[Any] | None = None, prompts: list[str] | None = None) -> None:
        """Describe the call, ask the guard (raising on a refusal), remember the run."""
        params: Mapping[str, Any] = kwargs.get("invocation_params") or {}
        meta = metadata or {}
        model = model_name(params, meta, serialized)
        tries, timeout = client_retries(serialized)
        # session_from_metadata(meta, self.session_id) without its two calls in the
        # common cases: a non-empty str thread_id (LangGraph), or neither key and the
        # handler's own non-empty str session; anything else is read the general way
        session = meta.get("thread_id")
        if type(session) is not str or not session:
            default = self.session_id
            session = default if session is None and "session_id" not in meta and \
                type(default) is str and default else session_from_metadata(meta, default)
        # ModelCall's fields in order, passed by position: binding 16 keywords cost as much
        # as the rest of building it (the order is checked when this module loads)
        call = _new_call(
            session,  # session
            model,  # model
            meta.get("ls_provider"),  # provider
            messages or (),  # messages
            params.get("tools") or None,  # tools
            max_output(params, meta),  # max_output_tokens
            None if prompts is None else sum(  # input_tokens
                self.guard.tokens.count_text(p, model) for p in prompts),
            _run_id_text(run_id),  # run_id: str(run_id)
            meta.get("langgraph_node"),  # node
            tuple(tags or ()),  # tags
            False,  # can_shrink
            meta.get("agent_guard_tier"),  # tier
            meta.get("agent_guard_route"),  # route
            # attributes_from_metadata(meta, names), its common case without its call:
            # no metadata key can carry a scope value (_scope_keys: the guard's names')
            {} if self._scope_keys.isdisjoint(meta) else  # attributes
            attributes_from_metadata(meta, self.guard.attribute_names),
            params,  # params
            tries,  # attempts
        )
        batch_size = kwargs.get("batch_size")
        batch = params if isinstance(batch_size, int) and batch_size > 1 else None
        if self.telemetry is not None:
            self.telemetry.chat_start(
                run_id, parent_run_id, model=model, provider=call.provider,
                max_tokens=call.max_output_tokens, session=call.session,
                messages=(messages if messages is not None else prompts)
                if self.telemetry.capture_content else None, attributes=call.attributes)
        # (OWNER is looked at first: no middleware runs the call in most runs)
        gate = owning_gate(self.guard) if messages is not None and OWNER.get() is not None \
            else None
        try:
            if batch is not None:
                self._raise_if_batch_refused(batch)
            if gate is not None:  # GuardMiddleware admitted this call: join it
                admission = gate.admission_for(run_id, serialized, messages, params, meta)
            else:
                # most runs are inside no with_fallbacks run: one test, no call
                fallbacks = self._refuse_inside_refused_fallbacks(parent_run_id) \
                    if self._fallback_runs else None
                try:
                    admission = self.guard.before_model_call(call)
                    if admission.call is not call and call.messages and \
                            admission.call.messages is not call.messages:
                        # it joined the open request of its run id, which LangChain
                        # started with another prompt object: another request given the
                        # same run id (see _another_request), admitted on its own
                        call = replace(call, run_id=None)
                        admission = self.guard.before_model_call(call)
                except GuardError as exc:
                    self._fallbacks_refused(fallbacks, exc)
                    raise
        except GuardError as exc:
            if self.telemetry is not None:
                self.telemetry.refused(run_id, exc)
            if batch is not None:
                self._refuse_batch(batch, exc)
            raise
        run = _Run(self, run_id, admission, parent_run_id, batch, time.monotonic(), timeout,
                   admission.call is call, messages if messages is not None else prompts)
        refused: tuple[Any, GuardError] | None = None
        dropped: list[tuple[UUID, _Run]] = []
        try:  # _run_key(run_id) inline (a try costs nothing when nothing is raised)
            key: Any = run_id.int
        except AttributeError:
            key = run_id
        # acquire/release in a try/finally, not `with` (~1k instructions fewer: no
        # __enter__/__exit__ lookups and calls); as exception-safe
        lock = self._lock
        lock.acquire()
        try:
            if batch is not None:
                refused = self._refused_batches.get(id(batch))
            if refused is None:
                open_ = self._runs.setdefault(key, run)
                while len(self._runs) > _MAX_OPEN_RUNS:  # runs nothing ever ended
                    oldest = self._runs.pop(next(iter(self._runs)))
                    dropped.append((oldest.run_id, oldest))
        finally:
            lock.release()
        for old_id, old in dropped:
            self._end_abandoned(old_id, old)
        if refused is not None:  # a sibling prompt was refused meanwhile: never sent
            self.guard.model_call_failed(admission)
            raise refused[1]
        if open_ is not run and not self._another_request(key, run, open_, call):
            return  # the same request, seen again: one run
        self._watch(run_id, run)
        if not self.kept:  # (after the run is in _runs: see LeaseKeeper._let_go)
            keeper.keep(self)

    def _another_request(self, key: Any, run: _Run, open_: _Run, call: ModelCall) -> bool:
        """``run``'s id is open already (``open_``). The same request when LangChain
        dispatched the same prompt object (this handler listed twice): False, one run.
        Else another request given the same run id (a config with a ``run_id`` reused
        while its first call runs), admitted on its own (a chat prompt already was, see
        _start; a text prompt joined the first's admission, and two bills would meet one
        charge: admitted again, its refusal raised), kept beside the first (True)."""
        if run.asked is open_.asked:
            return False
        if run.admission is open_.admission:
            try:
                run.admission = self.guard.before_model_call(replace(call, run_id=None))
            except GuardError as exc:
                if self.telemetry is not None:
                    self.telemetry.refused(run.run_id, exc)
                raise
            run.planned = True
        with self._lock:
            self._twins.setdefault(key, []).append(run)
        return True

    # -- every run ends once ---------------------------------------------------------

    @property
    def open_runs(self) -> int:
        """Model runs this handler holds a reservation for now (0 once a run is over)."""
        with self._lock:
            return self.open_count()

    def open_watches(self) -> list[_Run]:
        """The open runs, for the lease keeper (this handler is its source of them)."""
        with self._lock:
            runs = list(self._runs.values())
            for twins in self._twins.values() if self._twins else ():
                runs += twins
            return runs

    def open_count(self) -> int:
        if self._twins:
            return len(self._runs) + sum(len(twins) for twins in self._twins.values())
        return len(self._runs)

    def forked(self) -> None:
        """In a forked child (the keeper's at-fork hook, one thread: no lock): the open
        runs and tool calls are the parent's, not this process's to renew, end or count
        as open; the child's copy lets go of them (kept, a parent's run that nothing in
        the child ever ends would hold this handler as the child keeper's source, polled
        for the rest of the child's life). The parent ends and charges them. The lock
        is a new one: another thread of the parent (the keeper reading the open runs)
        may have held it at the fork."""
        self._lock = threading.Lock()
        self._runs = {}
        self._twins = {}
        self._tools = OrderedDict()

    def _watch(self, run_id: UUID, run: _Run) -> None:
        """Tell the lease keeper (which reads this handler's open runs) how to tell the
        run is still running: the stack frame of a synchronous call, else the asyncio
        task of an async one."""
        # the frame of the synchronous model call this callback runs in (its generate or
        # stream), or None (an async call: the handler runs in an executor thread); the
        # frames below _watch's caller's caller (_watch, _start, on_chat_model_start) are
        # the handler's own (sys._getframe(3): one frame object made, not four)
        frame: FrameType | None
        try:
            # LangChain's sync dispatch: the chat model's generate() (or stream())
            # called CallbackManager.on_chat_model_start, which called handle_event:
            # the model frame is 5 up, looked at directly (one frame object made);
            # else it is the first of LangChain's model code from 3 up
            frame = sys._getframe(5)
            code = frame.f_code
            if _MODEL_CODE_DIR not in code.co_filename or code.co_name[0] == "<":
                frame = sys._getframe(3)
        except ValueError:  # a shorter stack
            try:
                frame = sys._getframe(3)
            except ValueError:  # nothing called the callback from Python
                frame = None
        # (not a comprehension's frame: on Python 3.11 BaseLLM.generate starts its runs
        # from a list comprehension, a frame of its own that is over at once)
        for _ in range(32):
            if frame is None:
                break
            code = frame.f_code
            if _MODEL_CODE_DIR in code.co_filename and code.co_name[0] != "<":
                break
            frame = frame.f_back
        else:
            frame = None
        if frame is not None:
            if not frame.f_code.co_flags & inspect.CO_GENERATOR:  # not a stream between chunks
                run.thread_id = threading.get_ident()
                run.frame = frame
            else:
                run.stream = frame
            return
        ref = _CALLING_TASK.get()
        task = ref() if ref is not None else None
        if task is None:
            if ref is not None:  # the task is gone already: the call cannot be running
                self._stopped(run_id, run)
            return
        # a task already done (another handler raised while this one was reserving)
        # cannot be running the call: the keeper ends the run on its next look
        run.task = task
        with contextlib.suppress(RuntimeError):  # a closed loop: the keeper polls anyway
            task.get_loop().call_soon_threadsafe(task.add_done_callback, _poke_keeper)

    def _stopped(self, run_id: UUID, run: _Run | None = None) -> None:
        """The keeper saw the run's call end or stop (``run``, else the run of
        ``run_id``): forget it; if nothing ended it, end it as abandoned."""
        key = _run_key(run_id)
        with self._lock:
            if key in self._twins:
                found = self._take_twin(key, self._runs.pop(key, None), run)
            elif run is None or self._runs.get(key) is run:
                found = self._runs.pop(key, None)
            else:
                found = None
        if found is not None:
            self._end_abandoned(run_id, found)

    def _take_twin(self, key: Any, first: _Run | None, run: _Run | None = None
                   ) -> _Run | None:
        """(lock held) Of the open runs of one run id (``first``, popped from the open
        runs, and its twins), take ``run``, else the one whose call this thread or task
        is making (:func:`_making`); the others stay open."""
        runs = ([first] if first is not None else []) + self._twins.pop(key)
        if run is None:
            run = _making(runs)
        elif run not in runs:
            run = None
        self._reopen(key, [r for r in runs if r is not run])
        return run

    def _reopen(self, key: Any, runs: list[_Run]) -> None:
        """(lock held) ``runs``, of one run id, are open (after the open run of ``key``,
        if any): the first in the open runs, the others its twins."""
        if runs and key not in self._runs:
            self._runs[key] = runs.pop(0)
        if runs:
            self._twins[key] = runs

    def _mine(self, key: Any, first: _Run | None) -> _Run | None:
        """The open run of ``key`` whose call this thread or task is making, left open
        (``first``, the one in the open runs, when the run id has no twins)."""
        with self._lock:
            twins = self._twins.get(key)
            if not twins:
                return first
            return _making(([first] if first is not None else []) + twins)

    def _end_abandoned(self, run_id: UUID, run: _Run) -> None:
        if run.admission.finished:
            return
        record = self.guard.model_call_abandoned(run.admission)
        if self.telemetry is not None:
            self.telemetry.chat_end(run_id, record)

    def _end_runs_under(self, parent: UUID) -> None:
        """A chain or tool run ended: the model runs under it that are still open never
        got their end callbacks (cancelled, or another handler raised). End them; but
        not a run whose call visibly goes on in another thread or task (a run id given
        to two runs at once, e.g. a config's ``run_id`` reused by two agent runs: the one
        that ended is not its parent; the lease keeper ends it if its end never comes)."""
        orphans: list[tuple[UUID, _Run]] = []
        with self._lock:
            if self._runs:
                for key, run in list(self._runs.items()):
                    if self._is_under(run.parent, parent) and not _elsewhere(run):
                        orphans.append((run.run_id, self._runs.pop(key)))
            for key in list(self._twins) if self._twins else ():
                left = []
                for run in self._twins.pop(key):
                    if self._is_under(run.parent, parent) and not _elsewhere(run):
                        orphans.append((run.run_id, run))
                    else:
                        left.append(run)
                self._reopen(key, left)
            self._parents.pop(parent, None)
        for rid, run in orphans:
            self._end_abandoned(rid, run)

    def _is_under(self, run: UUID | None, ancestor: UUID) -> bool:
        for _ in range(256):  # lock held; parent links are acyclic, bounded anyway
            if run is None:
                return False
            if run == ancestor:
                return True
            run = self._parents.get(run)
        return False

    def _note_parent(self, run_id: UUID, parent_run_id: UUID | None) -> None:
        if parent_run_id is None:
            return
        with self._lock:
            self._parents[run_id] = parent_run_id
            while len(self._parents) > _MAX_PARENTS:
                self._parents.popitem(last=False)

    def _raise_if_batch_refused(self, batch: Any) -> None:
        refused = self._refused_batches.get(id(batch))
        if refused is not None:
            raise refused[1]

    def _refuse_batch(self, batch: Any, exc: GuardError) -> None:
        """A prompt of a generate() with several was refused: the call raises before any
        prompt is sent, so the holds of its sibling prompts are released."""
        with self._lock:
            self._refused_batches[id(batch)] = (batch, exc)
            while len(self._refused_batches) > _MAX_REFUSED_BATCHES:
                self._refused_batches.popitem(last=False)
            siblings = [(key, run) for key, run in self._runs.items()
                        if run.batch is batch and run.streamed_tokens == 0]
            for key, _ in siblings:
                del self._runs[key]
        for _, run in siblings:
            self.guard.model_call_failed(run.admission)

    def _refuse_inside_refused_fallbacks(self, parent_run_id: UUID | None) -> UUID | None:
        """The open ``with_fallbacks`` run a run belongs to (or None); raises the refusal
        when a call inside it was refused: its fallbacks (a chain, a model, a function,
        a tool) never run instead of the refused call."""
        fallbacks = self._enclosing_fallbacks(parent_run_id)
        if fallbacks is not None:
            refused = self._fallback_runs.get(fallbacks)
            if refused is not None:
                raise refused
        return fallbacks

    def _fallbacks_refused(self, fallbacks: UUID | None, exc: GuardError) -> None:
        """A call inside ``fallbacks`` was refused: so is every fallback of it and of the
        ``with_fallbacks`` runs around it."""
        with self._lock:
            while fallbacks is not None and fallbacks in self._fallback_runs:
                if self._fallback_runs[fallbacks] is None:
                    self._fallback_runs[fallbacks] = exc
                fallbacks = self._inside_fallbacks.get(fallbacks)

    def _enclosing_fallbacks(self, parent_run_id: UUID | None) -> UUID | None:
        """The open ``with_fallbacks`` run a run belongs to, if any.

        ``with_fallbacks`` passes its caller's config to each runnable unchanged, so a
        fallback's parent is not the fallbacks run; the child config it sets in the
        context names it. A run deeper inside (a model in ``prompt | model``) finds it
        through its parent chain's entry in ``_inside_fallbacks``."""
        if not self._fallback_runs:
            return None
        if parent_run_id in self._fallback_runs:
            return parent_run_id
        config = var_child_runnable_config.get()
        manager = config.get("callbacks") if config else None
        context_parent = manager.parent_run_id if isinstance(
            manager, BaseCallbackManager) else None
        if context_parent in self._fallback_runs:
            return context_parent
        for run in (parent_run_id, context_parent):
            found = self._inside_fallbacks.get(run) if run is not None else None
            if found is not None and found in self._fallback_runs:
                return found
        return None

    def on_llm_start(
        self,
        serialized: dict[str, Any],
        prompts: list[str],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Legacy text-completion models: the prompt is plain text."""
        self._start(serialized, run_id, parent_run_id, tags, metadata, kwargs, prompts=prompts)

    def on_llm_new_token(
        self,
        token: str | list[str | dict[str, Any]],
        *,
        chunk: Any = None,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        run = self._runs.get(_run_key(run_id))
        if self._twins:  # (a run id given to two requests at once: see _another_request)
            run = self._mine(_run_key(run_id), run)
        if run is None:
            return
        if not run.first_chunk:
            run.first_chunk = time.monotonic()
        run.touched = True  # (the keeper's sign of life of a stream between chunks)
        model = run.admission.call.model
        # The chunk's message is what was streamed, whatever ``token`` is: a str, or
        # (``output_version="v1"``, the Responses API, Anthropic) a list of content blocks.
        message = getattr(chunk, "message", None)
        counter = self.guard.tokens
        texts = [text for text in _streamed_texts(message, token) if text]
        texts += [(tc.get("name") or "") + (tc.get("args") or "")
                  for tc in getattr(message, "tool_call_chunks", None) or ()]
        n = sum(counter.count_text_unscaled(text, model) for text in texts)
        if n == 0:
            return
        cap = run.admission.max_output_tokens
        with self._lock:
            run.streamed_texts += texts
            run.streamed_unscaled += n
            if run.streamed_unscaled > cap:
                # chunks counted apart split tokens (8 characters a chunk count ~1.5x the
                # text's tokens): past the cap, count what was streamed as one text
                run.streamed_unscaled = counter.count_text_unscaled(
                    "".join(run.streamed_texts), model)
            unscaled = run.streamed_unscaled
            # the tokenizer factor applies to the total, once (see TokenCounter.scale)
            run.streamed_tokens = streamed = counter.scale(unscaled, model)
        # Stop on the best count (no safety factor): a provider that honours max_tokens
        # is never cut short by the factor; what was streamed is charged with it.
        if unscaled > cap:
            call = run.admission.call
            raise OutputCapExceeded(
                session=call.session, scope=f"call:{call.run_id}", dimension="output_tokens",
                cap=cap, spent=streamed, reserved=0, requested=streamed,
            )

    @ends_inline
    def on_llm_end(
        self,
        response: LLMResult,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> CallRecord | None:
        try:  # _run_key(run_id) inline (a try costs nothing when nothing is raised)
            key: Any = run_id.int
        except AttributeError:
            key = run_id
        lock = self._lock  # acquire/release, not `with` (see _start)
        lock.acquire()
        try:
            run = self._runs.pop(key, None)
            if self._twins and key in self._twins:  # (see _another_request)
                run = self._take_twin(key, run)
        finally:
            lock.release()
        if run is None:
            return None
        admission = run.admission
        # read as the middleware reads its answers
        answer = read_answer(response.generations, response.llm_output, admission.call.model,
                             self.guard.tokens, run.streamed_tokens)
        record = self.guard.after_model_call(
            admission, answer.usage, output_tokens=answer.counted, response_model=answer.model,
            cache_hit=answer.cache_hit, retried=0 if run.timeout is None else _retried(run),
        )
        split = cost_breakdown(self.guard, record, admission if run.planned else None) if (
            self.annotate_runs or self.telemetry is not None) else None
        if self.telemetry is not None:
            self.telemetry.chat_end(
                run_id, record, _finish_reasons(response), split,
                output=[getattr(g, "message", None) or g.text for g in _generations(response)]
                if self.telemetry.capture_content else None)
        if self.annotate_runs:
            if answer.message is not None:  # the one answer, found by read_answer
                annotate_message(answer.message, self.guard, record, split)
            else:
                annotate(_generations(response), self.guard, record, split)
        return record

    def on_llm_error(
        self,
        error: BaseException,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        key = _run_key(run_id)
        with self._lock:
            run = self._runs.pop(key, None)
            if key in self._twins:
                run = self._take_twin(key, run)
        if run is not None:
            record = self.guard.model_call_failed(run.admission,
                                                  output_tokens=run.streamed_tokens,
                                                  error=error)
            if self.telemetry is not None:
                self.telemetry.chat_end(run_id, record)

    # -- tools -------------------------------------------------------------------

    def on_tool_start(
        self,
        serialized: dict[str, Any],
        input_str: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        inputs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        name = (serialized or {}).get("name") or kwargs.get("name")
        fallbacks = self._refuse_inside_refused_fallbacks(parent_run_id)
        self._note_parent(run_id, parent_run_id)
        meta = metadata or {}
        session = session_from_metadata(meta, self.session_id)
        attributes = attributes_from_metadata(meta, self.guard.attribute_names)
        if self.telemetry is not None:
            self.telemetry.tool_start(run_id, parent_run_id, str(name),
                                      kwargs.get("tool_call_id"),
                                      inputs if inputs is not None else input_str,
                                      session=session, attributes=attributes)
        admission = None
        # a tool GuardMiddleware counted on this ledger is its own to count and record
        owned = tool_owned(self.guard, kwargs.get("tool_call_id"))
        if self.count_tools and not owned:
            args: Any = inputs if inputs is not None else input_str
            try:
                admission = self.guard.before_tool_call(
                    session, name, args, attributes=attributes,
                    price=declared_price(meta, name))
            except GuardError as exc:
                self._fallbacks_refused(fallbacks, exc)
                if self.telemetry is not None:
                    self.telemetry.refused(run_id, exc)
                raise
        if owned:
            return
        priced = admission is not None and admission.reservation is not None
        # a priced tool's end, which writes its cost on the run, comes before any tracer's
        handlers = go_first(self, run_id) if priced and self.annotate_runs else None
        with self._lock:
            self._tools[run_id] = _Tool(session, str(name), self.guard.clock(), attributes,
                                        meta.get("langgraph_node"), tuple(tags or ()),
                                        admission=admission,
                                        metadata=metadata if isinstance(metadata, dict)
                                        else None, handlers=handlers)
            dropped = [self._tools.popitem(last=False)[1]
                       for _ in range(len(self._tools) - 4096)]  # tools that never ended
        for tool in dropped:
            self._tool_record(tool, None, "aborted", None)
        if priced:
            self._watch_tool(run_id, cast(ToolAdmission, admission))

    def _watch_tool(self, run_id: UUID, admission: ToolAdmission) -> None:
        """A priced tool's hold is renewed by the lease keeper while the tool runs (a
        sandbox, a slow crawl may run longer than ``Limits.lease_seconds``): watched by
        the frame of a synchronous tool's run, else by the task of an async one. A tool
        whose run stopped without its end is charged as aborted (its worst case)."""
        on_stop = _StopCallback(self, run_id)
        frame = tool_run_frame()
        if frame is not None:
            keeper.watch(self, self.guard, admission, on_stop=on_stop,
                         thread_id=threading.get_ident(), frame=frame)
            return
        ref = _CALLING_TASK.get()
        task = ref() if ref is not None else None
        if task is None:  # no way to tell it is running: its lease decides
            return
        keeper.watch(self, self.guard, admission, on_stop=on_stop, task=task)
        with contextlib.suppress(RuntimeError):  # a closed loop: the keeper polls anyway
            task.get_loop().call_soon_threadsafe(task.add_done_callback, _poke_keeper)

    def _tool_stopped(self, run_id: UUID) -> None:
        """The keeper saw a priced tool's run stop without its end (cancelled)."""
        with self._lock:
            tool = self._tools.pop(run_id, None)
        if tool is not None and not (tool.admission is not None and tool.admission.finished):
            record = self._tool_record(tool, run_id, "aborted", None)
            if self.telemetry is not None:
                self.telemetry.tool_end(run_id, record=record)

    def on_custom_event(self, name: str, data: Any, *, run_id: UUID,
                        tags: list[str] | None = None,
                        metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """``cached_tool`` answering from the cache: the tool's record (and span) is a
        cache hit, with what it saved."""
        if name != CACHE_HIT_EVENT or not isinstance(data, Mapping):
            return
        try:
            saved = max(0, int(data.get("saved_nano") or 0))
        except (TypeError, ValueError):
            saved = 0
        with self._lock:
            tool = self._tools.get(run_id)
            if tool is not None:
                self._tools[run_id] = replace(tool, cache_hit=True,
                                              saved_nano=tool.saved_nano + saved)
        if self.telemetry is not None:
            self.telemetry.tool_cache_hit(run_id, saved)

    @ends_inline  # on async paths: in a thread, before a tracer listed after it
    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        record = self._tool_done(run_id, "ok", output)
        if self.telemetry is not None:
            self.telemetry.tool_end(run_id, result=output, record=record)

    @ends_inline
    def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        record = self._tool_done(run_id, "error", not_run=failed_before_running(error))
        if self.telemetry is not None:
            self.telemetry.tool_end(run_id, error, record=record)

    def _tool_done(self, run_id: UUID, outcome: Outcome, output: Any = None, *,
                   not_run: bool = False) -> CallRecord | None:
        """Settle and record a tool call. A priced call that failed is charged its
        reserved worst case (it may have reached the paid API), unless it failed
        before it ran (``not_run``: its arguments did not validate): released then,
        with no record."""
        self._end_runs_under(run_id)
        with self._lock:
            tool = self._tools.pop(run_id, None)
        if tool is None:
            return None
        if tool.admission is not None and tool.admission.reservation is not None:
            keeper.unwatch(self, tool.admission)
            if not_run:
                self.guard.tool_call_not_run(tool.admission)
                return None
        if tool.cache_hit and outcome == "ok":
            outcome = "cache_hit"
        return self._tool_record(tool, run_id, outcome, tool_result(output))

    def _tool_record(self, tool: _Tool, run_id: UUID | None, outcome: Outcome,
                     result: Any) -> CallRecord:
        record = self.guard.tool_call_done(
            tool.session, tool.name, outcome=outcome,
            saved_nano=tool.saved_nano if tool.cache_hit else 0,
            started_at=tool.started_at, run_id=None if run_id is None else str(run_id),
            node=tool.node, tags=tool.tags, attributes=tool.attributes,
            admission=tool.admission, result=result)
        if self.annotate_runs and tool.admission is not None \
                and tool.admission.price is not None:
            note_tool_cost(tool.metadata, record, run_id, tool.handlers)
        return record

    # -- runs (for telemetry) ---------------------------------------------------------

    def on_chain_start(self, serialized: dict[str, Any] | None, inputs: Any, *,
                       run_id: UUID, parent_run_id: UUID | None = None,
                       metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if self._fallback_runs:  # a fallback that is a chain or a function: refused too
            enclosing = self._refuse_inside_refused_fallbacks(parent_run_id)
            if enclosing is not None:
                with self._lock:
                    self._inside_fallbacks[run_id] = enclosing
                    while len(self._inside_fallbacks) > 4096:  # runs that never ended
                        self._inside_fallbacks.popitem(last=False)
        self._note_parent(run_id, parent_run_id)
        if _is_fallbacks(serialized, kwargs):
            with self._lock:
                self._fallback_runs[run_id] = None
                while len(self._fallback_runs) > 4096:  # runs that never ended
                    self._fallback_runs.popitem(last=False)
        if self.telemetry is None:
            return
        meta = metadata or {}
        name = (meta.get("lc_agent_name") or kwargs.get("name")
                or (serialized or {}).get("name"))
        self.telemetry.chain_start(
            run_id, parent_run_id, name, named_session(meta, self.session_id) or "",
            attributes_from_metadata(meta, self.guard.attribute_names)
            if parent_run_id is None else None)

    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._end_chain(run_id, None)

    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._end_chain(run_id, error)

    def _end_chain(self, run_id: UUID, error: BaseException | None) -> None:
        self._end_runs_under(run_id)
        if self._fallback_runs or self._inside_fallbacks:
            with self._lock:
                self._fallback_runs.pop(run_id, None)
                self._inside_fallbacks.pop(run_id, None)
        if self.telemetry is None:
            return
        session = self.telemetry.root_session(run_id)
        usage = self.guard.usage(session) if session is not None else None
        self.telemetry.chain_end(run_id, usage, error)

def _is_fallbacks(serialized: Mapping[str, Any] | None, kwargs: Mapping[str, Any]) -> bool:
    ident: Sequence[Any] = (serialized or {}).get("id") or ()
    return (bool(ident) and ident[-1] == "RunnableWithFallbacks") or (
        kwargs.get("name") == "RunnableWithFallbacks")


def _finish_reasons(response: LLMResult) -> list[str]:
    reasons = []
    for g in _generations(response):
        info = g.generation_info or {}
        meta = getattr(getattr(g, "message", None), "response_metadata", None) or {}
        reason = info.get("finish_reason") or meta.get("finish_reason")
        if reason:
            reasons.append(str(reason))
    return reasons


def _generations(response: LLMResult) -> list[Any]:
    return [g for prompt in response.generations for g in prompt]


class _StopCallback:
    """``on_stop`` for the keeper of a priced tool's run (a small object, not a closure
    over the frame; a model run's is the run itself)."""

    __slots__ = ("handler", "run_id")

    def __init__(self, handler: GuardCallbackHandler, run_id: UUID) -> None:
        self.handler = handler
        self.run_id = run_id

    def __call__(self) -> None:
        self.handler._tool_stopped(self.run_id)


def _poke_keeper(_: Any) -> None:
    keeper.poke()


def _note_calling_task() -> None:
    """Remember the running asyncio task in the context LangChain copies to run a
    handler in an executor (skipping LangChain's own short-lived dispatch tasks)."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no running loop: a sync path
        return
    if task is None:
        return
    coro = task.get_coro()
    name = getattr(coro, "__name__", None) or type(coro).__name__  # (an asend: its type's)
    if name in _DISPATCH_CORO_NAMES:
        return
    if name in LANGCHAIN_GATHERED_START_CORO_NAMES:  # a legacy model's start: its caller's
        task = _gathering(task)
        if task is None:
            return
    ref = _CALLING_TASK.get()
    if ref is None or ref() is not task:
        _CALLING_TASK.set(weakref.ref(task))


def _gathering(task: asyncio.Task[Any]) -> asyncio.Task[Any] | None:
    """The task awaiting the ``asyncio.gather`` that runs ``task`` (its ``_fut_waiter``
    is the gather's future, whose ``_children`` hold ``task``), or None."""
    for other in asyncio.all_tasks(task.get_loop()):
        waiter = getattr(other, "_fut_waiter", None)
        if waiter is not None and task in (getattr(waiter, "_children", None) or ()):
            return other
    return None


def _elsewhere(run: _Run) -> bool:
    """Whether ``run``'s call is still running in another thread (its frame executing)
    or another asyncio task (not done) than the one this callback comes from."""
    if run.frame is not None and run.thread_id != threading.get_ident():
        return executing(run.frame)
    if run.task is not None and not run.task.done():
        ref = _CALLING_TASK.get()
        task = ref() if ref is not None else None
        return task is not None and task is not run.task
    return False


def _making(runs: list[_Run]) -> _Run:
    """Of open runs sharing a run id, the one whose call this thread (a sync call's
    frame) or asyncio task (noted where LangChain dispatched the event) is making: its
    end and its chunks come from there; else the oldest. A sync stream's events come
    from its generator, running on this thread's stack (two streams may be stepped by
    one thread in turn: its frame tells them apart, the thread does not)."""
    if any(run.stream is not None for run in runs):
        frame: FrameType | None = sys._getframe(1)
        for _ in range(_STREAM_EVENT_DEPTH):
            if frame is None:
                break
            for run in runs:
                if run.stream is frame:
                    return run
            frame = frame.f_back
    ident = threading.get_ident()
    ref = _CALLING_TASK.get()
    task = ref() if ref is not None else None
    for run in runs:
        if (run.frame is not None and run.thread_id == ident) or (
                task is not None and run.task is task):
            return run
    return runs[0]


def _run_key(run_id: Any) -> Any:
    """The key of an open model run: its run id's int for a UUID (hashing an int is no
    Python call), else the run id itself (any hashable id, e.g. a str)."""
    try:
        return run_id.int
    except AttributeError:
        return run_id


def _run_id_text(run_id: UUID) -> str:
    """``str(run_id)``: for a plain ``uuid.UUID``, formatted by uuid-utils (a
    langchain-core dependency, in Rust: less than half the cost of ``UUID.__str__``,
    which formats in Python, once per guarded call); else as uuid does it, or the id's
    own ``__str__``."""
    if type(run_id) is UUID:
        if _uuid_text is not None:
            return str(_uuid_text(run_id.int))
        h = "%032x" % run_id.int  # noqa: UP031 - as uuid does: faster than a format spec
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
    return str(run_id)


def _retried(run: _Run) -> int:
    return retried(run.started, run.first_chunk, run.timeout, run.admission.call.attempts)
