"""Ledger, caches and usage store on a real 3-node Redis Cluster (``redis+cluster://``).

The cluster is the session fixture ``redis_cluster_url`` (tests/conftest.py): three
``redis-server --cluster-enabled yes`` on loopback joined by ``redis-cli --cluster
create``. The ledger contract, process and property suites also run on it through the
``redis_cluster`` ledger kind; this file covers what is specific to a cluster: the URL,
the client's bounds, a plain ``redis://`` URL pointed at a node, keys spread across
nodes, and the caches and usage store.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from agent_guard import Guard, Limits
from agent_guard.cache import LLMCache, ResultCache, store_from_url
from agent_guard.engine.admission import ModelCall
from agent_guard.engine.usage import Usage
from agent_guard.errors import BudgetExceeded, LedgerUnavailable
from agent_guard.finops.store import UsageStore
from agent_guard.ledger import Reservation, ScopeCaps, from_url
from agent_guard.ledger.redis import RedisLedger
from agent_guard.stores import parse_url, redis_client


def ns() -> str:
    return f"cl-{uuid.uuid4().hex[:10]}"


def cluster_nodes(url: str) -> list[tuple[str, int]]:
    """The nodes of the fixture's URL, read here independently of the library."""
    hosts = url.split("://", 1)[1].split("?", 1)[0].split("/", 1)[0]
    return [(h.rsplit(":", 1)[0], int(h.rsplit(":", 1)[1])) for h in hosts.split(",")]


def first_node(url: str) -> tuple[str, int]:
    return cluster_nodes(url)[0]


# -- the URL -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ledger", "cache", "usage"])
def test_a_cluster_url_parses_for_every_kind_of_store(kind: str) -> None:
    parsed = parse_url("redis+cluster://127.0.0.1:7000,127.0.0.1:7001?socket_timeout=2", kind)
    assert parsed.backend == "redis-cluster"
    from agent_guard.stores.url import cluster_nodes as parsed_nodes

    assert parsed_nodes(parsed.url) == [("127.0.0.1", 7000), ("127.0.0.1", 7001)]
    assert parsed.options["socket_timeout"] == 2.0


@pytest.mark.parametrize("bad", ["redis+cluster://127.0.0.1:7000/3",
                                 "redis+cluster://127.0.0.1:x",
                                 "redis+cluster://127.0.0.1:7000?bogus=1"])
def test_a_bad_cluster_url_is_refused_before_connecting(bad: str) -> None:
    with pytest.raises(ValueError):
        from_url(bad)


def test_the_password_of_a_cluster_url_is_redacted() -> None:
    from agent_guard.stores import redact_url

    shown = redact_url("redis+cluster://u:s3cret@10.0.0.1:7000,10.0.0.2:7000")
    assert "s3cret" not in shown and "10.0.0.2:7000" in shown


def test_the_cluster_client_keeps_the_bounds_of_one_redis(redis_cluster_url: str) -> None:
    client = redis_client(redis_cluster_url + "?socket_timeout=0.7&max_connections=3")
    try:
        assert isinstance(client, RedisCluster)
        client.ping()
        node = client.get_nodes()[0].redis_connection
        pool = node.connection_pool
        assert isinstance(pool, redis.BlockingConnectionPool)
        assert pool.max_connections == 3
        assert pool.connection_kwargs["socket_timeout"] == 0.7
        assert client.retry.get_retries() == 0  # a timed-out script is never resent
    finally:
        client.close()


# -- the ledger ---------------------------------------------------------------------------


def test_the_ledger_runs_on_a_cluster_url(redis_cluster_url: str) -> None:
    ledger = from_url(redis_cluster_url, namespace=ns())
    try:
        caps = [ScopeCaps("session:a", {"usd_nano": 100}), ScopeCaps("global", {"usd_nano": 150})]
        first = ledger.reserve(caps, {"usd_nano": 100}, lease_seconds=30)
        assert first
        assert not ledger.reserve(caps, {"usd_nano": 60}, lease_seconds=30)
        assert ledger.settle(first, {"usd_nano": 40})
        assert ledger.totals("global").get_spent("usd_nano") == 40
        assert ledger.totals("global").get_reserved("usd_nano") == 0
    finally:
        ledger.close()


