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
import itertools
import json
import logging
import math
import re
import threading
import types
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
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
    "RequestFeatures",
    "TokenCounter",
    "get_encoding",
    "request_features",
    "utf8_upper_bound",
]

_logger = logging.getLogger("agent_guard")

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
# OpenAI models see tool schemas rendered as a TypeScript namespace
# ("namespace functions { // description \n type name = (_: { ... }) => any; }"): the
# rendering's tokens plus 9 reproduce the API's prompt_tokens, 4 fewer when the prompt
# has a system message (the cookbook's example: 101 on gpt-4o, 105 on gpt-4).
FUNCTIONS_BLOCK_TOKENS = 9
FUNCTIONS_SYSTEM_SHARED_TOKENS = 4
# A json_schema response_format (with_structured_output): the schema's compact JSON plus
# this framing. OpenAI does not publish how it renders the schema; a stated bound.
RESPONSE_FORMAT_TOKENS = 10
# tool_choice naming one function: its name plus this framing; "none": 1 token.
TOOL_CHOICE_TOKENS = 4
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

    from .compat import tiktoken_constructor

    constructor = tiktoken_constructor(name)

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
# by entries and characters as a two-generation LRU: hits go to the young generation; when
# it is full it becomes the old one and the old one is dropped. So what was used in the
# last generation is always kept (never the whole memo cleared at once, which made many
# sessions recount everything), at the cost of one dict move per hit in the old one.

_MEMO_ENTRIES = 16_384  # per generation
_MEMO_CHARS = 8_000_000  # per generation


class _TextCounts:
    """Token count of a text under one encoding, memoised."""

    __slots__ = ("_chars", "_encode", "_lock", "_memo", "_old", "name", "roles", "stored")

    def __init__(self, name: str) -> None:
        self.name = name
        # how many texts of BOUND_MIN_CHARS or more were stored so far: only such a text
        # is ever sized by a bound, so a bound may be exact since this last changed
        self.stored = 0
        # the counts of role names ("user", "assistant"...), which every message has
        self.roles: dict[str, int] = {}
        self._memo: dict[str, int] = {}  # the young generation
        self._old: dict[str, int] = {}
        self._chars = 0
        self._lock = threading.Lock()
        self._encode: Callable[[str], list[int]] | None = None

    def get(self, text: str) -> int | None:
        """The memoised count of ``text``, or None."""
        n = self._memo.get(text)
        if n is None:
            n = self._old.get(text)
            if n is not None:
                self._keep(text, n)
        return n

    def __call__(self, text: str) -> int:
        n = self._memo.get(text)
        if n is not None:
            return n
        n = self._old.get(text)
        if n is not None:
            self._keep(text, n)
            return n
        if not text:
            return 0
        encode = self._encode
        if encode is None:
            # encode_ordinary == encode(text, disallowed_special=()), slightly faster:
            # "<|endoftext|>" in user text is counted as the text it is, never raised on.
            encode = self._encode = get_encoding(self.name).encode_ordinary
        n = len(encode(text))
        self._keep(text, n)
        return n

    def _keep(self, text: str, n: int) -> None:
        size = len(text)
        if size > _MEMO_CHARS // 4:
            return
        with self._lock:
            if len(self._memo) >= _MEMO_ENTRIES or self._chars + size > _MEMO_CHARS:
                self._old = self._memo  # the young generation ages; the old one goes
                self._memo = {}
                self._chars = 0
            self._memo[text] = n
            self._chars += size
            if size >= BOUND_MIN_CHARS:
                self.stored += 1

    def __len__(self) -> int:
        return len(self._memo) + len(self._old)


    def bound(self, text: str) -> int:
        """An upper bound of this count that costs no tokenising (see utf8_upper_bound)."""
        return utf8_upper_bound(text)


# Claude's tokenizer is not public. Its count is estimated from o200k_base's as
# ``o200k + ceil(extra UTF-8 bytes / 3)``, times ``TokenCounter.claude_factor``: o200k
# is as efficient as Claude's tokenizer on English, code and JSON but far more efficient
# on other scripts (Claude's older, published tokenizer counts 1.04-1.16x o200k on
# English prose, Python and JSON, 1.5-1.6x on German, French and Spanish, 2.4x on
# Russian, 3.1x on Arabic, 3.7x on Hindi: docs/anthropic.md), and the extra bytes of
# non-ASCII characters say how much of a text is in another script.
CLAUDE_COUNTS = "claude"
CLAUDE_FACTOR = 1.6


