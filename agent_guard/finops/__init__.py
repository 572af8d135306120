"""FinOps: keep every call record, report on it, export it as FOCUS.

- :mod:`.store`: :class:`UsageStore` (memory, SQLite, Redis stream), a record hook;
- :mod:`.report`: :func:`report` grouped by session, user, team, feature, model,
  node, day...; :func:`to_dataframe` when pandas is installed;
- :mod:`.focus`: :func:`export_focus` (FOCUS 1.2 CSV, or Parquet with pyarrow)
  and :func:`validate_focus`.
"""

from .focus import FOCUS_COLUMNS, FOCUS_VERSION, export_focus, focus_rows, validate_focus
from .report import GROUP_KEYS, report, to_dataframe, totals
from .store import (
    MemoryUsageStore,
    RedisUsageStore,
    SQLiteUsageStore,
    UsageStore,
    record_to_row,
    row_to_record,
)

__all__ = [
    "FOCUS_COLUMNS",
    "FOCUS_VERSION",
    "GROUP_KEYS",
    "MemoryUsageStore",
    "RedisUsageStore",
    "SQLiteUsageStore",
    "UsageStore",
    "export_focus",
    "focus_rows",
    "record_to_row",
    "report",
    "row_to_record",
    "to_dataframe",
    "totals",
    "validate_focus",
]
