"""What an adapter does when a cap is reached: raise, end cleanly, or pause for a human.

- ``"raise"``: the :class:`~agent_guard.errors.GuardError` reaches the caller.
- ``"end"``: the run stops with its state so far plus a final message saying why.

Either way the *whole* run stops, whatever the graph's edges, and every tool
call left open is answered (``docs/graph-control.md``).
- ``"interrupt"``: the graph pauses with LangGraph's ``interrupt()``; the payload
  says what was spent, the cap, and what the next step needs. Resume with
  ``Command(resume={"extend_usd": 1.0})`` (also ``extend_tokens``,
  ``extend_steps``, ``extend_model_calls``, ``extend_tool_calls``) to raise the
  session's caps and go on, or ``Command(resume={"stop": True})`` to end.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from langchain_core.messages import AIMessage, BaseMessage, ToolMessage

from .compat import LANGCHAIN_CALLBACK_ERROR
from .engine.drive import Op, Steps, adrive, drive
from .engine.reads import extending
from .engine.usage import nano_to_usd
from .errors import GuardError, GuardStop

if TYPE_CHECKING:
    from .engine.guard import Guard

__all__ = [
    "PAYLOAD_MARKER",
    "OnExceed",
    "Stop",
    "aapply_resume",
    "answer_tool_calls",
    "apply_resume",
    "check_on_exceed",
    "interrupt_payload",
    "is_guard_payload",
    "resume_steps",
    "stop_message",
    "wants_stop",
]

logger = logging.getLogger("agent_guard")

OnExceed = Literal["raise", "end", "interrupt"]
PAYLOAD_MARKER = "agent_guard"
STOP_MESSAGE_NAME = "agent-guard"
_EXTENSIONS = ("extend_usd", "extend_tokens", "extend_steps", "extend_model_calls",
               "extend_tool_calls")


def check_on_exceed(value: str) -> OnExceed:
    if value not in ("raise", "end", "interrupt"):
        raise ValueError(f"on_exceed must be 'raise', 'end' or 'interrupt', got {value!r}")
    return value  # type: ignore[return-value]


def _money(exc: GuardStop, amount: int) -> Any:
    return str(nano_to_usd(amount)) if exc.dimension == "usd_nano" else amount


class Stop:
    """Why a run was stopped: the refusal's text and numbers.

    Built from the refusal itself, or from the payload of the pause a human answered
    with ``{"stop": True}`` (the refusal object is gone by then)."""

    __slots__ = ("details", "text")

    def __init__(self, text: str, details: Mapping[str, Any]) -> None:
        self.text = text
        self.details = dict(details)

    @classmethod
    def of(cls, exc: GuardError) -> Stop:
        details: dict[str, Any] = {"reason": type(exc).__name__}
        if isinstance(exc, GuardStop):
            details.update(session=exc.session, dimension=exc.dimension,
                           cap=_money(exc, exc.cap), spent=_money(exc, exc.spent),
                           needed=_money(exc, exc.requested))
        return cls(str(exc), details)

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> Stop:
        keys = ("reason", "session", "dimension", "cap", "spent", "needed")
        return cls(str(payload.get("message", "")),
                   {k: payload[k] for k in keys if k in payload})

    def message(self, id: str | None = None) -> AIMessage:
        return AIMessage(content=f"Stopped by agent-guard. {self.text}", name=STOP_MESSAGE_NAME,
                         response_metadata={PAYLOAD_MARKER: dict(self.details)}, id=id)


def stop_message(exc: GuardError) -> AIMessage:
    """The final message of a run ended by the guard, for a chat UI to show."""
    return Stop.of(exc).message()


def answer_tool_calls(messages: Sequence[Any], stop: Stop,
                      started: Collection[str] = ()) -> list[ToolMessage]:
    """A ``ToolMessage`` for each tool call of the last assistant turn that has none:
    "Not run", but for a call whose tool ``started`` (its id in it): "Stopped", as the
    tool may have run (a model call inside it was refused).

    Chat APIs refuse a history in which an assistant message's tool calls are not
    each answered by a tool message right after it (OpenAI: ``400 ... tool_call_ids
    did not have response messages``); a run stopped between the two would leave the
    thread unusable. Only the last assistant message with tool calls can be pending
    (anything else after it means the history was already past it)."""
    for i in range(len(messages) - 1, -1, -1):
        message = messages[i]
        if isinstance(message, AIMessage) and message.tool_calls:
            after = messages[i + 1:]
            if not all(isinstance(m, ToolMessage) for m in after):
                return []
            answered = {m.tool_call_id for m in after}
            return [ToolMessage(
                content=f"{'Stopped' if call['id'] in started else 'Not run'}: the run "
                        f"was stopped by agent-guard. {stop.text}",
                tool_call_id=call["id"], name=call["name"], status="error",
                id=f"agent-guard-{call['id']}")
                for call in message.tool_calls
                if call.get("id") and call["id"] not in answered]
        if not isinstance(message, ToolMessage) and isinstance(message, BaseMessage):
            return []
    return []


def interrupt_payload(exc: GuardError, node: str | None) -> dict[str, Any]:
    """What ``interrupt()`` shows the human: spent, cap, what the next step needs."""
    payload: dict[str, Any] = {PAYLOAD_MARKER: True, "reason": type(exc).__name__,
                               "node": node, "message": str(exc)}
    if isinstance(exc, GuardStop):
        payload.update(session=exc.session, dimension=exc.dimension,
                       cap=_money(exc, exc.cap), spent=_money(exc, exc.spent),
                       reserved=_money(exc, exc.reserved), needed=_money(exc, exc.requested))
        if exc.dimension == "usd_nano":
            payload.update(spent_usd=str(nano_to_usd(exc.spent)),
                           cap_usd=str(nano_to_usd(exc.cap)),
                           next_step_usd=str(nano_to_usd(exc.requested)))
    payload["resume_with"] = {"extend_usd": "<dollars>", "stop": True}
    return payload


def is_guard_payload(value: Any) -> bool:
    return isinstance(value, Mapping) and value.get(PAYLOAD_MARKER) is True


def wants_stop(resume: Any) -> bool:
    return isinstance(resume, Mapping) and bool(resume.get("stop"))


def apply_resume(guard: Guard, session: str, resume: Any, dimension: str | None = None
                 ) -> bool:
    """Apply the cap extensions a resume value asks for; True if it asked for any.

    ``dimension`` is the one that refused (from the pause's payload): after a
    per-tool refusal (``tool_calls:<tool>``), ``extend_tool_calls`` raises that
    tool's cap too, or the extension could never let the run go on."""
    return drive(guard.ledger, resume_steps(guard, session, resume, dimension))


async def aapply_resume(guard: Guard, session: str, resume: Any,
                        dimension: str | None = None) -> bool:
    """:func:`apply_resume` awaiting the ledger (on an event loop)."""
    return await adrive(guard.ledger, resume_steps(guard, session, resume, dimension))


def resume_steps(guard: Guard, session: str, resume: Any, dimension: str | None = None
                 ) -> Steps[bool]:
    """The ledger operations of :func:`apply_resume`, for a decision driven sync or
    async (:mod:`agent_guard.engine.drive`)."""
    if not isinstance(resume, Mapping):
        return False
    asked = {k: resume[k] for k in _EXTENSIONS if resume.get(k) is not None}
    if asked:
        yield from extending(
            guard, session, usd=asked.get("extend_usd"), tokens=asked.get("extend_tokens"),
            steps=asked.get("extend_steps"), model_calls=asked.get("extend_model_calls"),
            tool_calls=asked.get("extend_tool_calls"))
        more = asked.get("extend_tool_calls")
        if more is not None and dimension and dimension.startswith("tool_calls:"):
            scope = guard.budgets.ref("session", session, guard.clock()).scope
            yield Op("extend", scope, dimension, more)
    return bool(asked)


# -- the log: one line per refusal ----------------------------------------------------------

_CALLBACK_ERROR = LANGCHAIN_CALLBACK_ERROR


def _guard_error_names() -> set[str]:
    names: set[str] = set()
    todo: list[type] = [GuardError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


class _QuietRefusals(logging.Filter):
    """Drop LangChain's ``Error in GuardCallbackHandler.on_chat_model_start callback``
    warning for a deliberate refusal.

    LangChain logs every exception a callback raises, even with ``raise_error=True``
    (``langchain_core.callbacks.manager.handle_event``); a refusal is not an error of
    the handler, and the adapters say what they did with it in one line of their own
    (or the caller gets the exception)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != _CALLBACK_ERROR or not isinstance(record.args, tuple) \
                or len(record.args) != 3:
            return True
        raised = str(record.args[2]).split("(", 1)[0]
        return raised not in _guard_error_names()


def quiet_langchain_refusals() -> None:
    """Install the filter once on LangChain's callback-manager logger."""
    target = logging.getLogger("langchain_core.callbacks.manager")
    if not any(isinstance(f, _QuietRefusals) for f in target.filters):
        target.addFilter(_QuietRefusals())


quiet_langchain_refusals()