class _ClaudeCounts(_TextCounts):
    """Claude tokens before ``claude_factor``: o200k plus a third of the non-ASCII bytes."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(CLAUDE_COUNTS)  # its own memos (and tool-schema memo key)

    def __call__(self, text: str) -> int:
        n = self.get(text)
        if n is not None:
            return n
        n = _TEXT_COUNTS["o200k_base"](text) + _non_latin(text)
        self._keep(text, n)
        return n

    def bound(self, text: str) -> int:
        return utf8_upper_bound(text) + _non_latin(text)


def _non_latin(text: str) -> int:
    """A third of the bytes beyond one per character (0 for ASCII), rounded up."""
    if text.isascii():
        return 0
    extra = len(text.encode("utf-8", "surrogatepass")) - len(text)
    return -(-extra // 3)


_TEXT_COUNTS: dict[str, _TextCounts] = {name: _TextCounts(name) for name in _BUNDLED_SHA256}
_TEXT_COUNTS[CLAUDE_COUNTS] = _ClaudeCounts()


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

    __slots__ = ("counts", "exact", "name")

    def __init__(self, counts: _TextCounts) -> None:
        self.counts = counts
        self.name = counts.name  # tool schemas are still counted (and memoised) exactly
        self.exact = True

    def __call__(self, text: str) -> int:
        if len(text) < BOUND_MIN_CHARS:
            return self.counts(text)
        n = self.counts.get(text)
        if n is not None:
            return n
        self.exact = False
        return self.counts.bound(text)

def _prompt_tokens(messages: Iterable[MessageLike],
                   tools: Sequence[Mapping[str, Any]] | None,
                   count: _Count, schema_count: _TextCounts, model: str = "gpt-4o",
                   params: Mapping[str, Any] | None = None) -> int:
    """A prompt's tokens before scaling: messages counted with ``count``, tool schemas
    and response formats (always exactly) with ``schema_count``."""
    n = REPLY_PRIMING_TOKENS
    image = _image_rule(model)
    has_system = False
    for message in messages:
        n += TOKENS_PER_MESSAGE + _message_tokens(message, count, image)
        if tools and not has_system:
            has_system = _is_system(message)
    if tools:
        n += _tools_tokens(tools, schema_count, model, has_system)
    if params:
        n += _params_tokens(params, schema_count)
    return n


def _tools_tokens(tools: Sequence[Mapping[str, Any]], schema_count: _TextCounts,
                  model: str, has_system: bool) -> int:
    if _family(model)[1]:  # OpenAI: the schemas as its TypeScript-like namespace
        n = schema_count(_functions_namespace(tools)) + FUNCTIONS_BLOCK_TOKENS
        if has_system:  # the namespace joins the system message's framing
            n -= FUNCTIONS_SYSTEM_SHARED_TOKENS
        return n
    n = TOOLS_BLOCK_TOKENS + anthropic_tool_system_tokens(model)
    for tool in tools:
        n += _tool_schema_tokens(tool, schema_count)
    return n


# -- conversations ----------------------------------------------------------------------------
# An agent's prompt is its previous prompt plus a few messages. TokenCounter.estimate_prompt
# remembers, per conversation, the messages of its last prompt and what each counted, so a
# call costs the new messages plus a C-speed comparison of the old ones (list equality
# checks identity first). Bounded as an LRU by conversations and by messages held.

_CONVERSATIONS_MAX = 1024
_CONVERSATION_MESSAGES_MAX = 262_144

# What a message adds to a prompt: its tokens (with framing), whether they are exact (not
# a bound), and whether it is a system message, marks blocks for a 5-minute or a 1-hour
# cache write, has audio or image input.
_FLAGS = ("system", "cache_5m", "cache_1h", "audio", "image")
_NEVER = 1 << 62  # "no message has it" as a first index


class _Buffers:
    """Messages and prefix sums, shared by the versions of one conversation that extend
    each other: a version is its first ``n`` entries; only the version as long as the
    buffers appends to them (a shorter one copies its part first)."""

    __slots__ = ("inexact", "lock", "messages", "tokens")

    def __init__(self, messages: list[Any], tokens: list[int], inexact: list[int]) -> None:
        self.messages = messages
        self.tokens = tokens  # tokens[k]: the first k messages' tokens
        self.inexact = inexact  # inexact[k]: how many of the first k are bounds
        self.lock = threading.Lock()


class _Conversation:
    """One version of a conversation: its first ``n`` messages, what they counted, the
    messages sized by a bound and where each flag of ``_FLAGS`` first appears."""

    __slots__ = ("bounds", "buffers", "checked", "firsts", "n", "sums")

    def __init__(self, buffers: _Buffers, n: int, bounds: list[int], firsts: list[int]
                 ) -> None:
        self.buffers, self.n, self.bounds, self.firsts = buffers, n, bounds, firsts
        # _TextCounts.stored when the bounds were last found still uncounted: no text
        # was counted since while it is unchanged, so they need no look
        self.checked = -1
        # totals(), kept once asked: a version does not change after follow/add made it
        self.sums: tuple[int, bool, bool, str | None, bool, bool] | None = None

    @classmethod
    def new(cls) -> _Conversation:
        return cls(_Buffers([], [0], [0]), 0, [], [_NEVER] * len(_FLAGS))

    def follow(self, messages: list[Any], counts: _TextCounts, image_rule: _ImageRule
               ) -> _Conversation:
        """The conversation of a prompt of ``messages``: the messages it shares with this
        one (by identity, or equal) are taken as counted; the rest are counted."""
        buf, k = self.buffers, self.n
        with buf.lock:
            held = buf.messages
            prev = held if len(held) == k else held[:k]
            try:
                if len(messages) == k:
                    start = k if messages == prev else _common_start(prev, messages)
                elif len(messages) > k and prev is held:
                    # Does the prompt extend this version? Compared as a whole with the
                    # held list lengthened by the prompt's new messages for the while
                    # (``messages[:k] == prev`` copied and freed the prefix on every
                    # call). No version of these buffers is longer than k, so none reads
                    # past k; a look without the lock (_Conversations.prompt) finds the
                    # list longer than its version and compares a slice of it.
                    held += messages[k:]
                    try:
                        extends = held == messages
                    finally:
                        del held[k:]
                    start = k if extends else _common_start(prev, messages)
                elif len(messages) > k and messages[:k] == prev:
                    start = k
                else:
                    start = _common_start(prev, messages)
            except Exception:  # a message whose __eq__ fails: count everything
                start = 0
            # a long text sized by a bound may have been counted since (the guard counts
            # exactly near a cap and when it settles without usage)
            recount = False
            # a value of counts.stored at which this version's bounds before ``start``
            # were all uncounted: the new version's too (those it adds are new)
            looked = self.checked if self.bounds else counts.stored
            if self.bounds and counts.stored != self.checked:
                stored = counts.stored
                recount = any(self._counted_now(i, counts, image_rule)
                              for i in self.bounds if i < start)
                if not recount:
                    looked = stored
                    if start >= k:  # every bound looked at
                        self.checked = stored
            if start == k == len(messages) and not recount:
                return self
            if start == len(held) and not recount and (not start or messages[start - 1]
                                                        is held[start - 1]):
                # extends the buffers in place
                conv = _Conversation(buf, start, list(self.bounds), list(self.firsts))
            else:
                # The new version holds the caller's message objects (equal to the ones
                # held, so counted alike): the next prompt, made of these objects, then
                # matches them by identity, not by a (pydantic) __eq__ per message on
                # every call.
                conv = _Conversation(
                    _Buffers(messages[:start], buf.tokens[:start + 1],
                             buf.inexact[:start + 1]),
                    start, [i for i in self.bounds if i < start],
                    [f if f < start else _NEVER for f in self.firsts])
                if recount:
                    conv.recount_bounds(counts, image_rule)
            if not recount:
                conv.checked = looked
            if conv.buffers is buf:
                conv.add(messages, start, counts, image_rule)
        if conv.buffers is not buf:
            conv.add(messages, start, counts, image_rule)
        return conv

    def add(self, messages: list[Any], start: int, counts: _TextCounts,
            image_rule: _ImageRule) -> None:
        """Count ``messages[start:]`` onto this version (its buffers end at ``n``)."""
        count = _Estimate(counts)
        firsts = self.firsts
        buf = self.buffers
        tokens, inexact = buf.tokens, buf.inexact
        for message in messages[start:] if start else messages:
            i = self.n
            count.exact = True
            plain = _plain_message_tokens(message, count)
            if plain is not None:  # a LangChain message of text: only a system flag
                n = plain
                if firsts[0] == _NEVER and message.type == "system":
                    firsts[0] = i
            else:
                n = TOKENS_PER_MESSAGE + _message_tokens(message, count, image_rule)
                ttl, audio, image = _message_features(message)
                for flag, has in enumerate((_is_system(message), ttl == "5m", ttl == "1h",
                                            audio, image)):
                    if has and firsts[flag] == _NEVER:
                        firsts[flag] = i
            buf.messages.append(message)
            tokens.append(tokens[i] + n)
            inexact.append(inexact[i] + (not count.exact))
            if not count.exact:
                self.bounds.append(i)
            self.n = i + 1

    def _counted_now(self, i: int, counts: _TextCounts, image_rule: _ImageRule) -> bool:
        count = _Estimate(counts)
        message = self.buffers.messages[i]
        if _plain_message_tokens(message, count) is None:
            _message_tokens(message, count, image_rule)
        return count.exact

    def recount_bounds(self, counts: _TextCounts, image_rule: _ImageRule) -> None:
        """Messages sized by a bound of a long new text: exact once the text is counted
        (the guard counts exactly near a cap and when it settles without usage). Only
        on a version that owns its buffers."""
        count = _Estimate(counts)
        buf = self.buffers
        counted: dict[int, int] = {}
        for i in self.bounds:
            count.exact = True
            n = TOKENS_PER_MESSAGE + _message_tokens(buf.messages[i], count, image_rule)
            if count.exact:
                counted[i] = n
        if not counted:
            return
        tokens = buf.tokens
        sizes = [counted.get(i, tokens[i + 1] - tokens[i]) for i in range(self.n)]
        buf.tokens = [0, *itertools.accumulate(sizes)]
        self.bounds = [i for i in self.bounds if i not in counted]
        bound = set(self.bounds)
        buf.inexact = [0, *itertools.accumulate(i in bound for i in range(self.n))]

    def totals(self) -> tuple[int, bool, bool, str | None, bool, bool]:
        """(tokens, exact, has a system message, cache-write marker, audio, image)."""
        n = self.n
        system, cache_5m, cache_1h, audio, image = self.firsts  # _FLAGS
        sums = self.sums = (self.buffers.tokens[n], not self.bounds, system < n,
                            "1h" if cache_1h < n else "5m" if cache_5m < n else None,
                            audio < n, image < n)
        return sums


def _common_start(a: list[Any], b: list[Any]) -> int:
    """How many first elements ``a`` and ``b`` share. Most prompts differ from the
    previous one near its end (a replaced last turn, a retried call): that is looked at
    first; elsewhere, a binary search on slice equality."""
    n = min(len(a), len(b))
    i = n
    while i > 0 and n - i < 8 and not (a[i - 1] is b[i - 1] or a[i - 1] == b[i - 1]):
        i -= 1
    if a[:i] == b[:i]:
        return i
    lo, hi = 0, i - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class _Conversations:
    """Conversation key -> its last prompt, least recently used first."""

    def __init__(self) -> None:
        self._items: OrderedDict[Hashable, _Conversation] = OrderedDict()
        self._held = 0  # messages held by all conversations
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> _Conversation | None:
        return self._items.get(key)

    def prompt(self, key: Hashable, messages: list[Any], counts: _TextCounts, model: str
               ) -> tuple[int, bool, bool, str | None, bool, bool]:
        """The totals (see _Conversation.totals) of a prompt of ``messages`` in the
        conversation ``key``, which then remembers it as its last prompt."""
        items = self._items
        conv = items.get(key)
        if conv is None:
            conv = _Conversation.new()
            conv.checked = counts.stored  # its bounds are all new (see follow)
            conv.add(messages, 0, counts, _image_rule(model))
        else:
            # The same prompt again (an agent's retried or repeated call): this version
            # as it is, when its messages are the prompt's (a list comparison that checks
            # identity first, in C) and no bound of it needs a look (see follow). The
            # buffers' message list only grows, and only past this version's end, so it
            # is read without their lock: a list that grew meanwhile compares unequal and
            # goes the way of follow.
            k = conv.n
            held = conv.buffers.messages
            try:
                same = (len(messages) == k
                        and (not conv.bounds or counts.stored == conv.checked)
                        and (held == messages if len(held) == k else held[:k] == messages))
            except Exception:  # a message whose __eq__ fails: follow counts all
                same = False
            if not same:
                conv = conv.follow(messages, counts, _image_rule(model))
        lock = self._lock  # (acquire and release: ``with``'s __exit__ call costs more)
        lock.acquire()
        try:  # kept as the conversation's last prompt, most recently used
            old = items.get(key)
            if old is not conv:
                self._held += conv.n - (old.n if old else 0)
                items[key] = conv
            items.move_to_end(key)
            while items and (len(items) > _CONVERSATIONS_MAX
                             or self._held > _CONVERSATION_MESSAGES_MAX):
                _, dropped = items.popitem(last=False)
                self._held -= dropped.n
        finally:
            lock.release()
        sums = conv.sums
        return conv.totals() if sums is None else sums

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._held = 0


_conversations = _Conversations()


# Anthropic adds a tool-use system prompt whenever tools are sent, billed as input and never
# in the messages; its size per model family (Anthropic's tool-use pricing page, the larger
# of its tool_choice auto / any counts), and Claude 3 Opus's 530 for a Claude not listed.
_ANTHROPIC_TOOL_SYSTEM = (
    (re.compile(r"claude-3-opus"), 530),
    (re.compile(r"claude-3-sonnet"), 235),
    (re.compile(r"claude-3(-5)?-haiku"), 340),
    (re.compile(r"claude-(3-5|3-7|3\.5|3\.7)-sonnet|claude-(sonnet|opus|haiku)-[4-9]"
                r"|claude-[4-9]"), 346),
)
ANTHROPIC_TOOL_SYSTEM_UNKNOWN = 530


@lru_cache(maxsize=512)
def anthropic_tool_system_tokens(model: str) -> int:
    """Tokens of Anthropic's hidden tool-use system prompt for ``model`` (0: not Claude)."""
    name = model.strip().lower()
    if "claude" not in name:
        return 0
    name = name[name.index("claude"):]
    for pattern, tokens in _ANTHROPIC_TOOL_SYSTEM:
        if pattern.match(name):
            return tokens
    return ANTHROPIC_TOOL_SYSTEM_UNKNOWN


