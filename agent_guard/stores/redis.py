"""The one way agent-guard builds a Redis client (ledger, caches, usage store).

Every client sits on a *blocking* pool of at most ``max_connections`` sockets: a
thread that finds them all busy waits up to ``pool_timeout`` seconds for one, then
gets an error, so a burst of threads never opens an unbounded number of sockets.
Every socket has a connect and a read timeout. redis-py's own retries are off by
default (``retries=0``): a resent command could run a ledger script twice, and a
cache would rather miss than wait.

Each kind of store has its defaults (:data:`LEDGER`, :data:`CACHE`, :data:`USAGE`);
a cache's are short, because a cache that answers slowly is worse than a miss.
Precedence: the profile's defaults, then the URL's query, then keyword arguments.

Errors: :data:`REDIS_ERRORS` is what a failed command raises (redis-py's errors and
socket errors); the ledger turns them into ``LedgerUnavailable``, a cache into a
miss, the usage store into a counted failure. A sync cluster client's connection closed
by another thread while it reads (redis-py's topology refresh after a node fails
disconnects the node's connections) raises redis-py's ``ConnectionError`` here, not the
parser's ``ValueError("I/O operation on closed file")``; so does an asyncio cluster
client's connection closed by another coroutine before it writes, not an
``AttributeError`` (``'NoneType' object has no attribute 'writelines'``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

__all__ = ["CACHE", "LEDGER", "REDIS_ERRORS", "UNREACHABLE_ERRORS", "USAGE", "RedisProfile",
           "redis_client"]


@dataclass(frozen=True)
class RedisProfile:
    """Defaults of one kind of store's Redis clients (seconds, sockets)."""

    socket_connect_timeout: float
    socket_timeout: float
    max_connections: int
    pool_timeout: float


LEDGER = RedisProfile(socket_connect_timeout=2.0, socket_timeout=5.0, max_connections=64,
                      pool_timeout=5.0)
USAGE = RedisProfile(socket_connect_timeout=2.0, socket_timeout=5.0, max_connections=16,
                     pool_timeout=5.0)
CACHE = RedisProfile(socket_connect_timeout=0.5, socket_timeout=0.5, max_connections=32,
                     pool_timeout=0.5)


def _errors() -> tuple[type[BaseException], ...]:
    try:
        from redis.exceptions import RedisClusterException, RedisError
    except ImportError:  # pragma: no cover - redis is an optional extra
        return (OSError,)
    # a cluster client that reaches no node raises RedisClusterException (not a RedisError)
    return (RedisError, RedisClusterException, OSError)


def _unreachable() -> tuple[type[BaseException], ...]:
    try:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import RedisClusterException
        from redis.exceptions import TimeoutError as RedisTimeoutError
    except ImportError:  # pragma: no cover
        return (OSError, TimeoutError)
    return (RedisConnectionError, RedisTimeoutError, RedisClusterException, OSError,
            TimeoutError)


#: What a failed Redis command raises.
REDIS_ERRORS: tuple[type[BaseException], ...] = _errors()
#: The part of those that means "down or slow" (no reply), not "replied with an error"
#: (``WRONGTYPE``, ``OOM``, ``NOPERM``...).
UNREACHABLE_ERRORS: tuple[type[BaseException], ...] = _unreachable()


def _pool_settings(url_kwargs: dict[str, Any], profile: RedisProfile,
                   max_connections: int | None, pool_timeout: float | None, retries: int,
                   options: dict[str, Any]) -> tuple[int, Any, dict[str, Any]]:
    """(pool size, wait for a connection, connection kwargs) of one client, single node or
    cluster: the profile's defaults, then the URL's query, then keyword arguments."""
    url_max = url_kwargs.pop("max_connections", None)
    url_timeout = url_kwargs.pop("timeout", None)
    size = max_connections if max_connections is not None else \
        url_max if url_max is not None else profile.max_connections
    wait = pool_timeout if pool_timeout is not None else \
        url_timeout if url_timeout is not None else profile.pool_timeout
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"max_connections must be an int >= 1, got {size!r}")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an int >= 0, got {retries!r}")
    kwargs: dict[str, Any] = {"socket_connect_timeout": profile.socket_connect_timeout,
                              "socket_timeout": profile.socket_timeout,
                              **url_kwargs, **options}
    return size, wait, kwargs


