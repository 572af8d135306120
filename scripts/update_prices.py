"""Refresh agent-guard's bundled price snapshot from LiteLLM's price list.

    python scripts/update_prices.py                 # from the installed LiteLLM
    python scripts/update_prices.py litellm-*.whl   # or a wheel, a JSON file, a URL

Keeps chat/responses/completion models and every per-token rate (see
``agent_guard/pricing/refresh.py``); numbers are copied as their exact source text.
The data is LiteLLM's (MIT licence, copied beside the snapshot). Users refresh their own
table without touching the package with ``agent-guard prices update``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent_guard.pricing.refresh import (  # noqa: E402
    build_table,
    diff_tables,
    dump_snapshot,
    load_source,
    read_snapshot,
)

OUT = ROOT / "agent_guard" / "pricing" / "data" / "model_prices.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="?", default=None,
                        help="litellm wheel, price JSON or URL (default: installed LiteLLM)")
    parser.add_argument("--date", default=dt.date.today().isoformat())
    args = parser.parse_args()
    raw, origin, version = load_source(args.source)
    models = build_table(raw)
    _, old = read_snapshot(OUT) if OUT.exists() else ({}, {})
    change = diff_tables(old, models)
    OUT.write_text(dump_snapshot(models, version=version, date=args.date))
    print(f"wrote {len(models)} models from {origin} to {OUT}: {len(change.added)} added, "
          f"{len(change.removed)} removed, {len(change.changed)} changed")


if __name__ == "__main__":
    main()