def test_the_async_ledger_runs_on_a_cluster_url(redis_cluster_url: str) -> None:
    ledger = from_url(redis_cluster_url, namespace=ns())

    async def main() -> None:
        caps = [ScopeCaps("session:a", {"usd_nano": 100})]
        r = await ledger.areserve(caps, {"usd_nano": 70}, lease_seconds=30)
        assert r
        assert not await ledger.areserve(caps, {"usd_nano": 40}, lease_seconds=30)
        assert await ledger.asettle(r, {"usd_nano": 70})
        assert (await ledger.atotals("session:a")).get_spent("usd_nano") == 70
        await ledger.aextend("session:a", "usd_nano", 5)
        assert (await ledger.atotals_many(["session:a"]))[0].extra == {"usd_nano": 5}
        await ledger.aclose()

    try:
        asyncio.run(main())
    finally:
        ledger.close()


def test_a_guard_on_a_cluster_url_admits_and_refuses_at_the_cap(redis_cluster_url: str) -> None:
    guard = Guard(Limits(max_cost_usd="0.001"), ledger=from_url(redis_cluster_url, namespace=ns()))
    call = ModelCall("s1", "gpt-4o-mini", input_tokens=100, max_output_tokens=50)
    admitted = 0
    settled = 0
    for _ in range(200):
        try:
            adm = guard.before_model_call(call)
        except BudgetExceeded:
            break
        settled += guard.after_model_call(adm, Usage(100, 50)).cost_nano
        admitted += 1
    assert 0 < admitted < 200
    scope = guard.scopes("s1")[0].scope
    assert guard.ledger.totals(scope).get_spent("usd_nano") == settled <= 1_000_000
    guard.ledger.close()


@pytest.mark.parametrize("namespace", ["default", "acme", "t-3"])
def test_a_plain_redis_url_on_a_cluster_node_says_to_use_redis_cluster(
        redis_cluster_url: str, namespace: str) -> None:
    """Every namespace's slot lives on one of three nodes: through the wrong node a
    plain client gets MOVED. The error names the fix."""
    host, _ = first_node(redis_cluster_url)
    refused = 0
    for port in (p for _, p in cluster_nodes(redis_cluster_url)):
        ledger = RedisLedger(f"redis://{host}:{port}/0", namespace=namespace)
        try:
            ledger.reserve([ScopeCaps("session:x", {"usd_nano": 10})], {"usd_nano": 1},
                           lease_seconds=5)
        except LedgerUnavailable as exc:
            refused += 1
            assert "redis+cluster://" in str(exc)
        finally:
            ledger.close()
    assert refused == 2  # the two nodes that do not own the namespace's slot


# -- caches and the usage store -------------------------------------------------------------


def test_the_cache_store_on_a_cluster(redis_cluster_url: str) -> None:
    store = store_from_url(redis_cluster_url, namespace=ns())
    try:
        cache = ResultCache(store)
        from agent_guard.cache.result import MISS

        for i in range(30):
            assert cache.get_tool("t", {"i": i}, tenant="a", ttl_class="factual") is MISS
            assert cache.put_tool("t", {"i": i}, i * 2, tenant="a", ttl_class="factual")
        assert [cache.get_tool("t", {"i": i}, tenant="a", ttl_class="factual")
                for i in range(30)] == [i * 2 for i in range(30)]
        assert cache.stats()["t"].errors == 0
        # one namespace's entries spread over every node (no shard holds the whole cache)
        per_node = []
        for _, port in cluster_nodes(redis_cluster_url):
            with redis.Redis(port=port) as node:
                per_node.append(sum(1 for _ in node.scan_iter(match="agc:*", count=1000)))
        assert all(n > 0 for n in per_node), per_node
        assert len(store.scan(cache.prefix)) == 30  # multi-key reads split by slot
        assert cache.clear() == 30  # multi-key deletes too
        assert cache.get_tool("t", {"i": 1}, tenant="a", ttl_class="factual") is MISS
    finally:
        store.close()


