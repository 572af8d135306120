"""LLM answer caches for LangChain chat models: exact, and semantic over any Embeddings.

Both implement ``langchain_core.caches.BaseCache`` (``model.cache = ...`` or
``set_llm_cache``). Generations are written and read with the allow-list
serializer (:mod:`.serde`: generations, messages and plain data, nothing else is
constructed; nothing is unpickled). An entry that cannot be read back, or a store
that fails or is slow, is a miss (counted in :meth:`LLMCache.stats`, logged once per
cause): the model is called. Keys carry the namespace and the tenant
(``for_tenant``, or the ``tenant`` metadata of the graph node making the call).

A cache hit makes LangChain replay the callbacks with the original token
counts and ``total_cost: 0``; the guard sees that, charges nothing and records
what the hit saved.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import hashlib
import json
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from langchain_core.caches import RETURN_VAL_TYPE, BaseCache
from langchain_core.embeddings import Embeddings
from langchain_core.messages import AIMessage
from langchain_core.outputs import ChatGeneration, Generation
from langchain_core.runnables.config import var_child_runnable_config

from ..context import llm_run_metadata, tenant_of
from .result import CacheStats
from .safety import DEFAULT_RETRY_AFTER, CacheIO, Failure, check_settings
from .serde import DEFAULT_MAX_BYTES, UndecodableEntry, loads_value
from .store import KVStore, key_part, store_from_url

__all__ = ["LLMCache", "SemanticLLMCache", "calibrate"]


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\x00")
    return h.hexdigest()


# Per-message fields that vary between runs of the same conversation and do not change
# what the model is asked: message ids (LangGraph's add_messages gives every message a
# fresh UUID), and what came back with an earlier answer (usage, cost, provider ids).
_RUN_SPECIFIC = frozenset({"id", "response_metadata", "usage_metadata"})


def canonical_prompt(prompt: str) -> str:
    """A chat prompt (LangChain's serialised message list) without what differs between
    two runs of the same conversation: message ids, earlier answers' usage and metadata,
    and tool-call ids (renumbered in order of appearance, so which result answers which
    call is kept). Anything else, including a plain-text prompt, is returned as is.

    Without this an exact cache never hits after the first turn of a LangGraph agent:
    every earlier message carries a fresh id and its answer's usage."""
    if not prompt.startswith("[{"):
        return prompt
    try:
        messages = json.loads(prompt)
    except ValueError:
        return prompt
    call_ids: dict[str, str] = {}

    def renumber(value: object) -> object:
        if not isinstance(value, str):
            return value
        return call_ids.setdefault(value, f"call_{len(call_ids)}")

    for m in messages:
        kwargs = m.get("kwargs") if isinstance(m, dict) else None
        if not isinstance(kwargs, dict):
            return prompt
        for name in _RUN_SPECIFIC & kwargs.keys():
            del kwargs[name]
        for call in kwargs.get("tool_calls") or ():
            if isinstance(call, dict) and "id" in call:
                call["id"] = renumber(call["id"])
        if "tool_call_id" in kwargs:
            kwargs["tool_call_id"] = renumber(kwargs["tool_call_id"])
        extra = kwargs.get("additional_kwargs")
        if isinstance(extra, dict):
            for call in extra.get("tool_calls") or ():
                if isinstance(call, dict) and "id" in call:
                    call["id"] = renumber(call["id"])
    return json.dumps(messages, sort_keys=True, separators=(",", ":"))


# the tenant an async lookup resolved in its coroutine, for the thread doing the I/O
_PINNED_TENANT: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "agent_guard_llm_cache_tenant", default=None)


async def _in_executor_as(tenant: str, fn: Callable[..., Any], *args: Any) -> Any:
    ctx = contextvars.copy_context()
    ctx.run(_PINNED_TENANT.set, tenant)
    return await asyncio.get_running_loop().run_in_executor(None, ctx.run, fn, *args)


