"""The allow-list serializer of cache entries: reading an entry constructs nothing else.

A cache store is shared (Redis, a SQLite file) and others can write to it, so an
entry is untrusted input. LangGraph's default serializer rebuilds any importable
type from msgpack extension data (a planted entry ran ``os.makedirs``) and
``pickle`` runs code by design. This module reads and writes JSON, and builds back
only these types, each from plain data and through its own validating constructor:

=========================================  =================================================
plain data                                 ``None``, ``bool``, ``int``, ``float`` (finite),
                                           ``str``, ``list``, ``tuple``, ``dict`` (keys:
                                           ``str``, ``int``, ``float``, ``bool``, ``None``)
LangChain messages (exactly these classes)  ``HumanMessage``, ``AIMessage``,
                                           ``SystemMessage``, ``ToolMessage``,
                                           ``ChatMessage``, ``FunctionMessage``,
                                           ``RemoveMessage`` and their ``...Chunk`` twins
LangChain documents                        ``Document`` (retrieval nodes return them)
LLM answers (the LLM cache)                ``Generation``, ``ChatGeneration``
LangGraph                                  ``Send`` (a node's fan-out writes)
=========================================  =================================================

A ``collections.deque`` (LangGraph keeps a node's writes in one) is written as a
list. Anything else, a subclass of an allowed class included, raises
:class:`UnencodableValue` when written: the value is simply not cached. A message's
fields hold plain data only.

Reading refuses (:class:`UndecodableEntry`) anything that is not this format:
bytes, other JSON, an unknown tag, a wrong field type, an entry larger than
``max_bytes`` (checked before parsing) or nested deeper than :data:`MAX_DEPTH`.
The caches turn a refusal into a miss.

Format: ``{"v": 1, "value": <value>}`` where a value is JSON, except that a tuple, a
dict with a non-``str`` key or a ``"$t"`` key, and each allowed class is an object
``{"$t": <tag>, ...}``.
"""

from __future__ import annotations

import json
import math
from collections import deque
from typing import Any

from langchain_core.documents import Document
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    ChatMessageChunk,
    FunctionMessage,
    FunctionMessageChunk,
    HumanMessage,
    HumanMessageChunk,
    RemoveMessage,
    SystemMessage,
    SystemMessageChunk,
    ToolMessage,
    ToolMessageChunk,
)
from langchain_core.outputs import ChatGeneration, Generation
from langgraph.types import Send

__all__ = ["DEFAULT_MAX_BYTES", "FORMAT", "MAX_DEPTH", "AllowListSerializer",
           "UndecodableEntry", "UnencodableValue", "dumps_value", "loads_value"]

FORMAT = 1
#: Largest entry written or read (UTF-8 bytes of its JSON text).
DEFAULT_MAX_BYTES = 4 * 2**20
#: Deepest nesting of containers written or read.
MAX_DEPTH = 64

TAG = "$t"

_MESSAGES: dict[str, type[BaseMessage]] = {
    cls.__name__: cls for cls in (
        HumanMessage, HumanMessageChunk, AIMessage, AIMessageChunk, SystemMessage,
        SystemMessageChunk, ToolMessage, ToolMessageChunk, ChatMessage, ChatMessageChunk,
        FunctionMessage, FunctionMessageChunk, RemoveMessage)
}
_SCALARS = (str, int, float, bool, type(None))


class UnencodableValue(ValueError):
    """A value outside the allow-list (or too large, or too deep): it is not cached."""


class UndecodableEntry(ValueError):
    """An entry that is not this format, or not one of the allowed values: a miss."""


# -- writing ---------------------------------------------------------------------------------


def _scalar(value: Any) -> Any:
    if type(value) is float and not math.isfinite(value):
        raise UnencodableValue(f"a non-finite float ({value!r}) is not cached")
    return value