def test_the_llm_cache_store_on_a_cluster(redis_cluster_url: str) -> None:
    store = store_from_url(redis_cluster_url)
    try:
        llm = LLMCache(store, namespace=ns())
        from langchain_core.outputs import Generation

        assert llm.lookup("p", "m") is None
        llm.update("p", "m", [Generation(text="hi")])
        hit = llm.lookup("p", "m")
        assert hit is not None and hit[0].text == "hi"
        llm.clear()
        assert llm.lookup("p", "m") is None
    finally:
        store.close()


def test_the_usage_store_on_a_cluster(redis_cluster_url: str) -> None:
    from agent_guard.engine.records import CallRecord

    name = ns()
    store = UsageStore.from_url(redis_cluster_url, namespace=name)
    try:
        guard = Guard(Limits(max_cost_usd="1"))
        store.attach(guard)
        adm = guard.before_model_call(ModelCall("u1", "gpt-4o-mini", input_tokens=10,
                                                max_output_tokens=5))
        record: CallRecord = guard.after_model_call(adm, Usage(10, 5))
        store.flush()
        assert [r.record_id for r in store.records()] == [record.record_id]
    finally:
        store.close()
    again = UsageStore.for_ledger(f"{redis_cluster_url}?namespace={name}")
    try:
        assert len(list(again.rows())) == 1
    finally:
        again.close()




def test_scope_ttl_and_extend_on_a_cluster(redis_cluster_url: str) -> None:
    """``extend`` with a scope TTL is a MULTI/EXEC pipeline: on a cluster it runs on the
    scope's slot, and the TTL is set (sync and async)."""
    name = ns()
    ledger = RedisLedger.from_url(redis_cluster_url + "?scope_ttl_seconds=3600", namespace=name)
    try:
        caps = [ScopeCaps("session:t", {"usd_nano": 10})]
        assert not ledger.reserve(caps, {"usd_nano": 15}, lease_seconds=5)
        ledger.extend("session:t", "usd_nano", 5)

        async def more() -> None:  # the loop's shutdown closes its async client
            await ledger.aextend("session:t", "usd_nano", 1)

        asyncio.run(more())
        r = ledger.reserve(caps, {"usd_nano": 16}, lease_seconds=5)
        assert r and ledger.settle(r, {"usd_nano": 16})
        assert ledger.totals("session:t").extra == {"usd_nano": 6}
        assert 3500 < ledger.client.ttl(ledger.scope_key("session:t")) <= 3600
    finally:
        ledger.close()


def test_the_usage_store_next_to_a_cluster_ledger(redis_cluster_url: str) -> None:
    ledger = from_url(redis_cluster_url, namespace=ns())
    store = UsageStore.for_ledger(ledger)
    try:
        guard = Guard(Limits(max_cost_usd="1"), ledger=ledger)
        store.attach(guard)
        adm = guard.before_model_call(ModelCall("u2", "gpt-4o-mini", input_tokens=10,
                                                max_output_tokens=5))
        record = guard.after_model_call(adm, Usage(10, 5))
        store.flush()
        assert [r.record_id for r in store.records()] == [record.record_id]
    finally:
        store.close()
        ledger.close()


