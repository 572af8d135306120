"""FOCUS export: call records as FinOps Open Cost and Usage Specification rows.

    from agent_guard.finops import export_focus, validate_focus

    export_focus(store, "llm-costs.csv", since="2026-11-01", billing_account_id="org-123")
    assert validate_focus("llm-costs.csv") == []

One row per model call and per paid tool call (FOCUS 1.2 columns, which include every column FOCUS
1.0 and 1.1 require), ``ChargeCategory`` ``Usage``, ``ServiceCategory`` ``AI and
Machine Learning`` / ``ServiceSubcategory`` ``Generative AI``:

- ``BilledCost`` = ``EffectiveCost`` = ``ListCost`` = ``ContractedCost`` = what the
  ledger settled for the call, as an exact decimal from integer nano-USD (no
  float anywhere); the call is priced as one unit (``PricingQuantity`` 1,
  ``PricingUnit`` ``Requests``), so ``ListUnitPrice`` x ``PricingQuantity`` =
  ``ListCost`` holds exactly;
- ``ConsumedQuantity`` = input + output tokens, ``ConsumedUnit`` ``Tokens``;
- a cache hit is a row with zero cost and zero tokens consumed, what it saved in
  ``x_SavedCost``; calls that failed before producing anything (nothing paid,
  nothing consumed) and free tool calls (no charge) are left out;
- a paid tool call (:class:`~agent_guard.pricing.ToolPrice`) is its own service:
  ``ServiceName`` the service its price names (else ``Tool <name>``),
  ``ServiceSubcategory`` ``Other (AI and Machine Learning)``, ``SkuId``
  ``tool:<name>``; it consumes the units it was priced on (``Results``,
  ``Seconds``, an argument's name), or one ``Calls`` unit for a price per call; a
  price per unit only is priced per unit (``PricingQuantity`` the units,
  ``ListUnitPrice`` the price of one) when that product is exactly the cost;
- ``ChargePeriodStart``/``End``: the call's start and end to the second
  (``YYYY-MM-DDTHH:MM:SSZ``, UTC, end exclusive and after the start), inside the
  calendar month that is the ``BillingPeriod``;
- ``ResourceId``/``ResourceName``: the agent session; ``SkuId``/``SkuPriceId``:
  the model; ``SubAccountId``: the call's ``project`` attribute, else its
  ``team``;
- ``Tags``: a JSON object with the session, model, node, tier, route and every
  attribute of the call (team, feature, user...);
- custom columns start with ``x_`` as FOCUS asks: token kinds, the outcome,
  the record id.

Column names, types, nullability and allowed values are data
(:data:`FOCUS_COLUMNS`); :func:`validate_focus` checks a CSV file against them
and against the row rules used here. Parquet (``.parquet``) needs the optional
``pyarrow``.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

from ..pricing import PriceBook
from .report import Source, _as_rows
from .store import TimeLike, format_usd

__all__ = [
    "FOCUS_COLUMNS",
    "FOCUS_VERSION",
    "REQUIRED_COLUMNS",
    "FocusColumn",
    "export_focus",
    "focus_rows",
    "validate_focus",
]

FOCUS_VERSION = "1.2"

ColumnType = Literal["Decimal", "DateTime", "String", "KeyValue"]
FeatureLevel = Literal["Mandatory", "Conditional", "Recommended"]

SERVICE_CATEGORIES = (
    "AI and Machine Learning", "Analytics", "Business Applications", "Compute", "Databases",
    "Developer Tools", "Multicloud", "Identity", "Integration", "Internet of Things",
    "Management and Governance", "Media", "Migration", "Mobile", "Networking", "Security",
    "Storage", "Web", "Other",
)
AI_SUBCATEGORIES = ("AI Platforms", "Bots", "Generative AI", "Machine Learning",
                    "Natural Language Processing", "Other (AI and Machine Learning)")
# ServiceSubcategory -> its one ServiceCategory (FOCUS: each subcategory has one parent);
# every category also has "Other (<category>)"
SERVICE_SUBCATEGORIES: dict[str, str] = {
    **dict.fromkeys(AI_SUBCATEGORIES, "AI and Machine Learning"),
    **dict.fromkeys(("Analytics Platform", "Business Intelligence", "Data Processing",
                     "Search", "Streaming Analytics"), "Analytics"),
    **dict.fromkeys(("Containers", "End User Computing", "Quantum", "Serverless Compute",
                     "Virtual Machines"), "Compute"),
    **dict.fromkeys(("Caching", "Data Warehouse", "Relational", "NoSQL", "Ledger",
                     "Time Series"), "Databases"),
    **dict.fromkeys(("API Management", "Messaging", "Workflow Automation"), "Integration"),
    **dict.fromkeys(("Administration", "Architecture", "Compliance", "Cost Management",
                     "Data Governance", "Disaster Recovery", "Observability", "Support"),
                    "Management and Governance"),
    **dict.fromkeys(("Content Delivery", "Data Transfer", "Load Balancing",
                     "Network Management", "Network Security"), "Networking"),
    **dict.fromkeys(("CSPM", "Credentials", "SIEM", "Threat Detection"), "Security"),
    **dict.fromkeys(("Backups", "Bulk Transfer", "Disk", "Files", "Object Storage"),
                    "Storage"),
    **{f"Other ({c})": c for c in SERVICE_CATEGORIES},
}


@dataclass(frozen=True, slots=True)
class FocusColumn:
    """One FOCUS column: its type, whether it may be null, its allowed values, and
    whether this export always provides it (``required``)."""

    name: str
    type: ColumnType
    level: FeatureLevel
    nullable: bool
    allowed: tuple[str, ...] | None = None
    required: bool = True
    introduced: str = "1.0"


def _c(name: str, type_: ColumnType, level: FeatureLevel = "Mandatory", *,
       nullable: bool = False, allowed: tuple[str, ...] | None = None,
       required: bool = True, introduced: str = "1.0") -> FocusColumn:
    return FocusColumn(name, type_, level, nullable, allowed, required, introduced)


FOCUS_COLUMNS: tuple[FocusColumn, ...] = (
    # Mandatory in FOCUS 1.0-1.2
    _c("BilledCost", "Decimal"),
    _c("BillingAccountId", "String"),
    _c("BillingAccountName", "String", nullable=True),
    _c("BillingCurrency", "String"),
    _c("BillingPeriodEnd", "DateTime"),
    _c("BillingPeriodStart", "DateTime"),
    _c("ChargeCategory", "String",
       allowed=("Usage", "Purchase", "Tax", "Credit", "Adjustment")),
    _c("ChargeClass", "String", nullable=True, allowed=("Correction",)),
    _c("ChargeDescription", "String", nullable=True),
    _c("ChargePeriodEnd", "DateTime"),
    _c("ChargePeriodStart", "DateTime"),
    _c("ContractedCost", "Decimal"),
    _c("EffectiveCost", "Decimal"),
    _c("InvoiceIssuerName", "String"),
    _c("ListCost", "Decimal"),
    _c("PricingQuantity", "Decimal", nullable=True),
    _c("PricingUnit", "String", nullable=True),
    _c("ProviderName", "String"),
    _c("PublisherName", "String"),
    _c("ServiceCategory", "String", allowed=SERVICE_CATEGORIES),
    _c("ServiceName", "String"),
    _c("ServiceSubcategory", "String", introduced="1.1"),
    # Conditional / recommended: they apply to metered, list-priced LLM usage
    _c("ChargeFrequency", "String", "Recommended",
       allowed=("One-Time", "Recurring", "Usage-Based")),
    _c("ConsumedQuantity", "Decimal", "Conditional", nullable=True),
    _c("ConsumedUnit", "String", "Conditional", nullable=True),
    _c("ContractedUnitPrice", "Decimal", "Conditional", nullable=True),
    _c("ListUnitPrice", "Decimal", "Conditional", nullable=True),
    _c("PricingCategory", "String", "Conditional", nullable=True,
       allowed=("Standard", "Dynamic", "Committed", "Other")),
    _c("RegionId", "String", "Conditional", nullable=True),
    _c("RegionName", "String", "Conditional", nullable=True),
    _c("ResourceId", "String", "Conditional", nullable=True),
    _c("ResourceName", "String", "Conditional", nullable=True),
    _c("ResourceType", "String", "Conditional", nullable=True),
    _c("SkuId", "String", "Conditional", nullable=True),
    _c("SkuPriceId", "String", "Conditional", nullable=True),
    _c("SubAccountId", "String", "Conditional", nullable=True),
    _c("SubAccountName", "String", "Conditional", nullable=True),
    _c("Tags", "KeyValue", "Conditional", nullable=True),
)
COLUMNS_BY_NAME = {c.name: c for c in FOCUS_COLUMNS}
REQUIRED_COLUMNS = tuple(c.name for c in FOCUS_COLUMNS if c.required)

CUSTOM_COLUMNS = (
    "x_AgentGuardRecordId", "x_Session", "x_CallOutcome", "x_InputTokens",
    "x_CachedInputTokens", "x_CacheWriteTokens", "x_OutputTokens", "x_ReasoningTokens",
    "x_SavedCost", "x_UsageEstimated",
)
COLUMNS = (*REQUIRED_COLUMNS, *CUSTOM_COLUMNS)

# Columns that must be set on a Usage row that is not a correction.
_USAGE_NOT_NULL = ("ConsumedQuantity", "ConsumedUnit", "ContractedUnitPrice", "ListUnitPrice",
                   "PricingCategory", "PricingQuantity", "PricingUnit")

_PROVIDERS = {
    "openai": "OpenAI", "azure": "Microsoft", "azure_openai": "Microsoft",
    "anthropic": "Anthropic", "google": "Google", "google_genai": "Google",
    "google_vertexai": "Google", "vertexai": "Google", "gemini": "Google",
    "bedrock": "AWS", "amazon_bedrock": "AWS", "aws": "AWS", "mistralai": "Mistral AI",
    "mistral": "Mistral AI", "cohere": "Cohere", "groq": "Groq", "deepseek": "DeepSeek",
    "xai": "xAI", "fireworks": "Fireworks AI", "together": "Together AI", "ollama": "Ollama",
}

# FOCUS numeric format: optional sign, digits, optional fraction, optional "mEn" exponent
_DECIMAL = re.compile(r"-?\d+(\.\d+)?(E[-+]?\d+)?")
_DATETIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
_CURRENCY = re.compile(r"[A-Z]{3}")


def _provider_name(provider: str | None, model: str, prices: PriceBook | None) -> str:
    """The provider's display name; from the price book when the record has none."""
    if not provider and model and prices is not None:
        price = prices.resolve(model)
        provider = price.provider if price is not None else None
    if not provider:
        return "Unknown"
    return _PROVIDERS.get(provider.lower(), provider)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _month(ts: float) -> tuple[float, float]:
    start = datetime.fromtimestamp(ts, UTC).replace(day=1, hour=0, minute=0, second=0,
                                                    microsecond=0)
    end = (start.replace(year=start.year + 1, month=1) if start.month == 12
           else start.replace(month=start.month + 1))
    return start.timestamp(), end.timestamp()


