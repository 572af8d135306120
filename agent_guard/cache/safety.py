"""How a cache touches its store: every failure is a miss, counted, logged once.

A cache is an optimisation, never a new way to fail. :class:`CacheIO` is the one
place the caches (tool results, node results, LLM answers) read and write their
store:

- a backend error (Redis down, a timeout, ``WRONGTYPE``, a locked SQLite file...)
  is a miss on read and a skipped write; it is logged once per cause (operation and
  error type) at WARNING. When the backend did not answer at all (refused
  connection, timeout, locked file) it is not asked again for ``retry_after``
  seconds (each call then costs nothing instead of a timeout), after which the
  next call tries it again; an error *reply* (``WRONGTYPE``...) only fails that
  command;
- an entry that is not text, is larger than the cache's ``max_bytes``, or that the
  allow-list serializer (:mod:`.serde`) refuses, is a miss, logged once per cause;
- a value the serializer cannot write is not cached (logged once per type).

Time is bounded by the store's client: a cache's Redis client has short socket and
pool timeouts (:data:`agent_guard.stores.redis.CACHE`), a cache's SQLite pool a short
busy timeout. Only the ledger decides to refuse a call.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from enum import Enum
from typing import Any, TypeVar

from ..stores.redis import UNREACHABLE_ERRORS
from ..stores.url import redact_url
from .serde import DEFAULT_MAX_BYTES, UndecodableEntry, UnencodableValue, dumps_value, loads_value

__all__ = ["DEFAULT_RETRY_AFTER", "CacheIO", "Failure", "check_settings"]

logger = logging.getLogger("agent_guard")
T = TypeVar("T")

#: Seconds a cache leaves its store alone after a backend error.
DEFAULT_RETRY_AFTER = 1.0
_MISSING: Any = object()
# no answer at all (as opposed to an error reply): leave the store alone a while
_UNREACHABLE = (*UNREACHABLE_ERRORS, sqlite3.OperationalError)


def check_settings(max_bytes: int, retry_after: float) -> None:
    """Refuse settings of a cache that cannot work (``ValueError``)."""
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise ValueError(f"max_bytes must be an int >= 1, got {max_bytes!r}")
    if isinstance(retry_after, bool) or not isinstance(retry_after, int | float) or \
            not 0 <= retry_after < float("inf"):
        raise ValueError(f"retry_after must be a number of seconds >= 0, got {retry_after!r}")


class Failure(Enum):
    """Why a read was a miss although the store was asked (None: an honest miss)."""

    ERROR = "error"  # the backend failed, or was being left alone after failing
    UNDECODABLE = "undecodable"  # an entry was there, and was refused


class CacheIO:
    """The failure policy of one store, shared by every cache on it (:meth:`of`)."""

    def __init__(self, store: Any, *, retry_after: float = DEFAULT_RETRY_AFTER,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.retry_after = retry_after
        self._clock = clock
        self._down_until = 0.0
        self._logged: set[tuple[str, ...]] = set()
        self._lock = threading.Lock()
        url = getattr(store, "url", None) or getattr(store, "path", None) or \
            type(store).__name__
        self.name = redact_url(str(url))

    @classmethod
    def of(cls, store: Any) -> CacheIO:
        """The ``CacheIO`` of ``store`` (made once: caches sharing a store share its
        back-off and its log-once memory)."""
        found = store.__dict__.get("_agent_guard_io")
        if found is None:
            found = cls(store)
            store.__dict__["_agent_guard_io"] = found
        return found

    # -- logging once ---------------------------------------------------------------------

    def _once(self, cause: tuple[str, ...], message: str, *args: Any) -> None:
        with self._lock:
            if cause in self._logged or len(self._logged) > 1000:
                return
            self._logged.add(cause)
        logger.warning(message + " (logged once per cause)", *args)

    def refused(self, why: str, what: str = "entry") -> None:
        """An entry read back was refused: log it once per reason."""
        reason = why.split(" (", 1)[0]
        self._once(("undecodable", what, reason),
                   "agent-guard: refused a cache %s in %s: %s; treated as a miss",
                   what, self.name, why)

    def unstorable(self, why: str, what: str) -> None:
        self._once(("unstorable", what, why.split(" (", 1)[0]),
                   "agent-guard: %s not cached: %s", what, why)

    # -- the backend ---------------------------------------------------------------------------

    def _call(self, op: str, fn: Callable[..., T], *args: Any) -> T | Any:
        """``fn(*args)``, or ``_MISSING`` when the backend fails or is left alone."""
        if self._down_until and self._clock() < self._down_until:
            return _MISSING
        try:
            result = fn(*args)
        except Exception as exc:  # a cache never fails the call: any backend error
            unreachable = isinstance(exc, _UNREACHABLE)
            if unreachable:
                self._down_until = self._clock() + self.retry_after
            self._once(("backend", op, type(exc).__name__),
                       "agent-guard: cache store %s unavailable on %s (%s: %s); calls go on "
                       "uncached%s", self.name, op, type(exc).__name__, exc,
                       f", the store is retried after {self.retry_after:g}s" if unreachable
                       else "")
            return _MISSING
        self._down_until = 0.0
        return result

    def read_text(self, key: str) -> tuple[str | None, Failure | None]:
        """The entry's text (size and format are the reader's to check)."""
        raw = self._call("read", self.store.get, key)
        if raw is _MISSING:
            return None, Failure.ERROR
        if raw is None:
            return None, None
        if type(raw) is not str:
            self.refused(f"a {type(raw).__name__} value, not text")
            return None, Failure.UNDECODABLE
        return raw, None

    def read(self, key: str, max_bytes: int = DEFAULT_MAX_BYTES, what: str = "entry"
             ) -> tuple[Any, Failure | None]:
        """``(value, None)`` on a hit, ``(None, None)`` on an honest miss,
        ``(None, Failure)`` when the store failed or the entry was refused."""
        raw, failure = self.read_text(key)
        if raw is None:
            return None, failure
        try:
            return loads_value(raw, max_bytes=max_bytes), None
        except UndecodableEntry as exc:
            self.refused(str(exc), what)
            return None, Failure.UNDECODABLE

    def encode(self, value: Any, what: str, max_bytes: int = DEFAULT_MAX_BYTES
               ) -> str | None:
        try:
            return dumps_value(value, max_bytes=max_bytes)
        except UnencodableValue as exc:
            self.unstorable(str(exc), what)
            return None

    def write_text(self, key: str, text: str, ttl: float | None) -> bool:
        return self._call("write", self.store.set, key, text, ttl) is not _MISSING

    def delete_prefix(self, prefix: str) -> int:
        found = self._call("clear", self.store.delete_prefix, prefix)
        return 0 if found is _MISSING else int(found)

    def scan(self, prefix: str) -> list[tuple[str, Any]] | None:
        found = self._call("scan", self.store.scan, prefix)
        return None if found is _MISSING else found