def test_concurrent_first_async_calls_on_a_fresh_cluster_client(redis_cluster_url: str) -> None:
    """redis-py's asyncio cluster client learns the slot map lazily: five commands sent at
    once on a fresh client went to wrong nodes and had their connections closed (about 1
    run in 6 failed). The ledger learns the map first."""
    failures = 0
    for _ in range(25):
        ledger = from_url(redis_cluster_url, namespace=ns())

        async def burst(ledger=ledger) -> list[object]:
            caps = [ScopeCaps("session:a", {"usd_nano": 100})]
            return await asyncio.gather(
                *[ledger.areserve(caps, {"usd_nano": 30}, lease_seconds=60) for _ in range(5)],
                return_exceptions=True)

        replies = asyncio.run(burst())
        failures += any(isinstance(r, BaseException) for r in replies)
        assert sum(bool(r) for r in replies if not isinstance(r, BaseException)) <= 3
        ledger.close()
    assert failures == 0



def test_a_cluster_ledger_built_while_no_node_answers_is_ledger_unavailable() -> None:
    """Unlike one Redis, redis-py's sync cluster client reaches a node when it is built;
    with none answering that is LedgerUnavailable (not a bare RedisClusterException)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    with pytest.raises(LedgerUnavailable):
        from_url(f"redis+cluster://127.0.0.1:{dead}?socket_connect_timeout=0.2")


def test_a_cache_on_a_cluster_nobody_answers_misses_and_recovers(tmp_path) -> None:
    """A cache never becomes a new way to fail: built while no node answers (redis-py's
    cluster client reaches a node when it is built), it misses; once the cluster is up
    it is used."""
    from agent_guard.cache.result import MISS
    from agent_guard.testing.redis_cluster import LocalRedisCluster, _free_ports

    cluster = LocalRedisCluster(tmp_path)
    cluster.ports = _free_ports(3)  # the URL is known before any node runs
    cache = ResultCache(cluster.url + "?socket_connect_timeout=0.2", namespace=ns(),
                        retry_after=0)
    try:
        assert cache.put_tool("t", {}, 1, tenant="a", ttl_class="factual") is False
        assert cache.get_tool("t", {}, tenant="a", ttl_class="factual") is MISS
        cluster.start()
        assert cache.put_tool("t", {}, 1, tenant="a", ttl_class="factual") is True
        assert cache.get_tool("t", {}, tenant="a", ttl_class="factual") == 1
    finally:
        cache.store.close()
        cluster.stop()


def test_a_usage_store_on_a_cluster_nobody_answers_is_built_and_catches_up(tmp_path) -> None:
    """Built while no node answers, the usage store does not raise; a record appended
    then is lost (logged, as on one Redis that is down); once the cluster is up, the
    next records land."""
    from agent_guard.testing.redis_cluster import LocalRedisCluster, _free_ports

    cluster = LocalRedisCluster(tmp_path)
    cluster.ports = _free_ports(3)
    store = UsageStore.from_url(cluster.url + "?socket_connect_timeout=0.2", namespace=ns())
    try:
        guard = Guard(Limits(max_cost_usd="1"))
        store.attach(guard)
        call = ModelCall("u3", "gpt-4o-mini", input_tokens=10, max_output_tokens=5)
        guard.after_model_call(guard.before_model_call(call), Usage(10, 5))  # never raises
        assert store.failed == 1
        cluster.start()
        record = guard.after_model_call(guard.before_model_call(call), Usage(10, 5))
        store.flush()
        assert [r.record_id for r in store.records()] == [record.record_id]
    finally:
        store.close()
        cluster.stop()


# -- one namespace over every node (cells) ----------------------------------------------------


def node_of_keys(url: str, match: str) -> dict[int, int]:
    """How many keys matching ``match`` each node holds."""
    out = {}
    for host, port in cluster_nodes(url):
        with redis.Redis(host=host, port=port) as client:
            out[port] = sum(1 for _ in client.scan_iter(match=match, count=1000))
    return out


def test_cells_spread_one_namespace_over_every_node(redis_cluster_url: str) -> None:
    """Sessions of several teams under a global budget: every node holds keys and runs
    scripts of the namespace (one slot per namespace put them all on one node), and the
    shared scopes' totals, summed over cells, are exact."""
    name = ns()
    ledger = from_url(redis_cluster_url + "?cells=12", namespace=name)
    try:
        for s in range(60):
            scopes = [ScopeCaps(f"session:s{s}", {"usd": 10}),
                      ScopeCaps(f"team:t{s % 3}", {"usd": 1000}),
                      ScopeCaps("global", {"usd": 5000})]
            res = ledger.reserve(scopes, {"usd": 5}, lease_seconds=60)
            assert res, res
            ledger.settle(res, {"usd": 3})  # type: ignore[arg-type]
        spread = node_of_keys(redis_cluster_url, f"ag:{{{name}/*")
        assert len(spread) == 3 and all(spread.values()), spread
        assert ledger.totals("global").get_spent("usd") == 180
        assert [ledger.totals(f"team:t{t}").get_spent("usd") for t in range(3)] == [60] * 3
        assert ledger.totals("global").get_reserved("usd") == 0
    finally:
        ledger.close()