def _decimal_text(value: Any) -> str:
    """A number as plain decimal text (no exponent): ``12.5``, ``3``."""
    number = Decimal(repr(value) if isinstance(value, float) else str(value))
    text = format(number.normalize(), "f")
    return text


def _unit_text(row: Mapping[str, Any]) -> str:
    """A tool row's unit: what its price counts, capitalised (``Results``,
    ``Seconds``), or ``Calls`` for a price per call."""
    unit = row.get("unit")
    if row.get("units") is None or not unit:
        return "Calls"
    return str(unit)[:1].upper() + str(unit)[1:]


def _tool_consumed(row: Mapping[str, Any], cache_hit: bool) -> str:
    if cache_hit:
        return "0"
    return "1" if row.get("units") is None else _decimal_text(row["units"])


def _tool_quantities(row: Mapping[str, Any], cost: str) -> tuple[str, str, str]:
    """(PricingQuantity, PricingUnit, unit price) of a tool row: its units at the
    price of one when the price is per unit only and that product is exactly the cost
    (a cost rounded up to the nano-dollar is not), else one request at the cost."""
    units, price = row.get("units"), row.get("unit_price_usd")
    if units is not None and price and row["outcome"] != "cache_hit":
        try:
            quantity = _decimal_text(units)
            if Decimal(price) * Decimal(quantity) == Decimal(cost) and Decimal(quantity):
                return quantity, _unit_text(row), price
        except (InvalidOperation, ValueError):
            pass
    return "1", "Requests", cost


