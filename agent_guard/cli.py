"""The ``agent-guard`` command."""

from __future__ import annotations

import csv
import json
import sys
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from .finops.report import REPORT_COLUMNS

app = typer.Typer(
    help="FinOps guardrails for LangChain and LangGraph agents.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()


def _show_version(value: bool) -> None:
    if value:
        from . import __version__

        console.print(f"agent-guard {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option(
        "--version", help="Show the version and exit.", callback=_show_version,
        is_eager=True)] = False,
) -> None:
    """FinOps guardrails for LangChain and LangGraph agents."""


def _dollars(value: str) -> str:
    """``--cap``: a positive, finite dollar amount (kept as the text, which is exact)."""
    from decimal import InvalidOperation

    try:
        amount = Decimal(value)
    except InvalidOperation:
        amount = Decimal("NaN")
    if not amount.is_finite() or amount <= 0:
        raise typer.BadParameter(f"{value!r} is not a dollar amount above 0, e.g. 0.05")
    return value


def _check_ledger_url(url: str, *, shared: bool = False) -> str:
    """Parse a ``--ledger`` URL before anything is built; for a command that reads what
    other processes wrote (``shared``), refuse a process-local ledger and a SQLite file
    that does not exist (opening it would create an empty one)."""
    from .stores import parse_url

    try:
        parsed = parse_url(url, "ledger")
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    if shared and parsed.backend == "memory":
        raise _fail(f"{url!r} is a ledger inside one process, empty here: give the ledger "
                    "the agents share, e.g. --ledger sqlite:///guard.db or redis://host:6379/0")
    if shared and parsed.backend == "sqlite":
        path = parsed.path or ""
        if path in ("", ":memory:") or not Path(path).is_file():
            raise _fail(f"no ledger at {url!r}: the file {path or '(none)'} does not exist "
                        "(give the SQLite file the guard writes, e.g. "
                        "--ledger sqlite:///guard.db)")
    return url


@app.command()
def demo(
    cap: Annotated[str, typer.Option(help="The session's dollar cap.",
                                     callback=_dollars)] = "0.05",
    ledger: Annotated[str, typer.Option(help="Ledger URL (memory://, sqlite:///f.db, "
                                               "redis://...).")] = "memory://",
    session: Annotated[str, typer.Option(help="Session id (the LangGraph thread_id).")] = (
        "ticket-42"),
    model: Annotated[str, typer.Option(help="Model name to price the scripted calls at.")] = (
        "gpt-4o"),
) -> None:
    """Run a runaway tool-using agent on a scripted model until its cap stops it."""
    from .demo import run_demo

    _check_ledger_url(ledger)
    result = run_demo(cap, ledger=ledger, session=session, model=model, console=console)
    if result.stopped_by is None:
        raise typer.Exit(1)


@app.command()
def usage(
    session: Annotated[str, typer.Argument(help="Session id.")],
    ledger: Annotated[str, typer.Option(help="Ledger URL.")] = "sqlite:///agent_guard.db",
) -> None:
    """Show a session's spend as a shared ledger has it."""
    from .engine.guard import Guard
    from .engine.limits import Limits
    from .errors import GuardError
    from .ledger import redact_url

    _check_ledger_url(ledger, shared=True)
    try:
        guard = Guard(Limits(), ledger=ledger)
        try:
            u = guard.usage(session)
        finally:
            guard.close()
    except (GuardError, ValueError, OSError) as exc:
        raise _fail(f"cannot read the ledger {redact_url(ledger)!r}: {exc}") from exc
    if not any((u.cost_nano, u.reserved_nano, u.input_tokens, u.output_tokens,
                u.model_calls, u.tool_calls)):
        console.print(f"no usage recorded for session {session!r} in "
                      f"{redact_url(ledger)} (no call was charged to it, or it was evicted)",
                      highlight=False)
        raise typer.Exit(1)
    table = Table(title=f"session {session!r} on {guard.ledger.url}", title_justify="left")
    table.add_column("what")
    table.add_column("value", justify="right")
    for name, value in (
        ("cost", f"${u.cost_usd:.9f}"),
        ("reserved", f"${u.reserved_usd:.9f}"),
        ("input tokens", f"{u.input_tokens:,}"),
        ("cached input tokens", f"{u.cached_tokens:,}"),
        ("cache-write tokens", f"{u.cache_creation_tokens:,}"),
        ("output tokens", f"{u.output_tokens:,}"),
        ("reasoning tokens", f"{u.reasoning_tokens:,}"),
        ("model calls", f"{u.model_calls:,}"),
        ("tool calls", f"{u.tool_calls:,}"),
    ):
        table.add_row(name, value)
    console.print(table)


