"""A throwaway Redis Cluster on loopback, for tests and benchmarks.

``LocalRedisCluster(workdir, nodes=3).start()`` runs ``nodes`` ``redis-server
--cluster-enabled yes`` processes on free loopback ports (each also needs its bus port,
``port + 10000``), joins them with ``redis-cli --cluster create ... --cluster-replicas 0``
and waits for ``cluster_state:ok`` on every node; ``stop()`` kills them. ``url`` is the
``redis+cluster://`` URL naming every node. Nothing persists (``--save ''``,
``--appendonly no``); each node's ``nodes-<port>.conf`` lives in ``workdir``.

With ``tls=True`` the nodes speak TLS only (``--port 0 --tls-port``, the cluster bus too)
with a self-signed certificate for 127.0.0.1 made by ``openssl`` in ``workdir``
(``ca_file``); ``url`` is then ``rediss+cluster://...?ssl_ca_certs=<ca_file>``.
With ``password`` the default user needs it (``--requirepass``); ``url`` carries it
(``redis+cluster://:<password>@...``, percent-encoded).
"""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

__all__ = ["ClusterUnavailable", "LocalRedisCluster", "make_certificate"]


class ClusterUnavailable(RuntimeError):
    """The binaries are missing or the cluster did not come up."""


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ephemeral_low() -> int:
    """The first port the OS hands out on its own (``bind(0)``, a client's source port)."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _free_ports(count: int) -> list[int]:
    """``count`` loopback ports whose bus ports (``+10000``) are free as well.

    Both are taken below the OS's ephemeral range: a port the OS can hand out by itself
    (to a client connecting anywhere, or a server binding port 0) can be taken between
    this choice and the node's start, and a node that cannot bind exits (seen in a full
    run: ``node ... not ready``)."""
    rng = random.Random()
    high = _ephemeral_low() - 10000  # node port + 10000 (bus) stays below the range
    ports: list[int] = []
    for _ in range(2000):
        if high <= 10001:
            break
        port = rng.randrange(10001, high)
        if port not in ports and _port_free(port) and _port_free(port + 10000):
            ports.append(port)
            if len(ports) == count:
                return ports
    raise ClusterUnavailable("no free loopback ports below the ephemeral range for a cluster")


def make_certificate(directory: Path) -> Path:
    """A self-signed certificate for 127.0.0.1 (``cert.pem``, its own CA, and ``key.pem``)
    in ``directory``, made by ``openssl``; returns the certificate's path."""
    openssl = shutil.which("openssl")
    if not openssl:
        raise ClusterUnavailable("openssl must be installed for a TLS Redis")
    directory.mkdir(parents=True, exist_ok=True)
    cert = directory / "cert.pem"
    if not cert.exists():
        made = subprocess.run(
            [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-keyout", str(directory / "key.pem"), "-out", str(cert),
             "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
            capture_output=True, text=True, timeout=60)
        if made.returncode != 0:
            raise ClusterUnavailable(f"openssl failed: {made.stderr[-500:]}")
    return cert


class LocalRedisCluster:
    def __init__(self, workdir: Path | str, *, nodes: int = 3,
                 extra_args: tuple[str, ...] = (), tls: bool = False,
                 password: str | None = None) -> None:
        self.workdir = Path(workdir)
        self.password = password
        self.nodes = nodes
        self.tls = tls
        self.ca_file = self.workdir / "tls" / "cert.pem"
        self.extra_args = extra_args  # e.g. ("--appendonly", "yes") to survive a restart
        self.ports: list[int] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.ports)
        if self.password is not None:
            hosts = f":{quote(self.password, safe='')}@{hosts}"
        if self.tls:
            return f"rediss+cluster://{hosts}?ssl_ca_certs={self.ca_file}"
        return f"redis+cluster://{hosts}"

    def _cli(self) -> list[str]:
        cli = [shutil.which("redis-cli") or "redis-cli"]
        if self.password is not None:
            cli += ["--no-auth-warning", "-a", self.password]
        return [*cli, "--tls", "--cacert", str(self.ca_file)] if self.tls else cli

    def start(self, timeout: float = 30.0) -> LocalRedisCluster:
        server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if not server or not cli:
            raise ClusterUnavailable("redis-server and redis-cli must be installed")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.tls:
            make_certificate(self.ca_file.parent)
        if not self.ports:  # preset ports: the URL was handed out before the start
            self.ports = _free_ports(self.nodes)
        try:
            for port in self.ports:
                self.procs.append(self._spawn(server, port))
            deadline = time.monotonic() + timeout
            for port in self.ports:
                self._wait(port, deadline, lambda out: out.strip() == "PONG", "PING")
            created = subprocess.run(
                [*self._cli(), "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                 "--cluster-replicas", "0", "--cluster-yes"],
                capture_output=True, text=True, timeout=timeout)
            if created.returncode != 0:
                raise ClusterUnavailable(f"redis-cli --cluster create failed: "
                                         f"{created.stdout[-500:]}{created.stderr[-500:]}")
            for port in self.ports:
                self._wait(port, deadline, lambda out: "cluster_state:ok" in out,
                           "CLUSTER", "INFO")
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, server: str, port: int) -> subprocess.Popen[bytes]:
        node_dir = self.workdir / str(port)
        node_dir.mkdir(exist_ok=True)
        listen = ["--port", "0", "--tls-port", str(port), "--tls-cluster", "yes",
                  "--tls-cert-file", str(self.ca_file.parent / "cert.pem"),
                  "--tls-key-file", str(self.ca_file.parent / "key.pem"),
                  "--tls-ca-cert-file", str(self.ca_file), "--tls-auth-clients", "no",
                  ] if self.tls else ["--port", str(port)]
        args = [server, *listen, "--bind", "127.0.0.1",
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(self.workdir / f"nodes-{port}.conf"),
                "--dir", str(node_dir), "--save", "", "--appendonly", "no",
                "--daemonize", "no", *self.extra_args]
        if self.password is not None:
            args += ["--requirepass", self.password]
        return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop_node(self, index: int, sig: int = 9) -> None:
        """Stop one node (``SIGKILL`` by default); :meth:`start_node` brings it back on
        its port with its ``nodes-<port>.conf`` (and its data, with ``--appendonly``)."""
        proc = self.procs[index]
        proc.send_signal(sig)
        proc.wait(timeout=10)

    def start_node(self, index: int, timeout: float = 20.0) -> None:
        server = shutil.which("redis-server") or "redis-server"
        self.procs[index] = self._spawn(server, self.ports[index])
        deadline = time.monotonic() + timeout
        self._wait(self.ports[index], deadline, lambda out: "cluster_state:ok" in out,
                   "CLUSTER", "INFO")

    def _wait(self, port: int, deadline: float, ready: object, *command: str) -> None:
        while True:
            out = subprocess.run([*self._cli(), "-p", str(port), *command], capture_output=True,
                                 text=True, timeout=10).stdout
            if ready(out):  # type: ignore[operator]
                return
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                raise ClusterUnavailable(f"node {port} not ready: {out.strip()[:200]!r}")
            time.sleep(0.05)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        self.procs = []

    def __enter__(self) -> LocalRedisCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
