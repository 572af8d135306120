"""Where ledgers, caches and usage stores keep their data: one URL dialect and scheme
registry (:mod:`.url`, built-ins in :mod:`.builtin`), one Redis client factory
(:mod:`.redis`) and one SQLite connection pool (:mod:`.sqlite`)."""

from . import builtin as _builtin  # noqa: F401 - registers the built-in schemes
from .redis import (
    CACHE,
    LEDGER,
    REDIS_ERRORS,
    UNREACHABLE_ERRORS,
    USAGE,
    RedisProfile,
    redis_client,
)
from .sqlite import SQLitePool, is_memory_path
from .url import (
    KINDS,
    Backend,
    StoreURL,
    known_options,
    known_schemes,
    open_store,
    parse_url,
    redact_url,
    register,
    register_backend,
)

__all__ = ["CACHE", "KINDS", "LEDGER", "REDIS_ERRORS", "UNREACHABLE_ERRORS", "USAGE",
           "Backend", "RedisProfile", "SQLitePool", "StoreURL", "is_memory_path",
           "known_options", "known_schemes", "open_store", "parse_url", "redact_url",
           "redis_client", "register", "register_backend"]