@app.command()
def price(
    model: Annotated[str, typer.Argument(help="Model name, e.g. gpt-4o-mini-2025-01-01.")],
) -> None:
    """Show the price agent-guard uses for a model (and how the name resolved)."""
    from .pricing import PriceBook

    book = PriceBook.default()
    p = book.resolve(model)
    if p is None:
        console.print(f"[red]no price for {model!r}[/red]: add one with "
                      "PriceBook.with_overrides(...) or AGENT_GUARD_PRICES=prices.yaml")
        raise typer.Exit(1)
    per_m = 1_000_000
    console.print(f"{model!r} -> {p.model!r} ({p.provider})")
    console.print(f"  prices as of {book.snapshot_date}{_age(book.snapshot_date)}")
    console.print(f"  input  ${p.input * per_m}/M tokens")
    console.print(f"  output ${p.output * per_m}/M tokens")
    if p.cache_read is not None:
        console.print(f"  cache read  ${p.cache_read * per_m}/M tokens")
    if p.cache_creation is not None:
        console.print(f"  cache write ${p.cache_creation * per_m}/M tokens")
    if p.reasoning is not None:
        console.print(f"  reasoning   ${p.reasoning * per_m}/M tokens")
    shown = {"input_cost_per_token", "output_cost_per_token", "cache_read_input_token_cost",
             "cache_creation_input_token_cost", "output_cost_per_reasoning_token"}
    for key, value in sorted(p.fields.items()):
        if key not in shown:
            console.print(f"  {key} ${value * per_m}/M tokens")
    for r in p.ranges:
        console.print(f"  prompt in ({r.start}, {r.end}]: " + ", ".join(
            f"{k} ${v * per_m}/M" for k, v in sorted(r.rates.items())))


#: prices older than this are flagged by ``agent-guard price``
STALE_AFTER_DAYS = 90


def _age(date: str | None) -> str:
    import datetime as dt

    try:
        days = (dt.date.today() - dt.date.fromisoformat(str(date))).days
    except ValueError:
        return ""
    if days > STALE_AFTER_DAYS:
        return (f" ({days} days old) [yellow]warning: prices may have changed since; "
                "refresh them with `agent-guard prices update`[/yellow]")
    return f" ({days} days old)"


prices_app = typer.Typer(help="The price table: refresh it from LiteLLM's price list.",
                         no_args_is_help=True)
app.add_typer(prices_app, name="prices")


@prices_app.command("update")
def prices_update(
    source: Annotated[str | None, typer.Option(
        "--from", help="The installed LiteLLM (default), a LiteLLM price JSON or wheel, or "
                       "an http(s) URL of the JSON.")] = None,
    out: Annotated[Path | None, typer.Option(
        help="Where to write the table (default: $AGENT_GUARD_PRICES, else the user file "
             "the guard reads).")] = None,
    dry_run: Annotated[bool, typer.Option(help="Show what would change; write nothing.")
                       ] = False,
    show: Annotated[int, typer.Option(help="Changed models listed (0: none).")] = 20,
) -> None:
    """Rebuild the price table from LiteLLM's price list and show what changed."""
    import os

    from .pricing import PriceBook
    from .pricing.pricebook import ENV_VAR
    from .pricing.refresh import (
        build_table,
        diff_tables,
        dump_snapshot,
        load_source,
        source_date,
    )

    try:
        raw, origin, version = load_source(source)
        table = build_table(raw)
        PriceBook.from_litellm(table)  # every entry must price
    except (OSError, ValueError) as exc:
        raise _fail(f"cannot read prices from {source or 'the installed LiteLLM'}: {exc}") from exc
    target = out or Path(os.environ.get(ENV_VAR) or PriceBook.user_prices_path())
    current = PriceBook.default()
    change = diff_tables(current._raw, table)
    console.print(f"{len(table)} models from {origin}; current table as of "
                  f"{current.snapshot_date}: {len(change.added)} added, "
                  f"{len(change.removed)} removed, {len(change.changed)} changed")
    for name, fields in list(change.changed.items())[:show]:
        console.print(f"  {name}: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in
                                                fields.items()))
    if dry_run:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(dump_snapshot(table, version=version, date=source_date(source),
                                    source=origin))
    note = "" if target == Path(os.environ.get(ENV_VAR) or PriceBook.user_prices_path()) else (
        f" (the guard reads it with {ENV_VAR}={target})")
    console.print(f"wrote {target}{note}")


