"""A graph killed mid-call (SIGKILL) and resumed from its checkpoint is charged once per
call that was answered; the killed call's hold comes back after its lease."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

from agent_guard.engine.usage import usd_to_nano
from agent_guard.ledger import from_url
from agent_guard.testing import FakeOpenAIServer, FakeReply

from .graph_worker import LEASE, THREAD, build, config

ROOT = Path(__file__).resolve().parent.parent
# gpt-4o list prices: $2.50 / M input, $10 / M output
ONE_CALL = usd_to_nano(500 * Decimal("2.5e-06") + 20 * Decimal("1e-05"))


def test_a_graph_killed_mid_call_and_resumed_is_charged_once_per_answered_call(
        tmp_path: Path) -> None:
    fast = FakeReply(content="step done", prompt_tokens=500, completion_tokens=20)
    slow = FakeReply(content="never read", prompt_tokens=500, completion_tokens=20,
                     delay_s=60)
    with FakeOpenAIServer(replies=[fast, fast, slow, fast]) as server:
        child = subprocess.Popen(
            [sys.executable, "-m", "tests.graph_worker", server.base_url, str(tmp_path)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while len(server.requests) < 3:  # the third call is in flight, reserved
                assert child.poll() is None, child.stderr.read().decode() if child.stderr \
                    else "child exited"
                assert time.monotonic() < deadline, "the child never made its third call"
                time.sleep(0.02)
            ledger = from_url(f"sqlite:///{tmp_path / 'ledger.db'}")
            held = ledger.totals(f"session:{THREAD}")
            assert held.get_spent("usd_nano") == 2 * ONE_CALL
            assert held.get_reserved("model_calls") == 1  # the killed call's hold
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()

        time.sleep(LEASE + 0.2)  # the killed call's lease runs out
        graph, guard = build(server.base_url, tmp_path)
        state = graph.invoke(None, config(guard))  # resume from the checkpoint after "b"
        assert [m.content for m in state["messages"][1:]] == ["step done"] * 3
        assert len(server.requests) == 4  # a, b, c (killed), c again

    totals = ledger.totals(f"session:{THREAD}")
    assert totals.get_spent("usd_nano") == 3 * ONE_CALL  # once per answered call
    assert totals.get_spent("model_calls") == 3
    assert totals.get_reserved("usd_nano") == 0 and totals.get_reserved("model_calls") == 0
    assert totals.get_spent("steps") == 4  # a, b, c (killed), c again: steps actually run
    ledger.close()
    guard.close()
