"""Fault injection against a real, dedicated redis-server (started on a free port).

- **Stop mid-run** (SIGKILL or SIGTERM) while threads and asyncio tasks make guarded
  calls, then restart on the same port. The test server runs with
  ``--appendonly yes --appendfsync always`` so a restart keeps what was acknowledged:
  - ``fail="closed"``: calls are refused while it is down; a settle that failed is
    retried by the caller until it lands. Spent never passes the cap, and the
    backend's total is exactly the sum of what was settled (a settle applied just
    before the kill and retried after it counts once: settle is idempotent per id).
  - ``fail="open"``: no call is refused; after the restart the journal is replayed and
    the backend's total equals the sum of everything settled, locally or remotely,
    exactly, in nano-dollars.
- **Data loss**: without persistence a restarted Redis is empty. Fail open then
  reconciles only what was journaled during the outage; what was settled before is
  gone (budgets reset). The test pins this down so nobody mistakes it for safety.
- **Slow Redis** (``DEBUG SLEEP`` longer than the client's socket timeout) during
  reserve and during settle, and **Redis answering errors** (``maxmemory 1`` ->
  OOM, an ACL that denies scripting -> NOPERM), during reserve and during settle,
  in both fail modes.

Skipped only when ``redis-server`` is not installed and ``CI`` is unset; in CI it fails.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from agent_guard import Guard, Limits
from agent_guard.engine.admission import Admission, ModelCall
from agent_guard.engine.records import CallRecord
from agent_guard.engine.usage import Usage, usd_to_nano
from agent_guard.errors import BudgetExceeded, LedgerUnavailable
from agent_guard.ledger import ScopeCaps
from agent_guard.ledger.failover import FailOpenLedger
from agent_guard.ledger.redis import RedisLedger
from agent_guard.ledger.redis_cells import CellsRedisLedger, cell_tags
from agent_guard.testing.redis_cluster import ClusterUnavailable, LocalRedisCluster

REDIS_SERVER = shutil.which("redis-server")
CAP_USD = "0.02"  # about 660 calls of the workload below: far from spent at the kill
CALL_SECONDS = 0.002  # each "model call" takes this long between reserve and settle
SESSION = "faults"
CALL = ModelCall(SESSION, "gpt-4o-mini", input_tokens=100, max_output_tokens=50)
TIMEOUT = 0.25  # the ledger's socket timeouts in these tests (seconds)
LEASE = 1.0


def require_redis_server() -> str:
    if REDIS_SERVER:
        return REDIS_SERVER
    if os.environ.get("CI"):
        pytest.fail("redis-server is not installed; the fault-injection tests need it in CI")
    pytest.skip("redis-server is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process on a fixed port, restartable."""

    def __init__(self, binary: str, workdir: Path, *, persistent: bool) -> None:
        self.binary, self.workdir, self.persistent = binary, workdir, persistent
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.workdir), "--save", "", "--enable-debug-command", "yes"]
        if self.persistent:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                with self.admin() as client:
                    if client.ping():
                        return
            except redis.RedisError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.02)

    def stop(self, sig: signal.Signals = signal.SIGKILL) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(timeout=10)

    def admin(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=10)

    def admins(self) -> list[redis.Redis]:
        return [self.admin()]

    def user_url(self, user: str, password: str) -> str:
        return f"redis://{user}:{password}@127.0.0.1:{self.port}/0"

    def namespace(self) -> str:
        return uuid.uuid4().hex


class ClusterServer:
    """The same faults on a 3-node Redis Cluster (``redis+cluster://``): the node that
    is stopped, slowed or made to answer errors is the one owning the test's
    namespace (:meth:`namespace` picks one whose slot that node serves)."""

    def __init__(self, cluster: LocalRedisCluster) -> None:
        self.cluster = cluster
        self.target = 0

    @property
    def port(self) -> int:
        return self.cluster.ports[self.target]

    @property
    def url(self) -> str:
        return self.cluster.url

    def start(self) -> None:
        self.cluster.start_node(self.target)

    @property
    def running(self) -> bool:
        return self.cluster.procs[self.target].poll() is None

    def stop(self, sig: signal.Signals = signal.SIGKILL) -> None:
        self.cluster.stop_node(self.target, sig)

    def admin(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=10)

    def admins(self) -> list[redis.Redis]:
        return [redis.Redis(port=p, socket_timeout=10) for p in self.cluster.ports]

    def user_url(self, user: str, password: str) -> str:
        return self.url.replace("://", f"://{user}:{password}@", 1)

    def namespace(self) -> str:
        """A fresh namespace whose keys live on the target node."""
        with self.admin() as client:
            while True:
                ns = uuid.uuid4().hex
                try:
                    client.get(f"ag:{{{ns}}}:open")  # MOVED unless this node owns it
                except redis.exceptions.ResponseError:
                    continue
                return ns


