"""What the guard reports: one record per call, and a session's totals."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal

from .._frozen import fast_init
from ..ledger import ScopeTotals
from .limits import Dimension
from .usage import Usage, nano_to_usd

__all__ = ["CallRecord", "Outcome", "SessionUsage", "utf8_text"]

Outcome = Literal["ok", "error", "aborted", "cache_hit"]
RecordKind = Literal["model", "tool"]


@fast_init
@dataclass(frozen=True, slots=True)
class CallRecord:
    """One model or tool call as the guard accounted it.

    ``kind`` is ``"model"`` or ``"tool"`` (then ``tool`` names it and ``model``
    is empty). ``attributes`` are the call's scope values (user, team,
    feature...), ``scopes`` the ledger scopes it was charged to, ``record_id``
    unique per call (the reservation id for model calls).

    ``usage_estimated`` is True when the provider reported no usage (for
    example streaming without ``stream_usage``) and the guard counted the
    tokens itself; the call is never recorded at $0 for that reason.
    ``unpriced`` is True when the model had no price and the policy let it
    through at $0. ``saved_nano`` is what a cache hit would have cost.
    ``tier`` and ``route`` say which router tier took the call and why.

    A tool call priced per unit keeps what it was priced on: ``units`` (results,
    seconds, an argument's value; its declared bound when it was charged its worst
    case), ``unit`` (what they count) and, for a price per unit only,
    ``unit_price_usd`` (exact decimal text): the FOCUS export consumes and prices them.
    """

    session: str
    run_id: str | None
    model: str
    provider: str | None
    usage: Usage
    cost_nano: int
    reserved_nano: int
    usage_estimated: bool
    outcome: Outcome
    started_at: float
    ended_at: float
    unpriced: bool = False
    saved_nano: int = 0
    max_output_tokens: int | None = None
    node: str | None = None
    tags: tuple[str, ...] = field(default_factory=tuple)
    tier: str | None = None
    route: str | None = None
    kind: RecordKind = "model"
    tool: str | None = None
    attributes: Mapping[str, str] = field(default_factory=dict)
    scopes: tuple[str, ...] = ()
    record_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    units: float | None = None
    unit: str | None = None
    unit_price_usd: str | None = None

    @property
    def cost_usd(self) -> Decimal:
        return nano_to_usd(self.cost_nano)

    @property
    def saved_usd(self) -> Decimal:
        return nano_to_usd(self.saved_nano)

    @property
    def duration_s(self) -> float:
        return self.ended_at - self.started_at


@dataclass(frozen=True, slots=True)
class SessionUsage:
    """A session's spend so far, read from the ledger (shared across processes)."""

    session: str
    cost_nano: int
    reserved_nano: int
    cap_nano: int | None
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    cache_creation_tokens: int
    reasoning_tokens: int
    reserved_tokens: int
    model_calls: int
    tool_calls: int
    steps: int

    @classmethod
    def from_totals(cls, session: str, totals: ScopeTotals, cap_nano: int | None) -> SessionUsage:
        s = totals.get_spent
        if cap_nano is not None:
            cap_nano += totals.get_extra(Dimension.USD_NANO)
        return cls(
            session=session,
            cost_nano=s(Dimension.USD_NANO),
            reserved_nano=totals.get_reserved(Dimension.USD_NANO),
            cap_nano=cap_nano,
            input_tokens=s(Dimension.INPUT_TOKENS),
            output_tokens=s(Dimension.OUTPUT_TOKENS),
            cached_tokens=s(Dimension.CACHE_READ_TOKENS),
            cache_creation_tokens=s(Dimension.CACHE_CREATION_TOKENS),
            reasoning_tokens=s(Dimension.REASONING_TOKENS),
            reserved_tokens=totals.get_reserved(Dimension.TOKENS),
            model_calls=s(Dimension.MODEL_CALLS),
            tool_calls=s(Dimension.TOOL_CALLS),
            steps=s(Dimension.STEPS),
        )

    @property
    def cost_usd(self) -> Decimal:
        return nano_to_usd(self.cost_nano)

    @property
    def reserved_usd(self) -> Decimal:
        return nano_to_usd(self.reserved_nano)

    @property
    def cap_usd(self) -> Decimal | None:
        return None if self.cap_nano is None else nano_to_usd(self.cap_nano)

    @property
    def remaining_usd(self) -> Decimal | None:
        if self.cap_nano is None:
            return None
        return nano_to_usd(max(0, self.cap_nano - self.cost_nano - self.reserved_nano))

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def utf8_text(text: str) -> str:
    """``text`` as UTF-8 can hold it: a lone surrogate (what a byte that was not UTF-8
    decodes to with ``surrogateescape``) becomes its ``\\udcxx`` escape, so the SQLite
    ledger, the usage stores and CSV files take the name instead of failing on it.
    Valid text is returned unchanged."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text