def _service_name(row: Mapping[str, Any], provider: str, tool: bool) -> str:
    """A model call's service is its provider's API; a paid tool's, its own: the
    service its price names (``ToolPrice(service=...)``), else the tool."""
    if tool:
        return provider if provider != "Unknown" else f"Tool {row['tool']}"
    return f"{provider} API" if provider != "Unknown" else "LLM API"


def _describe(row: Mapping[str, Any]) -> str:
    if row["kind"] == "tool":
        what = f"{row['tool']} tool call"
        if row["outcome"] == "cache_hit":
            return (f"{what} answered from agent-guard's cache (saved "
                    f"{format_usd(int(row['saved_nano']))} USD)")
        return what + (", failed (charged its worst case)" if row["outcome"] != "ok" else "")
    if row["outcome"] == "cache_hit":
        return (f"{row['model']} call answered from agent-guard's cache "
                f"(saved {format_usd(int(row['saved_nano']))} USD)")
    text = (f"{row['model']} call: {int(row['input_tokens'])} input tokens "
            f"({int(row['cache_read_tokens'])} cached), {int(row['output_tokens'])} output tokens")
    if row["outcome"] == "aborted":
        text += ", aborted after streaming"
    return text


def focus_rows(
    source: Source,
    *,
    since: TimeLike = None,
    until: TimeLike = None,
    billing_account_id: str = "default",
    billing_account_name: str | None = None,
    currency: str = "USD",
    prices: PriceBook | None = None,
) -> list[dict[str, str]]:
    """FOCUS rows (column -> text, ``""`` for null) for the model calls and paid tool
    calls of ``source``.

    ``prices`` names the provider of records that carry none (default: the
    bundled price book)."""
    if not _CURRENCY.fullmatch(currency):
        raise ValueError(f"currency must be an ISO 4217 code such as 'USD', got {currency!r}")
    if not billing_account_id:
        raise ValueError("billing_account_id must not be empty (use your provider's "
                         "organisation or account id)")
    out: list[dict[str, str]] = []
    book: PriceBook | None = prices
    for row in _as_rows(source, since, until):
        tool = row["kind"] == "tool"
        if tool and not int(row["cost_nano"]) and not int(row["saved_nano"]):
            continue  # a free tool: no charge to export
        if row["outcome"] == "error" and not int(row["cost_nano"]) and \
                not int(row["total_tokens"]):
            continue
        started = float(row["started_at"])
        start = math.floor(started)
        end = max(math.ceil(max(float(row["ended_at"]), started)), start + 1)
        bill_start, bill_end = _month(start)
        end = min(end, int(bill_end))
        cost = format_usd(int(row["cost_nano"]))
        cache_hit = row["outcome"] == "cache_hit"
        quantity, unit, unit_price = _tool_quantities(row, cost) if tool else \
            ("1", "Requests", cost)
        attributes = json.loads(row.get("attributes") or "{}")
        if book is None and not row.get("provider") and not tool:
            book = PriceBook.default()
        provider = row.get("provider") or "Unknown" if tool else \
            _provider_name(row.get("provider"), row["model"], book)
        sub_account = attributes.get("project") or attributes.get("team")
        tags = {k: v for k, v in (("session", row["session"]), ("model", row["model"]),
                                  ("tool", row.get("tool") if tool else None),
                                  ("node", row.get("node")), ("tier", row.get("tier")),
                                  ("route", row.get("route"))) if v}
        tags.update({k: str(v) for k, v in attributes.items()})
        out.append({
            "BilledCost": cost,
            "BillingAccountId": billing_account_id,
            "BillingAccountName": billing_account_name or billing_account_id,
            "BillingCurrency": currency,
            "BillingPeriodEnd": _iso(bill_end),
            "BillingPeriodStart": _iso(bill_start),
            "ChargeCategory": "Usage",
            "ChargeClass": "",
            "ChargeDescription": _describe(row),
            "ChargePeriodEnd": _iso(end),
            "ChargePeriodStart": _iso(start),
            "ContractedCost": cost,
            "EffectiveCost": cost,
            "InvoiceIssuerName": provider,
            "ListCost": cost,
            "PricingQuantity": quantity,
            "PricingUnit": unit,
            "ProviderName": provider,
            "PublisherName": provider,
            "ServiceCategory": "AI and Machine Learning",
            "ServiceName": _service_name(row, provider, tool),
            "ServiceSubcategory": "Other (AI and Machine Learning)" if tool
            else "Generative AI",
            "ChargeFrequency": "Usage-Based",
            "ConsumedQuantity": _tool_consumed(row, cache_hit) if tool
            else "0" if cache_hit else str(int(row["total_tokens"])),
            "ConsumedUnit": _unit_text(row) if tool else "Tokens",
            "ContractedUnitPrice": unit_price,
            "ListUnitPrice": unit_price,
            "PricingCategory": "Standard",
            "RegionId": "",
            "RegionName": "",
            "ResourceId": f"session/{row['session']}",
            "ResourceName": row["session"],
            "ResourceType": "Agent Session",
            "SkuId": f"tool:{row['tool']}" if tool else row["model"],
            "SkuPriceId": f"tool:{row['tool']}" if tool else row["model"],
            "SubAccountId": sub_account or "",
            "SubAccountName": sub_account or "",
            "Tags": json.dumps(tags, sort_keys=True, ensure_ascii=False),
            "x_AgentGuardRecordId": row["record_id"],
            "x_Session": row["session"],
            "x_CallOutcome": row["outcome"],
            "x_InputTokens": str(int(row["input_tokens"])),
            "x_CachedInputTokens": str(int(row["cache_read_tokens"])),
            "x_CacheWriteTokens": str(int(row["cache_creation_tokens"])),
            "x_OutputTokens": str(int(row["output_tokens"])),
            "x_ReasoningTokens": str(int(row["reasoning_tokens"])),
            "x_SavedCost": format_usd(int(row["saved_nano"])),
            "x_UsageEstimated": "true" if row["usage_estimated"] else "false",
        })
    return out


