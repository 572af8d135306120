"""What an adapter does when a cap is reached: raise, end cleanly, or pause for a human.

- ``"raise"``: the :class:`~agent_guard.errors.GuardError` reaches the caller.
- ``"end"``: the run stops with its state so far plus a final message saying why.
- ``"interrupt"``: the graph pauses with LangGraph's ``interrupt()``; the payload
  says what was spent, the cap, and what the next step needs. Resume with
  ``Command(resume={"extend_usd": 1.0})`` (also ``extend_tokens``,
  ``extend_steps``, ``extend_model_calls``, ``extend_tool_calls``) to raise the
  session's caps and go on, or ``Command(resume={"stop": True})`` to end.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from langchain_core.messages import AIMessage

from .errors import BudgetExceeded, GuardError
from .usage import nano_to_usd

if TYPE_CHECKING:
    from .guard import Guard

__all__ = [
    "PAYLOAD_MARKER",
    "OnExceed",
    "apply_resume",
    "check_on_exceed",
    "interrupt_payload",
    "is_guard_payload",
    "stop_message",
    "wants_stop",
]

OnExceed = Literal["raise", "end", "interrupt"]
PAYLOAD_MARKER = "agent_guard"
STOP_MESSAGE_NAME = "agent-guard"
_EXTENSIONS = ("extend_usd", "extend_tokens", "extend_steps", "extend_model_calls",
               "extend_tool_calls")


def check_on_exceed(value: str) -> OnExceed:
    if value not in ("raise", "end", "interrupt"):
        raise ValueError(f"on_exceed must be 'raise', 'end' or 'interrupt', got {value!r}")
    return value  # type: ignore[return-value]


def _money(exc: BudgetExceeded, amount: int) -> Any:
    return str(nano_to_usd(amount)) if exc.dimension == "usd_nano" else amount


def stop_message(exc: GuardError) -> AIMessage:
    """The final message of a run ended by the guard, for a chat UI to show."""
    details: dict[str, Any] = {"reason": type(exc).__name__}
    if isinstance(exc, BudgetExceeded):
        details.update(session=exc.session, dimension=exc.dimension,
                       cap=_money(exc, exc.cap), spent=_money(exc, exc.spent),
                       needed=_money(exc, exc.requested))
    return AIMessage(content=f"Stopped by agent-guard. {exc}", name=STOP_MESSAGE_NAME,
                     response_metadata={PAYLOAD_MARKER: details})


def interrupt_payload(exc: GuardError, node: str | None) -> dict[str, Any]:
    """What ``interrupt()`` shows the human: spent, cap, what the next step needs."""
    payload: dict[str, Any] = {PAYLOAD_MARKER: True, "reason": type(exc).__name__,
                               "node": node, "message": str(exc)}
    if isinstance(exc, BudgetExceeded):
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


def apply_resume(guard: Guard, session: str, resume: Any) -> bool:
    """Apply the cap extensions a resume value asks for; True if it asked for any."""
    if not isinstance(resume, Mapping):
        return False
    asked = {k: resume[k] for k in _EXTENSIONS if resume.get(k) is not None}
    if asked:
        guard.extend(session, usd=asked.get("extend_usd"), tokens=asked.get("extend_tokens"),
                     steps=asked.get("extend_steps"),
                     model_calls=asked.get("extend_model_calls"),
                     tool_calls=asked.get("extend_tool_calls"))
    return bool(asked)
