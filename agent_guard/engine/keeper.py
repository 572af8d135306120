"""Keep the holds of running calls, and end the calls nobody else will end.

A reservation has a lease so that a crashed worker's hold comes back. A call that
runs longer than the lease would then lose its hold while it runs (another call is
admitted into room that is still owed), and a call whose adapter never hears how it
ended (LangChain skips the end callbacks on cancellation and on another handler's
error) would keep its hold for the whole lease and be charged nothing.

:class:`LeaseKeeper` is one daemon thread per process. An adapter *watches* an
admission and says how to tell that the call is still running:

- ``task``: the asyncio task the call runs in (running while not done);
- ``thread_id`` and ``frame``: a synchronous call's thread and the stack frame of
  the call (running while that frame executes: ``frame.clear()`` refuses an executing
  frame and touches nothing else; no other thread's stack is walked, since walking
  ``f_back`` from another thread's frames crashes CPython 3.11 intermittently);
- ``touched``: neither is known (e.g. a generator between two chunks): running
  while :meth:`LeaseKeeper.touch` was called since the last renewal.

While the call runs, its lease is renewed every third of ``lease_seconds``. Once
it is over, or ended by anyone, the watch is dropped and ``on_stop`` is called: the
adapter forgets the call, and charges it as abandoned
(``Guard.model_call_abandoned``) if nobody ended it. A call with no way to tell is
never renewed: its lease ends it, as before.

An adapter that keeps its open calls itself (the callback handler's open runs, each its
own :class:`Watch`) is a *source* instead of watching and unwatching every call: the
keeper reads a source's open watches on each pass. A source is kept while it has open
calls (``kept`` says so; :meth:`LeaseKeeper.keep` after opening a call when it is
false), and let go on a pass that finds none, so a guarded call costs the keeper
nothing but its watch's ``renew_at`` and one flag test, and a pass costs what the open
calls do, whatever the number of idle handlers.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any, Protocol

from ..errors import LedgerUnavailable

__all__ = ["LeaseKeeper", "Watch", "WatchSource", "executing", "keeper"]

logger = logging.getLogger("agent_guard")

#: how often the keeper looks whether watched calls are still running (seconds)
POLL_SECONDS = 0.05


class Watch:
    """One watched call (a plain slotted object). An adapter may subclass it with its
    own record of the call (the callback handler's open run is its own watch: no second
    object per call) and hand it to :meth:`LeaseKeeper.watch_as`."""

    __slots__ = ("_renewed", "admission", "frame", "guard", "on_stop", "renew_at", "task",
                 "thread_id", "touched")

    def __init__(self, guard: Any, admission: Any, on_stop: Callable[[], Any] | None,
                 task: Any = None, thread_id: int | None = None,
                 frame: FrameType | None = None, renew_at: float = 0.0) -> None:
        self.guard = guard  # engine.guard.Guard (not imported: it imports this module)
        self.admission = admission
        self.on_stop = on_stop
        self.task = task
        self.thread_id = thread_id
        self.frame = frame
        self.touched = False
        self.renew_at = renew_at
        self._renewed: list[float] | None = None

    @property
    def renewed(self) -> list[float]:
        """Monotonic times of the renewals (for tests)."""
        if self._renewed is None:
            self._renewed = []
        return self._renewed

    def knows_liveness(self) -> bool:
        return self.task is not None or self.frame is not None or self.touched

    def stopped(self) -> None:
        """The call is over and nobody ended it through its owner: tell the owner."""
        if self.on_stop is not None:
            self.on_stop()


class WatchSource(Protocol):
    """An adapter that keeps its open calls' watches itself (see the module doc)."""

    #: whether the keeper holds it now (set by the keeper only)
    kept: bool

    def open_watches(self) -> Sequence[Watch]:
        """The watches of its calls open now (a copy: the keeper iterates it unlocked)."""

    def open_count(self) -> int:
        """How many calls it has open (no lock needed: read to decide to sleep)."""

    def forked(self) -> None:
        """In a forked child: the open calls are the parent's; forget them (see
        _after_fork), so the child's keeper lets the source go once the child's own
        calls are over."""