#: the file name endings ``export_focus`` writes, and the format of each
FOCUS_SUFFIXES = {".csv": "csv", ".parquet": "parquet"}


def export_focus(
    source: Source,
    path: str | Path,
    *,
    since: TimeLike = None,
    until: TimeLike = None,
    format: Literal["csv", "parquet"] | None = None,
    **options: Any,
) -> int:
    """Write ``source``'s model calls to ``path`` as FOCUS rows (CSV, or Parquet for a
    ``.parquet`` path or ``format="parquet"``); returns the number of rows."""
    path = Path(path)
    suffix = path.suffix.lower()
    if format is None and suffix not in FOCUS_SUFFIXES and not path.is_dir():
        raise ValueError(f"cannot write FOCUS rows as {suffix or 'a file without an extension'}"
                         f" ({path}): name the file .csv or .parquet, or pass format=")
    fmt = format or FOCUS_SUFFIXES.get(suffix, "csv")
    if fmt not in ("csv", "parquet"):
        raise ValueError(f"format must be 'csv' or 'parquet', got {fmt!r}")
    rows = focus_rows(source, since=since, until=until, **options)
    if fmt == "parquet":
        _write_parquet(rows, path)
    else:
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
    return len(rows)


def _write_parquet(rows: Sequence[Mapping[str, str]], path: Path) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError("a Parquet export needs pyarrow, which is optional: pip install "
                          "pyarrow (or export to .csv)") from exc

    def column(name: str) -> Any:
        values = [r[name] or None for r in rows]
        spec = COLUMNS_BY_NAME.get(name)
        kind = spec.type if spec else "String"
        if name.startswith("x_") and name.endswith("Tokens"):
            return pa.array([None if v is None else int(v) for v in values], pa.int64())
        if name == "x_SavedCost" or kind == "Decimal":
            return pa.array([None if v is None else Decimal(v) for v in values],
                            pa.decimal128(38, 9))
        if kind == "DateTime":
            return pa.array([None if v is None else
                             datetime.strptime(v, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
                             for v in values], pa.timestamp("s", tz="UTC"))
        return pa.array(values, pa.string())

    pq.write_table(pa.table({name: column(name) for name in COLUMNS}), str(path))


# -- validation -----------------------------------------------------------------------------


def _check_value(col: FocusColumn, value: str) -> str | None:
    """Why ``value`` is not a valid ``col`` (None when it is)."""
    if value == "":
        return None if col.nullable else "must not be null"
    if col.allowed is not None and value not in col.allowed:
        return f"{value!r} is not one of {', '.join(col.allowed)}"
    if col.type == "Decimal":
        if not _DECIMAL.fullmatch(value):
            return f"{value!r} is not a decimal (digits, an optional point and E exponent)"
    elif col.type == "DateTime":
        if not _DATETIME.fullmatch(value):
            return f"{value!r} is not a UTC date-time YYYY-MM-DDTHH:MM:SSZ"
        try:
            datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ")
        except ValueError:
            return f"{value!r} is not a real date and time"
    elif col.type == "KeyValue":
        try:
            obj = json.loads(value)
        except ValueError:
            return f"{value!r} is not JSON"
        if not isinstance(obj, dict):
            return "must be a JSON object"
        for k, v in obj.items():
            if not k or isinstance(v, dict | list):
                return f"key {k!r} must be non-empty with a string, number, boolean or null value"
    return None


def _dt(value: str) -> datetime:
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ")


def _check_row(row: Mapping[str, str]) -> Iterable[str]:
    names = set(row)
    if "BillingCurrency" in names and row["BillingCurrency"] and \
            not _CURRENCY.fullmatch(row["BillingCurrency"]):
        yield f"BillingCurrency {row['BillingCurrency']!r} is not an ISO 4217 code"
    category, sub = row.get("ServiceCategory"), row.get("ServiceSubcategory")
    if sub:
        parent = SERVICE_SUBCATEGORIES.get(sub)
        if parent is None:
            yield f"ServiceSubcategory {sub!r} is not a FOCUS service subcategory"
        elif category and parent != category:
            yield f"ServiceSubcategory {sub!r} belongs to {parent!r}, not {category!r}"
    try:
        cs, ce = _dt(row["ChargePeriodStart"]), _dt(row["ChargePeriodEnd"])
        bs, be = _dt(row["BillingPeriodStart"]), _dt(row["BillingPeriodEnd"])
    except (KeyError, ValueError):
        pass  # reported per value
    else:
        if not cs < ce:
            yield "ChargePeriodEnd must be after ChargePeriodStart"
        if not bs < be:
            yield "BillingPeriodEnd must be after BillingPeriodStart"
        if not (bs <= cs and ce <= be):
            yield "the charge period must lie inside the billing period"
    usage = row.get("ChargeCategory") == "Usage" and row.get("ChargeClass") != "Correction"
    if usage:
        for name in _USAGE_NOT_NULL:
            if name in names and not row[name]:
                yield f"{name} must not be null on a Usage row"
    for unit, cost in (("ListUnitPrice", "ListCost"), ("ContractedUnitPrice", "ContractedCost")):
        if row.get(unit) and row.get("PricingQuantity") and row.get(cost) and \
                row.get("ChargeClass") != "Correction":
            try:
                product = Decimal(row[unit]) * Decimal(row["PricingQuantity"])
                if product != Decimal(row[cost]):
                    yield f"{unit} x PricingQuantity ({product}) != {cost} ({row[cost]})"
                if Decimal(row[unit]) < 0:
                    yield f"{unit} must not be negative"
            except InvalidOperation:
                pass  # reported per value


def validate_focus(path: str | Path, *, max_problems: int = 50) -> list[str]:
    """Problems with the FOCUS CSV file at ``path`` (an empty list: it is valid).

    Checks that every column of :data:`REQUIRED_COLUMNS` is present, that other
    columns are FOCUS columns or custom ``x_`` columns, every value against its
    column's type, nullability and allowed values (:data:`FOCUS_COLUMNS`), and per
    row: ISO 4217 currency, the AI subcategory, charge period inside the billing
    period, unit price x quantity = cost, and the columns a Usage row must set.
    """
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        raise ValueError("validate_focus reads CSV; export to .csv to validate")
    problems: list[str] = []
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            problems.append(f"missing columns: {', '.join(missing)}")
        for name in header:
            if name not in COLUMNS_BY_NAME and not name.startswith("x_"):
                problems.append(f"column {name!r} is neither a FOCUS column nor custom (x_...)")
        if len(set(header)) != len(header):
            problems.append("a column appears twice in the header")
        for n, row in enumerate(reader, start=2):
            if None in row:
                problems.append(f"line {n}: more values than columns")
                continue
            if None in row.values():
                problems.append(f"line {n}: fewer values than columns")
                continue
            for name, value in row.items():
                col = COLUMNS_BY_NAME.get(name)
                if col is None:
                    continue
                why = _check_value(col, value or "")
                if why:
                    problems.append(f"line {n}, {name}: {why}")
            problems.extend(f"line {n}: {why}" for why in _check_row(row))
            if len(problems) >= max_problems:
                problems.append("... (stopped)")
                break
    return problems
