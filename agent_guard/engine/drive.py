"""Ledger I/O as values, so each decision is written once for sync and async callers.

A decision is a generator: it yields the ledger operations it needs (:class:`Op`, or
:class:`Wait` for another holder of the same request), gets each one's result (or its
exception, raised where the ``yield`` is) and returns its answer. It does no I/O of its
own. :func:`drive` runs it with the ledger's blocking methods, :func:`adrive` awaits the
ledger's ``a``-prefixed twins; each driver is a few lines::

    def usage(self, session):
        return drive(self.ledger, reads.session_usage(self, session))

    async def ausage(self, session):
        return await adrive(self.ledger, reads.session_usage(self, session))
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, TypeVar

from ..ledger import Ledger

if TYPE_CHECKING:
    from .admission import _Pending

__all__ = ["FINISHING", "Op", "Steps", "Wait", "adrive", "drive"]

T = TypeVar("T")


class Op:
    """One ledger call: ``ledger.<name>(*args, **kwargs)``, or ``await
    ledger.a<name>(...)`` on the async path."""

    __slots__ = ("args", "kwargs", "name")

    def __init__(self, name: str, *args: Any, **kwargs: Any) -> None:
        self.name, self.args, self.kwargs = name, args, kwargs

    def run(self, ledger: Ledger) -> Any:
        return getattr(ledger, self.name)(*self.args, **self.kwargs)

    async def arun(self, ledger: Ledger) -> Any:
        return await getattr(ledger, "a" + self.name)(*self.args, **self.kwargs)


class Wait(Op):
    """Wait (at most ``timeout`` seconds) for ``event``: blocking on the sync path, in a
    worker thread on the async one (the event loop is never blocked)."""

    __slots__ = ("event", "timeout")

    def __init__(self, event: threading.Event | _Pending, timeout: float) -> None:
        super().__init__("wait")
        self.event, self.timeout = event, timeout

    def run(self, ledger: Ledger) -> Any:
        return self.event.wait(self.timeout)

    async def arun(self, ledger: Ledger) -> Any:
        return await asyncio.to_thread(self.event.wait, self.timeout)


#: a decision: yields operations, receives their results, returns a ``T``
Steps = Generator[Op, Any, T]


def drive(ledger: Ledger, steps: Steps[T]) -> T:
    """Run ``steps`` with the ledger's blocking methods."""
    try:
        op = next(steps)
        while True:
            try:
                result = op.run(ledger)
            except BaseException as exc:
                op = steps.throw(exc)
            else:
                op = steps.send(result)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


#: operations that end what was already held or spent: a cancellation of the caller
#: waits for them (a settle cut off mid-await would leave a billed call's hold to run
#: out its lease and be returned, and the call without a record)
FINISHING = frozenset({"settle", "release", "flush", "close"})


async def adrive(ledger: Ledger, steps: Steps[T]) -> T:
    """Run ``steps`` awaiting the ledger's async methods.

    A :data:`FINISHING` operation runs to its end even when the caller is cancelled;
    the rest of the steps run too (the record is emitted), then the cancellation is
    raised."""
    cancelled: asyncio.CancelledError | None = None
    try:
        op = next(steps)
        while True:
            try:
                if op.name in FINISHING:
                    result, cancel = await _to_the_end(op, ledger)
                    cancelled = cancel or cancelled
                else:
                    result = await op.arun(ledger)
            except BaseException as exc:
                op = steps.throw(exc)
            else:
                op = steps.send(result)
    except StopIteration as done:
        if cancelled is not None:
            raise cancelled from None
        return done.value  # type: ignore[no-any-return]


async def _to_the_end(op: Op, ledger: Ledger) -> tuple[Any, asyncio.CancelledError | None]:
    """Await ``op`` to its end whatever cancels the caller meanwhile; return its result
    and the caller's cancellation, if one came.

    The operation's own task is cancelled with its caller when every task of the loop
    is: ``asyncio.run`` whose main task ends on an error (a refused branch of a
    ``RunnableParallel``) cancels all it leaves, maybe before the operation ran. It is
    run again then, once, in a task of its own made after that sweep (a settle or
    release of a reservation already finished does nothing, a flush sends what is left):
    otherwise the hold would wait out its lease and the call would have no record."""
    task = asyncio.ensure_future(op.arun(ledger))
    cancelled = None
    again = True
    while True:
        try:
            return await asyncio.shield(task), cancelled
        except asyncio.CancelledError as exc:
            if not task.done():  # the caller was cancelled: wait on
                cancelled = exc
                continue
            if not task.cancelled() and task.exception() is None:
                return task.result(), exc  # it ended as the caller was cancelled
            current = asyncio.current_task()
            if not (again and task.cancelled() and current is not None
                    and current.cancelling()):
                raise  # the operation itself was cancelled (or failed), not its caller
            cancelled, again = exc, False
            task = asyncio.ensure_future(op.arun(ledger))
