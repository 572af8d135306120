"""``rediss://`` and ``rediss+cluster://``: every client agent-guard builds speaks TLS.

Two checks, each over {one Redis, a cluster} x {sync, async}:

- what a client sends first on the wire, to a plain socket that records it: a TLS
  handshake record (``0x16``) for a ``rediss`` URL, a RESP command (``*``) for ``redis``;
  a client that sends its commands (and its password) in plain text on a ``rediss`` URL
  fails here;
- the ledger over a real TLS-only ``redis-server`` (``--port 0 --tls-port``) and a real
  TLS-only cluster (``--tls-cluster yes``), verified against a self-signed CA given in the
  URL (``ssl_ca_certs``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_guard.ledger import ScopeCaps, from_url
from agent_guard.stores import redis_client
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


@pytest.fixture(scope="module")
def tls_redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = shutil.which("redis-server")
    if not server:
        _unavailable("redis-server is not installed")
    workdir = tmp_path_factory.mktemp("redis-tls")
    try:
        ca = make_certificate(workdir / "tls")
    except ClusterUnavailable as exc:
        _unavailable(str(exc))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [str(server), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(ca), "--tls-key-file", str(ca.parent / "key.pem"),
         "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no", "--save", "",
         "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}"
    deadline = time.monotonic() + 20
    while True:
        try:
            client = redis_client(url)
            client.ping()
            client.close()
            break
        except Exception as exc:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                _unavailable(f"a TLS redis-server did not start: {exc}")
            time.sleep(0.05)
    yield url
    proc.kill()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def tls_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    cluster = LocalRedisCluster(tmp_path_factory.mktemp("redis-cluster-tls"), tls=True)
    try:
        cluster.start()
    except (ClusterUnavailable, OSError) as exc:
        _unavailable(f"a TLS Redis Cluster did not start: {exc}")
    yield cluster.url
    cluster.stop()


def _ledger_round_trip(url: str, mode: str) -> None:
    ledger = from_url(url, namespace=f"tls-{uuid.uuid4().hex[:8]}")
    caps = [ScopeCaps("session:a", {"usd_nano": 100})]
    try:
        if mode == "sync":
            first = ledger.reserve(caps, {"usd_nano": 70}, lease_seconds=30)
            assert first
            assert not ledger.reserve(caps, {"usd_nano": 40}, lease_seconds=30)
            assert ledger.settle(first, {"usd_nano": 25})
            assert ledger.totals("session:a").get_spent("usd_nano") == 25
            return

        async def main() -> None:
            first = await ledger.areserve(caps, {"usd_nano": 70}, lease_seconds=30)
            assert first
            assert not await ledger.areserve(caps, {"usd_nano": 40}, lease_seconds=30)
            assert await ledger.asettle(first, {"usd_nano": 25})
            assert (await ledger.atotals("session:a")).get_spent("usd_nano") == 25
            await ledger.aclose()

        asyncio.run(main())
    finally:
        ledger.close()


@pytest.mark.parametrize("mode", MODES)
def test_the_ledger_runs_on_a_tls_only_redis(tls_redis_url: str, mode: str) -> None:
    _ledger_round_trip(tls_redis_url, mode)


@pytest.mark.parametrize("mode", MODES)
def test_the_ledger_runs_on_a_tls_only_cluster(tls_cluster_url: str, mode: str) -> None:
    _ledger_round_trip(tls_cluster_url, mode)


@pytest.mark.parametrize("mode", MODES)
def test_a_tls_cluster_with_an_unknown_ca_is_refused(tls_cluster_url: str, mode: str,
                                                     tmp_path: Path) -> None:
    """Verification is on: the system's CAs do not trust the cluster's self-signed
    certificate, so without ``ssl_ca_certs`` nothing is reserved."""
    url = tls_cluster_url.split("?", 1)[0]
    from agent_guard.errors import LedgerUnavailable

    with pytest.raises(LedgerUnavailable):
        _ledger_round_trip(url, mode)
