"""Token estimates for prompts and answers, fully offline.

tiktoken's ``o200k_base`` and ``cl100k_base`` BPE files ship inside this package
(``agent_guard/tokens_data``, MIT, from tiktoken's public release). They are checked
against tiktoken's published SHA-256 before use and nothing is ever downloaded:
``tiktoken.get_encoding`` would fetch them from a blob URL on first use.

Counts are exact for OpenAI models' text. For other providers (Anthropic, Google,
Mistral, Llama, ...) the count is the ``o200k_base`` count times ``fallback_factor``
(1.2 by default, rounded up): their tokenizers generally produce more tokens than
o200k for English text, and a budget reservation must not come out too small.

Chat overhead follows OpenAI's cookbook rule, which matches the API's
``prompt_tokens`` for plain messages: 3 tokens per message, 1 more for a name, 3 to
prime the reply. Images, tool calls and tool schemas are estimates (see the constants
below); tool schemas are deliberately over-estimated.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from fractions import Fraction
from functools import lru_cache
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:  # tiktoken itself is imported on first use (it costs ~20 ms)
    import tiktoken
    from langchain_core.messages import BaseMessage

__all__ = [
    "IMAGE_TOKENS",
    "IMAGE_TOKENS_LOW_DETAIL",
    "REPLY_PRIMING_TOKENS",
    "TOKENS_PER_MESSAGE",
    "TOKENS_PER_NAME",
    "TOKENS_PER_TOOL_CALL",
    "TOKENS_PER_TOOL_SCHEMA",
    "TOOLS_BLOCK_TOKENS",
    "EncodingIntegrityError",
    "MessageLike",
    "TokenCounter",
    "get_encoding",
    "utf8_upper_bound",
]

MessageLike: TypeAlias = "BaseMessage | Mapping[str, Any] | str | tuple[str, Any]"

# -- the estimate's constants ---------------------------------------------------------------
# OpenAI cookbook, "How to count tokens with tiktoken" (these reproduce the API's
# prompt_tokens for plain chat messages on gpt-3.5, gpt-4 and gpt-4o):
TOKENS_PER_MESSAGE = 3  # <|start|>{role}<|message|>...<|end|> framing
TOKENS_PER_NAME = 1  # a message's "name" field
REPLY_PRIMING_TOKENS = 3  # <|start|>assistant<|message|> before the reply
# Tool schemas: OpenAI renders them as a TypeScript-like namespace, which is never longer
# than their compact JSON. Estimate = compact JSON of each function definition plus the
# cookbook's framing constants (7 per function, 12 for the block), an upper-ish bound:
# the cookbook's weather tool with its two messages costs 101 prompt tokens on gpt-4o,
# this estimate says 130.
TOKENS_PER_TOOL_SCHEMA = 7
TOOLS_BLOCK_TOKENS = 12
# A tool call in an assistant message: function name + JSON arguments + this framing
# (call id, type, delimiters). Not published; a small, stated approximation.
TOKENS_PER_TOOL_CALL = 6
# Images: 765 is OpenAI's price of one 1024x1024 image at detail "high"/"auto" for gpt-4o
# (85 base + 4 tiles of 512px x 170); wider or taller images can cost up to ~1,450, and
# "low" detail is a flat 85. The image's size is not inspected.
IMAGE_TOKENS = 765
IMAGE_TOKENS_LOW_DETAIL = 85

# -- bundled encodings --------------------------------------------------------------------

# tiktoken's expected SHA-256 of each file (tiktoken_ext/openai_public.py).
_BUNDLED_SHA256 = {
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
}
_REINSTALL = "pip install --force-reinstall langchain-agent-guard"

_encodings: dict[str, tiktoken.Encoding] = {}
_load_lock = threading.Lock()


class EncodingIntegrityError(RuntimeError):
    """A bundled tokenizer file is missing or does not match tiktoken's published hash."""


def _data_dir() -> Traversable:
    return resources.files("agent_guard") / "tokens_data"


