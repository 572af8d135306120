"""A local Anthropic-compatible Messages API server that bills like Anthropic.

It speaks what the ``anthropic`` client (and so ``ChatAnthropic``) parses: ``message``
JSON, and SSE streams (``message_start``, ``content_block_start`` / ``_delta`` /
``_stop`` for text, ``thinking`` and ``tool_use`` blocks, ``message_delta`` with the
usage, ``message_stop``), Anthropic's error objects (429 ``rate_limit_error``, 529
``overloaded_error``), and ``POST /v1/messages/count_tokens``. Standard library only.

    with FakeAnthropicServer([AnthropicReply("hi")]) as server:
        llm = ChatAnthropic(model="claude-sonnet-4-5", base_url=server.base_url,
                            api_key="test")
        llm.invoke("hello")
        assert server.billed_nano() == ...

**What Anthropic would bill.** :attr:`FakeAnthropicServer.billed` holds one
:class:`AnthropicBill` per request the server accepted, recorded on acceptance (before
any delay or byte), so an answer the client gave up on is billed too. The server counts
as Anthropic bills, not as any client estimates:

- the prompt is ``ceil(o200k tokens x token_ratio)`` (Claude's tokenizer is not
  public; ``token_ratio`` says how much more it counts than o200k, see
  ``docs/anthropic.md``), plus the hidden tool-use system prompt when tools are sent
  (346 tokens on Sonnet/Opus 4.x and 3.7, :data:`TOOL_SYSTEM_TOKENS`);
- blocks marked ``cache_control`` are written to a prompt cache (by their ``ttl``:
  5 minutes or 1 hour) the first time and read the next times: the usage reports
  ``cache_creation_input_tokens``, ``cache_read_input_tokens`` and the per-duration
  ``cache_creation: {ephemeral_5m_input_tokens, ephemeral_1h_input_tokens}``;
- thinking is output (it counts toward ``max_tokens``, which the answer never passes:
  ``stop_reason: "max_tokens"``);
- a prompt above 200k tokens is refused (400) unless the request carries the 1M-context
  beta (``anthropic-beta: context-1m-...``), and is then billed at the long-context
  rates for the whole request;
- :meth:`FakeAnthropicServer.billed_nano` prices the bills at Anthropic's list prices
  (:data:`LIST_PRICES`, per million tokens, from Anthropic's pricing page), not at the
  guard's price table, so a test compares the guard's table with the list.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal
from typing import Any

from .openai_server import ServedInThread, _Handler, _HTTPServer, count_text

__all__ = ["LIST_PRICES", "TOOL_SYSTEM_TOKENS", "AnthropicBill", "AnthropicReply",
           "FakeAnthropicServer"]

# Anthropic's list prices, USD per million tokens: input, 5-minute cache write, 1-hour
# cache write, cache read, output; and the long-context rates (prompt above 200k tokens
# with the 1M-context beta: input and cache rates x2, output x1.5) where the model has
# them. Anthropic's pricing page (platform.claude.com/docs/en/about-claude/pricing).
_M = Decimal(10**6)
LIST_PRICES: dict[str, dict[str, Decimal]] = {
    name: {k: Decimal(v) / _M for k, v in rates.items()}
    for name, rates in {
        "claude-opus-4-5": dict(i="5", w5="6.25", w1="10", r="0.50", o="25"),
        "claude-opus-4-1": dict(i="15", w5="18.75", w1="30", r="1.50", o="75"),
        "claude-opus-4": dict(i="15", w5="18.75", w1="30", r="1.50", o="75"),
        "claude-sonnet-4-5": dict(i="3", w5="3.75", w1="6", r="0.30", o="15",
                                  li="6", lw5="7.50", lw1="12", lr="0.60", lo="22.50"),
        "claude-sonnet-4": dict(i="3", w5="3.75", w1="6", r="0.30", o="15",
                                li="6", lw5="7.50", lw1="12", lr="0.60", lo="22.50"),
        "claude-3-7-sonnet": dict(i="3", w5="3.75", w1="6", r="0.30", o="15"),
        "claude-haiku-4-5": dict(i="1", w5="1.25", w1="2", r="0.10", o="5"),
        "claude-3-5-haiku": dict(i="0.80", w5="1", w1="1.6", r="0.08", o="4"),
        "claude-3-opus": dict(i="15", w5="18.75", w1="30", r="1.50", o="75"),
        "claude-3-haiku": dict(i="0.25", w5="0.30", w1="0.50", r="0.03", o="1.25"),
    }.items()
}
LONG_CONTEXT_THRESHOLD = 200_000
LONG_CONTEXT_BETA = "context-1m"

#: Anthropic's tool-use system prompt, by model family: (tool_choice auto/none,
#: any/tool) tokens, from Anthropic's tool-use pricing table.
TOOL_SYSTEM_TOKENS: tuple[tuple[str, tuple[int, int]], ...] = (
    ("claude-3-opus", (530, 281)),
    ("claude-3-sonnet", (159, 235)),
    ("claude-3-haiku", (264, 340)),
    ("claude-3-5-haiku", (264, 340)),
    ("claude-", (346, 313)),  # Opus 4.x, Sonnet 4.x, Haiku 4.5, Sonnet 3.7 / 3.5
)


def _list_price(model: str) -> dict[str, Decimal]:
    """The list prices of ``model`` (dated names, ``-latest``: the family's)."""
    name = model.lower()
    for family in sorted(LIST_PRICES, key=len, reverse=True):
        if name == family or name.startswith(family + "-"):
            return LIST_PRICES[family]
    raise KeyError(f"no Anthropic list price for {model!r}; add it to LIST_PRICES")


def _tool_system(model: str, forced: bool) -> int:
    for prefix, (auto, forced_n) in TOOL_SYSTEM_TOKENS:
        if model.lower().startswith(prefix):
            return forced_n if forced else auto
    return 0


@dataclass
class AnthropicReply:
    """One scripted answer of :class:`FakeAnthropicServer`.

    Attributes:
        text: The answer text (truncated to ``max_tokens`` as the server counts).
        thinking: A thinking block's text before the answer (billed as output; the
            request must enable ``thinking``, else it is not sent nor billed).
        tool_uses: ``{"name", "input": dict, "id": optional}`` each.
        input_tokens, cache_read, cache_write_5m, cache_write_1h: the usage to report
            and bill instead of the server's own count (``None``: counted).
        output_tokens: reported and billed output (``None``: counted).
        final_usage: ``"full"``: ``message_delta`` carries every count (the API since
            2025); ``"output_only"``: only ``output_tokens`` (older compatible servers).
        by_ttl: report the per-duration ``cache_creation`` breakdown.
        status: HTTP status; anything but 200 answers Anthropic's error object.
        delay_s, chunk_delay_s: seconds before the answer / before each streamed event.
        model: the response's model (``None``: the request's).
    """

    text: str = ""
    thinking: str = ""
    tool_uses: list[dict[str, Any]] = field(default_factory=list)
    input_tokens: int | None = None
    cache_read: int | None = None
    cache_write_5m: int | None = None
    cache_write_1h: int | None = None
    output_tokens: int | None = None
    final_usage: str = "full"
    by_ttl: bool = True
    status: int = 200
    delay_s: float = 0.0
    chunk_delay_s: float = 0.0
    model: str | None = None

    def __post_init__(self) -> None:
        if self.final_usage not in ("full", "output_only"):
            raise ValueError("final_usage is 'full' or 'output_only'")
        if not 100 <= self.status <= 599:
            raise ValueError(f"status must be an HTTP status code, got {self.status!r}")


@dataclass(frozen=True)
class AnthropicBill:
    """What Anthropic bills for one request (its own convention: ``input_tokens`` are
    the uncached prompt tokens, cache reads and writes are beside them)."""

    model: str
    input_tokens: int
    output_tokens: int
    cache_read: int = 0
    cache_write_5m: int = 0
    cache_write_1h: int = 0
    thinking_tokens: int = 0
    long_context: bool = False
    stream: bool = False

    @property
    def prompt_tokens(self) -> int:
        return self.input_tokens + self.cache_read + self.cache_write_5m + self.cache_write_1h

    def usage(self) -> Any:
        """The bill as an :class:`agent_guard.engine.usage.Usage` (inclusive convention)."""
        from ..engine.usage import Usage

        return Usage(input_tokens=self.prompt_tokens, output_tokens=self.output_tokens,
                     cache_read_tokens=self.cache_read,
                     cache_creation_tokens=self.cache_write_5m + self.cache_write_1h,
                     cache_creation_1h_tokens=self.cache_write_1h,
                     reasoning_tokens=self.thinking_tokens)

    def cost_usd(self) -> Decimal:
        """The bill at Anthropic's list prices."""
        p = _list_price(self.model)
        long = self.long_context and "li" in p
        pre = "l" if long else ""
        return (self.input_tokens * p[pre + "i"] + self.cache_write_5m * p[pre + "w5"]
                + self.cache_write_1h * p[pre + "w1"] + self.cache_read * p[pre + "r"]
                + self.output_tokens * p[pre + "o"])

    def cost_nano(self) -> int:
        return int((self.cost_usd() * 10**9).to_integral_value(rounding=ROUND_CEILING))


AnthropicScript = Sequence[AnthropicReply | str] | Callable[[dict[str, Any]], AnthropicReply | str]


class FakeAnthropicServer(ServedInThread):
    """Serves Anthropic's Messages API on ``127.0.0.1`` from a script (a list answered in
    order, the last one repeating; or a function of the request body).

    Args:
        replies: The script.
        token_ratio: Claude tokens per o200k token for the text the server counts.
        chunk_chars: Characters per streamed text, thinking or JSON delta.
    """

    def __init__(self, replies: AnthropicScript = (), *, token_ratio: float = 1.2,
                 chunk_chars: int = 8) -> None:
        self._replies = _script(replies)
        self.token_ratio = Decimal(str(token_ratio))
        self.chunk_chars = max(1, int(chunk_chars))
        self._requests: list[dict[str, Any]] = []
        self._headers: list[dict[str, str]] = []
        self._billed: list[AnthropicBill] = []
        self._cache: dict[str, str] = {}  # prefix digest -> ttl
        self._cursor = 0
        self._lock = threading.Lock()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.count_tokens_calls = 0

    # -- lifecycle ------------------------------------------------------------------------

    def _handler_class(self) -> type[_Handler]:
        return _AnthropicHandler

    def _thread_name(self) -> str:
        return "fake-anthropic-server"

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` (the ``anthropic`` client adds ``/v1/messages``)."""
        if self._httpd is None:
            raise RuntimeError("the server is not running; use it as a context manager")
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    # -- script and records -------------------------------------------------------------

    @property
    def replies(self) -> AnthropicScript:
        return self._replies

    @replies.setter
    def replies(self, replies: AnthropicScript) -> None:
        with self._lock:
            self._replies = _script(replies)
            self._cursor = 0

    @property
    def requests(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._requests)

    @property
    def billed(self) -> list[AnthropicBill]:
        with self._lock:
            return list(self._billed)

    def record_billed(self, bill: AnthropicBill) -> AnthropicBill:
        """Record that Anthropic bills one request (once per accepted request, before
        anything is sent)."""
        with self._lock:
            self._billed.append(bill)
        return bill

    def wait_billed(self, count: int, timeout: float = 5.0) -> list[AnthropicBill]:
        deadline = time.monotonic() + timeout
        while True:
            bills = self.billed
            if len(bills) >= count:
                return bills
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{len(bills)} requests billed, expected {count}")
            time.sleep(0.005)

    def billed_nano(self, prices: Any = None) -> int:
        """The billed total in nano-USD at Anthropic's list prices (``prices``: a
        :class:`~agent_guard.pricing.PriceBook` to price with instead)."""
        if prices is None:
            return sum(bill.cost_nano() for bill in self.billed)
        return sum(int(prices.cost(b.model, b.usage()).total_nano) for b in self.billed)

    def _next_reply(self, body: dict[str, Any], headers: dict[str, str]) -> AnthropicReply:
        with self._lock:
            self._requests.append(body)
            self._headers.append(headers)
            index, self._cursor = self._cursor, self._cursor + 1
            script = self._replies
        if callable(script):
            reply = script(body)
        elif script:
            reply = script[min(index, len(script) - 1)]
        else:
            reply = "ok"
        return AnthropicReply(reply) if isinstance(reply, str) else reply

    # -- counting as Anthropic bills -------------------------------------------------------

    def count(self, text: str) -> int:
        """Claude tokens of ``text`` as this server counts them."""
        n = count_text(text, "gpt-4o")
        return int((n * self.token_ratio).to_integral_value(rounding=ROUND_CEILING))

    def prompt_segments(self, body: Mapping[str, Any]) -> list[tuple[int, str | None, str]]:
        """The prompt in order (tools, system, messages) as (tokens, ttl of a
        ``cache_control`` that ends here or None, the part's JSON)."""
        out: list[tuple[int, str | None, str]] = []

        def add(block: Any, text: str, framing: int) -> None:
            cc = block.get("cache_control") if isinstance(block, Mapping) else None
            ttl = (cc.get("ttl") or "5m") if isinstance(cc, Mapping) else None
            ident = json.dumps(block, sort_keys=True, default=str)
            out.append((self.count(text) + framing, ttl, ident))

        for tool in body.get("tools") or ():
            add(tool, json.dumps({k: v for k, v in tool.items() if k != "cache_control"}), 4)
        system = body.get("system")
        for block in ([{"type": "text", "text": system}] if isinstance(system, str)
                      else system or ()):
            add(block, _block_text(block), 3)
        for message in body.get("messages") or ():
            content = message.get("content")
            blocks = ([{"type": "text", "text": content}] if isinstance(content, str)
                      else content or ())
            out.append((4, None, str(message.get("role"))))  # role framing
            for block in blocks:
                add(block, _block_text(block), 0)
        out.append((3, None, ""))  # the assistant turn's priming
        return out

    def prompt_tokens(self, body: Mapping[str, Any]) -> int:
        """Every prompt token of a request (cached or not), the tool-use system prompt
        included: what ``/v1/messages/count_tokens`` answers."""
        tools = body.get("tools") or []
        forced = (body.get("tool_choice") or {}).get("type") in ("any", "tool")
        hidden = _tool_system(str(body.get("model") or ""), forced) if tools else 0
        return sum(n for n, _, _ in self.prompt_segments(body)) + hidden

    def _cached_usage(self, body: Mapping[str, Any]) -> tuple[int, int, int, int]:
        """(uncached input, cache read, 5m writes, 1h writes) of a request's messages:
        the longest cached prefix ending at a marker is read, what follows up to the last
        marker is written (each part at the ttl of the marker that ends it)."""
        total, ends = 0, []
        digest = hashlib.sha256()
        for n, mark, ident in self.prompt_segments(body):
            total += n
            digest.update(ident.encode() + b"\x00")
            if mark is not None:
                ends.append((total, mark, digest.hexdigest()))
        read = w5 = w1 = 0
        with self._lock:
            for end, _, key in ends:
                if key in self._cache:
                    read = end
            start = read
            for end, mark, key in ends:
                if end <= read:
                    continue
                if mark == "1h":
                    w1 += end - start
                else:
                    w5 += end - start
                start = end
                self._cache[key] = mark
        return total - read - w5 - w1, read, w5, w1


def _block_text(block: Any) -> str:
    if isinstance(block, str):
        return block
    if not isinstance(block, Mapping):
        return json.dumps(block, default=str)
    kind = block.get("type")
    if kind == "text":
        return str(block.get("text") or "")
    if kind == "thinking":
        return str(block.get("thinking") or "")
    if kind == "tool_use":
        return str(block.get("name") or "") + json.dumps(block.get("input") or {})
    if kind == "tool_result":
        content = block.get("content")
        if isinstance(content, list):
            return " ".join(_block_text(b) for b in content)
        return str(content or "")
    return json.dumps({k: v for k, v in block.items() if k != "cache_control"}, default=str)


def _script(replies: Any) -> AnthropicScript:
    if isinstance(replies, AnthropicReply | str):
        return [replies]
    return replies if callable(replies) else list(replies)


_ERRORS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
           404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
           500: "api_error", 529: "overloaded_error"}


def _error(status: int, message: str | None = None) -> dict[str, Any]:
    kind = _ERRORS.get(status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": message or
                                       f"Scripted {kind} ({status})."}}


class _AnthropicHandler(_Handler):
    server_version = "fake-anthropic/1.0"

    @property
    def owner(self) -> FakeAnthropicServer:  # type: ignore[override]
        return self.server.owner  # type: ignore[return-value]

    def do_GET(self) -> None:
        self._not_found()

    def do_POST(self) -> None:
        raw = self._read_body()
        if raw is None:
            return
        route = self._route()
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = None
        if route not in ("/messages", "/messages/count_tokens") or not isinstance(body, dict):
            self._send_json(404 if isinstance(body, dict) else 400,
                            _error(404 if isinstance(body, dict) else 400))
            return
        server = self.owner
        model = str(body.get("model") or "")
        betas = ",".join([self.headers.get("anthropic-beta", ""),
                          ",".join(body.get("betas") or [])])
        if route == "/messages/count_tokens":
            server.count_tokens_calls += 1
            self._send_json(200, {"input_tokens": server.prompt_tokens(body)})
            return
        tools = body.get("tools") or []
        forced = (body.get("tool_choice") or {}).get("type") in ("any", "tool")
        hidden = _tool_system(model, forced) if tools else 0
        max_tokens = body.get("max_tokens")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            self._send_json(400, _error(400, "max_tokens: Field required"))
            return
        thinking = body.get("thinking") or {}
        budget = thinking.get("budget_tokens") if thinking.get("type") == "enabled" else None
        if budget is not None and (budget < 1024 or budget >= max_tokens):
            self._send_json(400, _error(400, "`max_tokens` must be greater than "
                                             "`thinking.budget_tokens`" if budget >= 1024
                                        else "thinking.budget_tokens: must be >= 1024"))
            return
        reply = server._next_reply(body, dict(self.headers))
        if reply.status != 200:
            if reply.delay_s:
                time.sleep(reply.delay_s)
            headers = {"retry-after": "0", "retry-after-ms": "10"} if reply.status in (
                429, 529) else {}
            self._send_json(reply.status, _error(reply.status), headers)
            return
        uncached, read, w5, w1 = server._cached_usage(body)
        uncached += hidden
        prompt = uncached + read + w5 + w1
        long_context = prompt > LONG_CONTEXT_THRESHOLD
        if long_context and LONG_CONTEXT_BETA not in betas:
            self._send_json(400, _error(400, f"prompt is too long: {prompt} tokens > "
                                             f"{LONG_CONTEXT_THRESHOLD} maximum"))
            return
        uncached = reply.input_tokens if reply.input_tokens is not None else uncached
        read = reply.cache_read if reply.cache_read is not None else read
        w5 = reply.cache_write_5m if reply.cache_write_5m is not None else w5
        w1 = reply.cache_write_1h if reply.cache_write_1h is not None else w1
        # the answer: thinking (when enabled), text and tool calls, within max_tokens
        room = max_tokens
        thought = reply.thinking if budget is not None else ""
        thought = _truncate(server, thought, min(room, budget or room))
        thinking_tokens = server.count(thought) if thought else 0
        room -= thinking_tokens
        text = _truncate(server, reply.text, room)
        stop = "max_tokens" if text != reply.text else "end_turn"
        room -= server.count(text) if text else 0
        uses = [dict(u, id=u.get("id") or f"toolu_{uuid.uuid4().hex[:20]}")
                for u in reply.tool_uses] if stop == "end_turn" else []
        use_tokens = sum(server.count(_block_text({"type": "tool_use", **u})) for u in uses)
        if uses and use_tokens <= room:
            stop = "tool_use"
        elif uses:
            uses, stop = [], "max_tokens"
        output = thinking_tokens + (server.count(text) if text else 0) + (
            use_tokens if uses else 0)
        output = reply.output_tokens if reply.output_tokens is not None else output
        response_model = reply.model or model
        server.record_billed(AnthropicBill(
            model=response_model, input_tokens=uncached, output_tokens=output, cache_read=read,
            cache_write_5m=w5, cache_write_1h=w1, thinking_tokens=min(thinking_tokens, output),
            long_context=long_context, stream=bool(body.get("stream"))))
        usage: dict[str, Any] = {
            "input_tokens": uncached, "output_tokens": output,
            "cache_creation_input_tokens": w5 + w1, "cache_read_input_tokens": read,
        }
        if reply.by_ttl:
            usage["cache_creation"] = {"ephemeral_5m_input_tokens": w5,
                                       "ephemeral_1h_input_tokens": w1}
        if thinking_tokens:
            usage["output_tokens_details"] = {"thinking_tokens": thinking_tokens}
        if reply.delay_s:
            time.sleep(reply.delay_s)
        content: list[dict[str, Any]] = []
        if thought:
            content.append({"type": "thinking", "thinking": thought, "signature": "sig"})
        if text or not (thought or uses):
            content.append({"type": "text", "text": text})
        content += [{"type": "tool_use", "id": u["id"], "name": u["name"],
                     "input": u.get("input") or {}} for u in uses]
        message = {"id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message",
                   "role": "assistant", "model": response_model, "content": content,
                   "stop_reason": stop, "stop_sequence": None, "usage": usage}
        if body.get("stream"):
            self._stream(message, reply)
        else:
            self._send_json(200, message)

    def _stream(  # type: ignore[override]  # Anthropic's events, not OpenAI's chunks
            self, message: dict[str, Any], reply: AnthropicReply) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        sent = [0]

        def event(kind: str, **data: Any) -> None:
            if sent[0] and reply.chunk_delay_s > 0:
                time.sleep(reply.chunk_delay_s)
            sent[0] += 1
            payload = f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(payload), payload))

        usage = message["usage"]
        start_usage = {**usage, "output_tokens": 1}
        event("message_start", message={**message, "content": [], "stop_reason": None,
                                        "usage": start_usage})
        step = self.owner.chunk_chars
        for index, block in enumerate(message["content"]):
            kind = block["type"]
            if kind == "text":
                event("content_block_start", index=index, content_block={"type": "text",
                                                                         "text": ""})
                for i in range(0, len(block["text"]), step):
                    event("content_block_delta", index=index, delta={
                        "type": "text_delta", "text": block["text"][i:i + step]})
            elif kind == "thinking":
                event("content_block_start", index=index, content_block={
                    "type": "thinking", "thinking": "", "signature": ""})
                for i in range(0, len(block["thinking"]), step):
                    event("content_block_delta", index=index, delta={
                        "type": "thinking_delta", "thinking": block["thinking"][i:i + step]})
                event("content_block_delta", index=index, delta={
                    "type": "signature_delta", "signature": block["signature"]})
            else:
                event("content_block_start", index=index, content_block={
                    **block, "input": {}})
                args = json.dumps(block["input"])
                for i in range(0, len(args), step):
                    event("content_block_delta", index=index, delta={
                        "type": "input_json_delta", "partial_json": args[i:i + step]})
            event("content_block_stop", index=index)
        final = usage if reply.final_usage == "full" else {
            "output_tokens": usage["output_tokens"]}
        event("message_delta", delta={"stop_reason": message["stop_reason"],
                                      "stop_sequence": None}, usage=final)
        event("message_stop")
        self.wfile.write(b"0\r\n\r\n")


def _truncate(server: FakeAnthropicServer, text: str, max_tokens: int) -> str:
    """The longest prefix of ``text`` the server counts at most ``max_tokens`` tokens."""
    if not text or server.count(text) <= max_tokens:
        return text
    lo, hi = 0, len(text)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if server.count(text[:mid]) <= max_tokens:
            lo = mid
        else:
            hi = mid
    return text[:lo]

