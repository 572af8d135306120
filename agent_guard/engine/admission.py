"""What a call is and what the guard's yes to it holds: :class:`ModelCall` (a model call
as an adapter describes it), :class:`Admission` and :class:`ToolAdmission` (the
reservation of one model or tool call, ended exactly once by whichever holder comes
first), and the process-wide registry that makes one request one admission however
many handlers and guards on the same ledger see it (:func:`claim`).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .._frozen import fast_init
from ..ledger import Reservation
from ..pricing import ModelPrice, ToolPrice
from .budgets import ScopeRef
from .records import CallRecord
from .usage import Usage

if TYPE_CHECKING:
    from .plan import Resolved

__all__ = ["Admission", "ModelCall", "ToolAdmission", "certainly_not_billed"]

#: ``args`` of a tool call whose arguments were not given (no identical-call counting)
NO_ARGS: Any = object()


@fast_init
@dataclass(frozen=True, slots=True)
class ModelCall:
    """One model call as an adapter describes it, before it is made.

    ``messages`` are LangChain messages or OpenAI-style dicts; give
    ``input_tokens`` instead when the adapter has already counted them.
    ``max_output_tokens`` is the call's own cap (``max_tokens`` /
    ``max_completion_tokens``); ``None`` means the policy default is reserved.
    ``can_shrink`` says the adapter can lower the call's output cap, so a
    call that does not fit may be admitted with a smaller one.

    ``attempts`` is how many requests the provider's client may send for this one
    call (1 + its own retries, e.g. the OpenAI SDK's ``max_retries``): a request
    that timed out may have been billed, so each attempt is reserved.

    ``run_id`` names the request: every ``before_model_call`` of guards on the same
    ledger with the same ``run_id`` while it is open joins one admission, so one
    request is reserved and charged once however many handlers see it.
    """

    session: str
    model: str
    provider: str | None = None
    messages: Sequence[Any] = ()
    tools: Sequence[Mapping[str, Any]] | None = None
    max_output_tokens: int | None = None
    input_tokens: int | None = None
    run_id: str | None = None
    node: str | None = None
    tags: tuple[str, ...] = ()
    can_shrink: bool = False
    tier: str | None = None
    route: str | None = None
    attributes: Mapping[str, str] = field(default_factory=dict)
    #: the call's request parameters (LangChain ``invocation_params``): what the prompt
    #: estimate and the worst case read besides the messages (``response_format``,
    #: ``service_tier``, ``modalities``, ``cache_control``, ``tool_choice``)
    params: Mapping[str, Any] = field(default_factory=dict)
    attempts: int = 1


class _CallState:
    """What every holder of one admission shares: it ends exactly once (:func:`finish`).
    No ``__init__``: the class attributes are the defaults until set (a guarded call
    makes one of these; an ``__init__`` and a lock of its own cost more than the rest)."""

    #: the record the admission ended with, once a holder ended it
    record: CallRecord | None = None
    #: the request's key in the registry, when other holders may join it (a run id)
    key: tuple[str, str] | None = None


class _Pending:
    """A request being admitted or open, that other guards on its ledger may join: the
    admission (or the refusal) of its first holder, and ``threading.Event``'s ``is_set``,
    ``set`` and ``wait`` for the others, whose Event is made only when a second holder
    waits (rare: every guarded call with a run id makes one of these, and an Event costs
    a Condition and its notification)."""

    # No ``__init__``: the class attributes are the defaults until set.
    #: the request's key in the registry (set by claim)
    key: tuple[str, str] = ("", "")
    admission: Admission | None = None
    error: BaseException | None = None
    _flag = False
    _event: threading.Event | None = None

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        _READY_LOCK.acquire()  # (not ``with``: its __enter__ and __exit__ cost the lock twice)
        try:
            self._flag = True
            event = self._event
        finally:
            _READY_LOCK.release()
        if event is not None:
            event.set()

    def wait(self, timeout: float | None = None) -> bool:
        with _READY_LOCK:
            if self._flag:
                return True
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        return event.wait(timeout)


# (ledger identity, run id) -> the request's admission while it is open. A LangChain
# model run executes in one process, so one process-wide registry sees every handler
# and guard that sees the run; the ledger identity keeps guards of different budgets
# apart. Entries leave when the call ends (settled, released or abandoned).
#
# No lock: an entry is added only where its key is absent (dict.setdefault, one step
# under the GIL: the key is a tuple of strings, hashed and compared without Python code)
# and removed at most once, by its opener (not_opened, or forget by the first holder to
# end the admission). A claim that races a removal joins the request that is ending,
# as it would had it come just before, or opens a new one just after.
_OPEN_REQUESTS: dict[tuple[str, str], _Pending] = {}
_READY_LOCK = threading.Lock()
# How long a second holder of a request waits for the first one's reservation.
_JOIN_WAIT_SECONDS = 30.0


def _forget_open_requests_after_fork() -> None:
    global _READY_LOCK
    _OPEN_REQUESTS.clear()  # the parent's requests are the parent's to end
    _READY_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_open_requests_after_fork)


def certainly_not_billed(error: BaseException) -> bool:
    """Whether a failed call certainly cost nothing at the provider.

    True for an HTTP status error (4xx, 429, 5xx: the provider answered with an error
    before generating) and for a connection that could not be made (the request was
    never sent). A timeout, a reset, a cancellation or anything else after the
    request may have been sent is not: the provider may have generated (and billed)
    the whole answer."""
    status = getattr(error, "status_code", None)
    if status is None:
        status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(status, int) and not isinstance(status, bool) and 400 <= status <= 599:
        return True
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if type(current).__name__ in _NOT_SENT:
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


# exception class names (httpx, the standard library) of a request that was never sent
_NOT_SENT = frozenset({"ConnectError", "ConnectTimeout", "ConnectionRefusedError",
                       "UnsupportedProtocol", "InvalidURL", "LocalProtocolError"})



@fast_init
@dataclass(frozen=True, slots=True)
class Admission:
    """The guard's yes: a reservation covering the call's worst case.

    ``max_output_tokens`` is the output the reservation covers; when
    ``shrunk`` is True it is lower than the call asked for and the adapter
    must lower the call's ``max_tokens`` to it before making the call.
    """

    call: ModelCall
    reservation: Reservation
    price: ModelPrice | None
    estimated_input_tokens: int
    max_output_tokens: int
    reserved_nano: int
    shrunk: bool = False
    started_at: float = field(default_factory=time.time)
    scopes: tuple[ScopeRef, ...] = ()
    attributes: Mapping[str, str] = field(default_factory=dict)
    #: ``estimated_input_tokens`` is an upper bound (long new texts were not tokenised):
    #: the guard counts the prompt exactly before settling a call without usage.
    input_is_bound: bool = False
    #: shared by every holder of this admission; set once the call is finished
    state: _CallState = field(default_factory=_CallState, compare=False, repr=False)
    #: the planner's descriptor of the call (its scopes' names, their thresholds' triggers)
    #: for the settle; None for an admission made elsewhere (the settle works them out)
    resolved: Resolved | None = field(default=None, compare=False, repr=False)

    @property
    def finished(self) -> bool:
        """Whether the call was settled or released (by any holder)."""
        return self.state.record is not None

    @property
    def attempt_nano(self) -> int:
        """The worst case of one attempt (``reserved_nano`` covers every attempt)."""
        return self.reserved_nano // max(1, self.call.attempts)


@dataclass(frozen=True, slots=True)
class ToolAdmission:
    """The guard's yes to one tool call. ``reservation`` holds a priced tool's worst
    case (``reserved_nano``) with its counts until the call ends; it is None for a free
    tool, whose counts were charged when it was admitted."""

    session: str
    tool: str | None
    args: Any
    price: ToolPrice | None
    reservation: Reservation | None
    reserved_nano: int
    started_at: float
    scopes: tuple[ScopeRef, ...] = ()
    attributes: Mapping[str, str] = field(default_factory=dict)
    state: _CallState = field(default_factory=_CallState, compare=False, repr=False)

    @property
    def finished(self) -> bool:
        return self.state.record is not None


# what a tool admission ends with when the tool certainly did not run (no record)
_NOT_RUN = CallRecord(session="", run_id=None, model="", provider=None, usage=Usage(),
                      cost_nano=0, reserved_nano=0, usage_estimated=False, outcome="error",
                      started_at=0.0, ended_at=0.0, kind="tool")


# _Pending.set's lock is taken with acquire() and release(), not
# ``with``: the context manager's __enter__ and __exit__ cost twice the lock itself.


def claim(ledger_id: str, run_id: str | None) -> tuple[_Pending | None, _Pending | None]:
    """(the request's entry this holder opened, None) or (None, the entry to join);
    (None, None) for a call without a run id."""
    if not run_id:
        return None, None
    own = _Pending()
    own.key = key = (ledger_id, run_id)
    pending = _OPEN_REQUESTS.setdefault(key, own)
    if pending is own:
        return own, None
    return None, pending


def opened(own: _Pending | None, admission: Admission) -> Admission:
    """The first holder of a request was admitted: the holders waiting on it join."""
    if own is not None:
        admission.state.key = own.key
        own.admission = admission
        own.set()
    return admission


def not_opened(own: _Pending | None, exc: BaseException) -> None:
    """The first holder of a request was refused: the holders waiting on it get ``exc``."""
    if own is None:
        return
    if _OPEN_REQUESTS.get(own.key) is own:
        _OPEN_REQUESTS.pop(own.key, None)
    own.error = exc
    own.set()


def finish(admission: Admission | ToolAdmission, record: CallRecord) -> CallRecord:
    """Claim the end of ``admission`` for ``record``; the record it already ended
    with if another holder came first."""
    # one dict.setdefault on the state's attributes (only here is ``record`` set): a C
    # call with a str key, atomic under the GIL, where a lock took two calls
    return admission.state.__dict__.setdefault("record", record)  # type: ignore[no-any-return]


def forget(admission: Admission | ToolAdmission) -> None:
    """The request is over: a later handler of the same run id admits anew."""
    key = admission.state.key
    if key is not None:
        pending = _OPEN_REQUESTS.get(key)
        if pending is not None and pending.admission is admission:
            _OPEN_REQUESTS.pop(key, None)