def _read_verified(name: str, directory: Traversable | Path | None = None) -> bytes:
    """The bytes of ``{name}.tiktoken``, checked against tiktoken's SHA-256 for it.

    The check is done here rather than by ``tiktoken.load.load_tiktoken_bpe(path,
    expected_hash)``: that routes a local path through tiktoken's download cache, which
    copies the 3.6 MB file into ``$TIKTOKEN_CACHE_DIR`` (or the temp dir), fails when
    a user-set cache dir is read-only, and words a mismatch as a bad download.
    """
    path = (directory if directory is not None else _data_dir()) / f"{name}.tiktoken"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise EncodingIntegrityError(
            f"the bundled tokenizer file {path} cannot be read ({exc}); the installation "
            f"of agent-guard is incomplete. Reinstall it: {_REINSTALL}"
        ) from exc
    actual = hashlib.sha256(data).hexdigest()
    if actual != _BUNDLED_SHA256[name]:
        raise EncodingIntegrityError(
            f"the bundled tokenizer file {path} is damaged: its SHA-256 is {actual}, "
            f"tiktoken publishes {_BUNDLED_SHA256[name]}. Reinstall agent-guard: {_REINSTALL}"
        )
    return data


def _parse_ranks(data: bytes, source: str) -> dict[bytes, int]:
    """``token rank`` lines (base64 token), the format of tiktoken's load_tiktoken_bpe."""
    ranks: dict[bytes, int] = {}
    b64decode = base64.b64decode
    for line in data.splitlines():
        if line:
            try:
                token, rank = line.split()
                ranks[b64decode(token)] = int(rank)
            except ValueError as exc:
                raise EncodingIntegrityError(
                    f"bad line {line[:60]!r} in {source}; reinstall: {_REINSTALL}") from exc
    return ranks


