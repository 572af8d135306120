"""Compatibility import: the pool moved to :mod:`agent_guard.stores.sqlite`."""

from .stores.sqlite import IDLE_CONNECTIONS, SQLitePool, is_memory_path

__all__ = ["IDLE_CONNECTIONS", "SQLitePool", "is_memory_path"]
