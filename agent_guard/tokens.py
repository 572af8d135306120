"""Token estimates for prompts and answers, offline.

tiktoken's ``o200k_base`` and ``cl100k_base`` BPE files ship inside this
package (``agent_guard/tokens_data``, MIT, from tiktoken's public release) and
are verified against tiktoken's own SHA-256 before use, so nothing is
downloaded at run time.

Counts are exact for OpenAI models' text. For other providers (Anthropic,
Google, Mistral, Llama...) the count is ``o200k_base`` times
``fallback_factor`` (1.2 by default): their tokenizers generally produce more
tokens than o200k for English, and a reservation must not be too small. The
chat-format overhead follows OpenAI's published rule of thumb (3 tokens per
message, 1 more for a name, 3 to prime the reply).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import lru_cache
from importlib import resources
from typing import Any

import tiktoken

__all__ = ["EncodingIntegrityError", "TokenCounter", "get_encoding"]

# tiktoken's expected SHA-256 of each file (tiktoken_ext/openai_public.py).
_EXPECTED_SHA256 = {
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
}

TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3
TOKENS_PER_TOOL_CALL = 6  # id, type and framing of one function call
TOKENS_PER_TOOL_SCHEMA = 12  # framing of one function definition in the prompt
IMAGE_TOKENS = 765  # one high-detail 512px-tile image at OpenAI's published rate

_TEXT_CACHE_SIZE = 8192  # texts whose counts are remembered per TokenCounter

_encodings: dict[str, tiktoken.Encoding] = {}
_load_lock = threading.Lock()


class EncodingIntegrityError(RuntimeError):
    """A bundled tokenizer file does not match tiktoken's published hash."""


def _read_bundled(name: str, directory: Any = None) -> bytes:
    base = directory if directory is not None else resources.files("agent_guard") / "tokens_data"
    path = base / f"{name}.tiktoken"
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != _EXPECTED_SHA256[name]:
        raise EncodingIntegrityError(
            f"the bundled tokenizer file {path} does not match tiktoken's published SHA-256 "
            "for it; the installation is damaged. Reinstall: "
            "pip install --force-reinstall langchain-agent-guard"
        )
    return data