class LLMCache(BaseCache):
    """Exact LLM cache: same prompt, same model and parameters (``llm_string``).

    ``store`` as for :class:`~agent_guard.cache.ResultCache` (``namespace``
    defaults to the URL's ``?namespace=``, else ``default``); ``max_bytes`` bounds
    an entry; after a store error the store is left alone ``retry_after`` seconds.
    """

    def __init__(self, store: str | KVStore = "memory://", *, namespace: str | None = None,
                 ttl: float | None = None, tenant: str | None = None,
                 tenant_key: str = "tenant", max_bytes: int = DEFAULT_MAX_BYTES,
                 retry_after: float = DEFAULT_RETRY_AFTER) -> None:
        check_settings(max_bytes, retry_after)
        if ttl is not None and not ttl > 0:
            raise ValueError(f"ttl must be > 0 seconds or None, got {ttl!r}")
        self.store = store_from_url(store)
        self.namespace = namespace or self.store.namespace or "default"
        self.ttl = ttl
        self.tenant = tenant
        self.tenant_key = tenant_key
        self.max_bytes = max_bytes
        self.io = CacheIO.of(self.store)
        self.io.retry_after = retry_after
        self.root = f"agc:{{{key_part(self.namespace)}}}:llm:"
        self._stats = CacheStats()
        self._stats_lock = threading.Lock()

    def stats(self) -> CacheStats:
        """Hits, misses (and why) of this cache (every tenant, this process)."""
        with self._stats_lock:
            return dataclasses.replace(self._stats)

    def _count(self, hit: bool, failure: Failure | None = None) -> None:
        with self._stats_lock:
            if hit:
                self._stats.hits += 1
                return
            self._stats.misses += 1
            if failure is Failure.ERROR:
                self._stats.errors += 1
            elif failure is Failure.UNDECODABLE:
                self._stats.undecodable += 1

    def for_tenant(self, tenant: str) -> LLMCache:
        """The same cache, seen by one tenant only."""
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        view.tenant = tenant
        return view

    def _tenant(self) -> str:
        """The tenant of the model call being served: this view's (``for_tenant``),
        else the call's metadata ``tenant_key`` as its run manager has it (a model
        invoked directly sets no runnable context, so that is the only place the call's
        own ``config={"metadata": ...}`` can be read), else the enclosing runnable's
        config, else ``_default``."""
        if self.tenant is not None:
            return self.tenant
        pinned = _PINNED_TENANT.get()
        if pinned is not None:
            return pinned
        metadata = llm_run_metadata()
        if metadata is None:
            config = var_child_runnable_config.get() or {}
            metadata = config.get("metadata") or {}
        return tenant_of(metadata, self.tenant_key)

    async def alookup(self, prompt: str, llm_string: str) -> RETURN_VAL_TYPE | None:
        return await _in_executor_as(self._tenant(), self.lookup, prompt, llm_string)

    async def aupdate(self, prompt: str, llm_string: str, return_val: RETURN_VAL_TYPE
                      ) -> None:
        await _in_executor_as(self._tenant(), self.update, prompt, llm_string, return_val)

    def _prefix(self) -> str:
        return f"{self.root}t={key_part(self._tenant())}:"

    def _key(self, prompt: str, llm_string: str) -> str:
        return self._prefix() + "x:" + _digest(canonical_prompt(prompt), llm_string)

    def _encode(self, return_val: RETURN_VAL_TYPE) -> str | None:
        text = self.io.encode(list(return_val), "an LLM answer", self.max_bytes)
        if text is None:
            with self._stats_lock:
                self._stats.unstorable += 1
        return text

    def _decode(self, raw: Any) -> RETURN_VAL_TYPE | None:
        """The generations in an entry's text, or None (refused and logged)."""
        try:
            value = loads_value(raw, max_bytes=self.max_bytes)
        except UndecodableEntry as exc:
            self.io.refused(str(exc), "LLM answer")
            return None
        if not _answers(value):
            self.io.refused("not a list of generations", "LLM answer")
            return None
        return value

    def _read(self, key: str) -> tuple[RETURN_VAL_TYPE | None, Failure | None]:
        raw, failure = self.io.read_text(key)
        if raw is None:
            return None, failure
        found = self._decode(raw)
        return found, None if found is not None else Failure.UNDECODABLE

    def _exact(self, prompt: str, llm_string: str) -> tuple[RETURN_VAL_TYPE | None,
                                                           Failure | None]:
        return self._read(self._key(prompt, llm_string))

    def lookup(self, prompt: str, llm_string: str) -> RETURN_VAL_TYPE | None:
        found, failure = self._exact(prompt, llm_string)
        self._count(found is not None, failure)
        return found

    def update(self, prompt: str, llm_string: str, return_val: RETURN_VAL_TYPE) -> None:
        text = self._encode(return_val)
        if text is not None:
            self.io.write_text(self._key(prompt, llm_string), text, self.ttl)

    def clear(self, **kwargs: Any) -> None:
        """Forget this namespace's answers (every tenant's)."""
        self.io.delete_prefix(self.root)