# -- FinOps: reports and FOCUS export ---------------------------------------------------------

_STORE_HELP = ("Usage store URL: sqlite:///guard.db (the ledger's file), redis://host:6379/0 "
               "(?namespace=... as the ledger's), memory://.")
_DEFAULT_DIMENSIONS = ("model", "team", "user", "feature", "node")


def _fail(message: str) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(2)


def _open_store(url: str, namespace: str | None) -> Any:
    from .finops.store import UsageStore
    from .stores import parse_url

    try:
        parsed = parse_url(url, "usage")
        if parsed.backend == "sqlite":
            path = parsed.path or ""
            if path not in ("", ":memory:") and not Path(path).is_file():
                raise _fail(f"no usage store at {url!r}: the file {path} does not exist "
                            f"(give the SQLite file the guard writes, e.g. sqlite:///guard.db)")
        return UsageStore.from_url(url, namespace=namespace)
    except ImportError as exc:
        raise _fail(f"{exc}; install redis-py: pip install 'redis>=5'") from exc
    except ValueError as exc:
        raise _fail(str(exc)) from exc


def _read_rows(store: Any, since: str | None, until: str | None, tz: Any = None
               ) -> list[dict[str, Any]]:
    from .finops.store import parse_time
    from .ledger import redact_url

    try:
        lo = parse_time(since, what="since", tz=tz)
        hi = parse_time(until, end=True, what="until", tz=tz)
        return list(store.rows(lo, hi))
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    except Exception as exc:  # connection refused, unreadable file...
        raise _fail(f"cannot read the usage store {redact_url(store.url)!r}: "
                    f"{type(exc).__name__}: {exc}") from exc


def _parse_where(items: list[str] | None) -> dict[str, list[str]]:
    where: dict[str, list[str]] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise _fail(f"--where {item!r} must be KEY=VALUE, e.g. --where team=acme")
        where.setdefault(key.strip(), []).append(value.strip())
    return where


def _usd(value: str | None) -> str:
    if value is None:
        return "-"
    d = Decimal(value)
    return f"${d:,.6f}" if abs(d) >= Decimal("0.000001") or d == 0 else f"${d:.9f}"


def _pct(value: float) -> str:
    return f"{value:.1%}"


def _mix(mix: dict[str, float]) -> str:
    return ", ".join(f"{tier} {share:.0%}" for tier, share in mix.items())


def _group_table(title: str, names: list[str], rows: list[dict[str, Any]],
                 total_nano: int) -> Table:
    table = Table(title=title, title_justify="left")
    for name in names:
        table.add_column(name)
    for col in ("cost", "share", "calls", "cost/call", "sessions", "cost/session", "input",
                "cached", "output", "reasoning", "cache hits", "saved", "redundant"):
        table.add_column(col, justify="right")
    table.add_column("routing")
    for r in rows:
        share = r["cost_nano"] / total_nano if total_nano else 0.0
        table.add_row(
            *("-" if r[n] is None else str(r[n]) for n in names),
            _usd(r["cost_usd"]), _pct(share), f"{r['calls']:,}", _usd(r["cost_per_call_usd"]),
            f"{r['sessions']:,}", _usd(r["cost_per_session_usd"]), f"{r['input_tokens']:,}",
            f"{r['cache_read_tokens']:,}", f"{r['output_tokens']:,}",
            f"{r['reasoning_tokens']:,}", _pct(r["cache_hit_rate"]), _usd(r["saved_usd"]),
            _pct(r["redundant_share"]), _mix(r["routing_mix"]))
    return table