def redis_client(url: str, *, profile: RedisProfile = LEDGER, asynchronous: bool = False,
                 retries: int = 0, max_connections: int | None = None,
                 pool_timeout: float | None = None, **options: Any) -> Any:
    """A ``redis.Redis`` (or ``redis.asyncio.Redis`` with ``asynchronous=True``) for
    ``url`` on a bounded blocking pool; ``options`` go to the connections
    (``socket_timeout``, ``health_check_interval``, ``ssl_ca_certs``...)."""
    import redis
    import redis.asyncio as aredis
    from redis.asyncio.connection import parse_url as aparse_url
    from redis.asyncio.retry import Retry as AsyncRetry
    from redis.backoff import ExponentialWithJitterBackoff
    from redis.connection import parse_url
    from redis.retry import Retry

    from .url import REDIS, REDIS_CLUSTER_SCHEMES, check_redis_url, redact_url

    check_redis_url(url, options)
    if url.split("://", 1)[0].lower() in REDIS_CLUSTER_SCHEMES:
        return _cluster_client(url, profile=profile, asynchronous=asynchronous,
                               retries=retries, max_connections=max_connections,
                               pool_timeout=pool_timeout, **options)
    unknown = sorted({k for k, _ in parse_qsl(urlsplit(url).query)} -
                     set(REDIS.client_options))
    if unknown:  # agent-guard's own options are read by parse_url(url, kind), not here
        raise ValueError(f"unknown Redis client option(s) {', '.join(unknown)} in "
                         f"{redact_url(url)!r}; known: {', '.join(sorted(REDIS.client_options))}")
    url_kwargs: dict[str, Any] = dict((aparse_url if asynchronous else parse_url)(url))
    size, wait, kwargs = _pool_settings(url_kwargs, profile, max_connections, pool_timeout,
                                        retries, options)
    backoff = ExponentialWithJitterBackoff(base=0.01, cap=0.5)
    if asynchronous:
        pool: Any = aredis.BlockingConnectionPool(
            max_connections=size, timeout=float(wait), retry=AsyncRetry(backoff, retries),
            **kwargs)
        client: Any = aredis.Redis(connection_pool=pool)
    else:
        pool = redis.BlockingConnectionPool(max_connections=size, timeout=float(wait),
                                            retry=Retry(backoff, retries), **kwargs)
        client = redis.Redis(connection_pool=pool)
    client.auto_close_connection_pool = True
    return client


@functools.cache
def _node_connection(base: type) -> type:
    """``base`` (redis-py's ``Connection`` or ``SSLConnection``) for a sync cluster node:
    a connection another thread closed under this one is a dropped connection
    (``ConnectionError``): its buffer closed mid-read (``ValueError``), or gone before the
    read began or between the parts of a reply (the parser's ``AttributeError`` on its
    ``None`` buffer). Mid-reply, the cluster client answers it by refreshing its slot map
    and the stores by their fault policy; in the pool's check of a connection it hands
    out (``can_read``), the pool replaces the connection and the call goes on."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    class NodeConnection(base):  # type: ignore[valid-type, misc]
        def _closed(self, exc: Exception, doing: str) -> RedisConnectionError:
            self.disconnect()
            return RedisConnectionError(
                f"connection to {self.host}:{self.port} closed while {doing}: {exc}")

        def _gone(self) -> bool:
            """Whether another thread disconnected this connection (its parser has no
            buffer): an AttributeError then is that, not a bug to hide."""
            return getattr(self._parser, "_buffer", True) is None or self._sock is None

        def read_response(self, *args: Any, **kwargs: Any) -> Any:
            try:
                return super().read_response(*args, **kwargs)
            except ValueError as exc:
                raise self._closed(exc, "reading") from exc
            except AttributeError as exc:
                if not self._gone():
                    raise
                raise self._closed(exc, "reading") from exc

        def can_read(self, *args: Any, **kwargs: Any) -> bool:
            try:
                return bool(super().can_read(*args, **kwargs))
            except ValueError as exc:
                raise self._closed(exc, "checked") from exc
            except AttributeError as exc:
                if not self._gone():
                    raise
                raise self._closed(exc, "checked") from exc

    NodeConnection.__name__ = NodeConnection.__qualname__ = f"Node{base.__name__}"
    return NodeConnection


@functools.cache
def _async_node_connection(base: type) -> type:
    """``base`` (redis-py's asyncio ``Connection`` or ``SSLConnection``) for an asyncio
    cluster node: a connection another coroutine disconnected before this one wrote its
    command (the cluster client's topology refresh disconnects a node's connections,
    whoever is using them) is a dropped connection (``ConnectionError``), not the
    ``AttributeError`` of a write on its cleared ``_writer``.

    redis-py's ``send_packed_command`` checks the connection is open (or reconnects it: a
    handshake), awaits ``check_health`` (a PING, with ``health_check_interval``), then
    writes, in a task of its own when there is a ``socket_timeout`` (``asyncio.wait_for``,
    which yields first before Python 3.12): the connection is checked after
    ``check_health`` and in that task, after every yield before the write. Reads need
    nothing: the parser keeps its stream, and reports a closed one as
    ``ConnectionError``."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    class NodeConnection(base):  # type: ignore[valid-type, misc]
        def _check_open(self, doing: str) -> None:
            if self._writer is None:
                raise RedisConnectionError(
                    f"connection to {self.host}:{self.port} closed {doing}")

        async def check_health(self) -> None:
            await super().check_health()
            self._check_open("while it was connected or checked")

        async def _send_packed_command(self, command: Any) -> None:
            self._check_open("before the write")
            await super()._send_packed_command(command)

    NodeConnection.__name__ = NodeConnection.__qualname__ = f"AsyncNode{base.__name__}"
    return NodeConnection