def _answers(value: Any) -> bool:
    """A model's answer as a cache holds it: generations, a chat one holding an AI
    message (another message type would read as the model speaking as someone else)."""
    return type(value) is list and bool(value) and all(
        (isinstance(g, ChatGeneration) and isinstance(g.message, AIMessage)) or
        type(g) is Generation for g in value)


def _free_text(prompt: str) -> str | None:
    """The text of a prompt made only of plain messages, else None: semantic matching
    never applies to tool calls or tool results, where near-identical text can mean
    opposite things ("convert 100 USD to EUR" / "convert 100 EUR to USD")."""
    try:
        messages = json.loads(prompt)
    except ValueError:
        return prompt  # a plain-text (completion) prompt
    if not isinstance(messages, list):
        return None
    texts = []
    for m in messages:
        kwargs = m.get("kwargs", {}) if isinstance(m, dict) else {}
        kind = (m.get("id") or [""])[-1] if isinstance(m, dict) else ""
        if "Tool" in kind or kwargs.get("tool_calls") or kwargs.get("tool_call_id"):
            return None
        content = kwargs.get("content")
        if not isinstance(content, str):
            return None
        texts.append(content)
    return "\n".join(texts)


def _cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=False))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    return dot / (na * nb) if na and nb else 0.0


class SemanticLLMCache(LLMCache):
    """Exact first, then the most similar earlier free-text prompt to the same model
    and parameters, if its cosine similarity is at least ``threshold``.

    The default threshold is conservative (0.95): a wrong hit serves a wrong
    answer. Use :func:`calibrate` on pairs you have labelled to choose one.
    Calls whose ``llm_string`` carries tools, and prompts with tool calls or
    tool results, only ever get exact hits. The vector index is in memory and
    rebuilt from the store (memory, SQLite or Redis) at most every
    ``refresh_s`` seconds, so other processes' entries are found too.
    """

    def __init__(self, embeddings: Embeddings, store: str | KVStore = "memory://", *,
                 threshold: float = 0.95, namespace: str | None = None,
                 ttl: float | None = None, tenant: str | None = None,
                 tenant_key: str = "tenant", refresh_s: float = 5.0,
                 max_bytes: int = DEFAULT_MAX_BYTES,
                 retry_after: float = DEFAULT_RETRY_AFTER) -> None:
        super().__init__(store, namespace=namespace, ttl=ttl, tenant=tenant,
                         tenant_key=tenant_key, max_bytes=max_bytes, retry_after=retry_after)
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.embeddings = embeddings
        self.threshold = threshold
        self.refresh_s = refresh_s
        self._index: dict[str, list[tuple[list[float], str]]] = {}
        self._loaded: dict[str, float] = {}
        self._lock = threading.Lock()

    def _group(self, llm_string: str) -> str:
        return self._prefix() + "s:" + _digest(llm_string) + ":"

    def _vectors(self, group: str) -> tuple[list[tuple[list[float], str]], bool]:
        """The group's ``(vector, key)`` index, and whether reading it refused entries."""
        now = time.monotonic()
        with self._lock:
            fresh = now - self._loaded.get(group, -math.inf) < self.refresh_s
            if fresh:
                return list(self._index.get(group, [])), False
        rows = self.io.scan(group)
        if rows is None:  # the store failed: use what is known
            with self._lock:
                return list(self._index.get(group, [])), False
        index = []
        refused = False
        for key, raw in rows:
            entry = self._semantic_entry(raw)
            if entry is None:
                refused = True
            else:
                index.append((entry["vector"], key))
        with self._lock:
            self._index[group] = index
            self._loaded[group] = now
        return index, refused

    def _semantic_entry(self, raw: Any) -> dict[str, Any] | None:
        """``{"vector": [numbers], "answer": [generations]}`` or None (refused)."""
        try:
            entry = loads_value(raw, max_bytes=self.max_bytes)
        except UndecodableEntry as exc:
            self.io.refused(str(exc), "semantic LLM entry")
            return None
        vector = entry.get("vector") if type(entry) is dict else None
        answer = entry.get("answer") if type(entry) is dict else None
        if type(vector) is not list or not all(type(x) in (int, float) for x in vector) or \
                not _answers(answer):
            self.io.refused("not a semantic entry", "semantic LLM entry")
            return None
        return entry

    def _embed(self, text: str) -> list[float] | None:
        try:
            return list(self.embeddings.embed_query(text))
        except Exception as exc:  # the embeddings are part of the cache: a miss
            self.io._once(("embeddings", type(exc).__name__),
                          "agent-guard: embeddings failed in the semantic cache (%s: %s); "
                          "exact matches only", type(exc).__name__, exc)
            return None

    def lookup(self, prompt: str, llm_string: str) -> RETURN_VAL_TYPE | None:
        exact, failure = self._exact(prompt, llm_string)
        if exact is not None or '"tools"' in llm_string or "'tools'" in llm_string:
            self._count(exact is not None, failure)
            return exact
        found, semantic_failure = self._semantic(prompt, llm_string)
        self._count(found is not None, failure or semantic_failure)
        return found

    def _semantic(self, prompt: str, llm_string: str
                  ) -> tuple[RETURN_VAL_TYPE | None, Failure | None]:
        text = _free_text(prompt)
        if not text:
            return None, None
        vector = self._embed(text)
        if vector is None:
            return None, Failure.ERROR
        best, best_key = 0.0, None
        index, refused = self._vectors(self._group(llm_string))
        for other, key in index:
            score = _cosine(vector, other)
            if score > best:
                best, best_key = score, key
        if best_key is None or best < self.threshold:
            return None, Failure.UNDECODABLE if refused else None
        raw, failure = self.io.read_text(best_key)
        if raw is None:
            return None, failure
        entry = self._semantic_entry(raw)
        if entry is None:
            return None, Failure.UNDECODABLE
        return entry["answer"], None

    def update(self, prompt: str, llm_string: str, return_val: RETURN_VAL_TYPE) -> None:
        super().update(prompt, llm_string, return_val)
        text = _free_text(prompt)
        if not text or '"tools"' in llm_string or "'tools'" in llm_string:
            return
        vector = self._embed(text)
        if vector is None:
            return
        group = self._group(llm_string)
        key = group + _digest(prompt)
        entry = self.io.encode({"vector": vector, "answer": list(return_val)},
                               "an LLM answer", self.max_bytes)
        if entry is None or not self.io.write_text(key, entry, self.ttl):
            return
        with self._lock:
            self._index.setdefault(group, []).append((vector, key))

    def clear(self, **kwargs: Any) -> None:
        super().clear()
        with self._lock:
            self._index.clear()
            self._loaded.clear()


def calibrate(embeddings: Embeddings, pairs: Sequence[tuple[str, str, bool]],
              thresholds: Sequence[float] = (0.8, 0.85, 0.9, 0.95, 0.97, 0.99)
              ) -> list[dict[str, float]]:
    """Precision and recall of each threshold on user-labelled pairs
    ``(prompt_a, prompt_b, same_answer)``: pick the lowest threshold whose
    precision you can live with."""
    scores = [(_cosine(embeddings.embed_query(a), embeddings.embed_query(b)), same)
              for a, b, same in pairs]
    table = []
    for t in thresholds:
        tp = sum(1 for s, same in scores if s >= t and same)
        fp = sum(1 for s, same in scores if s >= t and not same)
        fn = sum(1 for s, same in scores if s < t and same)
        table.append({"threshold": t, "precision": tp / (tp + fp) if tp + fp else 1.0,
                      "recall": tp / (tp + fn) if tp + fn else 1.0,
                      "true_hits": tp, "false_hits": fp, "missed": fn})
    return table
