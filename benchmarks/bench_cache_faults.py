"""What a cache costs a call when its Redis is slow or down (needs ``redis-server``).

    python benchmarks/bench_cache_faults.py [--calls 20]

Starts its own redis-server on a free loopback port (no persistence), puts a
``ResultCache`` with its default settings on it (0.5 s socket timeouts, the store
left alone 1 s after it failed to answer), and times ``cached_tool`` calls: with
Redis up, while Redis sleeps (``DEBUG SLEEP 3``), and after Redis is stopped.
Every call answers; the first call to meet the fault pays at most one timeout, and
the calls after it skip the store until ``retry_after`` has passed.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import socket
import subprocess
import tempfile
import threading
import time

import redis
from langchain_core.tools import tool

from agent_guard.cache import ResultCache, cached_tool


@tool
def price_of(item: str) -> str:
    """Today's price of an item."""
    return f"{item}: $9.99"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed")
    logging.basicConfig(level=logging.ERROR)
    port = free_port()
    workdir = tempfile.mkdtemp()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir",
                             workdir, "--save", "", "--appendonly", "no",
                             "--enable-debug-command", "yes"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    admin = redis.Redis(port=port, socket_timeout=10)
    deadline = time.monotonic() + 10
    while True:
        try:
            admin.ping()
            break
        except redis.RedisError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    try:
        cache = ResultCache(f"redis://127.0.0.1:{port}/0")
        cached = cached_tool(price_of, cache, "daily")

        def timed(label: str, n: int) -> None:
            started = time.perf_counter()
            for i in range(n):
                assert cached.invoke({"item": f"x{i % 2}"}) == f"x{i % 2}: $9.99"
            seconds = time.perf_counter() - started
            print(f"{label:<38} {n:>3} calls  {seconds * 1000:8.1f} ms")

        timed("Redis up", args.calls)
        sleeper = threading.Thread(
            target=lambda: redis.Redis(port=port, socket_timeout=10).execute_command(
                "DEBUG", "SLEEP", 3))
        sleeper.start()
        time.sleep(0.1)
        timed("Redis asleep: first call", 1)
        timed("Redis asleep: the calls after it", args.calls)
        sleeper.join()
        proc.kill()
        proc.wait()
        time.sleep(cache.io.retry_after + 0.1)
        timed("Redis stopped: first call", 1)
        timed("Redis stopped: the calls after it", args.calls)
        stats = cache.stats()["price_of"]
        print(f"hits {stats.hits}, misses {stats.misses} (store errors {stats.errors})")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main()