def _parse_ranks(data: bytes) -> dict[bytes, int]:
    import base64

    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _build(name: str, directory: Any = None) -> tiktoken.Encoding:
    """Build the Encoding with tiktoken's own constructor (its regex and special
    tokens), feeding it the bundled, verified ranks instead of a download.

    The constructor is called with its module's ``load_tiktoken_bpe`` swapped for
    a local reader for the duration of the call, under a lock; no environment
    variable or cache directory is touched.
    """
    from tiktoken_ext import openai_public

    ranks = _parse_ranks(_read_bundled(name, directory))
    constructor: Callable[[], dict[str, Any]] = getattr(openai_public, name)
    original = openai_public.load_tiktoken_bpe

    def local(_url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        return ranks

    openai_public.load_tiktoken_bpe = local  # type: ignore[assignment]
    try:
        spec = constructor()
    finally:
        openai_public.load_tiktoken_bpe = original
    return tiktoken.Encoding(
        name=spec["name"],
        pat_str=spec["pat_str"],
        mergeable_ranks=spec["mergeable_ranks"],
        special_tokens=spec["special_tokens"],
    )


def get_encoding(name: str) -> tiktoken.Encoding:
    """The bundled encoding ``name`` (``o200k_base`` or ``cl100k_base``), loaded once."""
    enc = _encodings.get(name)
    if enc is not None:
        return enc
    if name not in _EXPECTED_SHA256:
        raise ValueError(f"no bundled encoding {name!r}; have {sorted(_EXPECTED_SHA256)}")
    with _load_lock:
        enc = _encodings.get(name)
        if enc is None:
            enc = _build(name)
            _encodings[name] = enc
    return enc


_CL100K_PREFIXES = ("gpt-4-", "gpt-3.5", "gpt-35", "text-embedding-3", "text-embedding-ada")
_OPENAI_PREFIXES = ("gpt-", "o1", "o3", "o4", "chatgpt-", "text-embedding", "davinci",
                    "babbage", "ft:gpt", "codex")


@lru_cache(maxsize=1024)
def _family(model: str) -> tuple[str, bool]:
    """(encoding name, exact?) for a model name."""
    name = model.lower().rsplit("/", 1)[-1]
    if name == "gpt-4" or (name.startswith(_CL100K_PREFIXES) and not name.startswith(
            ("gpt-4o", "gpt-4.1", "gpt-4.5"))):
        return "cl100k_base", True
    if name.startswith(_OPENAI_PREFIXES):
        return "o200k_base", True
    return "o200k_base", False


class TokenCounter:
    """Counts tokens of prompts, tool schemas and answers for reservations."""

    def __init__(self, *, fallback_factor: float = 1.2) -> None:
        if not fallback_factor >= 1:
            raise ValueError(f"fallback_factor must be >= 1, got {fallback_factor!r}")
        self.fallback_factor = fallback_factor
        self._tool_cache: dict[str, int] = {}
        self._text_cache: dict[tuple[str, str], int] = {}
        self._tool_lock = threading.Lock()

    def encoding_name_for(self, model: str) -> str:
        return _family(model or "")[0]

    def is_exact(self, model: str) -> bool:
        """Whether ``model``'s count comes from its own tokenizer (OpenAI models)."""
        return _family(model or "")[1]

    def _scale(self, n: int, model: str) -> int:
        if _family(model or "")[1]:
            return n
        return -(-int(n * self.fallback_factor * 1000) // 1000)  # ceil without float drift

    def _raw(self, text: str, model: str) -> int:
        """Unscaled count, memoised: an agent re-sends its whole history on every call,
        so most texts were counted on the previous call (str hashes are cached too)."""
        if not text:
            return 0
        name = _family(model or "")[0]
        key = (name, text)
        n = self._text_cache.get(key)
        if n is None:
            n = len(get_encoding(name).encode_ordinary(text))
            if len(self._text_cache) >= _TEXT_CACHE_SIZE:
                self._text_cache.clear()
            self._text_cache[key] = n
        return n

    def count_text(self, text: str, model: str = "gpt-4o") -> int:
        """Tokens of plain text (special-token markers in user text are plain text)."""
        return self._scale(self._raw(text, model), model)

    def count_messages(
        self,
        messages: Iterable[Any],
        model: str = "gpt-4o",
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> int:
        """Tokens of a chat prompt: LangChain messages or OpenAI-style dicts, plus tools."""
        n = REPLY_PRIMING_TOKENS
        for message in messages:
            n += TOKENS_PER_MESSAGE + self._message_tokens(message, model)
        if tools:
            n += self._tools_tokens(tools, model)
        return self._scale(n, model)

    def count_output(self, message: Any, model: str = "gpt-4o") -> int:
        """Tokens of a generated answer: its text and its tool calls."""
        if isinstance(message, str):
            return self.count_text(message, model)
        n = self._content_tokens(_get(message, "content"), model)
        n += self._tool_calls_tokens(_tool_calls(message), model)
        return self._scale(n, model)

    # -- internals (unscaled counts) ----------------------------------------------------

    def _message_tokens(self, message: Any, model: str) -> int:
        n = self._raw(str(_role(message)), model)
        n += self._content_tokens(_get(message, "content"), model)
        name = _get(message, "name")
        if name:
            n += TOKENS_PER_NAME + self._raw(str(name), model)
        n += self._tool_calls_tokens(_tool_calls(message), model)
        return n

    def _content_tokens(self, content: Any, model: str) -> int:
        if content is None:
            return 0
        if isinstance(content, str):
            return self._raw(content, model)
        if isinstance(content, list):
            n = 0
            for block in content:
                if isinstance(block, str):
                    n += self._raw(block, model)
                elif isinstance(block, Mapping):
                    kind = block.get("type")
                    if kind == "text" and isinstance(block.get("text"), str):
                        n += self._raw(block["text"], model)
                    elif kind in ("image_url", "image", "input_image"):
                        n += IMAGE_TOKENS
                    else:
                        n += self._raw(json.dumps(block, default=str), model)
                else:
                    n += self._raw(str(block), model)
            return n
        return self._raw(str(content), model)

    def _tool_calls_tokens(self, tool_calls: Sequence[Any], model: str) -> int:
        n = 0
        for tc in tool_calls:
            fn = tc.get("function") if isinstance(tc, Mapping) else None
            if isinstance(fn, Mapping):  # OpenAI dict shape
                name, args = fn.get("name", ""), fn.get("arguments", "")
            else:
                name, args = _get(tc, "name") or "", _get(tc, "args") or ""
            if not isinstance(args, str):
                args = json.dumps(args, separators=(",", ":"), default=str)
            n += TOKENS_PER_TOOL_CALL + self._raw(str(name), model) + self._raw(args, model)
        return n

    def _tools_tokens(self, tools: Sequence[Mapping[str, Any]], model: str) -> int:
        n = 0
        for tool in tools:
            key = json.dumps(tool, separators=(",", ":"), sort_keys=True, default=str)
            cached = self._tool_cache.get(key)
            if cached is None:
                cached = TOKENS_PER_TOOL_SCHEMA + self._raw(key, model)
                with self._tool_lock:
                    if len(self._tool_cache) > 512:
                        self._tool_cache.clear()
                    self._tool_cache[key] = cached
            n += cached
        return n


def _get(obj: Any, key: str) -> Any:
    if type(obj) is dict or isinstance(obj, Mapping):  # dict first: Mapping is a slow ABC check
        return obj.get(key)
    return getattr(obj, key, None)


def _role(message: Any) -> str:
    if type(message) is dict or isinstance(message, Mapping):
        return str(message.get("role", "user"))
    kind = getattr(message, "type", "user")
    return {"human": "user", "ai": "assistant"}.get(kind, kind)


def _tool_calls(message: Any) -> Sequence[Any]:
    calls = _get(message, "tool_calls")
    return calls if type(calls) is list or isinstance(calls, tuple) else ()