def _is_system(message: Any) -> bool:
    if type(message) is dict or isinstance(message, Mapping):
        return message.get("role") in ("system", "developer") or message.get("type") == "system"
    if isinstance(message, tuple) and len(message) == 2:
        return str(message[0]) in ("system", "developer")
    return getattr(message, "type", None) == "system"


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
    """(counts, exact?) for a model name: a bundled encoding's name, or CLAUDE_COUNTS."""
    name = model.strip().lower().rsplit("/", 1)[-1]  # openai/gpt-4o, azure/gpt-4o, ...
    if name.startswith("ft:"):  # ft:gpt-4o-mini-2024-07-18:org::id
        name = name[3:].split(":", 1)[0]
    if name == "gpt-4" or name.startswith(_CL100K_PREFIXES):
        return "cl100k_base", True
    if name.startswith(_O200K_PREFIXES) or _O_SERIES.match(name):
        return "o200k_base", True
    if "claude" in name:
        return CLAUDE_COUNTS, False
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
    (anything not OpenAI), since o200k_base undercounts them; ``claude_factor`` does so
    for Claude models, whose count adds a share of the non-ASCII bytes first (see
    ``docs/anthropic.md``: how the factor was chosen, and what it costs).

    ``claude_prompt_counter`` (optional): a function ``(messages, tools) -> int`` that
    asks Anthropic for a Claude prompt's count (``ChatAnthropic(...).
    get_num_tokens_from_messages``, which calls ``/v1/messages/count_tokens``). When it is
    given, Claude prompts are counted with it (one more request per call, free of charge
    and rate-limited by Anthropic), and with the factor when it fails.
    """

    def __init__(self, fallback_factor: float = 1.2, *,
                 claude_factor: float = CLAUDE_FACTOR,
                 claude_prompt_counter: Callable[[Sequence[Any], Sequence[Any] | None], int]
                 | None = None) -> None:
        self.fallback_factor = _check_factor("fallback_factor", fallback_factor)
        self.claude_factor = _check_factor("claude_factor", claude_factor)
        # exact rationals so that ceil(n * 1.2) is not pushed up by float error
        self._ratios = {False: _ratio(self.fallback_factor),
                        True: _ratio(self.claude_factor)}
        self.claude_prompt_counter = claude_prompt_counter

    def __repr__(self) -> str:
        return (f"TokenCounter(fallback_factor={self.fallback_factor}, "
                f"claude_factor={self.claude_factor})")

    # -- models ---------------------------------------------------------------------------

    def encoding_name_for(self, model: str) -> str:
        """``cl100k_base`` for gpt-4 (not 4o/4.1), gpt-3.5 and text-embedding-3;
        ``o200k_base`` for everything else (exact for gpt-4o, gpt-4.1, gpt-5, o-series)."""
        enc = _family(model or "")[0]
        return "o200k_base" if enc == CLAUDE_COUNTS else enc

    def is_exact(self, model: str) -> bool:
        """Whether ``model`` is counted with its own tokenizer (OpenAI models); if not,
        counts are o200k_base times ``fallback_factor`` (``claude_factor``)."""
        return _family(model or "")[1]

    def _scaled(self, n: int, enc: str, exact: bool) -> int:
        if exact:
            return n
        num, den = self._ratios[enc == CLAUDE_COUNTS]
        return -(-n * num // den)  # ceil(n * factor)

    # -- counting -------------------------------------------------------------------------

    def count_text(self, text: str, model: str = "gpt-4o") -> int:
        """Tokens of plain text; special-token markers in it count as ordinary text."""
        enc, exact = _family(model or "")
        return self._scaled(_TEXT_COUNTS[enc](text), enc, exact)

    def count_text_unscaled(self, text: str, model: str = "gpt-4o") -> int:
        """Tokens of plain text with the bundled encoding, *without* ``fallback_factor``:
        a best guess rather than an upper bound. Streamed output is summed this way, then
        scaled once with :meth:`scale` (a per-chunk ceiling would count every one-token
        chunk as two). Claude: o200k_base's count."""
        return _TEXT_COUNTS[self.encoding_name_for(model)](text)

    def scale(self, n: int, model: str = "gpt-4o") -> int:
        """``n`` unscaled tokens as this counter reports them for ``model``: times
        ``fallback_factor`` (``claude_factor``), rounded up, when its tokenizer is not
        bundled."""
        return self._scaled(n, *_family(model or ""))

    def count_messages(
        self,
        messages: Iterable[MessageLike],
        model: str = "gpt-4o",
        tools: Sequence[Mapping[str, Any]] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> int:
        """Tokens of a chat prompt: LangChain messages or OpenAI-style dicts, plus the
        OpenAI-format tool schemas sent with it (``invocation_params["tools"]``) and what
        else of the request's ``params`` the model reads (``response_format``,
        ``tool_choice``)."""
        enc, exact = _family(model or "")
        if enc == CLAUDE_COUNTS and self.claude_prompt_counter is not None:
            asked = self._ask_claude(messages, tools)
            if asked is not None:
                return asked
        count = _TEXT_COUNTS[enc]
        return self._scaled(_prompt_tokens(messages, tools, count, count, model or "",
                                           params), enc, exact)

    def _ask_claude(self, messages: Iterable[MessageLike],
                    tools: Sequence[Mapping[str, Any]] | None) -> int | None:
        """Anthropic's count of a Claude prompt (``claude_prompt_counter``), or None when
        it cannot be had (the estimate is used then)."""
        assert self.claude_prompt_counter is not None
        try:
            n = self.claude_prompt_counter(list(messages), list(tools) if tools else None)
        except Exception as exc:  # the endpoint is an option: never fail the call on it
            _logger.warning("agent-guard: Claude token count failed (%s); using the "
                            "estimate", exc)
            return None
        return n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else None

    def estimate_messages(
        self,
        messages: Iterable[MessageLike],
        model: str = "gpt-4o",
        tools: Sequence[Mapping[str, Any]] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> tuple[int, bool]:
        """``(n, exact)``: ``count_messages`` when ``exact``, else an upper bound of it.

        Texts already counted (memoised) and short texts are counted exactly; a long
        new text adds its UTF-8 length instead of being tokenised. The guard reserves
        with the bound while a cap is far and counts exactly when it comes near."""
        enc, exact_family = _family(model or "")
        if enc == CLAUDE_COUNTS and self.claude_prompt_counter is not None:
            return self.count_messages(messages, model, tools, params), True
        counts = _TEXT_COUNTS[enc]
        count = _Estimate(counts)
        n = _prompt_tokens(messages, tools, count, counts, model or "", params)
        return self._scaled(n, enc, exact_family), count.exact

    def estimate_prompt(
        self,
        messages: Sequence[MessageLike],
        model: str = "gpt-4o",
        tools: Sequence[Mapping[str, Any]] | None = None,
        params: Mapping[str, Any] | None = None,
        *,
        conversation: Hashable = None,
    ) -> tuple[int, bool, RequestFeatures]:
        """``estimate_messages`` and ``request_features`` in one pass, at a cost that
        follows what is new: ``(n, exact, features)``.

        With a ``conversation`` key (the guard passes the session), the messages of the
        conversation's previous prompt are remembered: a prompt that repeats them (the
        same message objects, or equal ones) and adds some counts only the added ones;
        one that diverges (a trimmed or summarised history) reuses the common start.
        Messages are treated as immutable once sent, as LangChain and LangGraph treat
        them (a state update replaces a message, never edits it in place)."""
        enc, exact_family = _family(model or "")
        if not isinstance(messages, list):
            messages = list(messages)
        if enc == CLAUDE_COUNTS and self.claude_prompt_counter is not None:
            return (self.count_messages(messages, model, tools, params), True,
                    request_features(messages, tools, params))
        counts = _TEXT_COUNTS[enc]
        model = model or ""
        if conversation is None:
            conv = _Conversation.new()
            conv.add(messages, 0, counts, _image_rule(model))
            sums = conv.totals()
        else:
            sums = _conversations.prompt((conversation, model), messages, counts, model)
        tokens, exact, system, ttl, audio, image = sums
        n = REPLY_PRIMING_TOKENS + tokens
        if tools:
            n += _tools_tokens(tools, counts, model, system)
        # parameters (a dict) without the keys _params_tokens / _request_features read
        # add nothing: their reads would all find None
        plain_params = type(params) is dict and _PARAM_KEYS.isdisjoint(params)
        if params and not plain_params:
            n += _params_tokens(params, counts)
        if tools or ttl or audio or image or (params and not plain_params):
            features = _request_features(ttl, audio, image, tools, params)
        else:
            features = _PLAIN
        return n if exact_family else self._scaled(n, enc, False), exact, features

    def count_output(self, message: BaseMessage | Mapping[str, Any] | str,
                     model: str = "gpt-4o") -> int:
        """Tokens of a generated answer (its text and tool calls), for providers that
        report no usage. Accepts an AIMessage, an OpenAI-style dict or plain text."""
        enc, exact = _family(model or "")
        count = _TEXT_COUNTS[enc]
        if isinstance(message, str):
            return self._scaled(count(message), enc, exact)
        n = _content_tokens(_field(message, "content"), count, _image_rule(model or ""))
        n += _tool_calls_tokens(message, count)
        return self._scaled(n, enc, exact)


def _check_factor(name: str, value: float) -> float:
    factor = float(value)
    if not 1 <= factor < float("inf"):
        raise ValueError(f"{name} must be a finite number >= 1, got {value!r}")
    return factor


def _ratio(factor: float) -> tuple[int, int]:
    ratio = Fraction(str(factor)).limit_denominator(1_000_000)
    return ratio.numerator, ratio.denominator


# -- internals (unscaled counts) ------------------------------------------------------------

_Count: TypeAlias = "_TextCounts | _Estimate"  # exact, or exact-or-bound per text


def _field(obj: Any, key: str) -> Any:
    if type(obj) is dict or isinstance(obj, Mapping):  # dict first: Mapping is a slow check
        return obj.get(key)
    return getattr(obj, key, None)


def _message_tokens(message: Any, count: _Count, image: _ImageRule = None) -> int:
    """One message without its framing: role, content, name, tool calls, tool call id."""
    if type(message) is dict or isinstance(message, Mapping):
        return _dict_message_tokens(message, count, image)
    if isinstance(message, str):  # LangChain reads a bare string as a user message
        return count("user") + count(message)
    if isinstance(message, tuple) and len(message) == 2:  # ("user", "hi")
        role, content = message
        return count(_ROLE_OF_TYPE.get(str(role), str(role))) + _content_tokens(content, count,
                                                                                image)
    # A BaseMessage. Fields are read by type: a missing attribute costs ~1.6 us on a
    # pydantic model (it raises inside), more than the rest of the message together.
    kind = getattr(message, "type", "user")
    role = _ROLE_OF_TYPE.get(kind) or getattr(message, "role", None) or kind  # ChatMessage
    n = count(str(role)) + _content_tokens(getattr(message, "content", None), count, image)
    return n + _named_tokens(message, role, count)


def _named_tokens(message: Any, role: Any, count: _Count) -> int:
    """A BaseMessage's name, an assistant's tool calls, a tool result's call id."""
    n = 0
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


# LangChain's own message classes, by exact type (a subclass may override anything):
# their fields are read directly by _plain_message_tokens. Learned per type on first
# sight, so that langchain_core is not imported for a prompt of dicts or strings.
_PLAIN_TYPES: dict[type, bool] = {}
_PLAIN_TYPE_NAMES = frozenset({
    "AIMessage", "AIMessageChunk", "HumanMessage", "HumanMessageChunk", "SystemMessage",
    "SystemMessageChunk", "ToolMessage", "ToolMessageChunk", "ChatMessage",
    "ChatMessageChunk", "FunctionMessage", "FunctionMessageChunk"})


def _is_plain_type(kind: type) -> bool:
    """Whether ``kind`` is one of LangChain's message classes (``_PLAIN_TYPE_NAMES``)."""
    plain = False
    module = getattr(kind, "__module__", None)
    if isinstance(module, str) and module.startswith("langchain_core.messages"):
        from langchain_core import messages as lc

        plain = any(getattr(lc, name, None) is kind for name in _PLAIN_TYPE_NAMES)
    if len(_PLAIN_TYPES) < 1024:
        _PLAIN_TYPES[kind] = plain
    return plain


def _plain_message_tokens(message: Any, count: _Estimate) -> int | None:
    """``TOKENS_PER_MESSAGE + _message_tokens(message, count)`` of a LangChain message
    whose content is one string and which marks no cache write (so its
    ``_message_features`` are all unset, and it is a system message when its ``type``
    says so); None for any other message. The same reads as _message_tokens' BaseMessage
    branch without its dict, str and tuple checks (``isinstance(message, Mapping)`` is a
    Python-level ABC check) and without a call per part; property-tested equal to it."""
    plain = _PLAIN_TYPES.get(type(message))
    if plain is None:
        plain = _is_plain_type(type(message))
    if not plain:
        return None
    content = message.content
    extra = message.additional_kwargs
    if type(content) is not str or type(extra) is not dict or "cache_control" in extra:
        return None
    kind = message.type
    role = _ROLE_OF_TYPE.get(kind) or getattr(message, "role", None) or kind
    counts = count.counts
    n = counts.roles.get(role)  # type: ignore[arg-type]
    if n is None:
        n = count(str(role))
        if kind in _ROLE_OF_TYPE and len(counts.roles) < 64:  # a role name, not ChatMessage's
            counts.roles[role] = n
    # a short text is counted exactly by the estimate too: one call fewer
    n += TOKENS_PER_MESSAGE + (counts(content) if len(content) < BOUND_MIN_CHARS
                               else count(content))
    # most messages have no name and no tool calls: nothing more to count then
    if message.name or role == "tool" or (role == "assistant" and (
            getattr(message, "tool_calls", None)
            or getattr(message, "invalid_tool_calls", None))):
        n += _named_tokens(message, role, count)
    return n


def _dict_message_tokens(message: Mapping[str, Any], count: _Count,
                         image: _ImageRule = None) -> int:
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
            n += _content_tokens(value, count, image)
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


def _content_tokens(content: Any, count: _Count, image: _ImageRule = None) -> int:
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
                    n += _image_tokens(block, image)
                else:  # reasoning, tool_use, file, audio, ...: their JSON
                    n += count(_json(block))
            else:
                n += count(str(block))
        return n
    return count(str(content))


def _image_tokens(block: Mapping[str, Any], rule: _ImageRule = None) -> int:
    """An image's tokens by its model family's published rule, its size (read from the
    header of a base64 image) and its detail; the family's largest image when the size
    is unknown (a URL)."""
    spec = block.get("image_url")
    detail = spec.get("detail") if isinstance(spec, Mapping) else block.get("detail")
    source = block.get("source")
    data = (spec.get("url") if isinstance(spec, Mapping) else spec) or block.get("url") \
        or block.get("base64") or block.get("data") or (
            source.get("data") if isinstance(source, Mapping) else None)
    size = _image_size(data) if isinstance(data, str) else None
    return _rule_tokens(rule or _DEFAULT_IMAGE_RULE, size, detail)


# -- images -----------------------------------------------------------------------------------
# OpenAI's published rules ("Images and vision", calculating costs):
# - tile models: low detail costs the base; high (and auto, counted as high here) scales
#   the image into 2048x2048, then its shortest side to 768, and adds a tile's tokens per
#   512px tile covering it;
# - patch models: one 32px patch a token, at most 1,536 patches (the image scaled down to
#   fit), times the model's multiplier.
# Other providers: Anthropic's rule (width x height / 750 after fitting the long side into
# 1,568px), and never less than OpenAI's gpt-4o tiles: a stated bound, not a published
# rule for those models (Gemini tiles large images at 258 tokens per 768px tile).
_TILES: tuple[tuple[re.Pattern[str], int, int], ...] = (
    (re.compile(r"gpt-4o-mini"), 2833, 5667),
    (re.compile(r"gpt-5(\.\d+)?-(mini|nano)"), -1, -1),  # patches, below
    (re.compile(r"gpt-5"), 70, 140),
    (re.compile(r"gpt-4\.1-(mini|nano)"), -1, -1),
    (re.compile(r"computer-use"), 65, 129),
    (re.compile(r"o4-mini"), -1, -1),
    (re.compile(r"o1|o3(?!-mini)"), 75, 150),
    (re.compile(r"gpt-4o|gpt-4\.1|gpt-4\.5|gpt-4-turbo|gpt-4-vision|chatgpt"), 85, 170),
)
_PATCH_MULTIPLIER: tuple[tuple[re.Pattern[str], float], ...] = (
    (re.compile(r"gpt-5(\.\d+)?-mini|gpt-4\.1-mini"), 1.62),
    (re.compile(r"gpt-5(\.\d+)?-nano|gpt-4\.1-nano"), 2.46),
    (re.compile(r"o4-mini"), 1.72),
)
IMAGE_MAX_PATCHES = 1536
ANTHROPIC_IMAGE_MAX_SIDE = 1568
#: an image of unknown size on a model with no published rule
IMAGE_TOKENS_UNKNOWN_FAMILY = 1600

_ImageRule: TypeAlias = "tuple[str, float, float] | None"
_DEFAULT_IMAGE_RULE = ("other", 85, 170)


@lru_cache(maxsize=1024)
def _image_rule(model: str) -> tuple[str, float, float]:
    """("tiles", base, per tile), ("patches", multiplier, 0) or ("other", 85, 170)."""
    name = model.strip().lower().rsplit("/", 1)[-1]
    if not _family(model)[1]:
        return _DEFAULT_IMAGE_RULE
    for pattern, base, tile in _TILES:
        if pattern.match(name):
            if base < 0:
                for p, multiplier in _PATCH_MULTIPLIER:
                    if p.match(name):
                        return ("patches", multiplier, 0)
            return ("tiles", base, tile)
    return ("tiles", 85, 170)  # an OpenAI model without a published rule: gpt-4o's


def _tiles(base: float, tile: float, size: tuple[int, int] | None, detail: Any) -> int:
    if detail == "low":
        return int(base)
    if size is None:
        return int(base + 8 * tile)  # the largest: 768 x 2048 after scaling
    w: float
    h: float
    w, h = size
    if max(w, h) > 2048:
        w, h = w * 2048 / max(w, h), h * 2048 / max(w, h)
    if min(w, h) > 768:
        w, h = w * 768 / min(w, h), h * 768 / min(w, h)
    return int(base + math.ceil(w / 512) * math.ceil(h / 512) * tile)


def _patches(multiplier: float, size: tuple[int, int] | None) -> int:
    if size is None:
        patches = IMAGE_MAX_PATCHES
    else:
        w, h = size
        patches = math.ceil(w / 32) * math.ceil(h / 32)
        if patches > IMAGE_MAX_PATCHES:
            r = math.sqrt(32 * 32 * IMAGE_MAX_PATCHES / (w * h))
            r *= min(math.floor(w * r / 32) / (w * r / 32), math.floor(h * r / 32) / (h * r / 32))
            patches = min(math.ceil(w * r / 32) * math.ceil(h * r / 32), IMAGE_MAX_PATCHES)
    return math.ceil(patches * multiplier)


def _rule_tokens(rule: tuple[str, float, float], size: tuple[int, int] | None,
                 detail: Any) -> int:
    kind, a, b = rule
    if kind == "tiles":
        return _tiles(a, b, size, detail)
    if kind == "patches":
        return _patches(a, size)
    if size is None:
        return IMAGE_TOKENS_UNKNOWN_FAMILY
    w: float
    h: float
    w, h = size
    if max(w, h) > ANTHROPIC_IMAGE_MAX_SIDE:
        w, h = (w * ANTHROPIC_IMAGE_MAX_SIDE / max(w, h), h * ANTHROPIC_IMAGE_MAX_SIDE / max(w, h))
    return max(math.ceil(w * h / 750), _tiles(a, b, size, "high"))


_HEADER_CHARS = 65_536  # base64 characters decoded to find an image's size


@lru_cache(maxsize=256)
def _image_size(data: str) -> tuple[int, int] | None:
    """(width, height) from the header of a base64 PNG, GIF, WebP or JPEG (a data URL or
    bare base64); None when it cannot be read (a URL, another format)."""
    if data.startswith("data:"):
        comma = data.find(",")
        if comma < 0 or ";base64" not in data[:comma]:
            return None
        data = data[comma + 1:]
    elif data.startswith(("http://", "https://")):
        return None
    head = data[:_HEADER_CHARS]
    head = head[:len(head) - len(head) % 4]
    try:
        raw = base64.b64decode(head, validate=False)
    except ValueError:
        return None
    return _header_size(raw)


def _header_size(raw: bytes) -> tuple[int, int] | None:
    import struct

    try:
        if raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR":
            w, h = struct.unpack(">II", raw[16:24])
            return w, h
        if raw[:6] in (b"GIF87a", b"GIF89a"):
            w, h = struct.unpack("<HH", raw[6:10])
            return w, h
        if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
            chunk = raw[12:16]
            if chunk == b"VP8 ":
                w, h = struct.unpack("<HH", raw[26:30])
                return w & 0x3FFF, h & 0x3FFF
            if chunk == b"VP8L":
                b = raw[21:25]
                return (1 + (((b[1] & 0x3F) << 8) | b[0]),
                        1 + (((b[3] & 0xF) << 10) | (b[2] << 2) | ((b[1] & 0xC0) >> 6)))
            if chunk == b"VP8X":
                return (1 + int.from_bytes(raw[24:27], "little"),
                        1 + int.from_bytes(raw[27:30], "little"))
        if raw[:2] == b"\xff\xd8":
            i = 2
            while i + 9 < len(raw):
                if raw[i] != 0xFF:
                    i += 1
                    continue
                marker = raw[i + 1]
                if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
                    i += 1 if marker == 0xFF else 2
                    continue
                length = struct.unpack(">H", raw[i + 2:i + 4])[0]
                if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                    h, w = struct.unpack(">HH", raw[i + 5:i + 9])
                    return w, h
                i += 2 + length
    except (struct.error, IndexError):
        return None
    return None


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


# -- OpenAI's rendering of tool schemas ------------------------------------------------------

_render_memo: dict[int, tuple[object, str]] = {}
_SKIP_KEYS = frozenset({"type", "description", "enum", "properties", "required", "items",
                        "title", "additionalProperties", "$schema", "$defs", "definitions",
                        "anyOf", "oneOf", "allOf", "$ref", "strict", "const"})


def _functions_namespace(tools: Sequence[Any]) -> str:
    """The tools as OpenAI shows them to the model: a TypeScript-like namespace."""
    parts = ["namespace functions {", ""]
    for tool in tools:
        hit = _render_memo.get(id(tool))
        if hit is not None and hit[0] is tool:
            parts.append(hit[1])
            continue
        text = _render_function(_function_schema(tool))
        with _tool_memo_lock:
            if len(_render_memo) >= _TOOL_MEMO_ENTRIES:
                _render_memo.clear()
            _render_memo[id(tool)] = (tool, text)
        parts.append(text)
    parts.append("} // namespace functions")
    return "\n".join(parts)


def _function_schema(tool: Any) -> Mapping[str, Any]:
    if isinstance(tool, Mapping):
        fn = tool.get("function")
        return fn if isinstance(fn, Mapping) else tool
    try:  # a BaseTool, function or pydantic class, as bind_tools accepts
        from langchain_core.utils.function_calling import convert_to_openai_tool

        return convert_to_openai_tool(tool)["function"]  # type: ignore[no-any-return]
    except Exception:
        return {"name": str(tool)}


def _render_function(fn: Mapping[str, Any]) -> str:
    lines = []
    description = fn.get("description")
    if description:
        lines.append(f"// {description}")
    params = fn.get("parameters")
    name = fn.get("name") or ""
    if isinstance(params, Mapping) and params.get("properties"):
        defs = params.get("$defs") or params.get("definitions") or {}
        lines.append(f"type {name} = (_: {{")
        lines.append(_render_properties(params, 0, defs))
        lines.append("}) => any;")
    else:
        lines.append(f"type {name} = () => any;")
    lines.append("")
    return "\n".join(lines)


def _render_properties(obj: Mapping[str, Any], indent: int, defs: Mapping[str, Any]) -> str:
    lines = []
    required = obj.get("required") or ()
    properties = obj.get("properties") or {}
    if not isinstance(properties, Mapping):
        return _json(properties)
    for name, param in properties.items():
        if not isinstance(param, Mapping):
            lines.append(f"{name}: {_json(param)},")
            continue
        param = _deref(param, defs)
        if param.get("description") and indent < 2:
            lines.append(f"// {param['description']}")
        # keys OpenAI does not document rendering (default, minimum, format, ...):
        # counted as comments, so the estimate stays above the real count
        for key, value in param.items():
            if key not in _SKIP_KEYS:
                lines.append(f"// {key}: {_json(value)}")
        mark = "" if name in required else "?"
        lines.append(f"{name}{mark}: {_render_type(param, indent, defs)},")
    return "\n".join(" " * indent + line for line in lines)


def _deref(param: Mapping[str, Any], defs: Mapping[str, Any]) -> Mapping[str, Any]:
    ref = param.get("$ref")
    if isinstance(ref, str) and isinstance(defs, Mapping):
        target = defs.get(ref.rsplit("/", 1)[-1])
        if isinstance(target, Mapping):
            return {**target, **{k: v for k, v in param.items() if k != "$ref"}}
    return param


def _render_type(param: Mapping[str, Any], indent: int, defs: Mapping[str, Any],
                 depth: int = 0) -> str:
    if depth > 8:
        return _json(param)
    param = _deref(param, defs)
    for key in ("anyOf", "oneOf"):
        options = param.get(key)
        if isinstance(options, list) and options:
            return " | ".join(_render_type(o, indent, defs, depth + 1) if isinstance(
                o, Mapping) else _json(o) for o in options)
    if "const" in param:
        return _json(param["const"])
    kind = param.get("type")
    if isinstance(kind, list):
        return " | ".join(_render_type({**param, "type": k}, indent, defs, depth + 1)
                          for k in kind)
    enum = param.get("enum")
    if isinstance(enum, list) and enum:
        return " | ".join(_json(v) for v in enum)
    if kind == "string":
        return "string"
    if kind in ("number", "integer"):
        return "number"
    if kind in ("boolean", "null"):
        return str(kind)
    if kind == "object" or "properties" in param:
        if not param.get("properties"):
            return "object"
        return "\n".join(["{", _render_properties(param, indent + 2, defs), "}"])
    if kind == "array":
        items = param.get("items")
        if isinstance(items, Mapping):
            return f"{_render_type(items, indent, defs, depth + 1)}[]"
        return "any[]"
    return "any" if not kind else _json(param)


def _params_tokens(params: Mapping[str, Any], count: _TextCounts) -> int:
    """What the request's parameters add to the prompt: a structured-output schema
    (``response_format`` or the Responses API's ``text.format``) and a forced tool."""
    n = 0
    fmt = params.get("response_format")
    text = params.get("text")
    if fmt is None and isinstance(text, Mapping):
        fmt = text.get("format")
    if fmt is not None:
        n += _response_format_tokens(fmt, count)
    choice = params.get("tool_choice")
    if choice == "none":
        n += 1
    elif isinstance(choice, Mapping):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, Mapping) else choice.get("name")
        n += TOOL_CHOICE_TOKENS + count(str(name or ""))
    return n


def _response_format_tokens(fmt: Any, count: _TextCounts) -> int:
    if isinstance(fmt, Mapping):
        kind = fmt.get("type")
        if kind == "text":
            return 0
        if kind == "json_schema":
            schema = fmt.get("json_schema") or {k: v for k, v in fmt.items() if k != "type"}
            return RESPONSE_FORMAT_TOKENS + count(_json(schema))
        return count(_json(fmt))
    to_schema = getattr(fmt, "model_json_schema", None)  # a pydantic class
    if callable(to_schema):
        try:
            return RESPONSE_FORMAT_TOKENS + count(_json(to_schema()))
        except Exception:
            pass
    return RESPONSE_FORMAT_TOKENS + count(_json(fmt) if not isinstance(fmt, type) else
                                          repr(getattr(fmt, "__annotations__", fmt)))


# -- what a request could bill besides text tokens ----------------------------------------------

@dataclass(frozen=True, slots=True)
class RequestFeatures:
    """The billing dimensions a request could incur besides plain text tokens, read from
    its messages and parameters: the worst case prices its prompt and output with them."""

    cache_write: str | None = None  # "5m" or "1h": blocks are marked for caching
    audio_input: bool = False
    image_input: bool = False
    audio_output: bool = False
    service_tier: str | None = None


_PLAIN = RequestFeatures()
# the request parameters _params_tokens and _request_features read
_PARAM_KEYS = frozenset({"response_format", "text", "tool_choice", "cache_control",
                         "modalities", "audio", "service_tier"})
_AUDIO_BLOCKS = frozenset({"input_audio", "audio"})


def _merge_ttl(a: str | None, b: str | None) -> str | None:
    """The dearer of two cache-write markers (``"1h"`` over ``"5m"`` over none)."""
    if a == "1h" or b == "1h":
        return "1h"
    return a or b


def _marker_ttl(marker: Any) -> str | None:
    if isinstance(marker, Mapping):
        return "1h" if marker.get("ttl") == "1h" else "5m"
    return None


def _message_features(message: Any) -> tuple[str | None, bool, bool]:
    """(cache-write marker, audio input, image input) of one message."""
    ttl: str | None = None
    audio = image = False
    if isinstance(message, str):
        return ttl, audio, image
    if isinstance(message, tuple):
        content = message[1] if len(message) == 2 else None
    else:
        content = _field(message, "content")
        if isinstance(message, Mapping):
            if "cache_control" in message:
                ttl = _marker_ttl(message["cache_control"])
        else:
            extra = getattr(message, "additional_kwargs", None)
            if isinstance(extra, Mapping) and "cache_control" in extra:
                ttl = _marker_ttl(extra["cache_control"])
    if isinstance(content, list | tuple):
        for block in content:
            if isinstance(block, Mapping):
                if "cache_control" in block:
                    ttl = _merge_ttl(ttl, _marker_ttl(block["cache_control"]))
                kind = block.get("type")
                if kind in _IMAGE_BLOCKS:
                    image = True
                elif kind in _AUDIO_BLOCKS:
                    audio = True
    return ttl, audio, image


def request_features(messages: Iterable[Any], tools: Sequence[Any] | None = None,
                     params: Mapping[str, Any] | None = None) -> RequestFeatures:
    """Cache markers (Anthropic ``cache_control``, with its ``ttl``), audio and image
    inputs, an audio answer (``modalities``/``audio``), the requested ``service_tier``."""
    ttl: str | None = None
    audio = image = False
    for message in messages:
        m_ttl, m_audio, m_image = _message_features(message)
        ttl = _merge_ttl(ttl, m_ttl)
        audio = audio or m_audio
        image = image or m_image
    return _request_features(ttl, audio, image, tools, params)


def _request_features(ttl: str | None, audio: bool, image: bool,
                      tools: Sequence[Any] | None, params: Mapping[str, Any] | None
                      ) -> RequestFeatures:
    """The request's features from its messages' and its tools' and parameters'."""
    for tool in tools or ():
        if isinstance(tool, Mapping) and "cache_control" in tool:
            ttl = _merge_ttl(ttl, _marker_ttl(tool["cache_control"]))
    p = params or {}
    if "cache_control" in p:
        ttl = _merge_ttl(ttl, _marker_ttl(p["cache_control"]))
    modalities = p.get("modalities")
    audio_out = bool(p.get("audio")) or (isinstance(modalities, list | tuple)
                                         and "audio" in modalities)
    tier = p.get("service_tier")
    tier = tier if isinstance(tier, str) and tier not in ("auto", "default") else None
    if ttl is None and not audio and not image and not audio_out and tier is None:
        return _PLAIN
    return RequestFeatures(cache_write=ttl, audio_input=audio, image_input=image,
                           audio_output=audio_out, service_tier=tier)