def _encode(value: Any, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise UnencodableValue(f"nested deeper than {MAX_DEPTH}")
    kind = type(value)
    if kind in _SCALARS:
        return _scalar(value)
    d = depth + 1
    if kind is list or kind is deque:
        return [_encode(v, d) for v in value]
    if kind is tuple:
        return {TAG: "tuple", "items": [_encode(v, d) for v in value]}
    if kind is dict:
        if all(type(k) is str for k in value) and TAG not in value:
            return {k: _encode(v, d) for k, v in value.items()}
        items = []
        for k, v in value.items():
            if type(k) not in _SCALARS:
                raise UnencodableValue(f"a dict key of type {type(k).__name__} is not cached")
            items.append([_scalar(k), _encode(v, d)])
        return {TAG: "dict", "items": items}
    if kind.__name__ in _MESSAGES and _MESSAGES[kind.__name__] is kind:
        return {TAG: "message", "class": kind.__name__,
                "data": _encode(value.model_dump(), d)}
    if kind is Document:
        return {TAG: "document", "page_content": value.page_content, "id": value.id,
                "metadata": _encode(value.metadata, d)}
    if kind is ChatGeneration:
        return {TAG: "chat_generation", "message": _encode(value.message, d),
                "generation_info": _encode(value.generation_info, d)}
    if kind is Generation:
        return {TAG: "generation", "text": value.text,
                "generation_info": _encode(value.generation_info, d)}
    if kind is Send:
        return {TAG: "send", "node": value.node, "arg": _encode(value.arg, d)}
    raise UnencodableValue(f"a {kind.__module__}.{kind.__qualname__} is not on the cache's "
                           f"allow-list")


def dumps_value(value: Any, *, max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """The entry text of ``value``; :class:`UnencodableValue` if it is not allowed."""
    try:
        text = json.dumps({"v": FORMAT, "value": _encode(value, 0)}, ensure_ascii=False,
                          allow_nan=False, separators=(",", ":"))
    except UnencodableValue:
        raise
    except (TypeError, ValueError, RecursionError) as exc:  # e.g. a bad model_dump()
        raise UnencodableValue(f"cannot be written as JSON: {exc}") from None
    if _too_big(text, max_bytes):
        raise UnencodableValue(f"larger than {max_bytes} bytes")
    return text


# -- reading ---------------------------------------------------------------------------------


def _too_big(text: str, max_bytes: int) -> bool:
    return len(text) > max_bytes or (len(text) * 4 > max_bytes and
                                     len(text.encode("utf-8", "surrogatepass")) > max_bytes)


def _fail(why: str) -> UndecodableEntry:
    return UndecodableEntry(why)


def _plain_scalar(value: Any) -> Any:
    if type(value) is float and not math.isfinite(value):
        raise _fail("a non-finite number")
    return value


def _decode(value: Any, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise _fail(f"nested deeper than {MAX_DEPTH}")
    kind = type(value)
    if kind in _SCALARS:
        return _plain_scalar(value)
    d = depth + 1
    if kind is list:
        return [_decode(v, d) for v in value]
    if kind is not dict:
        raise _fail(f"a JSON {kind.__name__}")
    if TAG not in value:
        return {k: _decode(v, d) for k, v in value.items()}
    tag = value[TAG]
    if tag == "tuple":
        return tuple(_decode(v, d) for v in _list(value, "items"))
    if tag == "dict":
        out = {}
        for pair in _list(value, "items"):
            if type(pair) is not list or len(pair) != 2 or type(pair[0]) not in _SCALARS:
                raise _fail("a dict item that is not [scalar key, value]")
            out[_plain_scalar(pair[0])] = _decode(pair[1], d)
        return out
    try:
        return _construct(tag, value, d)
    except UndecodableEntry:
        raise
    except Exception as exc:  # pydantic's ValidationError, TypeError...: not ours
        raise _fail(f"a {tag!r} whose fields do not validate ({type(exc).__name__})"
                    ) from None


def _list(value: dict[str, Any], key: str) -> list[Any]:
    items = value.get(key)
    if type(items) is not list:
        raise _fail(f"{key!r} is not a list")
    return items


def _text(value: dict[str, Any], key: str, *, optional: bool = False) -> str | None:
    text = value.get(key)
    if type(text) is str or (optional and text is None):
        return text
    raise _fail(f"{key!r} is not text")


def _plain_dict(value: Any, what: str, *, optional: bool = False) -> dict[str, Any] | None:
    if value is None and optional:
        return None
    if type(value) is not dict:
        raise _fail(f"{what} is not an object")
    return value


def _construct(tag: Any, value: dict[str, Any], d: int) -> Any:
    if tag == "message":
        cls = _MESSAGES.get(value.get("class"))  # type: ignore[arg-type]
        if cls is None:
            raise _fail(f"a message of class {value.get('class')!r}")
        data = _plain_dict(_decode(value.get("data"), d), "a message's data")
        assert data is not None
        if any(type(k) is not str for k in data):
            raise _fail("a message field name that is not text")
        return cls(**data)
    if tag == "document":
        metadata = _plain_dict(_decode(value.get("metadata"), d), "a document's metadata")
        return Document(page_content=_text(value, "page_content") or "",
                        metadata=metadata or {}, id=_text(value, "id", optional=True))
    if tag == "chat_generation":
        message = _decode(value.get("message"), d)
        if not isinstance(message, BaseMessage):
            raise _fail("a chat generation without a message")
        info = _plain_dict(_decode(value.get("generation_info"), d), "generation_info",
                           optional=True)
        return ChatGeneration(message=message, generation_info=info)
    if tag == "generation":
        info = _plain_dict(_decode(value.get("generation_info"), d), "generation_info",
                           optional=True)
        return Generation(text=_text(value, "text") or "", generation_info=info)
    if tag == "send":
        return Send(_text(value, "node") or "", _decode(value.get("arg"), d))
    raise _fail(f"an unknown tag {tag!r}")


def loads_value(text: Any, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Any:
    """The value of an entry written by :func:`dumps_value`; :class:`UndecodableEntry`
    for anything else (which the caches count and treat as a miss)."""
    if type(text) is not str:
        raise _fail(f"a {type(text).__name__} entry, not text")
    if _too_big(text, max_bytes):
        raise _fail(f"an entry larger than {max_bytes} bytes")
    try:
        entry = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise _fail(f"not JSON ({type(exc).__name__})") from None
    if type(entry) is not dict or type(entry.get("v")) is not int or \
            entry["v"] != FORMAT or "value" not in entry:
        raise _fail("not a cache entry of format 1")
    return _decode(entry["value"], 0)


class AllowListSerializer:
    """LangGraph's ``SerializerProtocol`` over this format, for a LangGraph cache
    (``InMemoryCache``, ``SqliteCache``, ``RedisCache``) that ``guarded_graph`` keeps: it
    writes only allowed values and reads back only its own entries (any other type, e.g.
    LangGraph's ``msgpack``, ``json`` or ``pickle``, is :class:`UndecodableEntry`)."""

    TYPE = "agent_guard.v1"

    def __init__(self, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes

    def dumps_typed(self, obj: Any) -> tuple[str, bytes]:
        return self.TYPE, dumps_value(obj, max_bytes=self.max_bytes).encode("utf-8")

    def loads_typed(self, data: tuple[str, bytes]) -> Any:
        try:
            kind, raw = data
        except (TypeError, ValueError):
            raise _fail("not a (type, bytes) pair") from None
        if kind != self.TYPE:
            raise _fail(f"an entry of type {str(kind)[:40]!r}, not {self.TYPE!r}")
        if type(raw) is str:
            text = raw
        elif isinstance(raw, (bytes, bytearray, memoryview)):
            try:
                text = bytes(raw).decode("utf-8")
            except UnicodeDecodeError:
                raise _fail("not UTF-8") from None
        else:
            raise _fail(f"a {type(raw).__name__} payload")
        return loads_value(text, max_bytes=self.max_bytes)