def test_cells_refuse_a_shared_scope_at_its_cap_from_any_cell(redis_cluster_url: str) -> None:
    """A global cap of 10 calls spent from 40 sessions in 12 cells: exactly 10 are
    admitted (the allowances lent to cells are recalled at the cap), then every cell
    refuses, with the total over every cell in the denial."""
    ledger = from_url(redis_cluster_url + "?cells=12", namespace=ns())
    try:
        admitted = 0
        for s in range(40):
            got = ledger.charge([ScopeCaps(f"session:s{s}"), ScopeCaps("global", {"calls": 10})],
                                {"calls": 1})
            admitted += got is None
            if got is not None:
                assert (got.scope, got.cap, got.spent, got.reserved) == ("global", 10, 10, 0)
        assert admitted == 10
        assert ledger.totals("global").get_spent("calls") == 10
    finally:
        ledger.close()


def test_cells_deferred_settles_read_back_the_spend_over_every_cell(
        redis_cluster_url: str) -> None:
    """A deferred settle's callback gets a shared scope's spend summed over the cells
    (from the read-back thread), by the time flush returns; a session's from its script."""
    ledger = from_url(redis_cluster_url + "?cells=12", namespace=ns(), settle_delay=30)
    landed: list = []
    try:
        team = ScopeCaps("team:t", {"usd": 1000})
        for s in range(24):
            res = ledger.reserve([ScopeCaps(f"session:s{s}", {"usd": 100}), team], {"usd": 10},
                                 lease_seconds=60)
            assert res, res
            ledger.settle_later(res, {"usd": 7}, then=landed.append)  # type: ignore[arg-type]
        ledger.flush()
        assert len(landed) == 24 and all(landed)
        assert max(got.spent["team:t"]["usd"] for got in landed) == 24 * 7
        assert all(got.spent[f"session:s{s}"]["usd"] == 7 for s, got in enumerate(landed)
                   if f"session:s{s}" in got.spent)
        assert ledger.totals("team:t").get_spent("usd") == 24 * 7
    finally:
        ledger.close()


class _ClosedMidRead:
    """A node's socket whose read lets another thread close the connection first, as
    redis-py's sync cluster client does while a node restarts (its topology refresh
    disconnects connections that other threads are reading from)."""

    def __init__(self, sock: object, connection: redis.Connection) -> None:
        self.sock, self.connection = sock, connection

    def recv(self, size: int) -> bytes:
        data = self.sock.recv(size)  # type: ignore[attr-defined]
        self.connection.disconnect()  # the other thread, between the read and the parse
        return data

    def __getattr__(self, name: str) -> object:
        return getattr(self.sock, name)


CAPS_A = [ScopeCaps("session:a", {"usd_nano": 100})]


