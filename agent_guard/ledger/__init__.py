"""Budget ledgers, chosen by URL.

=============================  =========================================
``memory://``                  one process (threads, asyncio);
                               ``?max_idle_seconds=&max_scopes=`` bound it
``sqlite:///path/guard.db``    several processes on one host
``redis://host:6379/0``        several hosts (``rediss://`` for TLS)
=============================  =========================================

Third parties add a scheme with :func:`register_scheme`. Options in a URL's query
(``?timeout=`` for SQLite, redis-py's for Redis, ``namespace``...) are checked:
an unknown one raises, naming the known ones (see :mod:`agent_guard.stores`).
"""

from __future__ import annotations

from collections.abc import Callable

from ..stores import open_store, redact_url
from ..stores import register as _register
from .base import Denial, Ledger, Reservation, ScopeCaps, ScopeTotals, Settlement
from .memory import MemoryLedger

__all__ = [
    "Denial",
    "Ledger",
    "MemoryLedger",
    "Reservation",
    "ScopeCaps",
    "ScopeTotals",
    "Settlement",
    "from_url",
    "redact_url",
    "register_scheme",
]

LedgerFactory = Callable[..., Ledger]


def register_scheme(scheme: str, factory: LedgerFactory) -> None:
    """Make ``from_url("scheme://...")`` build a ledger with ``factory(url, **options)``
    (the factory reads its own URL; the built-in schemes are in
    :mod:`agent_guard.stores.builtin`)."""
    _register("ledger", scheme, factory, options=None)


def from_url(url: str | Ledger, **options: object) -> Ledger:
    """Build a ledger from a URL (a ledger instance is returned as it is); see
    :mod:`agent_guard.stores` for the URL dialect."""
    if isinstance(url, Ledger):
        return url
    ledger: Ledger = open_store(url, "ledger", **options)  # type: ignore[arg-type]
    return ledger