class LeaseKeeper:
    """Renews the leases of watched calls while they run; ends those that stopped."""

    def __init__(self, poll_seconds: float = POLL_SECONDS) -> None:
        self.poll_seconds = poll_seconds
        self._watches: dict[tuple[int, int], Watch] = {}
        # the watches' lock, and the condition on it the keeper waits with (the hot path
        # takes the plain lock: a Condition's own ``with`` is a Python-level call)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        # the sources with open calls (see the module doc): their ``kept`` is True
        self._sources: set[Any] = set()
        # the keeper waits for a first watch (not polling): only then does a watch wake it
        # (waking a polling keeper on every call made the caller wait for the GIL)
        self._idle = False

    def watch(self, owner: object, guard: Any, admission: Any, *,
              on_stop: Callable[[], Any] | None = None, task: Any = None,
              thread_id: int | None = None, frame: FrameType | None = None) -> None:
        """Keep ``admission``'s hold while its call runs; ``on_stop()`` once the call is
        over or ended (one watch per ``owner`` and admission)."""
        self.watch_as(owner, Watch(guard, admission, on_stop, task, thread_id, frame))

    def watch_as(self, owner: object, w: Watch) -> None:
        """:meth:`watch` with the watch made by the caller (its ``guard``,
        ``admission``, liveness and ``on_stop`` or ``stopped`` filled in)."""
        w.renew_at = time.monotonic() + w.guard.limits.lease_seconds / 3
        lock = self._lock
        lock.acquire()  # (not ``with``: its __enter__ and __exit__ cost the lock twice)
        try:
            self._watches[(id(w.admission.state), id(owner))] = w
            if self._thread is None:
                self._start_thread()
            if self._idle:  # otherwise the keeper is polling already: no wake-up per call
                self._cond.notify()
        finally:
            lock.release()

    def keep(self, source: WatchSource) -> None:
        """Read ``source``'s open calls on each pass until a pass finds none. A source
        calls it after opening a call (the call already in what ``open_watches``
        returns) when its ``kept`` is false; see :meth:`_let_go` for why no call is
        missed."""
        with self._cond:
            self._sources.add(source)
            source.kept = True
            if self._thread is None:
                self._start_thread()
            if self._idle:
                self._cond.notify()

    def _let_go(self, sources: list[Any]) -> None:
        """Drop the sources with no open call. A source opens a call, then reads
        ``kept``; here ``kept`` is cleared, then the count read again: either the call
        is seen and the source kept, or the source sees ``kept`` false and calls
        :meth:`keep` (which waits for this lock)."""
        with self._cond:
            for source in sources:
                if source.open_count() or source not in self._sources:
                    continue
                source.kept = False
                self._sources.discard(source)
                if source.open_count():
                    self._sources.add(source)
                    source.kept = True

    def unwatch(self, owner: object, admission: Any) -> None:
        """The owner ended the call itself: stop watching it (no ``on_stop``). No lock:
        ``dict.pop`` is one step under the GIL, and the keeper's own removal
        (:meth:`_drop`) tolerates a watch already gone."""
        self._watches.pop((id(admission.state), id(owner)), None)

    def touch(self, owner: object, admission: Any) -> None:
        """The call showed it is running (a streamed chunk arrived)."""
        w = self._watches.get((id(admission.state), id(owner)))
        if w is not None:
            w.touched = True

    def poke(self) -> None:
        """Look now (a watched task finished)."""
        with self._cond:
            self._cond.notify()

    @property
    def watching(self) -> int:
        return len(self._watches)

    def check(self) -> None:
        """One pass: drop ended calls, end stopped ones, renew running ones due."""
        now = time.monotonic()
        with self._cond:
            watches = list(self._watches.items())
            sources = list(self._sources)
        for key, w in watches:
            self._look(w, now, key)
        for source in sources:
            try:
                kept = source.open_watches()
            except Exception:
                logger.exception("agent-guard: reading a source's open calls failed")
                continue
            for w in kept:
                self._look(w, now, None)
        if sources:
            self._let_go(sources)

    def _look(self, w: Watch, now: float, key: tuple[int, int] | None) -> None:
        """End ``w``'s call if it is over (dropping a watch of ours: ``key``; a
        source's watch is dropped by its ``stopped``), else renew it when due."""
        over = bool(w.admission.finished)
        if over:
            pass
        elif w.task is not None:
            over = bool(w.task.done())
        elif w.frame is not None:
            over = not executing(w.frame)
        if over:
            if key is not None:
                self._drop(key, w)
            try:
                w.stopped()
            except Exception:
                logger.exception("agent-guard: ending an abandoned call failed")
            return
        if now >= w.renew_at and w.knows_liveness():
            self._renew(w, now)

    def _renew(self, w: Watch, now: float) -> None:
        lease = float(w.guard.limits.lease_seconds)
        w.renew_at = now + lease / 3
        if w.task is None and w.frame is None:
            if not w.touched:
                return  # no sign of life since the last renewal: let the lease decide
            w.touched = False
        try:
            renewed = w.guard.ledger.renew(w.admission.reservation, lease)
        except LedgerUnavailable as exc:
            logger.warning("agent-guard: could not renew a running call's hold (%s)", exc)
            return
        except Exception:
            logger.exception("agent-guard: renewing a running call's hold failed")
            return
        if renewed is None and not w.admission.finished:
            logger.warning(
                "agent-guard: the hold of a running call (session %r) expired before it was "
                "renewed; raise Limits.lease_seconds",
                getattr(w.admission, "session", None) or w.admission.call.session)
        w.renewed.append(now)

    def _drop(self, key: tuple[int, int], w: Watch) -> None:
        with self._cond:
            if self._watches.get(key) is w:
                # (pop, not del: an unwatch, which takes no lock, may have removed it)
                self._watches.pop(key, None)

    def _start_thread(self) -> None:
        """Start the keeper's thread (once per process: a forked child's keeper starts
        its own, see ``_after_fork``; the thread's loop outlives any failure)."""
        self._thread = threading.Thread(target=self._run, name="agent-guard-lease-keeper",
                                        daemon=True)
        self._thread.start()

    def _after_fork(self) -> None:
        """In a forked child: the parent's calls are not this process's to renew or
        end (their threads and tasks are not here)."""
        self._watches = {}
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._thread = None
        self._idle = False
        for source in self._sources:  # (one thread now: no lock is taken)
            source.forked()
            source.kept = False  # its next call starts this process's keeper
        self._sources = set()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._watches and not self._sources:
                    self._idle = True
                    self._cond.wait()
                self._idle = False
                self._cond.wait(self.poll_seconds)
            try:
                self.check()
            except Exception:  # the keeper must outlive any one bad call
                logger.exception("agent-guard: lease keeper pass failed")



def executing(frame: FrameType) -> bool:
    """Whether ``frame`` is still executing on some thread's stack.

    ``frame.clear()`` raises ``RuntimeError`` for an executing frame without touching
    it (CPython checks the frame's owner under the GIL); a finished frame is cleared,
    which only drops the locals it keeps alive. Reading another thread's stack instead
    (``sys._current_frames()`` and ``f_back``) segfaulted CPython 3.11.7 in the keeper
    thread in 2 of 3 full test runs."""
    try:
        frame.clear()
    except RuntimeError:
        return True
    return False


#: the process-wide keeper every adapter uses
keeper = LeaseKeeper()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=keeper._after_fork)
