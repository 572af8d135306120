"""Bad input and unavailable backends: a clear error, nothing lost, nothing spent."""

from __future__ import annotations

import socket

import pytest
from langchain_core.messages import AIMessage

from agent_guard import Guard, GuardCallbackHandler, LedgerUnavailable, Limits
from agent_guard.engine.admission import ModelCall
from agent_guard.engine.usage import Usage
from agent_guard.testing import ScriptedChatModel


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_redis_that_is_not_there_fails_closed_with_a_redacted_url() -> None:
    pytest.importorskip("redis")
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    guard = Guard(Limits(max_cost_usd=1), ledger=url)
    with pytest.raises(LedgerUnavailable) as info:
        guard.before_model_call(ModelCall(session="s", model="gpt-4o", input_tokens=10))
    message = str(info.value)
    assert "s3cret" not in message and ":***@127.0.0.1" in message
    assert "call was refused" in message


def test_an_unusable_sqlite_path_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(LedgerUnavailable, match="does not exist"):
        Guard(Limits(), ledger=f"sqlite:///{tmp_path / 'missing' / 'dir' / 'guard.db'}")


@pytest.mark.parametrize("bad", [
    {"input_tokens": -5, "output_tokens": 3, "total_tokens": -2},
    {"input_tokens": 10, "output_tokens": 3, "total_tokens": 13,
     "output_token_details": {"reasoning": 9}},
    {"input_tokens": 10, "output_tokens": 3, "total_tokens": 13,
     "input_token_details": {"cache_read": 50}},
])
def test_malformed_usage_is_replaced_by_a_count_never_zero(bad, caplog) -> None:
    records = []
    guard = Guard(Limits(max_cost_usd=1), on_record=[records.append])
    reply = AIMessage.model_construct(content="an answer of a few tokens", usage_metadata=bad,
                                      tool_calls=[], invalid_tool_calls=[],
                                      response_metadata={}, additional_kwargs={})
    llm = ScriptedChatModel(model_name="gpt-4o", responses=[reply])
    llm.invoke("question", config={"callbacks": [GuardCallbackHandler(guard,
                                                                      session_id="default")]})
    [record] = records
    assert record.usage_estimated and record.cost_nano > 0
    assert record.usage.output_tokens >= 5
    assert "unreadable usage" in caplog.text
    assert guard.usage("default").reserved_nano == 0


def test_usage_values_are_validated() -> None:
    from agent_guard.engine.usage import MalformedUsage

    with pytest.raises(MalformedUsage):
        Usage(input_tokens=-1)
    with pytest.raises(MalformedUsage):
        Usage(input_tokens=1, output_tokens=1, reasoning_tokens=2)


def test_redis_connections_are_bounded_and_an_exhausted_pool_fails_closed(
        redis_url: str, redis_namespace: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import redis as redis_py

    from agent_guard.ledger import Denial, ScopeCaps
    from agent_guard.ledger.redis import RedisLedger

    name = f"ag-pool-{redis_namespace}"
    ledger = RedisLedger(redis_url, namespace=redis_namespace, max_connections=2,
                         client_name=name)
    caps = [ScopeCaps("session:pool", {"usd_nano": 10**12})]

    def call(_: int) -> None:
        res = ledger.reserve(caps, {"usd_nano": 5}, lease_seconds=30)
        assert not isinstance(res, Denial)
        ledger.settle(res, {"usd_nano": 5})

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(call, range(200)))  # 16 threads share 2 connections, waiting turns
    assert ledger.totals("session:pool").get_spent("usd_nano") == 1000
    admin = redis_py.Redis.from_url(redis_url)
    mine = [c for c in admin.client_list() if c.get("name") == name]
    assert 1 <= len(mine) <= 2
    ledger.close()

    starved = RedisLedger(redis_url, namespace=redis_namespace, max_connections=1,
                          pool_timeout=0.2)
    held = starved.client.connection_pool.get_connection()  # the only connection, busy
    with pytest.raises(LedgerUnavailable, match=r"127\.0\.0\.1"):
        starved.reserve(caps, {"usd_nano": 5}, lease_seconds=30)
    starved.client.connection_pool.release(held)
    assert not isinstance(starved.reserve(caps, {"usd_nano": 5}, lease_seconds=30), Denial)
    starved.close()
    admin.close()


