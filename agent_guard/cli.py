"""The ``agent-guard`` command."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="FinOps guardrails for LangChain and LangGraph agents.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()


@app.command()
def demo(
    cap: Annotated[str, typer.Option(help="The session's dollar cap.")] = "0.05",
    ledger: Annotated[str, typer.Option(help="Ledger URL (memory://, sqlite:///f.db, "
                                               "redis://...).")] = "memory://",
    session: Annotated[str, typer.Option(help="Session id (the LangGraph thread_id).")] = (
        "ticket-42"),
    model: Annotated[str, typer.Option(help="Model name to price the scripted calls at.")] = (
        "gpt-4o"),
) -> None:
    """Run a runaway tool-using agent on a scripted model until its cap stops it."""
    from .demo import run_demo

    result = run_demo(cap, ledger=ledger, session=session, model=model, console=console)
    if result.stopped_by is None:
        raise typer.Exit(1)


@app.command()
def usage(
    session: Annotated[str, typer.Argument(help="Session id.")],
    ledger: Annotated[str, typer.Option(help="Ledger URL.")] = "sqlite:///agent_guard.db",
) -> None:
    """Show a session's spend as a shared ledger has it."""
    from .guard import Guard
    from .limits import Limits

    guard = Guard(Limits(), ledger=ledger)
    u = guard.usage(session)
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
    guard.close()


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
    console.print(f"{model!r} -> {p.model!r} ({p.provider}), snapshot {book.snapshot_date}")
    console.print(f"  input  ${p.input * per_m}/M tokens")
    console.print(f"  output ${p.output * per_m}/M tokens")
    if p.cache_read is not None:
        console.print(f"  cache read  ${p.cache_read * per_m}/M tokens")
    if p.cache_creation is not None:
        console.print(f"  cache write ${p.cache_creation * per_m}/M tokens")
    if p.reasoning is not None:
        console.print(f"  reasoning   ${p.reasoning * per_m}/M tokens")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
