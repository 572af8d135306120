"""Rebuild the price table from LiteLLM's price list: an installed LiteLLM, a file, or a URL.

Nothing here runs on its own: ``agent-guard prices update`` (and
``scripts/update_prices.py`` for the bundled snapshot) call it. LiteLLM is read as data
(its ``model_prices_and_context_window_backup.json``), never imported: importing it
costs seconds and may fetch the price list from the network.

Kept: chat, responses and completion models, and every per-token rate of theirs
(service tiers, cache writes by duration, audio and image tokens, thresholds,
``tiered_pricing`` ranges, ``off_peak_pricing`` for the record). Numbers are copied as
their exact source text.
"""

from __future__ import annotations

import datetime as dt
import json
import urllib.request
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from importlib import metadata, util
from pathlib import Path
from typing import Any

__all__ = ["TableDiff", "build_table", "diff_tables", "dump_snapshot", "load_source",
           "read_snapshot", "source_date"]

MODES = frozenset({"chat", "responses", "completion"})
KEEP = ("litellm_provider", "mode", "max_input_tokens", "max_output_tokens")
# kept only when true: the model may bill hidden reasoning tokens, so a call of it that
# reports no usage is settled at its reserved output (docs/money-truth.md)
FLAGS = ("supports_reasoning",)
LITELLM_FILE = "model_prices_and_context_window_backup.json"
SOURCE = f"litellm {LITELLM_FILE}"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | Decimal) and not isinstance(value, bool)


def select(entry: Any) -> dict[str, Any] | None:
    """The part of one LiteLLM entry agent-guard prices with, or None (not a chat model,
    or no text rates)."""
    if not isinstance(entry, Mapping) or entry.get("mode") not in MODES:
        return None
    ranges = entry.get("tiered_pricing")
    has_ranges = isinstance(ranges, list) and any(
        isinstance(r, Mapping) and "input_cost_per_token" in r for r in ranges)
    if not has_ranges and not all(_is_number(entry.get(k)) for k in (
            "input_cost_per_token", "output_cost_per_token")):
        return None
    out: dict[str, Any] = {}
    for key in KEEP:
        value = entry.get(key)
        if (isinstance(value, str) if key in ("litellm_provider", "mode") else _is_number(value)):
            out[key] = value
    for key in FLAGS:
        if entry.get(key) is True:
            out[key] = True
    for key, value in entry.items():
        if "cost" in key and _is_number(value):
            out[key] = value
    if has_ranges:
        out["tiered_pricing"] = [
            {k: v for k, v in r.items() if k == "range" or ("cost" in k and _is_number(v))}
            for r in ranges or () if isinstance(r, Mapping)]
    off_peak = entry.get("off_peak_pricing")
    if isinstance(off_peak, Mapping):
        out["off_peak_pricing"] = dict(off_peak)
    return out


def build_table(source: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{model: entry}`` of every chat model of a LiteLLM price list, sorted by name."""
    models = {}
    for name in sorted(source):
        if name == "sample_spec":
            continue
        picked = select(source[name])
        if picked is not None:
            models[name] = picked
    return models


def _parse(text: str, origin: str) -> dict[str, Any]:
    try:
        data = json.loads(text, parse_float=Decimal)
    except ValueError as exc:
        raise ValueError(f"{origin} is not a JSON price list: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{origin} must hold a mapping of model name -> prices")
    if "_meta" in data and isinstance(data.get("models"), dict):  # one of our snapshots
        return dict(data["models"])
    return data


def installed_litellm() -> tuple[Path, str]:
    """The price list of the installed LiteLLM and its version (LiteLLM not imported)."""
    spec = util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("LiteLLM is not installed: pip install litellm, or give a file "
                         "or URL (agent-guard prices update --from FILE|URL)")
    path = Path(next(iter(spec.submodule_search_locations))) / LITELLM_FILE
    if not path.is_file():
        raise ValueError(f"the installed LiteLLM has no {LITELLM_FILE} at {path}")
    return path, metadata.version("litellm")


def load_source(source: str | None, *, timeout: float = 30.0
                ) -> tuple[dict[str, Any], str, str | None]:
    """(LiteLLM price list, where it came from, LiteLLM version if known).

    ``source``: None or ``"litellm"`` (the installed LiteLLM), a ``.json`` file, a LiteLLM
    wheel, or an ``http(s)://`` URL of the JSON (fetched only here, when asked)."""
    if source in (None, "litellm"):
        path, version = installed_litellm()
        return _parse(path.read_text(), str(path)), f"litellm {version} ({path})", version
    assert source is not None
    if source.startswith(("http://", "https://")):
        with urllib.request.urlopen(source, timeout=timeout) as response:
            text = response.read().decode()
        return _parse(text, source), source, None
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"no such price list: {source}")
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as wheel:
            text = wheel.read(f"litellm/{LITELLM_FILE}").decode()
        version = path.name.split("-")[1]
        return _parse(text, str(path)), f"litellm {version} ({path.name})", version
    return _parse(path.read_text(), str(path)), str(path), None


