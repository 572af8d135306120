"""Refresh agent-guard's bundled price snapshot from LiteLLM's price table.

    pip download --no-deps litellm -d /tmp/litellm
    python scripts/update_prices.py /tmp/litellm/litellm-*.whl

Keeps chat/responses/completion models and the per-token text prices
agent-guard uses (base rates, cache read/write, reasoning, and the
``_above_<N>k_tokens`` tiers); numbers are copied as their exact source text.
The data is LiteLLM's (MIT licence, copied beside the snapshot).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import zipfile
from decimal import Decimal
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "agent_guard" / "pricing" / "data"
MODES = {"chat", "responses", "completion"}
BASE_FIELDS = (
    "input_cost_per_token",
    "output_cost_per_token",
    "cache_read_input_token_cost",
    "cache_creation_input_token_cost",
    "output_cost_per_reasoning_token",
)
TIER = re.compile(
    r"^(input_cost_per_token|output_cost_per_token|cache_read_input_token_cost|"
    r"cache_creation_input_token_cost)_above_(\d+)k_tokens$"
)
KEEP = ("litellm_provider", "mode", "max_input_tokens", "max_output_tokens")


def load_source(path: Path) -> tuple[dict, str]:
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as wheel:
            name = "litellm/model_prices_and_context_window_backup.json"
            data = wheel.read(name).decode()
        version = path.name.split("-")[1]
    else:
        data, version = path.read_text(), "unknown"
    return json.loads(data, parse_float=Decimal), version


def select(entry: dict) -> dict | None:
    if not isinstance(entry, dict) or entry.get("mode") not in MODES:
        return None
    if "input_cost_per_token" not in entry or "output_cost_per_token" not in entry:
        return None
    out = {}
    for k in KEEP:
        value = entry.get(k)
        if isinstance(value, str) if k in ("litellm_provider", "mode") else isinstance(
                value, int | Decimal):
            out[k] = value
    for key, value in entry.items():
        if (key in BASE_FIELDS or TIER.match(key)) and isinstance(value, Decimal | int):
            out[key] = value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="litellm wheel or price JSON")
    parser.add_argument("--date", default=dt.date.today().isoformat())
    args = parser.parse_args()
    source, version = load_source(args.source)
    models = {}
    for name in sorted(source):
        if name == "sample_spec":
            continue
        picked = select(source[name])
        if picked is not None:
            models[name] = picked

    def dump(value: object) -> str:
        return json.dumps(value, sort_keys=True, default=str)

    lines = [
        "{",
        f'"_meta": {dump({"source": "litellm model_prices_and_context_window_backup.json", "litellm_version": version, "snapshot_date": args.date, "license": "MIT", "models": len(models)})},',  # noqa: E501
        '"models": {',
    ]
    rows = []
    for name, entry in models.items():
        body = ", ".join(
            f"{json.dumps(k)}: {v if isinstance(v, Decimal | int) else json.dumps(v)}"
            for k, v in sorted(entry.items())
        )
        rows.append(f"{json.dumps(name)}: {{{body}}}")
    lines.append(",\n".join(rows))
    lines.append("}}")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "model_prices.json").write_text("\n".join(lines) + "\n")
    print(f"wrote {len(models)} models to {OUT / 'model_prices.json'}")


if __name__ == "__main__":
    main()
