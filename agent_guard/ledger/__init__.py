"""Budget ledgers, chosen by URL.

=============================  =========================================
``memory://``                  one process (threads, asyncio);
                               ``?max_idle_seconds=&max_scopes=`` bound it
``sqlite:///path/guard.db``    several processes on one host
``redis://host:6379/0``        several hosts (``rediss://`` for TLS)
=============================  =========================================

Third parties add a scheme with :func:`register_scheme`.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

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
_SCHEMES: dict[str, LedgerFactory] = {}


def register_scheme(scheme: str, factory: LedgerFactory) -> None:
    """Make ``from_url("scheme://...")`` build a ledger with ``factory(url, **options)``."""
    _SCHEMES[scheme.lower()] = factory


# query parameters that carry credentials (redis-py reads ?password= like the user info)
_SECRET_PARAMS = frozenset({"password", "pass", "pwd", "token", "secret", "key", "apikey",
                            "api_key", "access_token", "auth"})


def redact_url(url: str) -> str:
    """The URL without its password (in the user info or the query), safe for messages
    and logs."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            host = parts.hostname or ""
            if parts.port:
                host = f"{host}:{parts.port}"
            netloc = (f"{parts.username}:***@" if parts.username else ":***@") + host
    except ValueError:
        return "<unparseable url>"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in _SECRET_PARAMS for k, _ in pairs):
            query = "&".join(f"{k}=***" if k.lower() in _SECRET_PARAMS else
                             urlencode({k: v}) for k, v in pairs)
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _memory(url: str, **options: object) -> Ledger:
    return MemoryLedger.from_url(url, **options)


def _sqlite(url: str, **options: object) -> Ledger:
    from .sqlite import SQLiteLedger

    return SQLiteLedger.from_url(url, **options)


def _redis(url: str, **options: object) -> Ledger:
    from .redis import RedisLedger

    return RedisLedger.from_url(url, **options)


register_scheme("memory", _memory)
register_scheme("sqlite", _sqlite)
for _scheme in ("redis", "rediss", "unix"):
    register_scheme(_scheme, _redis)


def from_url(url: str | Ledger, **options: object) -> Ledger:
    """Build a ledger from a URL (a ledger instance is returned as it is)."""
    if isinstance(url, Ledger):
        return url
    if not isinstance(url, str) or "://" not in url:
        raise ValueError(
            f"ledger must be a URL such as 'memory://', 'sqlite:///guard.db' or "
            f"'redis://127.0.0.1:6379/0', or a Ledger instance; got {url!r}"
        )
    scheme = url.split("://", 1)[0].lower()
    factory = _SCHEMES.get(scheme)
    if factory is None:
        known = ", ".join(sorted(f"{s}://" for s in _SCHEMES))
        raise ValueError(
            f"unknown ledger scheme {scheme + '://'!r} in {redact_url(url)!r}; known: {known}"
        )
    return factory(url, **options)