def source_date(source: str | None) -> str:
    """The date of a price list, as near as can be told offline: the date inside one of
    our snapshots, the date of a wheel's price file (when the wheel records one), the
    modification date of a file or of the installed LiteLLM's file (its install date);
    today for a URL (fetched now)."""
    today = dt.date.today().isoformat()
    try:
        if source in (None, "litellm"):
            path, _ = installed_litellm()
            return dt.date.fromtimestamp(path.stat().st_mtime).isoformat()
        assert source is not None
        if source.startswith(("http://", "https://")):
            return today
        path = Path(source)
        if path.suffix == ".whl":
            with zipfile.ZipFile(path) as wheel:
                y, m, d, *_ = wheel.getinfo(f"litellm/{LITELLM_FILE}").date_time
            return dt.date(y, m, d).isoformat() if y > 2000 else today  # 1980: unknown
        meta, _ = read_snapshot(path) if path.suffix == ".json" else ({}, {})
        if meta.get("snapshot_date"):
            return str(meta["snapshot_date"])
        return dt.date.fromtimestamp(path.stat().st_mtime).isoformat()
    except (OSError, ValueError, KeyError, AttributeError):
        return today


def dump_snapshot(models: Mapping[str, Mapping[str, Any]], *, version: str | None,
                  date: str | None = None, source: str = SOURCE) -> str:
    """The snapshot file's text: ``{"_meta": {...}, "models": {...}}``, one model a line,
    numbers as their exact source text."""
    meta = {"source": source, "litellm_version": version or "unknown",
            "snapshot_date": date or dt.date.today().isoformat(), "license": "MIT",
            "models": len(models)}

    def value(v: Any) -> str:
        if isinstance(v, Decimal | int) and not isinstance(v, bool):
            return str(v)
        if isinstance(v, Mapping):
            return "{" + ", ".join(f"{json.dumps(k)}: {value(x)}" for k, x in v.items()) + "}"
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v)

    rows = [f"{json.dumps(name)}: {{" + ", ".join(
        f"{json.dumps(k)}: {value(v)}" for k, v in sorted(entry.items())) + "}"
        for name, entry in models.items()]
    return ("{\n" + f'"_meta": {json.dumps(meta, sort_keys=True)},\n' + '"models": {\n'
            + ",\n".join(rows) + "\n}}\n")


def read_snapshot(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(meta, models) of a snapshot file written by :func:`dump_snapshot`."""
    data = json.loads(path.read_text(), parse_float=Decimal)
    return dict(data.get("_meta") or {}), dict(data.get("models") or {})


@dataclass
class TableDiff:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: dict[str, dict[str, tuple[Any, Any]]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)


def diff_tables(old: Mapping[str, Mapping[str, Any]], new: Mapping[str, Mapping[str, Any]]
                ) -> TableDiff:
    """Models added, removed, and the fields whose value changed (numbers compared as
    numbers: ``1E-7`` equals ``1e-07``)."""
    out = TableDiff(added=sorted(set(new) - set(old)), removed=sorted(set(old) - set(new)))
    for name in sorted(set(old) & set(new)):
        a, b = old[name], new[name]
        fields = {}
        for key in sorted(set(a) | set(b)):
            x, y = a.get(key), b.get(key)
            same = (Decimal(str(x)) == Decimal(str(y))) if _is_number(x) and _is_number(y) \
                else x == y
            if not same:
                fields[key] = (x, y)
        if fields:
            out.changed[name] = fields
    return out
