"""FinOps: keep every call record, report on it, export it as FOCUS, alert on thresholds.

- :mod:`.store`: :class:`UsageStore` (memory, SQLite, Redis stream), a record hook;
- :mod:`.report`: :func:`report` grouped by session, user, team, feature, model,
  node, day...; :func:`to_dataframe` when pandas is installed;
- :mod:`.focus`: :func:`export_focus` (FOCUS 1.2 CSV, or Parquet with pyarrow)
  and :func:`validate_focus`;
- :mod:`.alerts`: threshold handlers for ``Guard(on_threshold=[...])``:
  :class:`LogAlert`, :class:`CallbackAlert`, :class:`WebhookAlert` (Slack-compatible,
  never blocking the agent).
"""

from .alerts import CallbackAlert, LogAlert, WebhookAlert, slack_payload
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
    "CallbackAlert",
    "LogAlert",
    "MemoryUsageStore",
    "RedisUsageStore",
    "SQLiteUsageStore",
    "UsageStore",
    "WebhookAlert",
    "export_focus",
    "focus_rows",
    "record_to_row",
    "report",
    "row_to_record",
    "slack_payload",
    "to_dataframe",
    "totals",
    "validate_focus",
]
