"""``rediss://``, ``rediss+cluster://``, ``unix://`` and passwords: every client
agent-guard builds speaks TLS on a TLS URL, authenticates, and every store runs on it.

The checks, each over {one Redis, a cluster} x {sync, async}:

- what a client sends first on the wire, to a plain socket that records it: a TLS
  handshake record (``0x16``) for a ``rediss`` URL, a RESP command (``*``) for ``redis``;
  a client that sends its commands (and its password) in plain text on a ``rediss`` URL
  fails here;
- every store (ledger, LLM cache under ``ChatOpenAI``, result cache under a tool, node
  cache under a compiled graph, usage store) over ``rediss://`` (the TLS port of a real
  ``redis-server``), ``rediss+cluster://`` (a real TLS-only cluster, ``--port 0
  --tls-port --tls-cluster yes``), both verified against a self-signed CA given in the
  URL (``ssl_ca_certs``), ``unix://`` and a plain ``redis://`` port of the server, each
  needing a password (``--requirepass``, and an ACL user ``--user``);
- the TLS options of the query (``ssl_cert_reqs``, ``ssl_check_hostname``,
  ``ssl_ca_certs``, ``ssl_ca_path``, a client key's ``ssl_password``...) accepted or
  refused alike by the sync and the async clients of one Redis and of a cluster;
- a wrong password: refused, and the password is in no error, repr, log or span.

One redis-server (TLS port, plain port, unix socket) and one TLS cluster serve the
module.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.types import CachePolicy
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agent_guard import Guard, GuardCallbackHandler, Limits
from agent_guard.cache import LLMCache, NodeCache, ResultCache, cached_tool
from agent_guard.engine.records import CallRecord
from agent_guard.engine.usage import Usage
from agent_guard.errors import LedgerUnavailable
from agent_guard.finops.store import UsageStore
from agent_guard.ledger import from_url
from agent_guard.stores import redis_client
from agent_guard.telemetry import GuardTelemetry
from agent_guard.testing import FakeOpenAIServer, FakeReply
from agent_guard.testing.redis_cluster import (
    ClusterUnavailable,
    LocalRedisCluster,
    make_certificate,
)

MODES = ["sync", "async"]


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


class FirstBytes:
    """A loopback listener that keeps the first bytes each connection sends."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(3)
                try:
                    self.received.append(conn.recv(5))
                except OSError:
                    self.received.append(b"")

    def close(self) -> None:
        self.sock.close()


def _ping(url: str, mode: str) -> None:
    """One PING by the client agent-guard builds for ``url``; any failure is expected (the
    listener answers nothing)."""
    options = {"socket_timeout": 0.5, "socket_connect_timeout": 0.5}
    if mode == "sync":
        try:  # a sync cluster client connects as it is built
            client = redis_client(url, **options)
            client.ping()
            client.close()
        except Exception:
            pass
        return

    async def main() -> None:
        client = redis_client(url, asynchronous=True, **options)
        with contextlib.suppress(Exception):
            await client.ping()
        with contextlib.suppress(Exception):
            await client.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scheme,tls", [("rediss", True), ("rediss+cluster", True),
                                        ("redis", False), ("redis+cluster", False)])
def test_a_client_s_first_bytes_are_tls_exactly_on_a_rediss_url(scheme: str, tls: bool,
                                                                mode: str) -> None:
    listener = FirstBytes()
    try:
        _ping(f"{scheme}://127.0.0.1:{listener.port}", mode)
        deadline = time.monotonic() + 5
        while not listener.received and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        listener.close()
    assert listener.received, "the client never connected"
    first = listener.received[0]
    if tls:
        assert first[:1] == b"\x16", f"{scheme} ({mode}) sent {first!r}: not a TLS handshake"
    else:
        assert first[:1] == b"*", f"{scheme} ({mode}) sent {first!r}: not a RESP command"


# -- a real TLS-only Redis and cluster ----------------------------------------------------

#: the default user's password (every character a URL must percent-encode) and an ACL user
PASSWORD = "s3cr:t@/p?w#d%"
USER, USER_PASSWORD = "guard", "gu@rd:pw"
KEY_PASSWORD = "k3y-pw"


