"""One URL dialect for ledgers, caches and usage stores: one parser and scheme registry
(unknown schemes and options raise, naming the known ones; SQLite query parameters are
options, not part of the file name) and one Redis client factory (bounded pool,
timeouts) behind all three."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from agent_guard.cache import LLMCache, ResultCache, store_from_url
from agent_guard.cache.store import MemoryStore, RedisStore, SQLiteStore
from agent_guard.finops.store import UsageStore
from agent_guard.ledger import from_url as ledger_from_url
from agent_guard.stores import StoreURL, known_schemes, parse_url

from .conftest import REDIS_URL, require_redis

KINDS = ["ledger", "cache", "usage"]


def build(kind: str, url: str, **options):
    if kind == "ledger":
        return ledger_from_url(url, **options)
    if kind == "cache":
        return store_from_url(url, **options)
    return UsageStore.from_url(url, **options)


def close(obj) -> None:
    obj.close()


# -- SQLite: the query is options, never the file name ---------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_sqlite_query_parameters_are_options_not_part_of_the_file_name(kind: str,
                                                                       tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cache.db'}?timeout=5"
    obj = build(kind, url)
    try:
        names = sorted(p.name for p in tmp_path.iterdir())
        assert "cache.db" in names and not any("?" in n for n in names), names
        pool = obj._pool
        assert pool.timeout == 5.0 and pool.path == str(tmp_path / "cache.db")
    finally:
        close(obj)


@pytest.mark.parametrize("kind", KINDS)
def test_a_percent_encoded_sqlite_path_is_decoded_once(kind: str, tmp_path: Path) -> None:
    obj = build(kind, f"sqlite:///{tmp_path}/my%20cache.db")
    try:
        assert (tmp_path / "my cache.db").exists()
    finally:
        close(obj)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("url", ["sqlite:///{tmp}/x.db?timeout=5&tiemout=6",
                                 "sqlite:///{tmp}/x.db?busy=1"])
def test_unknown_sqlite_options_raise_listing_the_known_ones(kind: str, url: str,
                                                             tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown .*option .* known: .*timeout"):
        build(kind, url.format(tmp=tmp_path))
    assert not (tmp_path / "x.db").exists()  # refused before anything was created


@pytest.mark.parametrize("kind", KINDS)
def test_a_bad_sqlite_option_value_is_a_clear_error(kind: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"timeout.*'soon'"):
        build(kind, f"sqlite:///{tmp_path}/x.db?timeout=soon")


# -- memory: options of each kind, typos refused ----------------------------------------------


def test_memory_cache_option_is_read_and_a_typo_is_refused() -> None:
    store = store_from_url("memory://?max_entries=5")
    assert isinstance(store, MemoryStore) and store.max_entries == 5
    with pytest.raises(ValueError, match=r"unknown .*option 'max_entrys'.*known: .*max_entries"):
        store_from_url("memory://?max_entrys=5")
    with pytest.raises(ValueError, match="max_entrys"):
        ResultCache("memory://?max_entrys=5")


def test_usage_store_reads_its_url_options_and_refuses_typos() -> None:
    store = UsageStore.from_url("memory://?retention_days=3")
    assert store.retention_days == 3
    with pytest.raises(ValueError, match=r"unknown .*option 'retention_dayz'.*retention_days"):
        UsageStore.from_url("memory://?retention_dayz=3")
    # a keyword given beside the URL wins, as for the ledgers
    assert UsageStore.from_url("memory://?retention_days=3", retention_days=7).retention_days \
        == 7


def test_memory_ledger_typo_is_refused_as_before() -> None:
    with pytest.raises(ValueError, match=r"unknown .*option 'max_scope'.*max_scopes"):
        ledger_from_url("memory://?max_scope=5")


# -- Redis: one factory ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_redis_options_raise_before_connecting(kind: str) -> None:
    with pytest.raises(ValueError, match=r"unknown .*option 'sokcet_timeout'.*socket_timeout"):
        build(kind, "redis://127.0.0.1:1/0?sokcet_timeout=1")


def test_redis_options_of_redis_py_and_ours_are_accepted() -> None:
    parsed = parse_url("redis://u:pw@127.0.0.1:6379/3?socket_timeout=1.5&namespace=ns"
                       "&max_connections=7", kind="cache")
    assert isinstance(parsed, StoreURL)
    assert parsed.options["namespace"] == "ns"
    assert parsed.options["socket_timeout"] == 1.5
    assert parsed.options["max_connections"] == 7
    assert "namespace" not in parsed.client_url and "pw" in parsed.client_url
    assert "pw" not in parsed.redacted


def client_of(kind: str, obj):
    if kind == "ledger":
        return obj.client
    if kind == "cache":
        return obj.client
    return obj.client


@pytest.mark.parametrize("kind", KINDS)
def test_every_redis_client_has_a_bounded_pool_and_timeouts(kind: str) -> None:
    require_redis()
    obj = build(kind, REDIS_URL + "?max_connections=9")
    try:
        pool = client_of(kind, obj).connection_pool
        assert isinstance(pool, redis.BlockingConnectionPool)
        assert pool.max_connections == 9
        kwargs = pool.connection_kwargs
        assert kwargs["socket_timeout"] and kwargs["socket_connect_timeout"]
    finally:
        close(obj)


def test_the_cache_client_has_short_timeouts() -> None:
    require_redis()
    store = store_from_url(REDIS_URL)
    assert isinstance(store, RedisStore)
    kwargs = store.client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] <= 1 and kwargs["socket_connect_timeout"] <= 1
    store.close()


def test_the_namespace_in_a_cache_url_names_the_cache() -> None:
    require_redis()
    cache = ResultCache(REDIS_URL + "?namespace=shop")
    assert cache.namespace == "shop"
    llm = LLMCache(REDIS_URL + "?namespace=shop")
    assert llm.namespace == "shop"
    cache.store.close()
    llm.store.close()


# -- the registry ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_scheme_lists_the_known_ones(kind: str) -> None:
    with pytest.raises(ValueError, match=r"unknown .*scheme 'mongodb://'.*memory://.*redis://"):
        build(kind, "mongodb://localhost/x")


def test_every_kind_knows_the_same_schemes() -> None:
    for kind in KINDS:
        assert {"memory", "sqlite", "redis", "rediss", "unix"} <= set(known_schemes(kind))


def test_the_old_import_path_of_the_sqlite_pool_still_works() -> None:
    from agent_guard.sqlite_pool import SQLitePool as Old
    from agent_guard.stores.sqlite import SQLitePool as New

    assert Old is New


def test_cache_sqlite_memory_path() -> None:
    store = store_from_url("sqlite:///:memory:")
    assert isinstance(store, SQLiteStore)
    store.set("k", "v")
    assert store.get("k") == "v"


def test_a_usage_store_next_to_a_redis_ledger_url_reads_the_ledgers_options() -> None:
    require_redis()
    store = UsageStore.for_ledger(REDIS_URL + "?namespace=shop&scope_ttl_seconds=60")
    try:
        assert store.key == "ag:{shop}:usage"
        assert isinstance(store.client.connection_pool, redis.BlockingConnectionPool)
    finally:
        store.close()


def test_the_redis_factory_refuses_options_it_does_not_know() -> None:
    from agent_guard.ledger.redis import RedisLedger
    from agent_guard.stores import redis_client

    with pytest.raises(ValueError, match=r"unknown Redis client option\(s\) namespace"):
        RedisLedger("redis://127.0.0.1:1/0?namespace=x")  # from_url reads it; this does not
    with pytest.raises(ValueError, match=r"known: .*socket_timeout"):
        redis_client("redis://127.0.0.1:1/0?decode_responses=1")


# -- Redis: a URL that would be misread, or fail only once connected, is refused at once -----

#: each URL holds a password "SECRET" (or a part of one); {port} is a listener's
BAD_REDIS_URLS = {
    "a raw '/' in the password": ("redis://u:SECR/ET@127.0.0.1:{port}/0", "percent-encode"),
    "a raw '?' in the password": ("rediss://u:SECR?ET@127.0.0.1:{port}/0", "percent-encode"),
    "a raw '#' in the password": ("rediss+cluster://u:SECR#ET@127.0.0.1:{port}",
                                  "percent-encode"),
    "a port out of range": ("redis://:SECRET@127.0.0.1:99999/0", "port"),
    "a port that is no number": ("redis://:SECRET@127.0.0.1:6x79/0", "port"),
    "port 0 (redis-py reads 6379)": ("rediss://:SECRET@127.0.0.1:0/0", "port"),
    "a database that is no number (redis-py reads 0)": (
        "redis://:SECRET@127.0.0.1:{port}/1x", "database number"),
    "a database on a cluster (path)": ("redis+cluster://:SECRET@127.0.0.1:{port}/2",
                                       "one database"),
    "a database on a cluster (query)": ("redis+cluster://:SECRET@127.0.0.1:{port}?db=2",
                                        "one database"),
    "no cluster node": ("rediss+cluster://u:SECRET@", "host:port"),
    "an empty cluster node": ("redis+cluster://:SECRET@127.0.0.1:{port},,127.0.0.1:{port}",
                              "host:port"),
    "an unknown option": ("rediss://:SECRET@127.0.0.1:{port}/0?sokcet_timeout=1",
                          "unknown"),
    "a TLS option without TLS": ("redis://:SECRET@127.0.0.1:{port}/0?ssl_cert_reqs=none",
                                 "need a TLS URL"),
    "a TLS option on a plain cluster": (
        "redis+cluster://:SECRET@127.0.0.1:{port}?ssl_ca_certs=/ca.pem", "need a TLS URL"),
    "a TLS option on a unix socket": ("unix:///tmp/r.sock?ssl_ca_certs=/ca.pem&password=SECRET",
                                      "need a TLS URL"),
    "an ssl_cert_reqs redis-py refuses as it connects": (
        "rediss://:SECRET@127.0.0.1:{port}/0?ssl_cert_reqs=maybe", "ssl_cert_reqs"),
    "a protocol redis-py refuses as it connects": (
        "redis://:SECRET@127.0.0.1:{port}/0?protocol=4", "protocol"),
    "a unix socket with a host (redis-py drops it)": (
        "unix://relative/r.sock?password=SECRET", "socket file"),
    "a unix URL with no socket": ("unix://:SECRET@", "socket file"),
}


def _build_with(kind: str, url: str) -> None:
    from agent_guard import Guard, Limits
    from agent_guard.stores import redis_client

    if kind == "ledger":
        ledger_from_url(url)
    elif kind == "guard":
        Guard(Limits(max_cost_usd=1), ledger=url)
    elif kind == "result cache":
        ResultCache(url)
    elif kind == "LLM cache":
        LLMCache(url)
    elif kind == "usage store":
        UsageStore.from_url(url)
    elif kind == "client":
        redis_client(url)
    else:
        redis_client(url, asynchronous=True)


@pytest.mark.parametrize("kind", ["ledger", "guard", "result cache", "LLM cache",
                                  "usage store", "client", "async client"])
@pytest.mark.parametrize("case", list(BAD_REDIS_URLS))
def test_a_bad_redis_url_is_refused_before_connecting_without_its_password(
        case: str, kind: str) -> None:
    """Every store (and the client factory, sync and async) refuses the URL as it is
    built, with an error that says what is wrong and shows no password; nothing
    connected to the server it names (a listener counts connections)."""
    import socket

    template, says = BAD_REDIS_URLS[case]
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        url = template.format(port=listener.getsockname()[1])
        with pytest.raises(ValueError, match=says) as refused:
            _build_with(kind, url)
        try:
            listener.accept()
            connected = True
        except BlockingIOError:
            connected = False
    assert not connected
    assert "SECR" not in str(refused.value)


def test_tls_options_given_as_keywords_need_a_tls_url() -> None:
    from agent_guard.stores import redis_client

    with pytest.raises(ValueError, match="ssl_ca_certs need a TLS URL"):
        redis_client("redis://127.0.0.1:1/0", ssl_ca_certs="/ca.pem")
    with pytest.raises(ValueError, match="ssl_cert_reqs need a TLS URL"):
        ledger_from_url("redis+cluster://127.0.0.1:1", ssl_cert_reqs="none")


@pytest.mark.parametrize("url", ["unix:///var/run/redis.sock", "unix:///tmp/r.sock?db=2",
                                 "unix://u:p%40w@/tmp/r.sock"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_unix_url_reaches_redis_py_as_a_unix_url(url: str, kind: str) -> None:
    """``unix:///path`` (no host) keeps its ``//`` on its way to redis-py, which refuses
    ``unix:/path``."""
    parsed = parse_url(url + ("&" if "?" in url else "?") + "namespace=n", kind)
    assert parsed.client_url.startswith("unix://")
    assert "namespace" not in parsed.client_url
    assert redis.connection.parse_url(parsed.client_url)["path"].endswith(".sock")


def test_redaction_masks_a_password_the_parser_cannot_delimit() -> None:
    from agent_guard.stores import redact_url

    for url in ("redis://u:SECR/ET@h:1/0", "redis://:SECR#ET@h:1/0", "redis://u:SECR?ET@h:1",
                "rediss+cluster://u:SE/CR?ET@h:1,h:2"):
        shown = redact_url(url)
        assert "SECR" not in shown and "ET" not in shown.replace("***", "")
        assert shown.endswith(url.rpartition("@")[2])
    assert redact_url("sqlite:///data/a@b.db") == "sqlite:///data/a@b.db"