def _totals_table(t: dict[str, Any], window: str) -> Table:
    table = Table(title=f"usage {window}", title_justify="left")
    table.add_column("what")
    table.add_column("value", justify="right")
    for name, value in (
        ("cost", _usd(t["cost_usd"])),
        ("  model calls / paid tools", f"{_usd(t['model_cost_usd'])} / "
                                       f"{_usd(t['tool_cost_usd'])}"),
        ("calls (model / tool)", f"{t['calls']:,} ({t['model_calls']:,} / {t['tool_calls']:,})"),
        ("sessions", f"{t['sessions']:,}"),
        ("cost per model call", _usd(t["cost_per_call_usd"])),
        ("cost per session", _usd(t["cost_per_session_usd"])),
        ("input tokens", f"{t['input_tokens']:,}"),
        ("  cached input tokens", f"{t['cache_read_tokens']:,}"),
        ("  cache-write tokens", f"{t['cache_creation_tokens']:,}"),
        ("output tokens", f"{t['output_tokens']:,}"),
        ("  reasoning tokens", f"{t['reasoning_tokens']:,}"),
        ("cache hits", f"{t['cache_hits']:,} ({_pct(t['cache_hit_rate'])} of calls)"),
        ("saved by caches", _usd(t["saved_usd"])),
        ("duplicate paid calls", f"{t['duplicate_calls']:,} ({_usd(t['duplicate_cost_usd'])})"),
        ("redundant share", f"{_pct(t['redundant_share'])} (cache hits + duplicates)"),
        ("routing mix", _mix(t["routing_mix"]) or "-"),
        ("errors / aborted", f"{t['errors']:,} / {t['aborted']:,}"),
        ("usage estimated by the guard", f"{t['estimated_calls']:,} calls"),
    ):
        table.add_row(name, value)
    return table