def _pw(text: str) -> str:
    return quote(text, safe="")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_up(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            client = redis_client(url)
            client.ping()
            client.close()
            return
        except Exception as exc:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                _unavailable(f"a TLS redis-server did not start: {exc}")
            time.sleep(0.05)


@dataclass
class Servers:
    """One redis-server (a TLS port, a plain port, a unix socket) and a TLS cluster, all
    with :data:`PASSWORD` for the default user and the ACL user :data:`USER`, all
    certified by ``ca`` (``ca_dir`` holds it under its hash name, for ``ssl_ca_path``);
    ``client_cert``/``client_key`` are a client certificate and its key encrypted with
    :data:`KEY_PASSWORD`."""

    tls_port: int
    plain_port: int
    socket: Path
    cluster_ports: list[int]
    ca: Path
    ca_dir: Path
    client_cert: Path
    client_key: Path

    def single(self, creds: str = f":{_pw(PASSWORD)}", host: str = "127.0.0.1",
               query: str | None = None) -> str:
        query = f"ssl_ca_certs={self.ca}" if query is None else query
        return f"rediss://{creds}@{host}:{self.tls_port}/0" + (f"?{query}" if query else "")

    def cluster(self, creds: str = f":{_pw(PASSWORD)}", host: str = "127.0.0.1",
                query: str | None = None, nodes: int = 3) -> str:
        query = f"ssl_ca_certs={self.ca}" if query is None else query
        hosts = ",".join(f"{host}:{p}" for p in self.cluster_ports[:nodes])
        return f"rediss+cluster://{creds}@{hosts}" + (f"?{query}" if query else "")


ACL = ("--user", USER, "on", f">{USER_PASSWORD}", "~*", "&*", "+@all")
#: another loopback address of the servers, not the certificate's (127.0.0.1): redis-py
#: reads "localhost" as 127.0.0.1 in a cluster's node names
OTHER_NAME = "127.0.0.2"


def _bindable(address: str) -> bool:
    with socket.socket() as s:
        try:
            s.bind((address, 0))
        except OSError:
            return False
    return True


def _openssl(*args: str) -> str:
    made = subprocess.run([shutil.which("openssl") or "openssl", *args], capture_output=True,
                          text=True, timeout=60)
    if made.returncode != 0:
        _unavailable(f"openssl failed: {made.stderr[-300:]}")
    return made.stdout


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    server = shutil.which("redis-server")
    if not server:
        _unavailable("redis-server is not installed")
    workdir = tmp_path_factory.mktemp("redis-tls")
    try:
        ca = make_certificate(workdir / "tls")
    except ClusterUnavailable as exc:
        _unavailable(str(exc))
    ca_dir = workdir / "ca-dir"
    ca_dir.mkdir()
    name = _openssl("x509", "-hash", "-noout", "-in", str(ca)).strip()
    shutil.copy(ca, ca_dir / f"{name}.0")
    client_key, client_cert = workdir / "client-key.pem", workdir / "client.pem"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-keyout", str(client_key), "-out", str(client_cert), "-days", "2",
             "-subj", "/CN=client", "-passout", f"pass:{KEY_PASSWORD}")
    # the cluster uses the same certificate (LocalRedisCluster makes one only if missing)
    shutil.copytree(workdir / "tls", workdir / "cluster" / "tls")
    tls_port, plain_port = _free_port(), _free_port()
    bind = ("127.0.0.1", OTHER_NAME) if _bindable(OTHER_NAME) else ("127.0.0.1",)
    sock = workdir / "redis.sock"
    proc = subprocess.Popen(
        [str(server), "--port", str(plain_port), "--tls-port", str(tls_port),
         "--bind", *bind, "--unixsocket", str(sock), "--unixsocketperm", "700",
         "--tls-cert-file", str(ca), "--tls-key-file", str(ca.parent / "key.pem"),
         "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no", "--save", "",
         "--appendonly", "no", "--dir", str(workdir), "--requirepass", PASSWORD, *ACL],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cluster = LocalRedisCluster(workdir / "cluster", tls=True, password=PASSWORD,
                                extra_args=(*ACL, "--bind", *bind))
    try:
        _wait_up(f"rediss://:{_pw(PASSWORD)}@127.0.0.1:{tls_port}/0?ssl_ca_certs={ca}", proc)
        try:
            cluster.start()
        except (ClusterUnavailable, OSError) as exc:
            _unavailable(f"a TLS Redis Cluster did not start: {exc}")
        yield Servers(tls_port, plain_port, sock, cluster.ports, ca, ca_dir, client_cert,
                      client_key)
    finally:
        cluster.stop()
        proc.kill()
        proc.wait(timeout=10)


# -- every store over every URL -------------------------------------------------------------

#: how each URL reaches the servers: TLS one Redis (the default user's password) and
#: cluster (an ACL user's), the unix socket (the password in the query), the plain port
WHERE = {
    "rediss": lambda s: s.single(),
    "rediss+cluster-acl-user": lambda s: s.cluster(creds=f"{USER}:{_pw(USER_PASSWORD)}"),
    "unix": lambda s: f"unix://{s.socket}?password={_pw(PASSWORD)}&db=3",
    "redis": lambda s: f"redis://:{_pw(PASSWORD)}@127.0.0.1:{s.plain_port}/2",
}


def _with(url: str, **query: str) -> str:
    extra = "&".join(f"{k}={v}" for k, v in query.items())
    return url + ("&" if "?" in url else "?") + extra


@tool
def price_of(item: str) -> str:
    """The price of an item."""
    RUNS.append(item)
    return f"{item}: $9.99"


RUNS: list[str] = []


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("where", sorted(WHERE))
def test_every_store_runs_over_the_url(servers: Servers, where: str, mode: str) -> None:
    """One URL for the ledger of a Guard, an LLM cache under ChatOpenAI, a result cache
    under a tool, a node cache under a compiled graph and a usage store: the second,
    identical model call is served by the cache (the provider saw one request), the
    ledger holds what the provider's reply cost (read back by a fresh ledger on the same
    URL), the usage store both calls, the tool and the node ran once."""
    url = WHERE[where](servers)
    ns = f"tls-{uuid.uuid4().hex[:8]}"
    guard = Guard(Limits(max_cost_usd=1), ledger=_with(url, namespace=ns))
    records: list[Any] = []
    guard.add_record_hook(records.append)
    usage = UsageStore.from_url(url, namespace=ns).attach(guard)
    handler = GuardCallbackHandler(guard, session_id="s")
    results = ResultCache(url, namespace=ns, ttl={"pricing": 60})
    priced = cached_tool(price_of, results, "pricing")
    RUNS.clear()
    ran: list[str] = []

    def research(state: MessagesState) -> dict[str, Any]:
        ran.append("research")
        return {"messages": [AIMessage("findings")]}

    builder = StateGraph(MessagesState)
    builder.add_node("research", research, cache_policy=CachePolicy(
        key_func=lambda st: str(st["messages"][-1].content), ttl=60))
    builder.add_edge(START, "research")
    builder.add_edge("research", END)
    graph = builder.compile(cache=NodeCache(ResultCache(url, namespace=ns)))
    question = {"messages": [HumanMessage("what changed?")]}
    with FakeOpenAIServer([FakeReply("Paris is the capital of France.", prompt_tokens=30,
                                     completion_tokens=8)]) as server:
        llm = ChatOpenAI(model="gpt-4o", base_url=server.base_url, api_key="k",
                         max_retries=0, max_tokens=50, cache=LLMCache(url, namespace=ns),
                         http_async_client=httpx.AsyncClient())
        cfg: Any = {"callbacks": [handler]}
        if mode == "sync":
            answers = [llm.invoke("Capital of France?", config=cfg) for _ in range(2)]
            tools = [priced.invoke({"item": "mug"}) for _ in range(2)]
            nodes = [graph.invoke(question) for _ in range(2)]
        else:
            async def main() -> tuple[list[Any], list[Any], list[Any]]:
                answers = [await llm.ainvoke("Capital of France?", config=cfg)
                           for _ in range(2)]
                tools = [await priced.ainvoke({"item": "mug"}) for _ in range(2)]
                nodes = [await graph.ainvoke(question) for _ in range(2)]
                await guard.aclose()
                return answers, tools, nodes

            answers, tools, nodes = asyncio.run(main())
        billed = server.request_count
    assert [a.content for a in answers] == ["Paris is the capital of France."] * 2
    assert billed == 1
    assert [r.outcome for r in records] == ["ok", "cache_hit"]
    cost = records[0].cost_nano
    assert cost > 0
    fresh = from_url(_with(url, namespace=ns))
    try:
        assert fresh.totals("session:s").get_spent("usd_nano") == cost
    finally:
        fresh.close()
    rows = usage.rows()
    assert len(rows) == 2 and sum(r["cost_nano"] for r in rows) == cost
    assert tools == ["mug: $9.99"] * 2 and RUNS == ["mug"]
    assert [n["messages"][-1].content for n in nodes] == ["findings"] * 2 and ran == ["research"]
    guard.close()
    usage.close()


# -- TLS options, alike in the sync and the async clients --------------------------------

#: (query, host, accepted): the servers' certificate is for 127.0.0.1, self-signed
TLS_OPTIONS: dict[str, tuple[str, str, bool]] = {
    "ssl_ca_certs": ("ssl_ca_certs={ca}", "127.0.0.1", True),
    "no CA: verified against the system's": ("", "127.0.0.1", False),
    "ssl_cert_reqs=none": ("ssl_cert_reqs=none", "127.0.0.1", True),
    "ssl_ca_path": ("ssl_ca_path={ca_dir}", "127.0.0.1", True),
    "another name: it is checked": ("ssl_ca_certs={ca}", OTHER_NAME, False),
    "ssl_check_hostname=false": ("ssl_ca_certs={ca}&ssl_check_hostname=false", OTHER_NAME,
                                 True),
    "ssl_password": ("ssl_ca_certs={ca}&ssl_certfile={cert}&ssl_keyfile={key}"
                     f"&ssl_password={KEY_PASSWORD}", "127.0.0.1", True),
    "a wrong ssl_password": ("ssl_ca_certs={ca}&ssl_certfile={cert}&ssl_keyfile={key}"
                             "&ssl_password=wrong", "127.0.0.1", False),
    "ssl_min_version, ssl_ciphers, retry_on_timeout, socket_keepalive": (
        "ssl_ca_certs={ca}&ssl_min_version=771&ssl_ciphers=HIGH&retry_on_timeout=true"
        "&socket_keepalive=true&health_check_interval=5", "127.0.0.1", True),
}


def _round_trip(url: str, mode: str) -> None:
    """A SET and a GET by the client agent-guard builds for ``url``."""
    key = f"tls-{uuid.uuid4().hex}"
    options = {"socket_timeout": 3.0, "socket_connect_timeout": 3.0}
    if mode == "sync":
        client = redis_client(url, **options)
        try:
            client.set(key, "v", ex=60)
            assert client.get(key) == b"v"
        finally:
            client.close()
        return

    async def main() -> None:
        client = redis_client(url, asynchronous=True, **options)
        try:
            await client.set(key, "v", ex=60)
            assert await client.get(key) == b"v"
        finally:
            await client.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("topology", ["single", "cluster"])
@pytest.mark.parametrize("case", list(TLS_OPTIONS))
def test_tls_options_are_honoured_alike_sync_and_async(servers: Servers, case: str,
                                                       topology: str, mode: str) -> None:
    """Each TLS option of the query is accepted, or refused, the same way by the sync and
    the async client of one Redis and of a cluster (a cluster URL naming one node, so
    the name checked is the one in the URL; the nodes it learns are 127.0.0.1)."""
    query, host, accepted = TLS_OPTIONS[case]
    if host == OTHER_NAME and not _bindable(OTHER_NAME):
        pytest.skip(f"{OTHER_NAME} is not a loopback address here")
    query = query.format(ca=servers.ca, ca_dir=servers.ca_dir, cert=servers.client_cert,
                         key=servers.client_key)
    url = (servers.single(host=host, query=query) if topology == "single" else
           servers.cluster(host=host, query=query, nodes=1))
    if accepted:
        _round_trip(url, mode)
        return
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import RedisClusterException

    with pytest.raises((RedisConnectionError, RedisClusterException)):
        _round_trip(url, mode)


# -- passwords: AUTH, and redaction ----------------------------------------------------------

#: the forms a password takes in a URL: the default user's or an ACL user's, in the user
#: info or in the query
AUTH = {
    "default user": (f":{_pw(PASSWORD)}", ""),
    "ACL user": (f"{USER}:{_pw(USER_PASSWORD)}", ""),
    "password in the query": ("", f"password={_pw(PASSWORD)}"),
    "ACL user in the query": ("", f"username={USER}&password={_pw(USER_PASSWORD)}"),
}


def _auth_url(servers: Servers, topology: str, creds: str, query: str) -> str:
    if topology == "unix":
        return (f"unix://{creds}@{servers.socket}" if creds else f"unix://{servers.socket}"
                ) + (f"?{query}" if query else "")
    tls = f"ssl_ca_certs={servers.ca}" + (f"&{query}" if query else "")
    url = (servers.single if topology == "single" else servers.cluster)(
        creds=creds, query=tls)
    return url if creds else url.replace("://@", "://")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("topology", ["single", "cluster", "unix"])
@pytest.mark.parametrize("form", list(AUTH))
def test_every_form_of_password_authenticates(servers: Servers, form: str, topology: str,
                                              mode: str) -> None:
    """Servers that need a password (``--requirepass``, an ACL user): each form of it in
    the URL is sent, by the sync and the async client, of one Redis, a cluster, a unix
    socket (the passwords hold ':', '@', '/', '?', '#', '%', percent-encoded)."""
    _round_trip(_auth_url(servers, topology, *AUTH[form]), mode)


#: a wrong password, sent as the default user's, as an ACL user's, in the query; none
WRONG = "Wr0ng:p@ss/word"
WRONG_URLS = {
    "single": lambda s: s.single(creds=f":{_pw(WRONG)}"),
    "cluster-acl-user": lambda s: s.cluster(creds=f"{USER}:{_pw(WRONG)}", nodes=1),
    "unix-password-in-query": lambda s: f"unix://{s.socket}?password={_pw(WRONG)}",
    "cluster-no-password": lambda s: s.cluster(creds="", nodes=1).replace("://@", "://"),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("where", list(WRONG_URLS))
def test_a_wrong_password_is_refused_and_never_shown(
        servers: Servers, where: str, mode: str, caplog: pytest.LogCaptureFixture) -> None:
    """A Guard on a ledger whose password is wrong (or missing) refuses the call, as it
    is built (a cluster client connects then) or as the call starts: the provider is
    never asked. The result cache misses (the tool runs), the usage store counts a
    failed write. The password, encoded or not, is in no error, repr, log line or span."""
    caplog.set_level(logging.DEBUG)
    url = WRONG_URLS[where](servers)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry = GuardTelemetry(provider)
    emitted: list[str] = []
    usage = UsageStore.from_url(url)
    cache = LLMCache(url)
    results = ResultCache(url, ttl={"pricing": 60})
    built: list[Guard] = []
    with FakeOpenAIServer([FakeReply("hi", prompt_tokens=3, completion_tokens=1)]) as server:
        llm = ChatOpenAI(model="gpt-4o", base_url=server.base_url, api_key="k",
                         max_retries=0, max_tokens=5, cache=cache,
                         http_async_client=httpx.AsyncClient())
        with pytest.raises(LedgerUnavailable) as refused:
            guard = Guard(Limits(max_cost_usd=1), ledger=url)
            built.append(guard)
            usage.attach(guard)
            handler = GuardCallbackHandler(guard, session_id="s", telemetry=telemetry)
            if mode == "sync":
                llm.invoke("hi", config={"callbacks": [handler]})
            else:
                async def main() -> None:
                    try:
                        await llm.ainvoke("hi", config={"callbacks": [handler]})
                    finally:
                        await guard.aclose()

                asyncio.run(main())
        assert server.request_count == 0
    RUNS.clear()
    cached_tool(price_of, results, "pricing").invoke({"item": "cup"})
    assert RUNS == ["cup"]  # a miss: the tool ran
    usage.append(_record())
    assert usage.failed == 1
    error = refused.value
    emitted += [str(error), repr(error), repr(error.args), repr(error.__cause__),
                str(error.__cause__), repr(error.__cause__ and error.__cause__.__cause__)]
    things: list[Any] = [usage, cache, cache.store, results.store,
                         getattr(results.store, "_client", None)]
    for guard in built:
        things += [guard.ledger, guard.ledger.client]
        guard.close()
    for thing in things:
        emitted += [repr(thing), str(getattr(thing, "url", ""))]
    usage.close()
    provider.force_flush()
    emitted += [repr(dict(sp.attributes or {})) + repr([(e.name, dict(e.attributes or {}))
                                                        for e in sp.events])
                for sp in exporter.get_finished_spans()]
    emitted += [r.getMessage() + str(r.exc_text or "") for r in caplog.records]
    blob = "\n".join(emitted)
    for secret in (WRONG, _pw(WRONG), PASSWORD, _pw(PASSWORD), "Wr0ng"):
        assert secret not in blob


def _record() -> CallRecord:
    now = time.time()
    return CallRecord(session="s", run_id=None, model="gpt-4o", provider="openai",
                      usage=Usage(input_tokens=3, output_tokens=1), cost_nano=1,
                      reserved_nano=1, usage_estimated=False, outcome="ok", started_at=now,
                      ended_at=now)