@contextlib.contextmanager
def _node_connection_patched(cluster_url: str, cells: int | None,
                             patch: Any) -> Iterator[Any]:
    """A ledger (plain or cells) that reserved once, whose pooled connection to the
    session's node ``patch(connection)`` changed; closed afterwards."""
    url = cluster_url if cells is None else f"{cluster_url}?cells={cells}"
    ledger = from_url(url, namespace=ns())
    try:
        assert ledger.reserve(CAPS_A, {"usd_nano": 1}, lease_seconds=30)
        key = ledger.scope_key("session:a")  # type: ignore[attr-defined]
        pool = ledger.client.get_node_from_key(key).redis_connection.connection_pool
        connection = pool.get_connection()
        patch(connection)
        pool.release(connection)
        yield ledger
    finally:
        ledger.close()


def _node_socket_replaced(cluster_url: str, cells: int | None,
                          sock: type[_ClosedMidRead]) -> Any:
    """... whose pooled connection to the session's node now reads through ``sock``."""

    def patch(connection: Any) -> None:
        buffer = connection._parser._buffer
        buffer._sock = sock(buffer._sock, connection)

    return _node_connection_patched(cluster_url, cells, patch)


@pytest.mark.parametrize("cells", [None, 3])
def test_a_connection_closed_mid_read_by_another_thread_is_ledger_unavailable(
        redis_cluster_url: str, cells: int | None) -> None:
    """redis-py's parser then raises ValueError("I/O operation on closed file"): the
    ledger says LedgerUnavailable (so the guard's fail policy applies), plain or cells,
    and the next call runs on a fresh connection."""
    with _node_socket_replaced(redis_cluster_url, cells, _ClosedMidRead) as ledger:
        with pytest.raises(LedgerUnavailable):
            ledger.reserve(CAPS_A, {"usd_nano": 1}, lease_seconds=30)
        assert ledger.reserve(CAPS_A, {"usd_nano": 1}, lease_seconds=30)


@pytest.mark.parametrize("cells", [None, 3])
def test_a_connection_closed_between_write_and_read_is_ledger_unavailable(
        redis_cluster_url: str, cells: int | None) -> None:
    """Another thread's topology refresh disconnects the connection after this one wrote
    its command and before it reads: redis-py's parser then has no buffer
    (AttributeError: 'NoneType' object has no attribute 'readline', seen in CI under the
    node-restart fault test, outside the fault policy). The ledger says
    LedgerUnavailable, and the next call runs on a fresh connection."""
    def patch(connection: Any) -> None:
        send = connection.send_packed_command

        def send_then_closed(*args: Any, **kwargs: Any) -> None:
            del connection.send_packed_command  # once
            send(*args, **kwargs)
            connection.disconnect()  # the other thread's refresh

        connection.send_packed_command = send_then_closed

    with _node_connection_patched(redis_cluster_url, cells, patch) as ledger:
        with pytest.raises(LedgerUnavailable):
            ledger.reserve(CAPS_A, {"usd_nano": 1}, lease_seconds=30)
        assert ledger.reserve(CAPS_A, {"usd_nano": 1}, lease_seconds=30)


class _ClosedWhileChecked(_ClosedMidRead):
    """A pooled node socket closed by another thread while the pool checks it before
    handing it out (``can_read``): redis-py's buffer then raises ValueError from its
    ``finally`` (as seen in CI under the fault tests, with EBADF underneath)."""

    def recv(self, size: int) -> bytes:
        self.connection.disconnect()  # the other thread, as the check reads
        return self.sock.recv(size)  # type: ignore[attr-defined,no-any-return]


@pytest.mark.parametrize("cells", [None, 3])
def test_a_pooled_connection_closed_while_checked_is_replaced_not_raised(
        redis_cluster_url: str, cells: int | None) -> None:
    """The pool's check of a connection it hands out turns that ValueError into a
    dropped connection, which the pool replaces: the call goes through."""
    with _node_socket_replaced(redis_cluster_url, cells, _ClosedWhileChecked) as ledger:
        assert isinstance(ledger.reserve(CAPS_A, {"usd_nano": 1}, lease_seconds=30),
                          Reservation)
        assert isinstance(ledger.reserve(CAPS_A, {"usd_nano": 1}, lease_seconds=30),
                          Reservation)