# the bare loop.close() case is cleaned up by the collector, which warns about the
# transports it closes
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_an_asyncio_run_per_task_does_not_leave_redis_connections_behind(
        redis_url: str, redis_namespace: str) -> None:
    """A worker that runs each task with asyncio.run gets a new event loop, and so a new
    async pool, per task: each pool is closed when its loop shuts down, so the
    connections on the server stay at one per live loop, not one per task."""
    import asyncio
    import gc

    import redis as redis_py

    from agent_guard.ledger import Denial, ScopeCaps
    from agent_guard.ledger.redis import RedisLedger

    name = f"ag-loops-{redis_namespace}"
    ledger = RedisLedger(redis_url, namespace=redis_namespace, client_name=name)
    caps = [ScopeCaps("session:loops", {"usd_nano": 10**12})]
    admin = redis_py.Redis.from_url(redis_url)

    def mine() -> int:
        return sum(1 for c in admin.client_list() if c.get("name") == name)

    async def task() -> int:
        res = await ledger.areserve(caps, {"usd_nano": 3}, lease_seconds=30)
        assert not isinstance(res, Denial)
        await ledger.asettle(res, {"usd_nano": 3})
        return mine()  # this loop's connection is open while the loop runs

    during = [asyncio.run(task()) for _ in range(25)]
    gc.collect()
    assert during == [1] * 25  # the earlier loops' connections were already closed
    assert mine() == 0 and len(ledger._async_by_loop) == len(ledger._async_closers) == 0

    # a loop closed without shutting down its async generators never ran its closer:
    # the next loop's first call drops it, so loops do not pile up either way
    for _ in range(5):
        bare = asyncio.new_event_loop()
        bare.run_until_complete(task())
        bare.close()
    asyncio.run(task())
    gc.collect()
    assert len(ledger._async_by_loop) == len(ledger._async_closers) == 0
    assert mine() == 0
    assert ledger.totals("session:loops").get_spent("usd_nano") == 3 * 31  # every task

    async def closed_early() -> None:  # aclose inside the loop, then the loop ends
        await task()
        await ledger.aclose()

    asyncio.run(closed_early())
    assert mine() == 0
    admin.close()


def test_sqlite_connections_do_not_pile_up_with_threads(tmp_path) -> None:
    """Each Runnable.batch makes a new thread pool: 300 short-lived threads use the SQLite
    ledger, cache and usage store, and the connections (and file descriptors) kept
    stay a handful, not one per thread."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from agent_guard import Guard, Limits
    from agent_guard.cache.store import SQLiteStore
    from agent_guard.engine.admission import ModelCall
    from agent_guard.engine.usage import Usage
    from agent_guard.finops import UsageStore
    from agent_guard.sqlite_pool import IDLE_CONNECTIONS

    path = tmp_path / "guard.db"
    guard = Guard(Limits(max_cost_usd=100), f"sqlite:///{path}")
    store = UsageStore.for_ledger(guard.ledger)
    guard.add_record_hook(store.append)
    cache = SQLiteStore(str(tmp_path / "cache.db"))

    def call(i: int) -> None:
        admission = guard.before_model_call(ModelCall(session=f"s{i % 7}", model="gpt-4o-mini",
                                                      input_tokens=10, max_output_tokens=5))
        guard.after_model_call(admission, Usage(10, 5))
        cache.set(f"k{i}", "v")
        assert cache.get(f"k{i}") == "v"

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    call(0)
    before = fds()
    for batch in range(30):  # a new pool of 10 threads each time, as batch() does
        with ThreadPoolExecutor(10) as pool:
            list(pool.map(call, range(batch * 10 + 1, batch * 10 + 11)))
    for pool_of in (guard.ledger._pool, store._pool, cache._pool):
        assert pool_of.open_connections <= IDLE_CONNECTIONS
    assert fds() - before <= 3 * 2 * IDLE_CONNECTIONS  # was 2 per thread: ~1,800
    assert len(store.rows()) == 301
    guard.close()
    store.close()
    cache.close()


def test_a_redis_ledger_url_may_name_its_namespace(redis_url: str) -> None:
    """As the usage store's URL does: ?namespace= picks the key space."""
    from agent_guard import Guard, Limits

    guard = Guard(Limits(max_cost_usd=1), f"{redis_url}?namespace=url-ns&scope_ttl_seconds=60")
    try:
        assert guard.ledger.prefix == "ag:{url-ns}:"  # type: ignore[attr-defined]
        assert guard.ledger.scope_ttl_seconds == 60  # type: ignore[attr-defined]
    finally:
        guard.close()
