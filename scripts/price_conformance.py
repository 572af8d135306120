"""Compare agent-guard's prices with LiteLLM's ``cost_per_token`` on every chat model.

    python scripts/price_conformance.py            # writes docs/price-conformance.md
    python scripts/price_conformance.py --usages 4 --check   # what the test runs

For each chat model of the installed LiteLLM's price list (the table agent-guard builds
from it, as ``agent-guard prices update`` does), random usages over every billing
dimension (cache reads, 5-minute and 1-hour cache writes, reasoning, audio in and out,
image input, service tiers, prompts at and around each threshold and range end) are
priced by both. A model "differs" when any usage's cost differs by more than a
nano-dollar; it is an under-charge when agent-guard's is the lower. Fixed seed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import sys
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network at import

from agent_guard.engine.usage import Usage  # noqa: E402
from agent_guard.pricing.pricebook import ModelPrice  # noqa: E402
from agent_guard.pricing.refresh import build_table, load_source  # noqa: E402

DOC = ROOT / "docs" / "price-conformance.md"
TOLERANCE = Decimal("1e-9")
#: usages are priced at instants drawn from the week that starts here (a Monday, UTC), the
#: same for both sides, so time-of-day ``off_peak_pricing`` is compared in and out of its
#: windows and the report does not depend on when it was made
WEEK_START = 1_795_996_800  # 2026-11-30T00:00:00Z
THRESHOLDS = (128_000, 200_000, 272_000)
TIERS = (None, None, "priority", "flex")


@dataclass
class ModelResult:
    model: str
    provider: str
    usages: int = 0
    differ: int = 0
    under: int = 0
    max_over: Decimal = Decimal(0)
    max_under: Decimal = Decimal(0)
    example: str = ""
    errors: int = 0
    reason: str = ""


@dataclass
class Report:
    litellm_version: str
    results: list[ModelResult] = field(default_factory=list)

    @property
    def differing(self) -> list[ModelResult]:
        return [r for r in self.results if r.differ]

    @property
    def under(self) -> list[ModelResult]:
        return [r for r in self.results if r.under]


def _edges(entry: Mapping[str, Any]) -> list[int]:
    edges = set(THRESHOLDS)
    for key in entry:
        if "_above_" in key and key.endswith("k_tokens"):
            with contextlib.suppress(ValueError):
                edges.add(int(key.rsplit("_above_", 1)[1].split("k_tokens")[0]) * 1000)
    for tier in entry.get("tiered_pricing") or ():
        bounds = tier.get("range") if isinstance(tier, Mapping) else None
        if isinstance(bounds, list) and len(bounds) == 2:
            edges.add(int(bounds[1]))
    return sorted(edges)


def usages(name: str, entry: Mapping[str, Any], n: int) -> Iterator[Usage]:
    """``n`` usages over every dimension; the 2nd, 3rd... sit exactly on the thresholds
    (128k, 200k, 272k and the model's own), the others near them or below."""
    rng = random.Random(zlib.crc32(name.encode()))
    edges = _edges(entry)
    near = [e + d for e in edges for d in (-1, 0, 1)]
    for i in range(n):
        # first: exactly on each threshold (inclusive or not), then anywhere near or below
        size = edges[i - 1] if 1 <= i <= len(edges) else rng.choice(
            [rng.randint(1, 20_000), rng.choice(near)])
        read = rng.choice([0, 0, rng.randint(0, size // 2)])
        write = rng.choice([0, rng.randint(0, (size - read) // 2)])
        write_1h = rng.choice([0, write, rng.randint(0, write)])
        rest = size - read - write
        audio_in = rng.choice([0, 0, rng.randint(0, rest // 3)])
        image_in = rng.choice([0, 0, rng.randint(0, rest // 3)])
        out = rng.randint(0, 20_000)
        reasoning = rng.choice([0, rng.randint(0, out)])
        audio_out = rng.choice([0, 0, rng.randint(0, out - reasoning)])
        yield Usage(input_tokens=size, output_tokens=out, cache_read_tokens=read,
                    cache_creation_tokens=write, reasoning_tokens=reasoning,
                    cache_creation_1h_tokens=write_1h, audio_input_tokens=audio_in,
                    image_input_tokens=image_in, audio_output_tokens=audio_out,
                    service_tier=TIERS[rng.randrange(len(TIERS))])


def litellm_cost(litellm: Any, name: str, provider: str, u: Usage) -> Decimal:
    from litellm.types.utils import (
        CacheCreationTokenDetails,
        CompletionTokensDetailsWrapper,
        PromptTokensDetailsWrapper,
    )
    from litellm.types.utils import Usage as LUsage

    usage = LUsage(
        prompt_tokens=u.input_tokens, completion_tokens=u.output_tokens,
        total_tokens=u.total_tokens,
        prompt_tokens_details=PromptTokensDetailsWrapper(
            cached_tokens=u.cache_read_tokens, cache_creation_tokens=u.cache_creation_tokens,
            cache_creation_token_details=CacheCreationTokenDetails(
                ephemeral_5m_input_tokens=u.cache_creation_tokens - u.cache_creation_1h_tokens,
                ephemeral_1h_input_tokens=u.cache_creation_1h_tokens),
            audio_tokens=u.audio_input_tokens, image_tokens=u.image_input_tokens),
        completion_tokens_details=CompletionTokensDetailsWrapper(
            reasoning_tokens=u.reasoning_tokens, audio_tokens=u.audio_output_tokens))
    prompt, completion = litellm.cost_per_token(
        model=name, usage_object=usage, custom_llm_provider=provider,
        service_tier=u.service_tier)
    return Decimal(repr(float(prompt))) + Decimal(repr(float(completion)))


def reason_for(name: str, entry: Mapping[str, Any], provider: str, under: bool) -> str:
    if provider == "perplexity":
        if under:
            return ("LiteLLM's Perplexity calculator strips the route prefix and prices "
                    "`perplexity/<model>` (another entry, other rates); agent-guard uses this "
                    "entry's own rates. Known and listed in the test")
        return ("LiteLLM's Perplexity calculator ignores thresholds, cache writes, audio and "
                "service tiers; agent-guard charges them (dearer)")
    if provider == "fireworks_ai":
        return ("LiteLLM's Fireworks AI path ignores the `_priority` rates of a priority call; "
                "agent-guard charges them (dearer)")
    off_peak = ("off-peak (`off_peak_pricing`, priced at the same instant on both sides): the "
                "block has no audio or image rates, so agent-guard keeps the standard audio "
                "and image rates of an off-peak call; LiteLLM applies the off-peak input and "
                "output rates to them (dearer)") if "off_peak_pricing" in entry else ""
    if provider == "deepseek":
        return "; ".join(filter(None, (
            "LiteLLM's DeepSeek calculator prices cache writes at 0; agent-guard at the input "
            "rate (DeepSeek bills uncached tokens at the input rate)", off_peak)))
    if off_peak:
        return off_peak
    if "explicit_cache_read_input_token_cost" in entry:
        return ("explicit cache reads: agent-guard prices every cache read at the dearer "
                "explicit-cache rate (LangChain does not report which cache was read)")
    if any(k.startswith("cache_creation_input_token_cost_above_1hr_above_") for k in entry):
        return ("1-hour writes above a threshold under a service tier: agent-guard uses the "
                "threshold's 1-hour rate, LiteLLM the tier's base 1-hour rate")
    if any(k.startswith("input_cost_per_audio_token_above_") for k in entry):
        return ("audio tokens in a long prompt: agent-guard charges the dearer of the base "
                "and the long-prompt audio rates; LiteLLM's Vertex calculator reads the "
                "long-prompt one, its generic one the base one")
    if ModelPrice.from_litellm(name, entry).floored_by_threshold():
        return ("a rate above a prompt-size threshold is below the same rate under it in "
                "LiteLLM's table (e.g. cache writes above 200k); agent-guard keeps the dearer, "
                "so a longer prompt never costs less (dearer)")
    if name.startswith("gemini-exp"):
        return "LiteLLM prices this experimental Gemini model at $0; agent-guard at its table rates"
    return "unclassified (see the example)"


#: under-charges against LiteLLM that are LiteLLM's reading of another entry, not a rate
#: agent-guard misses (see the reason in the table)
KNOWN_UNDER = frozenset({"perplexity/perplexity/sonar"})


def run(n: int, only: set[str] | None = None) -> Report:
    import litellm
    from litellm._internal_context import pinned_billing_time

    litellm.suppress_debug_info = True
    raw, _, version = load_source("litellm")
    table = build_table(raw)
    report = Report(litellm_version=version or "unknown")
    for name, entry in table.items():
        if only is not None and name not in only:
            continue
        provider = str(entry.get("litellm_provider") or "")
        result = ModelResult(name, provider)
        price = ModelPrice.from_litellm(name, entry)
        instants = random.Random(zlib.crc32(name.encode()) ^ 0x0FF9EA4)
        for usage in usages(name, entry, n):
            result.usages += 1
            at = WEEK_START + instants.randrange(7 * 86_400)
            ours = price.cost(usage, (at, at)).total_usd
            try:
                with pinned_billing_time(datetime.fromtimestamp(at, UTC)):
                    theirs = litellm_cost(litellm, name, provider, usage)
            except Exception:  # LiteLLM cannot price it (its own routing)
                result.errors += 1
                continue
            diff = ours - theirs
            if abs(diff) <= TOLERANCE + abs(theirs) * Decimal("1e-12"):
                continue
            result.differ += 1
            if diff < 0:
                result.under += 1
                result.max_under = max(result.max_under, -diff)
            else:
                result.max_over = max(result.max_over, diff)
            if not result.example or (diff < 0 and result.under == 1):
                result.example = (f"{usage.input_tokens} in ({usage.cache_read_tokens} read, "
                                  f"{usage.cache_creation_tokens} written), "
                                  f"{usage.output_tokens} out, tier {usage.service_tier}: "
                                  f"${ours:.9f} vs ${theirs:.9f}"
                                  + (f" at {datetime.fromtimestamp(at, UTC):%a %H:%M} UTC"
                                     if "off_peak_pricing" in entry else ""))
        if result.differ:
            result.reason = reason_for(name, entry, provider, bool(result.under))
        report.results.append(result)
    return report


def render(report: Report, n: int) -> str:
    lines = [
        "# Price conformance with LiteLLM",
        "",
        "Generated by `python scripts/price_conformance.py` (do not edit by hand): every chat",
        f"model of LiteLLM {report.litellm_version}'s price list, {n} random usages each over",
        "every billing dimension (cache reads, 5-minute and 1-hour writes, reasoning, audio in",
        "and out, image input, priority and flex tiers, prompts at and around each threshold),",
        "priced by agent-guard and by `litellm.cost_per_token`.",
        "",
        f"- models compared: {len(report.results)}",
        f"- agree on every usage (to the nano-dollar): "
        f"{len(report.results) - len(report.differing)}",
        f"- differ: {len(report.differing)}",
        f"- charged less than LiteLLM on any usage: {len(report.under)}"
        + (f" ({', '.join(f'`{r.model}`' for r in report.under)}: LiteLLM reads another "
           "entry for it, see its row)" if report.under else ""),
        "",
    ]
    if report.differing:
        lines += ["| model | provider | usages differing | largest difference | reason | example |",
                  "|---|---|---|---|---|---|"]
        for r in report.differing:
            worst = f"+${r.max_over:.9f}" if not r.under else f"-${r.max_under:.9f}"
            lines.append(f"| `{r.model}` | {r.provider} | {r.differ}/{r.usages} | {worst} | "
                         f"{r.reason} | {r.example} |")
    return "\n".join(lines) + "\n"


def documented_models(text: str) -> set[str]:
    return {line.split("`")[1] for line in text.splitlines() if line.startswith("| `")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--usages", type=int, default=15)
    parser.add_argument("--check", action="store_true",
                        help="do not write; fail on an under-charge or an undocumented model")
    parser.add_argument("--json", action="store_true",
                        help="do not write; print the results as JSON")
    args = parser.parse_args()
    report = run(args.usages)
    if args.json:
        import json

        print(json.dumps({"litellm_version": report.litellm_version, "results": [
            {"model": r.model, "usages": r.usages, "differ": r.differ, "under": r.under,
             "reason": r.reason, "example": r.example} for r in report.results]}))
        return
    print(f"LiteLLM {report.litellm_version}: {len(report.results)} models, "
          f"{len(report.differing)} differ, {len(report.under)} charged less")
    for r in report.under:
        print(f"  UNDER {r.model}: {r.example}")
    if args.check:
        missing = {r.model for r in report.differing} - documented_models(DOC.read_text())
        if missing:
            print(f"differ but not in {DOC}: {sorted(missing)}")
        unknown_under = {r.model for r in report.under} - KNOWN_UNDER
        sys.exit(1 if unknown_under or missing else 0)
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(render(report, args.usages))
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