def _csv_value(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else value


@app.command()
def report(
    store: Annotated[str, typer.Option(help=_STORE_HELP)],
    by: Annotated[str | None, typer.Option(
        help="Group by these keys together, comma-separated: session, user, team, feature, "
             "project, environment, tenant, model, provider, node, tier, route, kind, tool, "
             "outcome, hour, day, week, month, attr:<name>. Default: one table each for "
             "model, team, user, feature and node.")] = None,
    since: Annotated[str | None, typer.Option(
        help="Calls started from this date (YYYY-MM-DD, in --tz) or ISO date-time.")] = None,
    until: Annotated[str | None, typer.Option(
        help="Calls started before this date-time; a date includes that whole day.")] = None,
    tz: Annotated[str, typer.Option(
        "--tz", help="Time zone of dates and of the hour/day/week/month keys (an IANA "
                     "name; use your budgets' Budgets(timezone=...)).")] = "UTC",
    where: Annotated[list[str] | None, typer.Option(
        help="Only calls with KEY=VALUE (repeat; the same key twice means either).")] = None,
    top: Annotated[int, typer.Option(min=1, help="Rows in the top-sessions table (and in "
                                                 "each grouped table).")] = 10,
    format: Annotated[str, typer.Option(
        "--format", help="table (rich), json (everything), csv (the grouped rows).")] = "table",
    namespace: Annotated[str | None, typer.Option(
        help="Redis key namespace (default: the URL's ?namespace= or 'default').")] = None,
) -> None:
    """Cost, calls, tokens, caching, routing and redundancy from the usage store."""
    from .finops.report import report as build
    from .finops.report import zone
    from .ledger import redact_url

    if format not in ("table", "json", "csv"):
        raise _fail(f"--format must be table, json or csv, got {format!r}")
    filters = _parse_where(where)
    names = [n.strip() for n in by.split(",") if n.strip()] if by else []
    try:  # check the keys before reading anything
        clock = zone(tz)
        build([], names)
        build([], (), where=filters, since=since, until=until)
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    usage_store = _open_store(store, namespace)
    try:
        rows = _read_rows(usage_store, since, until, clock)
    finally:
        usage_store.close()
    store_url = redact_url(usage_store.url)

    def grouped(keys: list[str] | tuple[str, ...], limit: int | None = None
                ) -> list[dict[str, Any]]:
        return build(rows, keys, where=filters, top=limit, tz=clock)

    totals = grouped(())[0]
    tables: dict[str, list[dict[str, Any]]] = {}
    if names:
        tables[",".join(names)] = grouped(names, top if format == "table" else None)
    else:
        for dim in _DEFAULT_DIMENSIONS:
            group = grouped([dim], top if format == "table" else None)
            if any(r[dim] is not None for r in group):
                tables[dim] = group
    top_sessions = grouped(["session"], top)
    by_day = grouped(["day"])
    by_tier = grouped(["tier"])

    if format == "json":
        print(json.dumps({
            "store": store_url, "since": since, "until": until, "tz": tz, "where": filters,
            "totals": totals, "groups": tables, "top_sessions": top_sessions,
            "by_day": by_day, "by_tier": by_tier}, indent=2, sort_keys=False))
        return
    if format == "csv":
        main = tables.get(",".join(names)) if names else grouped(["session"])
        writer = csv.writer(sys.stdout, lineterminator="\n")
        header = list((main or [{}])[0].keys()) or [*(names or ["session"]), *REPORT_COLUMNS]
        writer.writerow(header)
        for r in main or []:
            writer.writerow([_csv_value(r.get(h)) for h in header])
        return

    # tables are wide: off a terminal (a pipe, a file) do not squeeze them into 80 columns
    out = console if console.is_terminal else Console(width=max(console.width, 180))
    window = " ".join(p for p in (f"since {since}" if since else "",
                                  f"until {until}" if until else "") if p) or "(all time)"
    if filters:
        window += " where " + ", ".join(f"{k} in {v}" if len(v) > 1 else f"{k}={v[0]}"
                                        for k, v in filters.items())
    if not totals["calls"]:
        out.print(f"no calls recorded in {store_url} {window}", highlight=False)
        return
    out.print(_totals_table(totals, window))
    for key, group in tables.items():
        out.print(_group_table(f"cost by {key}", key.split(","), group,
                                   totals["cost_nano"]))
    out.print(_group_table(f"top {len(top_sessions)} sessions by cost", ["session"],
                               top_sessions, totals["cost_nano"]))
    out.print(_group_table(f"trend by day ({tz})", ["day"], by_day, totals["cost_nano"]))
    if any(r["tier"] is not None for r in by_tier):
        out.print(_group_table("routing mix by tier", ["tier"], by_tier,
                                   totals["cost_nano"]))


@app.command()
def export(
    store: Annotated[str, typer.Option(help=_STORE_HELP)],
    focus: Annotated[Path, typer.Option(
        help="Write FOCUS 1.2 rows to this file (.csv, or .parquet with pyarrow).")],
    since: Annotated[str | None, typer.Option(help="Calls started from this date.")] = None,
    until: Annotated[str | None, typer.Option(
        help="Calls started before this; a date includes that whole day.")] = None,
    billing_account: Annotated[str, typer.Option(
        help="BillingAccountId: your provider organisation or account id.")] = "default",
    namespace: Annotated[str | None, typer.Option(help="Redis key namespace.")] = None,
) -> None:
    """Export model calls as FinOps FOCUS rows (one per call), and validate the file."""
    from .finops.focus import FOCUS_SUFFIXES, FOCUS_VERSION, export_focus, validate_focus
    from .finops.store import format_usd

    if focus.suffix.lower() not in FOCUS_SUFFIXES and not focus.is_dir():
        what = focus.suffix or "a file without an extension"
        raise _fail(f"cannot write FOCUS rows as {what} ({focus}): name the file .csv or "
                    ".parquet")
    usage_store = _open_store(store, namespace)
    try:
        rows = _read_rows(usage_store, since, until)
    finally:
        usage_store.close()
    if not focus.parent.is_dir():
        raise _fail(f"cannot write {focus}: directory {focus.parent} does not exist")
    try:
        n = export_focus(rows, focus, billing_account_id=billing_account)
    except (ImportError, ValueError) as exc:
        raise _fail(str(exc)) from exc
    except OSError as exc:  # a directory, no permission, a full disk
        raise _fail(f"cannot write {focus}: {exc.strerror or exc}") from exc
    billed = sum((int(r["cost_nano"]) for r in rows if r["kind"] == "model"), 0)
    console.print(f"wrote {n:,} FOCUS {FOCUS_VERSION} rows to {focus} "
                  f"(BilledCost total ${format_usd(billed)})", highlight=False)
    if focus.suffix.lower() != ".parquet":
        problems = validate_focus(focus)
        if problems:
            for p in problems:
                console.print(f"[red]invalid:[/red] {p}", highlight=False)
            raise typer.Exit(1)
        console.print("validated: every required FOCUS column present, every value typed")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
