"""One URL dialect for every store: ledgers, caches and usage stores.

A URL names a *backend* by its scheme (``memory://``, ``sqlite:///path.db``,
``redis://host:6379/0``, ``rediss://``, ``unix://``) and carries options in its
query. Two sorts of options are read:

- the backend's own, the same for every kind of store: ``?timeout=`` (seconds to
  wait for a lock or a connection) for SQLite; for Redis the options redis-py
  reads from a URL (``socket_timeout``, ``socket_connect_timeout``,
  ``max_connections``, ``timeout`` for a free pooled connection, ``db``,
  ``client_name``, ``ssl_*`` ...);
- the options of one kind of store (``max_entries`` for a memory cache,
  ``retention_days`` for a usage store, ``namespace`` ...), registered with the
  scheme's factory.

Any other option raises ``ValueError`` naming the options that are known, before
anything is opened or created. Keyword arguments given beside a URL win over its
query; the query wins over defaults.

The registry maps ``(kind, scheme)`` to a factory ``factory(parsed, **options)``
and a scheme to its backend. A new backend (say Redis Cluster,
``redis+cluster://``) is one :func:`register_backend` and one :func:`register` per
kind of store.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import SplitResult, parse_qsl, unquote, urlencode, urlsplit, urlunsplit

__all__ = ["KINDS", "Backend", "StoreURL", "known_options", "known_schemes", "open_store",
           "parse_url", "redact_url", "register", "register_backend"]

#: The kinds of store a URL can name.
KINDS = ("ledger", "cache", "usage")
_NOUN = {"ledger": "ledger", "cache": "cache store", "usage": "usage store"}

Converter = Callable[[str], Any]


# -- option converters ---------------------------------------------------------------------


def as_int(text: str) -> int:
    return int(text.strip())


def as_float(text: str) -> float:
    value = float(text.strip())
    if not math.isfinite(value):
        raise ValueError("not a finite number")
    return value


def as_str(text: str) -> str:
    return text


def as_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("not a boolean")


# -- redaction --------------------------------------------------------------------------------

# query parameters that carry credentials (redis-py reads ?password= like the user info)
_SECRET_PARAMS = frozenset({"password", "pass", "pwd", "token", "secret", "key", "apikey",
                            "api_key", "access_token", "auth", "ssl_password"})


def _stray_at(parts: SplitResult) -> bool:
    """An ``@`` after the host of a server URL: a user info whose password holds a ``/``,
    ``?`` or ``#`` that was not percent-encoded, so the parser cut it in two."""
    return parts.scheme.lower() not in _FILE_SCHEMES and "@" in (
        parts.path + parts.query + parts.fragment)


# schemes whose URL names a file, where an '@' in the path is only a file name
_FILE_SCHEMES = frozenset({"sqlite", "memory"})


def redact_url(url: str) -> str:
    """The URL without its password (in the user info or the query), safe for messages
    and logs. A user info the parser cannot delimit (an ``@`` after the host: a password
    with a raw ``/``, ``?`` or ``#``) is masked up to its last ``@``."""
    try:
        parts = urlsplit(url)
        if _stray_at(parts):
            scheme, _, rest = url.partition("://")
            return f"{scheme}://***@{rest.rpartition('@')[2]}"
        netloc = parts.netloc
        if parts.password is not None:
            host = netloc.rpartition("@")[2]  # every host:port (a cluster names several)
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


