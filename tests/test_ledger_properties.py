"""Random reserve/settle/release/crash/charge/extend sequences against a pure model.

Invariants, for every backend:
- no overshoot: spent + reserved <= cap + extensions on every capped dimension of
  every scope, unless a provider overran its reservation on that scope;
- money conservation: spent is exactly the sum of what was settled and charged
  (each reservation counted once), reserved is exactly what open holds add up to;
- settle/release/reserve answer exactly as the model says.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    rule,
)

from agent_guard.ledger import Denial, Ledger, MemoryLedger, Reservation, ScopeCaps

from .conftest import REDIS_URL, require_redis

SCOPES = {"session:a": {"usd": 1000, "calls": 6}, "team:t": {"usd": 1500}}
DIMS = ("usd", "calls")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Held:
    res: Reservation
    done: bool = False
    reclaimed: bool = False


class LedgerMachine(RuleBasedStateMachine):
    backend = "memory"
    holds = Bundle("holds")

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.tmp: str | None = None
        self.ledger = self._make()
        self.spent = {s: dict.fromkeys(DIMS, 0) for s in SCOPES}
        self.extra = {s: dict.fromkeys(DIMS, 0) for s in SCOPES}
        self.overrun = dict.fromkeys(SCOPES, False)
        self.open: list[Held] = []

    def _make(self) -> Ledger:
        if self.backend == "memory":
            return MemoryLedger(clock=self.clock)
        if self.backend == "sqlite":
            from agent_guard.ledger.sqlite import SQLiteLedger

            self.tmp = tempfile.mkdtemp()
            return SQLiteLedger(f"{self.tmp}/l.db", clock=self.clock)
        from agent_guard.ledger.redis import RedisLedger

        self.namespace = f"prop-{uuid.uuid4().hex[:10]}"
        return RedisLedger.from_url(REDIS_URL, namespace=self.namespace, clock=self.clock)

    def teardown(self) -> None:
        if self.backend == "redis":
            keys = list(self.ledger.client.scan_iter(match=f"*{self.namespace}*"))  # type: ignore[attr-defined]
            if keys:
                self.ledger.client.delete(*keys)  # type: ignore[attr-defined]
        self.ledger.close()
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- the model ------------------------------------------------------------------------

    def _reserved(self, scope: str) -> dict[str, int]:
        out = dict.fromkeys(DIMS, 0)
        for h in self.open:
            if not h.done and not h.reclaimed and scope in h.res.scopes:
                for d, a in h.res.amounts.items():
                    out[d] += a
        return out

    def _reclaim(self) -> None:
        for h in self.open:
            if not h.done and not h.reclaimed and h.res.expires_at <= self.clock.now:
                h.reclaimed = True

    def _fits(self, scopes: list[str], amounts: dict[str, int]) -> bool:
        for s in scopes:
            held = self._reserved(s)
            for d, cap in SCOPES[s].items():
                want = amounts.get(d, 0)
                if want > 0 and self.spent[s][d] + held[d] + want > cap + self.extra[s][d]:
                    return False
        return True

    # -- rules -------------------------------------------------------------------------------

    @rule(target=holds, usd=st.integers(0, 700), calls=st.integers(0, 2),
          both=st.booleans(), lease=st.integers(1, 60))
    def reserve(self, usd: int, calls: int, both: bool, lease: int):
        scopes = ["session:a", "team:t"] if both else ["session:a"]
        amounts = {"usd": usd, "calls": calls}
        self._reclaim()
        expected = self._fits(scopes, amounts)
        got = self.ledger.reserve([ScopeCaps(s, SCOPES[s]) for s in scopes], amounts,
                                  lease_seconds=lease)
        assert isinstance(got, Reservation) == expected, (got, amounts)
        if isinstance(got, Denial):
            return multiple()
        held = Held(got)
        self.open.append(held)
        return held

    @rule(held=consumes(holds), share=st.floats(0, 1), overrun=st.integers(0, 300),
          overran=st.booleans())
    def settle(self, held: Held, share: float, overrun: int, overran: bool) -> None:
        actual = {d: int(a * share) for d, a in held.res.amounts.items()}
        if overran:
            actual["usd"] = held.res.amounts.get("usd", 0) + overrun
        ok = self.ledger.settle(held.res, actual)
        assert bool(ok) is (not held.done)
        if ok:
            held.done = True
            for s in held.res.scopes:
                for d, a in actual.items():
                    self.spent[s][d] += a
                if overran and overrun:
                    self.overrun[s] = True

    @rule(held=holds)
    def settle_again_counts_nothing(self, held: Held) -> None:
        if held.done:
            assert not self.ledger.settle(held.res, {"usd": 5})
            assert self.ledger.release(held.res) is False

    @rule(held=consumes(holds))
    def release(self, held: Held) -> None:
        ok = self.ledger.release(held.res)
        assert ok is (not held.done and not held.reclaimed)
        held.done = True

    @rule(held=consumes(holds))
    def crash(self, held: Held) -> None:
        """The worker dies: its reservation is never settled nor released."""

    @rule(seconds=st.integers(0, 90))
    def advance(self, seconds: int) -> None:
        self.clock.now += seconds

    @rule()
    def reclaim(self) -> None:
        self._reclaim()
        self.ledger.reclaim_expired()

    @rule(calls=st.integers(1, 2))
    def charge(self, calls: int) -> None:
        self._reclaim()
        expected = self._fits(["session:a"], {"calls": calls})
        got = self.ledger.charge([ScopeCaps("session:a", SCOPES["session:a"])], {"calls": calls})
        assert (got is None) == expected
        if got is None:
            self.spent["session:a"]["calls"] += calls

    @rule(scope=st.sampled_from(sorted(SCOPES)), usd=st.integers(0, 300))
    def extend(self, scope: str, usd: int) -> None:
        self.ledger.extend(scope, "usd", usd)
        self.extra[scope]["usd"] += usd

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def ledger_matches_the_model(self) -> None:
        for s in SCOPES:
            t = self.ledger.totals(s)
            held = self._reserved(s)
            for d in DIMS:
                assert t.get_spent(d) == self.spent[s][d], (s, d)
                assert t.get_extra(d) == self.extra[s][d], (s, d)
                # the ledger may still hold an expired lease it has not reclaimed yet
                expired = sum(h.res.amounts.get(d, 0) for h in self.open
                              if not h.done and not h.reclaimed and s in h.res.scopes
                              and h.res.expires_at <= self.clock.now)
                assert held[d] - expired <= t.get_reserved(d) <= held[d], (s, d)

    @invariant()
    def no_overshoot(self) -> None:
        for s, caps in SCOPES.items():
            if self.overrun[s]:
                continue
            t = self.ledger.totals(s)
            for d, cap in caps.items():
                assert t.get_spent(d) + t.get_reserved(d) <= cap + t.get_extra(d), (s, d)


def run_machine(backend: str, examples: int) -> None:
    machine = type(f"{backend.title()}LedgerMachine", (LedgerMachine,), {"backend": backend})
    machine.TestCase.settings = settings(
        max_examples=examples, stateful_step_count=30, deadline=None, derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    machine.TestCase().runTest()


def test_memory_ledger_properties() -> None:
    run_machine("memory", 150)


def test_sqlite_ledger_properties() -> None:
    run_machine("sqlite", 40)


@pytest.mark.redis
def test_redis_ledger_properties() -> None:
    require_redis()
    run_machine("redis", 60)