def _cluster_client(url: str, *, profile: RedisProfile, asynchronous: bool, retries: int,
                    max_connections: int | None, pool_timeout: float | None,
                    **options: Any) -> Any:
    """A ``redis.cluster.RedisCluster`` (or ``redis.asyncio.cluster.RedisCluster``) for a
    ``redis+cluster://host:port[,host:port...]`` URL.

    The same bounds as one Redis, per node: at most ``max_connections`` sockets to each
    node, connect and read timeouts, ``retries`` (0 by default) for the cluster client's
    own retries after a timeout or a dropped connection (a MOVED or ASK redirection is
    always followed: it resends nothing that ran). The sync client waits up to
    ``pool_timeout`` for a free socket of a node; redis-py's asyncio cluster client
    cannot wait, so there a command that finds every socket of its node busy fails at
    once (``MaxConnectionsError``, a :data:`REDIS_ERRORS`)."""
    import redis
    import redis.asyncio as aredis
    from redis.asyncio.retry import Retry as AsyncRetry
    from redis.backoff import ExponentialWithJitterBackoff
    from redis.connection import parse_url
    from redis.retry import Retry

    from .url import REDIS, cluster_nodes, redact_url

    parts = urlsplit(url)
    unknown = sorted({k for k, _ in parse_qsl(parts.query)} - set(REDIS.client_options))
    if unknown:
        raise ValueError(f"unknown Redis client option(s) {', '.join(unknown)} in "
                         f"{redact_url(url)!r}; known: {', '.join(sorted(REDIS.client_options))}")
    nodes = cluster_nodes(url)
    tls = parts.scheme.lower().startswith("rediss")
    # redis-py reads the credentials and the query of a one-node URL
    userinfo = parts.netloc.rpartition("@")[0]
    single = (f"{'rediss' if tls else 'redis'}://{userinfo + '@' if userinfo else ''}"
              f"{nodes[0][0]}:{nodes[0][1]}/0" + (f"?{parts.query}" if parts.query else ""))
    url_kwargs: dict[str, Any] = dict(parse_url(single))
    for name in ("host", "port", "path"):
        url_kwargs.pop(name, None)
    if url_kwargs.pop("db", 0) not in (0, None):
        raise ValueError(f"a Redis Cluster has one database (0): {redact_url(url)!r}")
    size, wait, kwargs = _pool_settings(url_kwargs, profile, max_connections, pool_timeout,
                                        retries, options)
    backoff = ExponentialWithJitterBackoff(base=0.01, cap=0.5)
    if asynchronous:
        from redis.asyncio.cluster import ClusterNode as AsyncNode

        # parse_url's connection_class is the sync one. The asyncio cluster client takes
        # no connection_class and only some ssl_* options (not ssl_ca_path, ssl_password):
        # the TLS connection class and every ssl_* option go to its nodes' connections
        # below, as a one-node client's get them (without them it speaks plain text to a
        # rediss+cluster:// URL, or refuses the options with a TypeError).
        kwargs.pop("connection_class", None)
        node_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith("ssl_")}
        # it retries after a timeout anyway (up to `retries`), as the sync one does with
        # retry_on_timeout; the keyword itself it refuses
        kwargs.pop("retry_on_timeout", None)
        aclient = aredis.RedisCluster(
            startup_nodes=[AsyncNode(h, p) for h, p in nodes], max_connections=size,
            retry=AsyncRetry(backoff, retries), **kwargs)
        # its nodes read their connection class and kwargs from the kwargs it shares
        # with its nodes manager (the nodes it discovers) or hold them (the startup nodes)
        node_kwargs["connection_class"] = _async_node_connection(
            aredis.SSLConnection if tls else aredis.Connection)
        aclient.nodes_manager.connection_kwargs.update(node_kwargs)
        for node in aclient.nodes_manager.startup_nodes.values():
            node.connection_class = node_kwargs["connection_class"]
            node.connection_kwargs.update(
                {k: v for k, v in node_kwargs.items() if k != "connection_class"})
        return aclient
    from redis.cluster import ClusterNode

    # the url= path makes redis-py build each node's pool with connection_pool_class
    first = f"{'rediss' if tls else 'redis'}://{nodes[0][0]}:{nodes[0][1]}"
    kwargs["connection_class"] = _node_connection(kwargs.get("connection_class",
                                                             redis.Connection))
    return redis.RedisCluster(
        url=first, startup_nodes=[ClusterNode(h, p) for h, p in nodes[1:]],
        connection_pool_class=redis.BlockingConnectionPool, max_connections=size,
        timeout=float(wait), retry=Retry(backoff, retries), **kwargs)