class ClusterCellsServer(ClusterServer):
    """The cluster with the ledger spread over cells (``?cells=12``): the faulted node is
    the one owning the cell of the test's session (a cell's slot range is fixed, so the
    target node is picked for the namespace, not the other way round)."""

    CELLS = 12

    @property
    def url(self) -> str:
        return f"{self.cluster.url}?cells={self.CELLS}"

    def namespace(self) -> str:
        ns = uuid.uuid4().hex
        home = zlib.crc32(f"session:{SESSION}".encode()) % self.CELLS
        key = f"ag:{{{cell_tags(ns, self.CELLS)[home]}}}:open"
        for target in range(len(self.cluster.ports)):
            self.target = target
            with self.admin() as client:
                try:  # MOVED unless this node owns the session's cell
                    client.get(key)
                except redis.exceptions.ResponseError:
                    continue
                return ns
        raise AssertionError(f"no node owns {key}")


@pytest.fixture(scope="module")
def fault_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisCluster]:
    """A 3-node cluster of its own (it is killed and slowed), persistent like the server."""
    require_redis_server()
    cluster = LocalRedisCluster(tmp_path_factory.mktemp("fault-cluster"), extra_args=(
        "--appendonly", "yes", "--appendfsync", "always", "--enable-debug-command", "yes"))
    try:
        cluster.start()
    except (ClusterUnavailable, OSError) as exc:
        if os.environ.get("CI"):
            pytest.fail(f"the fault-test Redis Cluster did not start: {exc}")
        pytest.skip(f"no Redis Cluster: {exc}")
    yield cluster
    cluster.stop()


