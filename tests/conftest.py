"""Shared fixtures: ledgers of every backend, a real Redis on loopback."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent_guard.ledger import Ledger, MemoryLedger


class FakeClock:
    """The one fake clock of the suite: ``clock()`` reads it, ``clock.advance(s)`` or
    ``clock.now = t`` moves it (thread-safe). Pass it as a ledger's or guard's
    ``clock=``."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self._lock = threading.Lock()
        self._now = float(start)

    def __call__(self) -> float:
        with self._lock:
            return self._now

    @property
    def now(self) -> float:
        return self()

    @now.setter
    def now(self, value: float) -> None:
        with self._lock:
            self._now = float(value)

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds


@pytest.fixture
def clock() -> FakeClock:
    """A :class:`FakeClock` at t = 1,000,000 s."""
    return FakeClock()


# -- the fast run: `python -m pytest -m "not slow"` ---------------------------------------------
# What is slow: other processes (workers, subprocess examples, servers), a Redis Cluster,
# property-based searches, the money-truth and graph-control matrices (real LangChain runs
# against the local provider servers), the notebook and the price conformance. They
# run in `python -m pytest` (everything, what .ci/run runs). A new test that takes more
# than a second or two belongs here, or carries @pytest.mark.slow itself.
SLOW_MODULES = frozenset({
    "test_cache_faults", "test_cache_hostile", "test_crash_resume", "test_fuzz",
    "test_graph_control_matrix", "test_ledger_processes", "test_ledger_properties",
    "test_money_truth", "test_money_truth_anthropic", "test_money_truth_content",
    "test_money_truth_redteam", "test_money_truth_redteam2",
    "test_notebooks", "test_phoenix", "test_price_conformance", "test_redis_cluster",
    "test_redis_faults", "test_redis_tls", "test_telemetry_examples", "test_telemetry_setup",
})
SLOW_TESTS = (
    "tests/test_budgets.py::test_team_month_cap_shared_by_two_processes",
    "tests/test_budgets.py::test_scope_values_cannot_collide",
    "tests/test_cli.py::test_quickstart_example_runs_offline",
    "tests/test_cli.py::test_team_budget_example_runs_offline",
    "tests/test_front_door.py::test_quickstart_prints_tool_records_as_tool_calls",
    "tests/test_guarded_graph.py::test_a_second_process_shares_the_thread_budget",
    "tests/test_telemetry.py::test_configure_otlp_exports_to_a_collector",
    "tests/test_token_bound.py::test_utf8_length_is_never_below_the_token_count",
    "tests/test_tokens.py::test_the_encoding_is_the_one_tiktoken_builds_itself",
    "tests/test_tokens.py::test_loads_with_no_network_and_an_empty_tiktoken_cache",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")
        if (module in SLOW_MODULES or item.nodeid.startswith(SLOW_TESTS)
                or "redis_cluster" in item.nodeid):
            item.add_marker(pytest.mark.slow)


# -- parallel runs (pytest-xdist) ---------------------------------------------------------------
# pyproject's addopts say ``-n auto --dist loadfile``, and this hook is what "auto" means: a run
# of the whole suite (no paths, or a directory) goes to 2 worker processes, one per core of
# the CI machine: half the suite's time is waiting (leases running out, servers, other
# processes), so two workers take about half the wall time. A run naming files or tests
# stays in this process (starting workers costs more than a few tests take). ``-n N`` on
# the command line (``-n 0``: no workers) or PYTEST_XDIST_AUTO_NUM_WORKERS overrides it.
# ``loadfile`` keeps each test file on one worker, in its own order, so a module's servers
# start once. No more workers than cores: a test that holds a 0.6 s lease past its end needs
# the CPU promptly (with 4 workers on 2 cores one of them lost its hold).
XDIST_WORKERS = 2


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # xdist's own hook reads it
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    here = config.invocation_params.dir
    whole = config.args_source is not pytest.Config.ArgsSource.ARGS or any(
        (here / arg.split("::", 1)[0]).is_dir() for arg in config.args)
    return min(XDIST_WORKERS, cpus or 1) if whole and (cpus or 1) > 1 else 0


REDIS_URL = os.environ.get("AGENT_GUARD_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def redis_available() -> bool:
    try:
        import redis
    except ImportError:
        return False
    try:
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=0.5)
        ok = bool(client.ping())
        client.close()
        return ok
    except Exception:
        return False


_REDIS_UP = redis_available()


def require_redis() -> None:
    """Skip on a developer machine without Redis; fail in CI, where .ci/run starts one."""
    if _REDIS_UP:
        return
    if os.environ.get("CI"):
        pytest.fail(f"redis-server is not answering at {REDIS_URL}; .ci/run should start it")
    pytest.skip(f"no redis-server at {REDIS_URL}")


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real 3-node Redis Cluster on loopback (``redis+cluster://...``) for the session.

    Skipped on a developer machine without ``redis-server``/``redis-cli``; in CI it fails
    (``.ci/run`` installs redis-server, which brings redis-cli)."""
    from agent_guard.testing.redis_cluster import ClusterUnavailable, LocalRedisCluster

    cluster = LocalRedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
    except (ClusterUnavailable, OSError) as exc:
        if os.environ.get("CI"):
            pytest.fail(f"the test Redis Cluster did not start: {exc}")
        pytest.skip(f"no Redis Cluster: {exc}")
    yield cluster.url
    cluster.stop()


@pytest.fixture
def redis_url() -> str:
    require_redis()
    return REDIS_URL


@pytest.fixture
def redis_namespace() -> Iterator[str]:
    """A fresh key namespace; its keys are deleted afterwards."""
    ns = f"test-{uuid.uuid4().hex[:12]}"
    yield ns
    if _REDIS_UP:
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"*{ns}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture(params=["memory", "redis"])
def memory_or_redis_ledger(request: pytest.FixtureRequest, redis_namespace: str
                           ) -> Iterator[Ledger]:
    """A memory ledger, then a Redis ledger in a fresh namespace (the provider-side
    accounting suites run each path on both)."""
    if request.param == "memory":
        made: Ledger = MemoryLedger()
    else:
        require_redis()
        from agent_guard.ledger.redis import RedisLedger

        made = RedisLedger.from_url(REDIS_URL, namespace=redis_namespace)
    yield made
    made.close()


#: cells of the spread ledger layout in the tests (agent_guard.ledger.redis_cells): few
#: on one Redis, so that a call's scopes often sit in different cells
CELLS_ONE_REDIS = 4
CELLS_CLUSTER = 12


@pytest.fixture(params=["sqlite", "redis", "redis_cluster", "redis_cluster_cells"])
def shared_url(request: pytest.FixtureRequest, tmp_path: Path, redis_namespace: str
               ) -> tuple[str, str | None]:
    """(ledger URL, Redis namespace or None) that several processes open: one SQLite
    file, or one namespace of the test Redis, or of the test Redis Cluster."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}", None
    if request.param == "redis_cluster":
        return request.getfixturevalue("redis_cluster_url"), redis_namespace
    if request.param == "redis_cluster_cells":
        return (f"{request.getfixturevalue('redis_cluster_url')}?cells={CELLS_CLUSTER}",
                redis_namespace)
    require_redis()
    return REDIS_URL, redis_namespace


LedgerFactory = Callable[..., Ledger]


@pytest.fixture(params=["memory", "sqlite", "redis", "redis_cells", "redis_cluster",
                        "redis_cluster_cells"])
def ledger_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_ledger(
    ledger_kind: str, tmp_path, redis_namespace: str, request: pytest.FixtureRequest
) -> Iterator[LedgerFactory]:
    """Build ledgers of ``ledger_kind`` that share one store (same file / namespace)."""
    made: list[Ledger] = []

    def factory(**options: object) -> Ledger:
        if ledger_kind == "memory":
            if made:  # one process: share the same instance
                return made[0]
            ledger: Ledger = MemoryLedger(**options)  # type: ignore[arg-type]
        elif ledger_kind == "sqlite":
            from agent_guard.ledger.sqlite import SQLiteLedger

            ledger = SQLiteLedger(str(tmp_path / "ledger.db"), **options)  # type: ignore[arg-type]
        elif ledger_kind in ("redis_cluster", "redis_cluster_cells"):
            from agent_guard.ledger.redis import RedisLedger

            if ledger_kind == "redis_cluster_cells":
                options = {"cells": CELLS_CLUSTER, **options}
            ledger = RedisLedger.from_url(request.getfixturevalue("redis_cluster_url"),
                                          namespace=redis_namespace, **options)
        else:
            require_redis()
            from agent_guard.ledger.redis import RedisLedger

            if ledger_kind == "redis_cells":
                options = {"cells": CELLS_ONE_REDIS, **options}
            ledger = RedisLedger.from_url(REDIS_URL, namespace=redis_namespace, **options)
        made.append(ledger)
        return ledger

    yield factory
    for ledger in made:
        ledger.close()


@pytest.fixture
def ledger(make_ledger: LedgerFactory) -> Ledger:
    return make_ledger()


@pytest.fixture(autouse=True)
def _fresh_openai_http_clients() -> Iterator[None]:
    """Forget langchain-openai's cached httpx clients after each test.

    langchain-openai keeps one default client per ``base_url`` for the whole process
    (``functools.lru_cache``). Each test starts its own local server, and the OS reuses
    ephemeral ports: a later test on the same port would get an async client whose pooled
    connections belong to an earlier test's closed event loop (``RuntimeError: Event loop
    is closed`` when the pool drops them), a flake that depends on test order."""
    yield
    try:
        from langchain_openai.chat_models import _client_utils
    except ImportError:  # the openai extra is not installed
        return
    for name in ("_cached_sync_httpx_client", "_cached_async_httpx_client"):
        cached = getattr(_client_utils, name, None)
        if cached is not None and hasattr(cached, "cache_clear"):
            cached.cache_clear()