def _build(name: str, directory: Traversable | Path | None = None) -> tiktoken.Encoding:
    """Build encoding ``name`` from the bundled file, with tiktoken's own regex and
    special tokens.

    Those live inside tiktoken's constructor (``tiktoken_ext.openai_public.o200k_base``
    etc.), which also loads the ranks from a URL. The constructor is run as a *copy*
    whose globals map ``load_tiktoken_bpe`` to a reader of the bundled file: nothing
    shared is touched, so a concurrent ``tiktoken.get_encoding`` elsewhere in the process
    is unaffected. Patching the module attribute instead would be visible to other
    threads for the duration, and swapping ``TIKTOKEN_CACHE_DIR`` would change the
    process environment and need files written under sha1(url) names.
    """
    import tiktoken
    from tiktoken_ext import openai_public

    constructor = getattr(openai_public, name)
    if "load_tiktoken_bpe" not in constructor.__code__.co_names:
        raise RuntimeError(
            f"tiktoken {tiktoken.__version__} builds {name} without load_tiktoken_bpe; "
            "agent_guard.tokens cannot feed it the bundled file (upgrade agent-guard)"
        )

    def bundled_ranks(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        filename = url.rsplit("/", 1)[-1]
        if filename != f"{name}.tiktoken" or expected_hash != _BUNDLED_SHA256[name]:
            raise RuntimeError(
                f"tiktoken {tiktoken.__version__} wants {url} (sha256 {expected_hash}); the "
                f"bundled {name}.tiktoken is {_BUNDLED_SHA256[name]} (upgrade agent-guard)"
            )
        data = _read_verified(name, directory)
        return _parse_ranks(data, filename)

    namespace = {**constructor.__globals__, "load_tiktoken_bpe": bundled_ranks}
    offline: Callable[[], dict[str, Any]] = types.FunctionType(
        constructor.__code__, namespace, constructor.__name__,
        constructor.__defaults__, constructor.__closure__)
    return tiktoken.Encoding(**offline())


def get_encoding(name: str) -> tiktoken.Encoding:
    """The bundled encoding ``name`` (``o200k_base`` or ``cl100k_base``).

    Loaded on first use (about 0.2 s), once per process even under concurrent first
    calls, then shared.
    """
    enc = _encodings.get(name)
    if enc is not None:
        return enc
    if name not in _BUNDLED_SHA256:
        raise ValueError(f"no bundled encoding {name!r}; have {sorted(_BUNDLED_SHA256)}")
    with _load_lock:
        enc = _encodings.get(name)
        if enc is None:
            enc = _encodings[name] = _build(name)
    return enc


# -- memoised text counts -------------------------------------------------------------------
# An agent re-sends its whole history on every call, so most texts were counted on the
# previous call. Counts are remembered per encoding, shared by all TokenCounters, bounded
# by entries and characters (the whole memo is dropped when full: simple and cheap).

_MEMO_ENTRIES = 16_384
_MEMO_CHARS = 8_000_000


class _TextCounts:
    """Token count of a text under one encoding, memoised."""

    __slots__ = ("_chars", "_encode", "_lock", "_memo", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self._memo: dict[str, int] = {}
        self._chars = 0
        self._lock = threading.Lock()
        self._encode: Callable[[str], list[int]] | None = None

    def __call__(self, text: str) -> int:
        n = self._memo.get(text)
        if n is not None:
            return n
        if not text:
            return 0
        encode = self._encode
        if encode is None:
            # encode_ordinary == encode(text, disallowed_special=()), slightly faster:
            # "<|endoftext|>" in user text is counted as the text it is, never raised on.
            encode = self._encode = get_encoding(self.name).encode_ordinary
        n = len(encode(text))
        size = len(text)
        if size <= _MEMO_CHARS // 4:
            with self._lock:
                if len(self._memo) >= _MEMO_ENTRIES or self._chars + size > _MEMO_CHARS:
                    self._memo.clear()
                    self._chars = 0
                self._memo[text] = n
                self._chars += size
        return n


_TEXT_COUNTS = {name: _TextCounts(name) for name in _BUNDLED_SHA256}


# -- a cheap upper bound ----------------------------------------------------------------------
# Every token of o200k_base and cl100k_base is at least one byte, and encode_ordinary's
# tokens concatenate to the text's UTF-8 (lone surrogates become U+FFFD, 3 bytes, as
# "surrogatepass" counts them): so a text's UTF-8 length is never below its token count
# (property-tested in tests/test_tokens.py). It costs O(1) for ASCII text, where tiktoken
# costs about a microsecond per few bytes.

# Texts shorter than this are counted exactly even when estimating: that is cheap, it
# fills the memo for the next call, and the bound (~4x for English) would be loose.
BOUND_MIN_CHARS = 512


def utf8_upper_bound(text: str) -> int:
    """An upper bound of ``text``'s token count under the bundled encodings (its UTF-8
    length)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


class _Estimate:
    """A count function for one estimate: the exact count of a text when it is memoised
    or short, else its UTF-8 upper bound (noting that the result is then a bound)."""

    __slots__ = ("_counts", "_memo", "exact", "name")

    def __init__(self, counts: _TextCounts) -> None:
        self._counts = counts
        self._memo = counts._memo
        self.name = counts.name  # tool schemas are still counted (and memoised) exactly
        self.exact = True

    def __call__(self, text: str) -> int:
        n = self._memo.get(text)
        if n is not None:
            return n
        if len(text) < BOUND_MIN_CHARS:
            return self._counts(text)
        self.exact = False
        return utf8_upper_bound(text)

def _prompt_tokens(messages: Iterable[MessageLike],
                   tools: Sequence[Mapping[str, Any]] | None,
                   count: _Count, schema_count: _TextCounts) -> int:
    """A prompt's tokens before scaling: messages counted with ``count``, tool schemas
    (always exactly) with ``schema_count``."""
    n = REPLY_PRIMING_TOKENS
    for message in messages:
        n += TOKENS_PER_MESSAGE + _message_tokens(message, count)
    if tools:
        n += TOOLS_BLOCK_TOKENS
        for tool in tools:
            n += _tool_schema_tokens(tool, schema_count)
    return n


# Tool schemas by identity: LangChain passes the same schema dicts on every call of a
# bound model, so a hit skips serialising them. The entry keeps the schema alive and is
# checked with ``is`` (ids are reused after garbage collection). Schemas are treated as
# immutable once passed, as LangChain does. A miss serialises and hits the text memo.
_TOOL_MEMO_ENTRIES = 1024
_tool_memo: dict[tuple[int, str], tuple[object, int]] = {}
_tool_memo_lock = threading.Lock()

_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str)


def _json(value: Any) -> str:
    """Compact JSON (non-ASCII kept as is, as the model sees it)."""
    try:
        return _JSON.encode(value)
    except (TypeError, ValueError):  # circular or exotic keys: still count something
        return str(value)


# -- model -> encoding ----------------------------------------------------------------------

_O200K_PREFIXES = ("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "chatgpt-", "gpt-oss",
                   "codex-", "gpt-realtime", "gpt-audio", "gpt-image", "computer-use")
_CL100K_PREFIXES = ("gpt-4-", "gpt-3.5", "gpt-35", "text-embedding-3", "text-embedding-ada",
                    "davinci-002", "babbage-002")
_O_SERIES = re.compile(r"o\d+(?:-|$)")  # o1, o3-mini, o4-mini-2025-04-16, ...


@lru_cache(maxsize=1024)
def _family(model: str) -> tuple[str, bool]:
    """(encoding name, exact?) for a model name."""
    name = model.strip().lower().rsplit("/", 1)[-1]  # openai/gpt-4o, azure/gpt-4o, ...
    if name.startswith("ft:"):  # ft:gpt-4o-mini-2024-07-18:org::id
        name = name[3:].split(":", 1)[0]
    if name == "gpt-4" or name.startswith(_CL100K_PREFIXES):
        return "cl100k_base", True
    if name.startswith(_O200K_PREFIXES) or _O_SERIES.match(name):
        return "o200k_base", True
    return "o200k_base", False


# -- messages -------------------------------------------------------------------------------

_ROLE_OF_TYPE = {
    "human": "user", "HumanMessageChunk": "user",
    "ai": "assistant", "AIMessageChunk": "assistant",
    "system": "system", "SystemMessageChunk": "system",
    "tool": "tool", "ToolMessageChunk": "tool",
    "function": "function", "FunctionMessageChunk": "function",
}
_TEXT_BLOCKS = frozenset({"text", "input_text", "output_text"})
_IMAGE_BLOCKS = frozenset({"image_url", "image", "input_image"})


class TokenCounter:
    """Counts tokens of prompts, tool schemas and answers, for budget reservations.

    Thread-safe; instances are cheap (the encodings and memos are shared per process).
    ``fallback_factor`` multiplies counts for models whose tokenizer is not bundled
    (anything not OpenAI), since o200k_base undercounts them.
    """

    def __init__(self, fallback_factor: float = 1.2) -> None:
        factor = float(fallback_factor)
        if not 1 <= factor < float("inf"):
            raise ValueError(f"fallback_factor must be a finite number >= 1, "
                             f"got {fallback_factor!r}")
        self.fallback_factor = factor
        # exact rational so that ceil(n * 1.2) is not pushed up by float error
        ratio = Fraction(str(factor)).limit_denominator(1_000_000)
        self._num, self._den = ratio.numerator, ratio.denominator

    def __repr__(self) -> str:
        return f"TokenCounter(fallback_factor={self.fallback_factor})"

    # -- models ---------------------------------------------------------------------------

    def encoding_name_for(self, model: str) -> str:
        """``cl100k_base`` for gpt-4 (not 4o/4.1), gpt-3.5 and text-embedding-3;
        ``o200k_base`` for everything else (exact for gpt-4o, gpt-4.1, gpt-5, o-series)."""
        return _family(model or "")[0]

    def is_exact(self, model: str) -> bool:
        """Whether ``model`` is counted with its own tokenizer (OpenAI models); if not,
        counts are o200k_base times ``fallback_factor``."""
        return _family(model or "")[1]

    def _scaled(self, n: int, exact: bool) -> int:
        return n if exact else -(-n * self._num // self._den)  # ceil(n * factor)

    # -- counting -------------------------------------------------------------------------

    def count_text(self, text: str, model: str = "gpt-4o") -> int:
        """Tokens of plain text; special-token markers in it count as ordinary text."""
        enc, exact = _family(model or "")
        return self._scaled(_TEXT_COUNTS[enc](text), exact)

    def count_messages(
        self,
        messages: Iterable[MessageLike],
        model: str = "gpt-4o",
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> int:
        """Tokens of a chat prompt: LangChain messages or OpenAI-style dicts, plus the
        OpenAI-format tool schemas sent with it (``invocation_params["tools"]``)."""
        enc, exact = _family(model or "")
        count = _TEXT_COUNTS[enc]
        return self._scaled(_prompt_tokens(messages, tools, count, count), exact)

    def estimate_messages(
        self,
        messages: Iterable[MessageLike],
        model: str = "gpt-4o",
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> tuple[int, bool]:
        """``(n, exact)``: ``count_messages`` when ``exact``, else an upper bound of it.

        Texts already counted (memoised) and short texts are counted exactly; a long
        new text adds its UTF-8 length instead of being tokenised. The guard reserves
        with the bound while a cap is far and counts exactly when it comes near."""
        enc, exact_family = _family(model or "")
        counts = _TEXT_COUNTS[enc]
        count = _Estimate(counts)
        n = _prompt_tokens(messages, tools, count, counts)
        return self._scaled(n, exact_family), count.exact

    def count_output(self, message: BaseMessage | Mapping[str, Any] | str,
                     model: str = "gpt-4o") -> int:
        """Tokens of a generated answer (its text and tool calls), for providers that
        report no usage. Accepts an AIMessage, an OpenAI-style dict or plain text."""
        enc, exact = _family(model or "")
        count = _TEXT_COUNTS[enc]
        if isinstance(message, str):
            return self._scaled(count(message), exact)
        n = _content_tokens(_field(message, "content"), count)
        n += _tool_calls_tokens(message, count)
        return self._scaled(n, exact)


# -- internals (unscaled counts) ------------------------------------------------------------

_Count: TypeAlias = "_TextCounts | _Estimate"  # exact, or exact-or-bound per text


def _field(obj: Any, key: str) -> Any:
    if type(obj) is dict or isinstance(obj, Mapping):  # dict first: Mapping is a slow check
        return obj.get(key)
    return getattr(obj, key, None)


def _message_tokens(message: Any, count: _Count) -> int:
    """One message without its framing: role, content, name, tool calls, tool call id."""
    if type(message) is dict or isinstance(message, Mapping):
        return _dict_message_tokens(message, count)
    if isinstance(message, str):  # LangChain reads a bare string as a user message
        return count("user") + count(message)
    if isinstance(message, tuple) and len(message) == 2:  # ("user", "hi")
        role, content = message
        return count(_ROLE_OF_TYPE.get(str(role), str(role))) + _content_tokens(content, count)
    # A BaseMessage. Fields are read by type: a missing attribute costs ~1.6 us on a
    # pydantic model (it raises inside), more than the rest of the message together.
    kind = getattr(message, "type", "user")
    role = _ROLE_OF_TYPE.get(kind) or getattr(message, "role", None) or kind  # ChatMessage
    n = count(str(role)) + _content_tokens(getattr(message, "content", None), count)
    name = getattr(message, "name", None)
    if name:
        n += TOKENS_PER_NAME + count(str(name))
    if role == "assistant":
        n += _tool_calls_tokens(message, count)
    elif role == "tool":
        call_id = getattr(message, "tool_call_id", None)
        if call_id:
            n += count(str(call_id))
    return n


def _dict_message_tokens(message: Mapping[str, Any], count: _Count) -> int:
    """The cookbook's rule for an OpenAI message dict: every field's value counted."""
    n = 0
    has_role = False
    for key, value in message.items():
        if value is None:
            continue
        if key == "role":
            has_role = True
            n += count(str(value))
        elif key == "type":  # LangChain's dict form: {"type": "human", ...}
            if "role" not in message:
                has_role = True
                n += count(_ROLE_OF_TYPE.get(str(value), str(value)))
        elif key == "content":
            n += _content_tokens(value, count)
        elif key == "name":
            n += TOKENS_PER_NAME + count(str(value))
        elif key in ("tool_calls", "function_call", "invalid_tool_calls"):
            pass  # below, once
        elif isinstance(value, str):
            n += count(value)
        else:
            n += count(_json(value))
    if not has_role:
        n += count("user")
    return n + _tool_calls_tokens(message, count)


def _content_tokens(content: Any, count: _Count) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return count(content)
    if isinstance(content, list | tuple):
        n = 0
        for block in content:
            if isinstance(block, str):
                n += count(block)
            elif isinstance(block, Mapping):
                kind = block.get("type")
                text = block.get("text")
                if kind in _TEXT_BLOCKS and isinstance(text, str):
                    n += count(text)
                elif kind in _IMAGE_BLOCKS:
                    n += _image_tokens(block)
                else:  # reasoning, tool_use, file, audio, ...: their JSON
                    n += count(_json(block))
            else:
                n += count(str(block))
        return n
    return count(str(content))


def _image_tokens(block: Mapping[str, Any]) -> int:
    spec = block.get("image_url")
    detail = spec.get("detail") if isinstance(spec, Mapping) else block.get("detail")
    return IMAGE_TOKENS_LOW_DETAIL if detail == "low" else IMAGE_TOKENS


def _tool_calls_tokens(message: Any, count: _Count) -> int:
    """Tool calls of an assistant message: LangChain ``tool_calls`` (and invalid ones,
    which are sent back too) or OpenAI's ``tool_calls`` / legacy ``function_call``."""
    n = 0
    is_mapping = type(message) is dict or isinstance(message, Mapping)
    for key in _CALL_FIELDS if is_mapping else _CALL_FIELDS[:2]:  # function_call: dicts only
        calls = message.get(key) if is_mapping else getattr(message, key, None)
        if not calls:
            continue
        if key == "function_call":
            calls = (calls,)
        elif not isinstance(calls, list | tuple):
            continue
        for call in calls:
            fn = _field(call, "function")
            if isinstance(fn, Mapping):  # OpenAI: {"id", "type", "function": {...}}
                name, args = fn.get("name"), fn.get("arguments")
            else:  # LangChain: {"name", "args", "id"}; legacy: {"name", "arguments"}
                name = _field(call, "name")
                args = _field(call, "args")
                if args is None:
                    args = _field(call, "arguments")
            n += TOKENS_PER_TOOL_CALL + count(str(name or ""))
            if args is not None:
                n += count(args if isinstance(args, str) else _json(args))
    return n


_CALL_FIELDS = ("tool_calls", "invalid_tool_calls", "function_call")


def _tool_schema_tokens(tool: Mapping[str, Any] | Any, count: _TextCounts) -> int:
    """Compact JSON of the function definition + TOKENS_PER_TOOL_SCHEMA, memoised."""
    key = (id(tool), count.name)
    hit = _tool_memo.get(key)
    if hit is not None and hit[0] is tool:
        return hit[1]
    if isinstance(tool, Mapping):
        fn = tool.get("function")
        schema: Any = fn if isinstance(fn, Mapping) else tool  # other formats: all of it
    else:  # a BaseTool, function or pydantic class, as bind_tools accepts
        try:
            from langchain_core.utils.function_calling import convert_to_openai_tool

            schema = convert_to_openai_tool(tool)["function"]
        except Exception:
            schema = str(tool)
    n = TOKENS_PER_TOOL_SCHEMA + count(_json(schema))
    with _tool_memo_lock:
        if len(_tool_memo) >= _TOOL_MEMO_ENTRIES:
            _tool_memo.clear()
        _tool_memo[key] = (tool, n)
    return n
