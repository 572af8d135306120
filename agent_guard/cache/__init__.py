"""Caches: tool and sub-task results (exact, TTL classes, per tenant), LLM answers.

Entries are written and read with an allow-list serializer (:mod:`.serde`); a
store that fails or an entry that cannot be read is a miss (:mod:`.safety`).
"""

from .llm import LLMCache, SemanticLLMCache, calibrate
from .node import NodeCache, content_key
from .result import DEFAULT_TTL, TTL, CacheStats, ResultCache, cached_tool
from .store import KVStore, MemoryStore, RedisStore, SQLiteStore, store_from_url

__all__ = ["DEFAULT_TTL", "TTL", "CacheStats", "KVStore", "LLMCache", "MemoryStore",
           "NodeCache", "RedisStore", "ResultCache", "SQLiteStore", "SemanticLLMCache",
           "cached_tool", "calibrate", "content_key", "store_from_url"]