def _closed_by_the_refresh_after(connection: Any, method: str) -> None:
    """The next ``connection.<method>()`` (awaited by ``send_packed_command`` before it
    writes) returns once another task has disconnected the connection, as redis-py's
    asyncio cluster client does to a node's connections in a topology refresh while other
    coroutines use them: the write then finds no ``_writer``."""
    original = getattr(connection, method)

    async def then_closed(*args: Any, **kwargs: Any) -> Any:
        delattr(connection, method)  # once
        result = await original(*args, **kwargs)
        await asyncio.create_task(connection.disconnect())  # the refresh, in another task
        return result

    setattr(connection, method, then_closed)


async def _async_node_connection(ledger: Any) -> Any:
    """The async client's pooled connection to the session's node, after one call."""
    assert isinstance(await ledger.areserve(CAPS_A, {"usd_nano": 1}, lease_seconds=30),
                      Reservation)
    node = ledger._async().client.get_node_from_key(ledger.scope_key("session:a"))
    assert len(node._free) == 1, node._free  # one coroutine, one connection
    return node._free[0]


@pytest.mark.parametrize(("method", "options"), [
    ("check_health", {}),  # after the check that it is connected, before the write
    ("on_connect_check_health", {}),  # while it reconnects (the handshake's replies)
    ("on_connect_check_health", {"socket_timeout": None}),  # a write without wait_for
    ("_send_ping", {"socket_timeout": None, "health_check_interval": 30}),  # its PING's reply
    ("check_health", {"retries": 1}),
])
def test_an_async_connection_closed_before_its_write_is_a_dropped_connection(
        redis_cluster_url: str, method: str, options: dict[str, Any]) -> None:
    """redis-py's write then raised AttributeError ('NoneType' object has no attribute
    'writelines'), seen under the node-kill fault test: neither the ledger's fault policy
    nor the cluster client's handling of a dropped connection applied. It is a dropped
    connection: LedgerUnavailable, and the next call runs on a fresh one; with
    ``retries``, the cluster client refreshes its slot map and resends, and the call goes
    through. (A cells ledger's async calls run its sync client in a thread: tests above.)"""
    ledger = from_url(redis_cluster_url, namespace=ns(), **options)

    async def main() -> None:
        connection = await _async_node_connection(ledger)
        if method == "on_connect_check_health":
            await connection.disconnect()  # the refresh left it to reconnect on next use
        connection.next_health_check = -1  # a PING is due (with health_check_interval)
        _closed_by_the_refresh_after(connection, method)
        if not options.get("retries"):
            with pytest.raises(LedgerUnavailable):
                await ledger.areserve(CAPS_A, {"usd_nano": 1}, lease_seconds=30)
        assert isinstance(await ledger.areserve(CAPS_A, {"usd_nano": 1}, lease_seconds=30),
                          Reservation)

    try:
        asyncio.run(main())
    finally:
        ledger.close()


def test_every_node_of_the_async_cluster_client_reports_a_closed_connection(
        redis_cluster_url: str) -> None:
    """The startup nodes (which it asks for the slot map) as well as the nodes it learns:
    a write on a connection found closed is redis-py's ConnectionError."""
    client = redis_client(redis_cluster_url, asynchronous=True)

    async def main() -> None:
        await client.initialize()
        nodes = [*client.nodes_manager.startup_nodes.values(), *client.get_nodes()]
        assert len(nodes) == 6
        for node in nodes:
            connection = node.acquire_connection()
            try:
                await connection.disconnect()  # as its topology refresh does
                with pytest.raises(redis.ConnectionError):
                    await connection._send_packed_command([b"PING\r\n"])
            finally:
                node.release(connection)
        await client.aclose()

    asyncio.run(main())