@pytest.fixture(params=["redis", "redis_cluster", "redis_cluster_cells"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RedisServer]:
    if request.param in ("redis_cluster", "redis_cluster_cells"):
        kind = ClusterCellsServer if request.param == "redis_cluster_cells" else ClusterServer
        node = kind(request.getfixturevalue("fault_cluster"))
        yield node  # type: ignore[misc]
        if not node.running:
            node.start()
        return
    srv = RedisServer(require_redis_server(), tmp_path, persistent=True)
    srv.start()
    yield srv
    if srv.proc is not None and srv.proc.poll() is None:
        srv.stop()


def backend(url: str, namespace: str) -> RedisLedger:
    return RedisLedger.from_url(url, namespace=namespace, socket_connect_timeout=TIMEOUT,
                       socket_timeout=TIMEOUT)


def make_guard(url: str, fail: str, namespace: str) -> tuple[Guard, FailOpenLedger | None]:
    limits = Limits(max_cost_usd=CAP_USD, lease_seconds=LEASE)
    if fail == "closed":
        return Guard(limits, ledger=backend(url, namespace)), None
    ledger = FailOpenLedger(backend(url, namespace), retry_interval=0.05)
    guard = Guard(limits, ledger=ledger, fail="open")
    assert guard.ledger is ledger
    return guard, ledger


def final_totals(url: str, namespace: str) -> tuple[int, int, int]:
    """(spent usd_nano, model calls, reserved usd_nano) once stale leases are back."""
    ledger = backend(url, namespace)
    try:
        t = ledger.totals(f"session:{SESSION}")
        if t.get_reserved("usd_nano"):
            time.sleep(LEASE)  # holds whose reply was lost (a kill, a timeout) expire ...
            ledger.reclaim_expired()  # ... and come back
            t = ledger.totals(f"session:{SESSION}")
        return t.get_spent("usd_nano"), t.get_spent("model_calls"), t.get_reserved("usd_nano")
    finally:
        ledger.close()


def settle_until_counted(settle: Callable[[], CallRecord], tally: Tally) -> CallRecord:
    """What a careful caller does under fail="closed": retry the settle (idempotent)."""
    deadline = time.monotonic() + 20
    while True:
        try:
            return settle()
        except LedgerUnavailable:
            tally.bump("settle_retries")
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    costs: list[int] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def bump(self, what: str) -> None:
        with self.lock:
            self.counts[what] = self.counts.get(what, 0) + 1

    def settled(self, record: CallRecord) -> None:
        with self.lock:
            self.costs.append(record.cost_nano)

    def __getitem__(self, what: str) -> int:
        return self.counts.get(what, 0)


def thread_worker(guard: Guard, tally: Tally, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        try:
            admission = guard.before_model_call(CALL)
        except BudgetExceeded:
            tally.bump("over_budget")
            time.sleep(0.005)
            continue
        except LedgerUnavailable:
            tally.bump("refused_unavailable")
            time.sleep(0.01)
            continue
        time.sleep(CALL_SECONDS)
        usage = Usage(100, rng.randint(1, 50))
        tally.settled(settle_until_counted(lambda a=admission, u=usage:
                                           guard.after_model_call(a, u), tally))


async def async_worker(guard: Guard, tally: Tally, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        try:
            admission: Admission = await guard.abefore_model_call(CALL)
        except BudgetExceeded:
            tally.bump("over_budget")
            await asyncio.sleep(0.005)
            continue
        except LedgerUnavailable:
            tally.bump("refused_unavailable")
            await asyncio.sleep(0.01)
            continue
        await asyncio.sleep(CALL_SECONDS)
        usage = Usage(100, rng.randint(1, 50))
        deadline = time.monotonic() + 20
        while True:
            try:
                record = await guard.aafter_model_call(admission, usage)
                break
            except LedgerUnavailable:
                tally.bump("settle_retries")
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.02)
        tally.settled(record)


def run_with_outage(guard: Guard, server: RedisServer, sig: signal.Signals,
                    felt: Callable[[Tally], bool]) -> Tally:
    """6 threads + 4 asyncio tasks call until the budget is spent; the server is
    stopped with ``sig`` after 30 settled calls and restarted once the outage was
    ``felt`` by the workers (at least 0.3 s later; at most 10 s)."""
    tally, stop = Tally(), threading.Event()

    def run_async() -> None:
        async def main() -> None:
            await asyncio.gather(*(async_worker(guard, tally, stop, 100 + i) for i in range(4)))

        asyncio.run(main())

    threads = [threading.Thread(target=thread_worker, args=(guard, tally, stop, i))
               for i in range(6)]
    threads.append(threading.Thread(target=run_async))
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 20
        while len(tally.costs) < 30 and time.monotonic() < deadline:
            time.sleep(0.005)
        server.stop(sig)
        down_at = time.monotonic()
        time.sleep(0.3)
        while not felt(tally) and time.monotonic() < down_at + 10:
            time.sleep(0.01)
        server.start()
        # run on until every worker is refused for budget (or 15 s)
        deadline = time.monotonic() + 15
        seen = tally["over_budget"]
        while time.monotonic() < deadline:
            time.sleep(0.1)
            if tally["over_budget"] - seen >= 50:
                break
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    return tally


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_fail_closed_survives_a_restart_without_losing_or_doubling(
        server: RedisServer, sig: signal.Signals) -> None:
    ns = server.namespace()
    guard, _ = make_guard(server.url, "closed", ns)
    tally = run_with_outage(guard, server, sig,
                            lambda t: t["refused_unavailable"] + t["settle_retries"] >= 10)
    guard.close()
    spent, calls, reserved = final_totals(server.url, ns)
    # the outage was felt: calls were refused, or their settles had to be retried
    assert tally["refused_unavailable"] + tally["settle_retries"] > 0, tally.counts
    assert spent == sum(tally.costs)  # nothing settled is lost, nothing counted twice
    assert calls == len(tally.costs)
    assert spent <= usd_to_nano(CAP_USD)
    assert reserved == 0
    assert tally["over_budget"] > 0  # the cap was reached, and held


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_fail_open_reconciles_exactly_after_a_restart(
        server: RedisServer, sig: signal.Signals) -> None:
    ns = server.namespace()
    guard, ledger = make_guard(server.url, "open", ns)
    assert ledger is not None
    tally = run_with_outage(guard, server, sig, lambda _: ledger.admitted_open >= 10)
    deadline = time.monotonic() + 10
    while not ledger.reconcile() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ledger.pending == 0 and not ledger.is_open
    assert tally["refused_unavailable"] == 0 and tally["settle_retries"] == 0
    diagnosis = (tally.counts, len(tally.costs), ledger.outages, ledger.admitted_open,
                 ledger.reconciled)
    assert ledger.outages >= 1 and ledger.admitted_open > 0, diagnosis
    assert ledger.reconciled > 0, diagnosis
    guard.close()
    spent, calls, reserved = final_totals(server.url, ns)
    assert spent == sum(tally.costs)  # local + remote, exact in nano-USD
    assert calls == len(tally.costs)
    assert reserved == 0


def test_fail_open_after_data_loss_reconciles_only_the_outage(tmp_path: Path) -> None:
    """Without persistence the restarted server is empty: the spend settled before the
    outage is gone and the session's budget restarts from what was journaled."""
    srv = RedisServer(require_redis_server(), tmp_path, persistent=False)
    srv.start()
    try:
        ns = uuid.uuid4().hex
        guard, ledger = make_guard(srv.url, "open", ns)
        assert ledger is not None
        ledger.retry_interval = 0

        def call(output_tokens: int) -> int:
            admission = guard.before_model_call(CALL)
            return guard.after_model_call(admission, Usage(100, output_tokens)).cost_nano

        before = [call(n) for n in (10, 20, 30)]
        srv.stop(signal.SIGKILL)
        during = [call(n) for n in (40, 50)]
        assert ledger.is_open and ledger.pending == 2
        srv.start()  # empty
        assert ledger.reconcile()
        after = [call(5)]
        guard.close()
        spent, calls, _ = final_totals(srv.url, ns)
        assert spent == sum(during) + sum(after)  # exact for what survived ...
        assert spent < sum(before) + sum(during) + sum(after)  # ... the rest is lost
        assert calls == 3
    finally:
        srv.stop()


# -- a slow Redis and a Redis answering errors -----------------------------------------------


def sleep_server(server: RedisServer, seconds: float) -> threading.Thread:
    """Block the server for ``seconds`` (DEBUG SLEEP); returns once it is asleep."""
    def run() -> None:
        with server.admin() as client:
            client.execute_command("DEBUG", "SLEEP", seconds)

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.1)
    return t


def fault_oom(server: RedisServer) -> Callable[[], None]:
    with server.admin() as client:
        client.config_set("maxmemory", 1)  # noeviction (the default): writes get -OOM

    def undo() -> None:
        with server.admin() as client:
            client.config_set("maxmemory", 0)
    return undo


def fault_noperm(server: RedisServer) -> Callable[[], None]:
    with server.admin() as client:
        client.acl_setuser("guard", enabled=True, passwords=["+pw"], keys=["*"],
                           categories=["-@all", "+@read", "+@connection"])

    def undo() -> None:
        with server.admin() as client:
            client.acl_setuser("guard", enabled=True, passwords=["+pw"], keys=["*"],
                               categories=["+@all"])
    return undo


def fault_slow(server: RedisServer) -> Callable[[], None]:
    asleep = sleep_server(server, 1.0)  # 4x the client's socket timeout
    return lambda: asleep.join()


FAULTS = {"slow": fault_slow, "oom": fault_oom, "noperm": fault_noperm}


@pytest.mark.parametrize("phase", ["reserve", "settle"])
@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.parametrize("fail", ["closed", "open"])
def test_faults_during_reserve_and_settle(server: RedisServer, fail: str, fault: str,
                                          phase: str) -> None:
    for admin in server.admins():  # a user the ACL fault can restrict
        with admin as client:
            client.acl_setuser("guard", enabled=True, passwords=["+pw"], keys=["*"],
                               categories=["+@all"])
    url = server.user_url("guard", "pw")
    ns = server.namespace()
    guard, ledger = make_guard(url, fail, ns)
    usage = Usage(100, 33)
    tally = Tally()
    admission: Admission | None = None
    if phase == "settle":
        admission = guard.before_model_call(CALL)
    undo = FAULTS[fault](server)
    try:
        if phase == "reserve":
            if fail == "closed":
                with pytest.raises(LedgerUnavailable) as err:
                    guard.before_model_call(CALL)
                assert "fail='open'" in str(err.value)
            else:
                admission = guard.before_model_call(CALL)  # admitted on local caps
                assert ledger is not None and ledger.is_open and ledger.admitted_open == 1
        else:
            assert admission is not None
            if fail == "closed":  # the call ran: its settle is kept, not lost
                record = guard.after_model_call(admission, usage)
                assert guard.pending_settles == 1
                tally.settled(record)
            else:
                record = guard.after_model_call(admission, usage)  # journaled
                assert ledger is not None and ledger.pending >= 1
                tally.settled(record)
    finally:
        undo()
    if phase == "reserve" and fail == "closed":
        spent, calls, reserved = final_totals(url, ns)
        assert (spent, calls, reserved) == (0, 0, 0)  # refused: nothing spent or held
        return
    if ledger is not None and ledger.is_open:
        time.sleep(0.06)  # past retry_interval: the next call replays first
    assert admission is not None
    if not tally.costs:
        tally.settled(settle_until_counted(lambda: guard.after_model_call(admission, usage),
                                           tally))
    if ledger is not None:
        assert ledger.reconcile() and ledger.pending == 0 and not ledger.is_open
    deadline = time.monotonic() + 20
    while not guard.settle_pending():  # the server may still be recovering
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert guard.pending_settles == 0
    guard.close()
    spent, calls, reserved = final_totals(url, ns)
    assert spent == sum(tally.costs) == 100 * 150 + 33 * 600  # counted exactly once
    assert (calls, reserved) == (1, 0)


# -- cells: a node down stops only the cells it owns ----------------------------------------


def owner(cluster: LocalRedisCluster, key: str) -> int:
    """The index of the node that serves ``key``."""
    for index, port in enumerate(cluster.ports):
        with redis.Redis(port=port, socket_timeout=10) as client:
            try:
                client.get(key)
            except redis.exceptions.ResponseError:
                continue
            return index
    raise AssertionError(f"no node serves {key}")


def test_cells_a_node_down_stops_only_its_cells_and_lent_allowance_still_admits(
        fault_cluster: LocalRedisCluster) -> None:
    """The node owning a team's home is killed: a session on another node spends the
    team allowance its cell already holds, then is refused (LedgerUnavailable: it cannot
    borrow), as is every call whose cell is on the dead node; after the restart (AOF)
    the totals are exact and nothing is held."""
    cells = 12
    url = f"{fault_cluster.url}?cells={cells}"
    ns = uuid.uuid4().hex
    tags = cell_tags(ns, cells)
    node_of_cell = [owner(fault_cluster, f"ag:{{{tag}}}:open") for tag in tags]
    ledger = backend(url, ns)
    assert isinstance(ledger, CellsRedisLedger)
    team = ScopeCaps("team:t", {"usd": 1000})  # a loan is 1000 / 48 -> 21
    dead = node_of_cell[ledger.home("team:t")]
    away = next(f"session:a{i}" for i in range(200)
                if node_of_cell[ledger.home(f"session:a{i}")] != dead)
    near = next(f"session:b{i}" for i in range(200)
                if node_of_cell[ledger.home(f"session:b{i}")] == dead
                and ledger.home(f"session:b{i}") != ledger.home("team:t"))
    assert ledger.charge([ScopeCaps(away), team], {"usd": 1}) is None  # borrows 21
    fault_cluster.stop_node(dead)
    try:
        for _ in range(20):  # the rest of the loan, with the home down
            assert ledger.charge([ScopeCaps(away), team], {"usd": 1}) is None
        with pytest.raises(LedgerUnavailable):  # the loan is spent: it must borrow
            ledger.charge([ScopeCaps(away), team], {"usd": 1})
        with pytest.raises(LedgerUnavailable):  # its cell is on the dead node
            ledger.charge([ScopeCaps(near), team], {"usd": 1})
    finally:
        fault_cluster.start_node(dead)
    deadline = time.monotonic() + 20
    while True:  # the restarted node may take a moment to serve again
        try:
            assert ledger.charge([ScopeCaps(away), team], {"usd": 1}) is None
            break
        except LedgerUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    totals = ledger.totals("team:t")
    assert (totals.get_spent("usd"), totals.get_reserved("usd")) == (22, 0)
    ledger.close()
