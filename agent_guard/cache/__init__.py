"""Caches: tool and sub-task results (exact, TTL classes, per tenant), LLM answers."""

from .llm import LLMCache, SemanticLLMCache, calibrate
from .node import NodeCache, content_key
from .result import TTL, CacheStats, ResultCache, cached_tool
from .store import KVStore, MemoryStore, RedisStore, SQLiteStore, store_from_url

__all__ = ["TTL", "CacheStats", "KVStore", "LLMCache", "MemoryStore", "NodeCache",
           "RedisStore", "ResultCache", "SQLiteStore", "SemanticLLMCache", "cached_tool",
           "calibrate", "content_key", "store_from_url"]