# -- backends and the registry --------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    """A family of schemes: the query options its client reads (for every kind of
    store) and how a URL names a location (``locate`` returns the SQLite path, or
    None, or raises ``ValueError``)."""

    name: str
    client_options: Mapping[str, Converter]
    locate: Callable[[SplitResult, str], str | None]


@dataclass(frozen=True)
class StoreURL:
    """A parsed store URL.

    ``options`` holds every query option, converted (the backend's and the
    kind's); ``kind_options`` only the kind's, which become keyword arguments of
    the factory. ``path`` is the file of a SQLite URL (percent-decoded, no query).
    ``client_url`` is the URL to hand to the backend's client: the kind's options
    removed from its query (a Redis URL keeps redis-py's)."""

    kind: str
    scheme: str
    backend: str
    url: str
    path: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    kind_options: dict[str, Any] = field(default_factory=dict)
    client_url: str = ""

    @property
    def redacted(self) -> str:
        return redact_url(self.url)


@dataclass(frozen=True)
class _Entry:
    factory: Callable[..., Any]
    options: Mapping[str, Converter] | None  # None: the factory reads the raw URL itself


_BACKENDS: dict[str, Backend] = {}
_REGISTRY: dict[tuple[str, str], _Entry] = {}


def register_backend(scheme: str, backend: Backend) -> None:
    """Make ``scheme://`` URLs parse as ``backend``'s."""
    _BACKENDS[scheme.lower()] = backend


def register(kind: str, scheme: str, factory: Callable[..., Any], *,
             options: Mapping[str, Converter] | None) -> None:
    """Build a store of ``kind`` from ``scheme://`` URLs with
    ``factory(parsed: StoreURL, **options)``; ``options`` are the query options of
    that kind (beside the backend's), each with its converter.

    ``options=None`` registers a factory that reads its URL itself (a third-party
    backend): it is called as ``factory(url: str, **keywords)``, unchecked."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    scheme = scheme.lower()
    if options is not None and scheme not in _BACKENDS:
        raise ValueError(f"no backend is registered for {scheme}://; "
                         f"call register_backend first")
    _REGISTRY[(kind, scheme)] = _Entry(factory, options)


def known_schemes(kind: str) -> list[str]:
    return sorted(s for k, s in _REGISTRY if k == kind)


def known_options(kind: str, scheme: str) -> list[str]:
    entry = _REGISTRY.get((kind, scheme.lower()))
    if entry is None or entry.options is None:
        return []
    backend = _BACKENDS[scheme.lower()]
    return sorted({*backend.client_options, *entry.options})


def _example(kind: str) -> str:
    return (f"a {_NOUN[kind]} is a URL such as 'memory://', 'sqlite:///guard.db' or "
            f"'redis://127.0.0.1:6379/0'")


def parse_url(url: str, kind: str) -> StoreURL:
    """Parse and check ``url`` as a ``kind`` store's URL (``ValueError`` if the scheme
    or an option is unknown, or a value does not convert)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(url, str) or "://" not in url:
        raise ValueError(f"{_example(kind)}; got {url!r}")
    scheme = url.split("://", 1)[0].lower()
    entry = _REGISTRY.get((kind, scheme))
    if entry is None:
        known = ", ".join(f"{s}://" for s in known_schemes(kind))
        raise ValueError(f"unknown {_NOUN[kind]} scheme {scheme + '://'!r} in "
                         f"{redact_url(url)!r}; known: {known}")
    if entry.options is None:
        return StoreURL(kind, scheme, "", url, client_url=url)
    backend = _BACKENDS[scheme]
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ValueError(f"cannot parse the {_NOUN[kind]} URL {redact_url(url)!r}: {exc}"
                         ) from None
    # the place first: a password cut by a raw '?' must not be echoed as an option name
    path = backend.locate(parts, url)
    spec: dict[str, Converter] = {**backend.client_options, **entry.options}
    options: dict[str, Any] = {}
    kind_options: dict[str, Any] = {}
    client_query: list[tuple[str, str]] = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        convert = spec.get(key)
        if convert is None:
            raise ValueError(
                f"unknown {scheme}:// option {key!r} in the {_NOUN[kind]} URL "
                f"{redact_url(url)!r}; "
                f"known: {', '.join(sorted(spec)) or '(none)'}")
        options[key] = _convert(convert, key, value, f"the {_NOUN[kind]} URL", url)
        if key in entry.options:
            kind_options[key] = options[key]
        else:
            client_query.append((key, value))
    client_url = _unsplit(parts._replace(query=urlencode(client_query)))
    return StoreURL(kind, scheme, backend.name, url, path, options, kind_options, client_url)


def _unsplit(parts: SplitResult) -> str:
    """``urlunsplit`` that keeps the ``//`` of a URL with an empty host: it writes
    ``unix:///tmp/redis.sock`` as ``unix:/tmp/redis.sock``, which redis-py refuses."""
    text = urlunsplit(parts)
    prefix = f"{parts.scheme}:"
    if not parts.netloc and text.startswith(prefix) and not text.startswith(prefix + "//"):
        text = f"{prefix}//{text[len(prefix):]}"
    return text


def _convert(convert: Converter, key: str, value: str, what: str, url: str) -> Any:
    try:
        return convert(value)
    except (TypeError, ValueError) as exc:
        shown = "***" if key.lower() in _SECRET_PARAMS else repr(value)
        raise ValueError(f"option {key!r} of {what} {redact_url(url)!r} must be "
                         f"{_what(convert)}, got {shown} ({exc})") from None


def _what(convert: Converter) -> str:
    names: dict[Converter, str] = {as_int: "an integer", as_float: "a number",
                                   as_bool: "a boolean", as_str: "text"}
    return names.get(convert, "valid")


def open_store(url: str, kind: str, **keywords: Any) -> Any:
    """Build the ``kind`` store ``url`` names; ``keywords`` win over the URL's options."""
    parsed = parse_url(url, kind)
    entry = _REGISTRY[(kind, parsed.scheme)]
    if entry.options is None:
        return entry.factory(url, **keywords)
    return entry.factory(parsed, **{**parsed.kind_options, **keywords})


# -- the built-in backends --------------------------------------------------------------------


def _locate_memory(parts: SplitResult, url: str) -> None:
    if parts.netloc or parts.path not in ("", "/") or parts.fragment:
        raise ValueError(f"a memory URL names no place (memory:// or memory://?option=...), "
                         f"got {redact_url(url)!r}")
    return None


def _locate_sqlite(parts: SplitResult, url: str) -> str:
    if parts.netloc or not parts.path.startswith("/"):
        raise ValueError(f"a SQLite URL is sqlite:///relative/path.db, sqlite:////abs/path.db "
                         f"or sqlite:///:memory:, got {url!r}")
    if parts.fragment:
        raise ValueError(f"the SQLite URL {url!r} has a '#': percent-encode it as %23 in a "
                         f"file name")
    path = unquote(parts.path[1:])
    if not path:
        raise ValueError(f"the SQLite URL {url!r} names no file")
    return path


def _locate_redis(parts: SplitResult, url: str) -> None:
    """Refuse, before anything connects, what redis-py would read as something else or
    fail on only when it connects: a password cut by a raw ``/``, ``?`` or ``#``; a port
    that is no port (redis-py takes port 0 as 6379); a database that is no number
    (redis-py takes ``/1x`` as db 0); a ``unix://`` URL with a host or no socket; TLS
    options on a URL without TLS (a ``TypeError`` at the first command)."""
    if _stray_at(parts):
        raise ValueError(
            f"the {parts.scheme}:// URL has an '@' after its host: percent-encode "
            f"'/', '?', '#', '@' and ':' in a user name or password (%2F, %3F, %23, %40, "
            f"%3A); got {redact_url(url)!r}")
    if parts.fragment:
        raise ValueError(f"a Redis URL has no fragment, got {redact_url(url)!r}")
    scheme = parts.scheme.lower()
    host = parts.netloc.rpartition("@")[2]
    if scheme == "unix":  # redis-py drops a host: unix://run/r.sock would be /r.sock
        if host.lower() not in ("", "localhost") or not parts.path.strip("/"):
            raise ValueError(f"a unix:// URL names a socket file and no host: "
                             f"unix:///path/to/redis.sock[?db=N], got {redact_url(url)!r}")
    elif not scheme.endswith("+cluster"):
        try:
            port = parts.port
        except ValueError:
            port = 0
        if port == 0 and ":" in host.rpartition("]")[2]:
            raise ValueError(f"the port of a Redis URL is a number in 1-65535, got "
                             f"{redact_url(url)!r}")
        db = parts.path[1:]
        if db and not db.isdigit():
            raise ValueError(f"the path of a Redis URL is its database number "
                             f"(redis://host:port/0), got {redact_url(url)!r}")
    _need_tls(parts, url, [k for k, _ in parse_qsl(parts.query)])
    return None


def _need_tls(parts: SplitResult, url: str, names: Iterable[str]) -> None:
    """``ssl_*`` options on a URL without TLS: redis-py hands them to a plain connection,
    which raises ``TypeError`` at the first command."""
    ssl = sorted({name for name in names if name.startswith("ssl_")})
    if ssl and not parts.scheme.lower().startswith("rediss"):
        raise ValueError(f"{', '.join(ssl)} need a TLS URL (rediss:// or rediss+cluster://), "
                         f"got {redact_url(url)!r}")


def as_cert_reqs(text: str) -> str:
    if text not in ("none", "optional", "required"):
        raise ValueError("one of none, optional, required")
    return text


def as_protocol(text: str) -> int:
    if text.strip() not in ("2", "3"):
        raise ValueError("2 or 3")
    return int(text)


def _redis_client_options() -> dict[str, Converter]:
    """What redis-py reads from a URL's query (see ``redis.connection.parse_url``)."""
    from redis.connection import URL_QUERY_ARGUMENT_PARSERS

    opts: dict[str, Converter] = {k: cast(Converter, v)
                                  for k, v in URL_QUERY_ARGUMENT_PARSERS.items()
                                  if k != "retry_on_error"}
    for name in ("username", "password", "client_name", "lib_name", "lib_version",
                 "ssl_keyfile", "ssl_certfile", "ssl_ca_certs",
                 "ssl_ca_path", "ssl_ca_data", "ssl_password", "ssl_ciphers"):
        opts[name] = as_str
    # redis-py checks these only as it connects
    opts["ssl_cert_reqs"] = as_cert_reqs
    opts["protocol"] = as_protocol
    return opts


MEMORY = Backend("memory", {}, _locate_memory)
SQLITE = Backend("sqlite", {"timeout": as_float}, _locate_sqlite)


def _redis_backend() -> Backend:
    try:
        options = _redis_client_options()
    except ImportError:  # redis is an optional extra: the URL still parses
        options = {"socket_timeout": as_float, "socket_connect_timeout": as_float,
                   "max_connections": as_int, "timeout": as_float, "db": as_int}
    return Backend("redis", options, _locate_redis)


REDIS = _redis_backend()
#: The schemes of a single Redis server.
REDIS_SCHEMES = ("redis", "rediss", "unix")


def _locate_cluster(parts: SplitResult, url: str) -> None:
    """``redis+cluster://[user:pass@]host:port[,host:port...][/0]``: the nodes to learn
    the cluster's layout from (one is enough; more survive one being down)."""
    _locate_redis(parts, url)
    if parts.path not in ("", "/", "/0"):
        raise ValueError(f"a Redis Cluster has one database (0); the URL names "
                         f"{parts.path!r}: {redact_url(url)!r}")
    cluster_nodes(url)  # raises ValueError on a malformed node list
    return None


def check_redis_url(url: str, options: Mapping[str, Any] | None = None) -> None:
    """``ValueError`` for a Redis or Redis Cluster URL (and the keyword options given
    beside it) that a client would misread or fail on only as it connects."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ValueError(f"cannot parse the Redis URL {redact_url(url)!r}: {exc}") from None
    cluster = parts.scheme.lower() in REDIS_CLUSTER_SCHEMES
    (_locate_cluster if cluster else _locate_redis)(parts, url)
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        convert = REDIS.client_options.get(key)
        if convert is not None:
            _convert(convert, key, value, "the Redis URL", url)
    _need_tls(parts, url, options or ())


def cluster_nodes(url: str) -> list[tuple[str, int]]:
    """The ``(host, port)`` pairs a ``redis+cluster://`` URL names (port 6379 if none)."""
    netloc = urlsplit(url).netloc.rpartition("@")[2]
    nodes: list[tuple[str, int]] = []
    for item in netloc.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep:
            host, port = item.strip(), "6379"
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"a Redis Cluster URL is redis+cluster://host:port[,host:port...], "
                             f"got {redact_url(url)!r}")
        nodes.append((host, int(port)))
    return nodes


#: Redis Cluster: redis-py's ``RedisCluster`` (and its asyncio twin), the same options
#: as one Redis (``db`` may only be 0).
REDIS_CLUSTER = Backend("redis-cluster", REDIS.client_options, _locate_cluster)
REDIS_CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
#: Every scheme the Redis stores (ledger, caches, usage) accept.
ALL_REDIS_SCHEMES = REDIS_SCHEMES + REDIS_CLUSTER_SCHEMES
REDIS_BACKENDS = ("redis", "redis-cluster")

register_backend("memory", MEMORY)
register_backend("sqlite", SQLITE)
for _scheme in REDIS_SCHEMES:
    register_backend(_scheme, REDIS)
for _scheme in REDIS_CLUSTER_SCHEMES:
    register_backend(_scheme, REDIS_CLUSTER)
