"""A local OpenAI-compatible chat-completions server for offline tests.

It speaks the wire format the ``openai`` client (and so ``ChatOpenAI``) parses:
``chat.completion`` JSON, and SSE streams of ``chat.completion.chunk`` deltas
whose usage chunk is sent only when the request asks for it with
``stream_options.include_usage``, as OpenAI does; and the Responses API
(``POST /v1/responses``, JSON and its SSE events). Standard library only.

    with FakeOpenAIServer([FakeReply("hi", prompt_tokens=12)]) as server:
        llm = ChatOpenAI(model="gpt-4o", base_url=server.base_url, api_key="test")
        llm.invoke("hello")
        assert server.requests[0]["messages"][0]["content"] == "hello"

Token counts a reply leaves as ``None`` are computed from the request with
:class:`agent_guard.tokens.TokenCounter` (tiktoken) when it is importable, and
otherwise with a heuristic of 4 characters per token.

**What a real provider would bill.** :attr:`FakeOpenAIServer.billed` holds one
:class:`BilledRequest` per request the server accepted (status 200) and so
generated an answer for, in full: hidden reasoning tokens included, and also when
the client stopped waiting (a client timeout, a disconnect, a cancelled task, a
stream closed early), since a provider that has started generating bills the
answer whatever the client does. It is recorded when the request is accepted,
before any delay or byte, so a test may read it as soon as the client gave up.
Error replies (4xx/5xx) are not billed. :meth:`FakeOpenAIServer.billed_nano`
prices the total with a :class:`~agent_guard.pricing.PriceBook`, so a test can
assert ``charged >= billed``. Every endpoint records through the single
:meth:`FakeOpenAIServer.record_billed`.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import urlsplit

__all__ = ["BilledRequest", "FakeOpenAIServer", "FakeReply", "ReplyScript"]


@dataclass
class FakeReply:
    """One scripted answer of :class:`FakeOpenAIServer`.

    Attributes:
        content: The answer text.
        tool_calls: ``{"name": ..., "arguments": dict or JSON string, "id": optional}``
            each (LangChain's ``{"name", "args", "id"}`` is accepted too). A missing
            id becomes ``call_<random>``.
        prompt_tokens: Reported prompt tokens; ``None`` counts the request's
            messages and tools.
        completion_tokens: Reported completion tokens; ``None`` counts the content
            and tool calls, plus ``reasoning_tokens`` (OpenAI includes them).
        cached_tokens: ``usage.prompt_tokens_details.cached_tokens``.
        reasoning_tokens: ``usage.completion_tokens_details.reasoning_tokens``: hidden
            reasoning, billed as output and never sent (the Responses API's
            ``output_tokens_details.reasoning_tokens``).
        reasoning_summary: The Responses API's reasoning summary text (a
            ``reasoning`` output item, streamed as ``response.reasoning_summary_text``
            deltas); it is part of ``reasoning_tokens`` (raised to cover it).
        model: Response model name; ``None`` answers the request's model plus the
            server's ``response_model_suffix`` (unless it already ends in a date).
        status: HTTP status. Anything but 200 sends ``error_body`` (default: an
            OpenAI error object for that status); a 429 also carries
            ``retry-after: 1`` and ``retry-after-ms: 10`` (the ``openai`` client
            prefers the latter, so a retrying client waits 10 ms).
        error_body: The JSON body of an error reply, ``{"error": {...}}``.
        headers: Extra response headers (they override the defaults above).
        delay_s: Seconds to wait before answering (time to first byte). The
            request is billed before the wait, so a client that times out during it
            has still been billed (see :attr:`FakeOpenAIServer.billed`).
        chunk_delay_s: Seconds to wait before each streamed chunk after the first,
            for tests that cut a stream (``break``, ``aclose()``, a timeout).
        finish_reason: ``None`` means ``"tool_calls"`` if there are tool calls,
            else ``"stop"``.

    The server ignores ``max_tokens``: a reply is as long as scripted, which is
    what a test of an output cap enforced by the client side needs.
    """

    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    reasoning_summary: str = ""
    model: str | None = None
    status: int = 200
    error_body: Mapping[str, Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    chunk_delay_s: float = 0.0
    finish_reason: str | None = None

    def __post_init__(self) -> None:
        if not 100 <= self.status <= 599:
            raise ValueError(f"status must be an HTTP status code, got {self.status!r}")
        for tc in self.tool_calls:
            if not isinstance(tc, Mapping) or not isinstance(tc.get("name"), str):
                raise ValueError(f"each tool call needs a 'name' string, got {tc!r}")
            args = tc.get("arguments", tc.get("args", {}))
            if not isinstance(args, str | Mapping):
                raise ValueError(f"tool call arguments must be a dict or a JSON string: {tc!r}")
        for name in ("delay_s", "chunk_delay_s"):
            delay = getattr(self, name)
            if not isinstance(delay, int | float) or not math.isfinite(delay) or delay < 0:
                raise ValueError(f"{name} must be a finite number of seconds >= 0, got {delay!r}")
        for name in ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")


@dataclass(frozen=True)
class BilledRequest:
    """What a provider bills for one request it generated an answer for.

    The OpenAI convention: ``prompt_tokens`` includes ``cached_tokens`` and
    ``completion_tokens`` includes ``reasoning_tokens`` (hidden reasoning is billed
    as output although it is never sent).

    Attributes:
        model: The model the response names (the one a price is looked up for).
        prompt_tokens: Every prompt token, cached ones included.
        completion_tokens: Every generated token, reasoning included, for all choices.
        cached_tokens: Prompt tokens read from the provider's prompt cache.
        reasoning_tokens: Hidden reasoning tokens (part of ``completion_tokens``).
        endpoint: ``"chat.completions"`` or another endpoint's name.
        stream: Whether the answer was requested as a stream.
    """

    model: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    endpoint: str = "chat.completions"
    stream: bool = False

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.cached_tokens > self.prompt_tokens:
            raise ValueError("cached_tokens are part of prompt_tokens; they cannot exceed it")
        if self.reasoning_tokens > self.completion_tokens:
            raise ValueError("reasoning_tokens are part of completion_tokens; "
                             "they cannot exceed it")

    def usage(self) -> Any:
        """The billed tokens as an :class:`agent_guard.engine.usage.Usage`."""
        from ..engine.usage import Usage

        return Usage(input_tokens=self.prompt_tokens, output_tokens=self.completion_tokens,
                     cache_read_tokens=self.cached_tokens,
                     reasoning_tokens=self.reasoning_tokens)


#: A list of replies used in order (the last one repeats once the list is
#: exhausted; a ``str`` is ``FakeReply(content=...)``), or a function of the
#: parsed request body.
ReplyScript = Sequence[FakeReply | str] | Callable[[dict[str, Any]], FakeReply | str]


class ServedInThread:
    """Start, stop and ``with`` of a fake provider served by ``_HTTPServer`` on loopback in
    a daemon thread: the part of its life every fake provider shares."""

    _port = 0
    _httpd: _HTTPServer | None
    _thread: threading.Thread | None

    def start(self) -> Self:
        """Bind and serve in a daemon thread; returns ``self``."""
        if self._httpd is not None:
            raise RuntimeError("the server is already running")
        self._httpd = _HTTPServer(("127.0.0.1", self._port), self._handler_class(),
                                  self)  # type: ignore[arg-type]
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,),
                                        name=self._thread_name(), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close open connections (idempotent)."""
        httpd, thread = self._httpd, self._thread
        self._httpd = self._thread = None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.close_connections()
        httpd.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        raise NotImplementedError

    def _thread_name(self) -> str:
        return type(self).__name__


class FakeOpenAIServer(ServedInThread):
    """Serves the OpenAI chat-completions API on ``127.0.0.1`` from a script.

    ``replies`` is a list answered in order, **the last one repeating** once the
    list is exhausted (an empty list answers ``"ok"``), or a function
    ``(request_body) -> FakeReply`` for dynamic scripts. Every chat-completion
    request body is recorded in :attr:`requests`.

    Routes: ``POST /v1/chat/completions`` (JSON, or SSE with ``"stream": true``),
    ``POST /v1/responses`` (the Responses API, for ``ChatOpenAI(use_responses_api=True)``:
    a ``response`` object, or its SSE events from ``response.created`` to
    ``response.completed``, which carries the usage with
    ``output_tokens_details.reasoning_tokens``; a reply with hidden reasoning or a
    ``reasoning_summary`` answers a ``reasoning`` item first), ``GET /v1/models``;
    anything else answers 404 with an OpenAI error object.
    Use it as a context manager, or call :meth:`start` and :meth:`stop`.

    Args:
        replies: The script.
        response_model_suffix: Appended to the request's model for the response's
            model name, as OpenAI answers ``gpt-4o`` with a dated snapshot.
        chunk_chars: Characters per streamed content or arguments delta.
        port: Port to bind, 0 for an ephemeral one.
    """

    #: Refuse (400, OpenAI's error) a history whose assistant tool calls are not each
    #: answered by a following ``tool`` message, or with a ``tool`` message answering no
    #: call, as OpenAI does. Set to ``False`` on an instance to accept any history.
    check_tool_history: bool = True

    def __init__(
        self,
        replies: ReplyScript = (),
        *,
        response_model_suffix: str = "-2024-08-06",
        chunk_chars: int = 8,
        port: int = 0,
    ) -> None:
        self._replies: ReplyScript = _script(replies)
        self.response_model_suffix = response_model_suffix
        self.chunk_chars = max(1, int(chunk_chars))
        self._port = port
        self._requests: list[dict[str, Any]] = []
        self._billed: list[BilledRequest] = []
        self._cursor = 0
        self._lock = threading.Lock()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        return _Handler

    def _thread_name(self) -> str:
        return f"fake-openai-server:{self.port}"

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("the server is not running; use it as a context manager")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``, for ``ChatOpenAI(base_url=...)``."""
        return f"http://127.0.0.1:{self.port}/v1"

    # -- script and records -----------------------------------------------------------

    @property
    def replies(self) -> ReplyScript:
        """The script. Setting it replaces the script: the next request gets its first reply."""
        return self._replies

    @replies.setter
    def replies(self, replies: ReplyScript) -> None:
        with self._lock:
            self._replies = _script(replies)
            self._cursor = 0

    @property
    def requests(self) -> list[dict[str, Any]]:
        """A copy of the parsed JSON bodies of the chat-completion requests, in order."""
        with self._lock:
            return list(self._requests)

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self._requests)

    def reset(self) -> None:
        """Forget the recorded requests and bills and start the script over."""
        with self._lock:
            self._requests.clear()
            self._billed.clear()
            self._cursor = 0

    # -- what a provider would bill ---------------------------------------------------

    @property
    def billed(self) -> list[BilledRequest]:
        """A copy of the bills, one per answered request, in the order they were accepted."""
        with self._lock:
            return list(self._billed)

    def record_billed(self, model: str, *, prompt_tokens: int, completion_tokens: int,
                      cached_tokens: int = 0, reasoning_tokens: int = 0,
                      endpoint: str = "chat.completions", stream: bool = False
                      ) -> BilledRequest:
        """Record that the provider bills one request (every endpoint calls this once
        per request it generates an answer for, before sending anything)."""
        bill = BilledRequest(model=model, prompt_tokens=prompt_tokens,
                             completion_tokens=completion_tokens, cached_tokens=cached_tokens,
                             reasoning_tokens=reasoning_tokens, endpoint=endpoint,
                             stream=stream)
        with self._lock:
            self._billed.append(bill)
        return bill

    def wait_billed(self, count: int, timeout: float = 5.0) -> list[BilledRequest]:
        """The bills once there are at least ``count`` (a client that timed out may return
        before the server has read its request); ``TimeoutError`` if they do not come."""
        deadline = time.monotonic() + timeout
        while True:
            bills = self.billed
            if len(bills) >= count:
                return bills
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{len(bills)} requests billed, expected {count}")
            time.sleep(0.005)

    def wait_settled(self, quiet: float = 0.3, timeout: float = 5.0) -> list[BilledRequest]:
        """The bills once no request has arrived and none been billed for ``quiet``
        seconds: for a client cut off before it sent all it might have (how many requests
        went out is then the client's race, not the test's to fix)."""
        deadline = time.monotonic() + timeout
        seen: tuple[int, int] = (-1, -1)
        since = time.monotonic()
        while True:
            with self._lock:
                now_seen, bills = (len(self._requests), len(self._billed)), list(self._billed)
            now = time.monotonic()
            if now_seen != seen:
                seen, since = now_seen, now
            elif now - since >= quiet:
                return bills
            if now >= deadline:
                raise TimeoutError(f"requests still arriving: {now_seen} (received, billed)")
            time.sleep(0.005)

    def billed_usage(self) -> Any:
        """The billed tokens summed over every request, as an ``agent_guard.engine.usage.Usage``."""
        from ..engine.usage import Usage

        total = Usage()
        for bill in self.billed:
            total = total + bill.usage()
        return total

    def billed_nano(self, prices: Any = None) -> int:
        """The billed total in nano-USD, each request priced by its response model.

        ``prices`` is an :class:`agent_guard.pricing.PriceBook` (the one the guard
        uses, e.g. ``guard.prices``); ``None`` is ``PriceBook.default()``. A model
        without a price raises :class:`agent_guard.errors.UnknownModelPrice`.
        """
        if prices is None:
            from ..pricing import PriceBook

            prices = PriceBook.default()
        return sum(int(prices.cost(bill.model, bill.usage()).total_nano) for bill in self.billed)

    def _next_reply(self, body: dict[str, Any]) -> FakeReply:
        with self._lock:
            self._requests.append(body)
            index, self._cursor = self._cursor, self._cursor + 1
            script = self._replies
        if callable(script):
            reply = script(body)
        elif script:
            reply = script[min(index, len(script) - 1)]
        else:
            reply = "ok"
        if isinstance(reply, str):
            return FakeReply(reply)
        if not isinstance(reply, FakeReply):
            raise TypeError(f"a reply must be a FakeReply or a str, got {type(reply).__name__}")
        return reply


def _script(replies: ReplyScript | FakeReply | str) -> ReplyScript:
    if isinstance(replies, FakeReply | str):  # one reply, not a sequence of characters
        return [replies]
    return replies if callable(replies) else list(replies)


# -- token estimates (shared with ScriptedChatModel) ---------------------------------------
# agent_guard.tokens is optional here so the doubles work on their own; without it
# every count is the explicit heuristic below.

try:
    from ..tokens import TokenCounter as _TokenCounter
except ImportError:  # pragma: no cover - tiktoken or agent_guard.tokens unavailable
    _TokenCounter = None  # type: ignore[assignment,misc]

_counter: Any = _TokenCounter() if _TokenCounter is not None else None
CHARS_PER_TOKEN = 4  # the heuristic used when agent_guard.tokens is not importable


def _heuristic(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def _field(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, Mapping) else getattr(obj, key, None)


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for block in content:
            if isinstance(block, Mapping) and isinstance(block.get("text"), str):
                parts.append(block["text"])
            else:
                parts.append(block if isinstance(block, str) else json.dumps(block, default=str))
        return " ".join(parts)
    return str(content)


def _tool_call_text(tc: Any) -> str:
    fn = _field(tc, "function")
    if isinstance(fn, Mapping):  # OpenAI shape
        name, args = fn.get("name", ""), fn.get("arguments", "")
    else:  # LangChain / FakeReply shape
        name = _field(tc, "name") or ""
        args = _field(tc, "args")
        args = _field(tc, "arguments") if args is None else args
    return str(name) + (args if isinstance(args, str) else json.dumps(args or {}))


def count_text(text: str, model: str) -> int:
    """Tokens of ``text``: TokenCounter when importable, else ~4 characters a token."""
    return _counter.count_text(text, model) if _counter is not None else _heuristic(text)


def count_prompt(messages: Iterable[Any], model: str,
                 tools: Sequence[Mapping[str, Any]] | None = None) -> int:
    """Tokens of a prompt (OpenAI message dicts or LangChain messages, plus tools)."""
    if _counter is not None:
        return int(_counter.count_messages(list(messages), model, tools=tools or None))
    n = 3  # reply priming
    for message in messages:
        n += 3 + _heuristic(str(_field(message, "role") or _field(message, "type") or ""))
        n += _heuristic(_content_text(_field(message, "content")))
        n += sum(6 + _heuristic(_tool_call_text(tc)) for tc in _field(message, "tool_calls") or ())
    n += sum(12 + _heuristic(json.dumps(t, default=str)) for t in tools or ())
    return n


def count_output(content: Any, tool_calls: Sequence[Any], model: str) -> int:
    """Tokens of an answer: its text and its tool calls."""
    if _counter is not None:
        return int(_counter.count_output({"content": content, "tool_calls": list(tool_calls)},
                                         model))
    return _heuristic(_content_text(content)) + sum(
        6 + _heuristic(_tool_call_text(tc)) for tc in tool_calls)


def truncate_to_tokens(text: str, max_tokens: int, model: str) -> str:
    """The longest prefix of ``text`` that counts at most ``max_tokens`` tokens."""
    if count_text(text, model) <= max_tokens:
        return text
    lo, hi = 0, len(text)  # count_text(text[:lo]) <= max_tokens < count_text(text[:hi])
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count_text(text[:mid], model) <= max_tokens:
            lo = mid
        else:
            hi = mid
    return text[:lo]


# -- HTTP -----------------------------------------------------------------------------------

_DATED = re.compile(r"-\d{4}-\d{2}-\d{2}$")
_ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
}


def _error(status: int, message: str | None = None, *, code: str | None = "") -> dict[str, Any]:
    """An OpenAI error object; ``code=""`` takes the usual code for ``status``."""
    kind, default_code = _ERROR_TYPES.get(status, ("server_error" if status >= 500 else
                                                   "invalid_request_error", None))
    code = default_code if code == "" else code
    if message is None:
        message = ("Rate limit reached for requests (scripted)." if status == 429
                   else f"Scripted error {status}.")
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def tool_history_error(messages: Sequence[Any]) -> dict[str, Any] | None:
    """OpenAI's 400 for a chat history it refuses over tool calls, or ``None``.

    An assistant message with ``tool_calls`` must be followed, before any other
    message, by one ``tool`` message per ``tool_call_id``; a ``tool`` message must
    answer a call of the assistant message before it. The messages and ``param``
    are OpenAI's (Chat Completions API, 2025-2026)."""
    pending: list[str] = []  # unanswered ids of the last assistant message with tool calls
    opened_at = 0
    answerable: set[str] = set()
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, Mapping) else None
        if role == "tool":
            call_id = message.get("tool_call_id")
            if call_id not in answerable:
                return {"error": {
                    "message": "Invalid parameter: messages with role 'tool' must be a "
                               "response to a preceeding message with 'tool_calls'.",
                    "type": "invalid_request_error", "param": f"messages.[{index}].role",
                    "code": None}}
            if call_id in pending:
                pending.remove(call_id)
            continue
        if pending:
            break
        answerable = set()
        calls = message.get("tool_calls") if role == "assistant" else None
        if calls:
            pending = [str(_field(tc, "id")) for tc in calls]
            answerable = set(pending)
            opened_at = index
    if pending:
        return {"error": {
            "message": "An assistant message with 'tool_calls' must be followed by tool "
                       "messages responding to each 'tool_call_id'. The following "
                       f"tool_call_ids did not have response messages: {', '.join(pending)}",
            "type": "invalid_request_error", "param": f"messages.[{opened_at}].role",
            "code": None}}
    return None


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler],
                 owner: FakeOpenAIServer) -> None:
        self.owner = owner
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Wake handler threads parked on idle keep-alive connections."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # the client went away (reset, broken pipe, stop()): nothing to report
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"
    # headers and body are separate writes: without TCP_NODELAY, Nagle plus the client's
    # delayed ACK hold every reply ~40 ms on loopback (measured 47 ms -> 2.4 ms a request)
    disable_nagle_algorithm = True
    server_version = "fake-openai/1.0"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    @property
    def owner(self) -> FakeOpenAIServer:
        return self.server.owner

    def _route(self) -> str:
        path = urlsplit(self.path).path.rstrip("/")
        return path.removeprefix("/v1")

    def _read_body(self) -> bytes | None:
        """The request body; ``None`` (after answering an error) if it is not delimited."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            self._send_json(411, _error(411, "Send a Content-Length; chunked bodies are "
                                             "not supported by the fake server."))
            return None
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            self._send_json(400, _error(400, "Invalid Content-Length."))
            return None
        return self.rfile.read(length)

    def _send_json(self, status: int, payload: Any, headers: Mapping[str, str] | None = None
                   ) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_not_found(self) -> None:
        self._send_json(404, _error(404, f"Invalid URL ({self.command} {self.path})", code=None))

    def _not_found(self) -> None:
        if self._read_body() is not None:
            self._send_not_found()

    do_PUT = do_PATCH = do_DELETE = _not_found

    def do_GET(self) -> None:
        if self._route() != "/models":
            self._not_found()
            return
        models = ["gpt-4o", "gpt-4o-mini"]
        self._send_json(200, {"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "agent-guard"}
            for m in models]})

    def do_POST(self) -> None:
        raw = self._read_body()
        if raw is None:
            return
        route = self._route()
        if route not in ("/chat/completions", "/responses"):
            self._send_not_found()
            return
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = None
        if not isinstance(body, dict):
            self._send_json(400, _error(400, "The request body is not a JSON object."))
            return
        if route == "/responses":
            self._responses(body)
            return
        if not isinstance(body.get("model"), str) or not isinstance(body.get("messages"), list):
            self._send_json(400, _error(400, "A chat completion needs 'model' (a string) "
                                             "and 'messages' (a list)."))
            return
        invalid = self.owner.check_tool_history and tool_history_error(body["messages"])
        if invalid:  # as OpenAI: refused before any reply is used, nothing billed or recorded
            self._send_json(400, invalid)
            return
        try:
            reply = self.owner._next_reply(body)
        except Exception as exc:  # a bug in a scripted reply function: say so to the client
            self._send_json(500, _error(500, f"the reply script raised {exc!r}"))
            return
        usage: dict[str, Any] = {}
        if reply.status == 200:  # accepted: billed in full whatever the client does next
            usage = self._usage(body, reply)
            self.owner.record_billed(
                self._model(body, reply),
                prompt_tokens=usage["prompt_tokens"],
                completion_tokens=usage["completion_tokens"],
                cached_tokens=usage["prompt_tokens_details"]["cached_tokens"],
                reasoning_tokens=usage["completion_tokens_details"]["reasoning_tokens"],
                stream=bool(body.get("stream")))
        if reply.delay_s > 0:
            time.sleep(reply.delay_s)
        if reply.status != 200:
            headers = {"retry-after": "1", "retry-after-ms": "10"} if reply.status == 429 else {}
            headers.update(reply.headers)
            self._send_json(reply.status, reply.error_body or _error(reply.status), headers)
        elif body.get("stream"):
            self._stream(body, reply, usage)
        else:
            self._send_json(200, self._completion(body, reply, usage), reply.headers)

    # -- payloads ---------------------------------------------------------------------

    def _model(self, body: Mapping[str, Any], reply: FakeReply) -> str:
        if reply.model:
            return reply.model
        model = str(body["model"])
        return model if _DATED.search(model) else model + self.owner.response_model_suffix

    @staticmethod
    def _choices(body: Mapping[str, Any]) -> int:
        n = body.get("n")
        return min(n, 16) if isinstance(n, int) and n > 1 and not body.get("stream") else 1

    def _usage(self, body: Mapping[str, Any], reply: FakeReply) -> dict[str, Any]:
        """The request's usage; as OpenAI, one usage whose output covers every choice."""
        model = str(body["model"])
        prompt = reply.prompt_tokens
        if prompt is None:
            prompt = max(reply.cached_tokens,
                         count_prompt(body["messages"], model, tools=body.get("tools")))
        completion = reply.completion_tokens
        if completion is None:
            completion = count_output(reply.content, reply.tool_calls, model)
            completion += reply.reasoning_tokens
        choices = self._choices(body)
        completion *= choices
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": reply.cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": reply.reasoning_tokens * choices,
                                          "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0,
                                          "rejected_prediction_tokens": 0},
        }

    @staticmethod
    def _tool_calls(reply: FakeReply) -> list[dict[str, Any]]:
        calls = []
        for tc in reply.tool_calls:
            args = tc.get("arguments", tc.get("args", {}))
            calls.append({"id": tc.get("id") or f"call_{uuid.uuid4().hex[:24]}",
                          "type": "function",
                          "function": {"name": tc["name"],
                                       "arguments": args if isinstance(args, str)
                                       else json.dumps(args)}})
        return calls

    @staticmethod
    def _finish(reply: FakeReply) -> str:
        return reply.finish_reason or ("tool_calls" if reply.tool_calls else "stop")

    def _envelope(self, body: Mapping[str, Any], reply: FakeReply, kind: str) -> dict[str, Any]:
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": kind,
                "created": int(time.time()), "model": self._model(body, reply),
                "system_fingerprint": "fp_fake"}

    def _completion(self, body: Mapping[str, Any], reply: FakeReply, usage: dict[str, Any]
                    ) -> dict[str, Any]:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": reply.content if reply.content or not reply.tool_calls else None,
            "refusal": None,
            "annotations": [],
        }
        if reply.tool_calls:
            message["tool_calls"] = self._tool_calls(reply)
        choices = self._choices(body)
        return {
            **self._envelope(body, reply, "chat.completion"),
            "choices": [{"index": i, "message": message, "logprobs": None,
                         "finish_reason": self._finish(reply)} for i in range(choices)],
            "usage": usage,
        }

    def _stream(self, body: Mapping[str, Any], reply: FakeReply, usage: dict[str, Any]
                ) -> None:
        """SSE over chunked transfer encoding, so the connection stays reusable."""
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        tool_calls = self._tool_calls(reply)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        base = self._envelope(body, reply, "chat.completion.chunk")
        if include_usage:
            base["usage"] = None  # as OpenAI: null on every chunk but the usage one

        def write(data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

        def event(choices: list[dict[str, Any]], **extra: Any) -> None:
            write(b"data: " + json.dumps({**base, "choices": choices, **extra}).encode() + b"\n\n")

        sent = [0]

        def delta(d: dict[str, Any], finish: str | None = None) -> None:
            if sent[0] and reply.chunk_delay_s > 0:
                time.sleep(reply.chunk_delay_s)
            sent[0] += 1
            event([{"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}])

        step = self.owner.chunk_chars
        delta({"role": "assistant", "content": "" if reply.content or not reply.tool_calls
               else None, "refusal": None})
        for i in range(0, len(reply.content), step):
            delta({"content": reply.content[i:i + step]})
        for index, tc in enumerate(tool_calls):
            fn = tc["function"]
            delta({"tool_calls": [{"index": index, "id": tc["id"], "type": "function",
                                   "function": {"name": fn["name"], "arguments": ""}}]})
            args = fn["arguments"]
            for i in range(0, len(args), step):
                delta({"tool_calls": [{"index": index,
                                       "function": {"arguments": args[i:i + step]}}]})
        delta({}, self._finish(reply))
        if include_usage:
            event([], usage=usage)
        write(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")

    # -- the Responses API (POST /v1/responses) -----------------------------------------

    def _responses(self, body: dict[str, Any]) -> None:
        """``POST /v1/responses`` as OpenAI answers it: a ``response`` object, or (with
        ``"stream": true``) its SSE events, ``response.created`` to
        ``response.completed`` (whose response carries the usage)."""
        if not isinstance(body.get("model"), str) or not isinstance(body.get("input"),
                                                                     str | list):
            self._send_json(400, _error(400, "A response needs 'model' (a string) and "
                                             "'input' (a string or a list of items)."))
            return
        try:
            reply = self.owner._next_reply(body)
        except Exception as exc:  # a bug in a scripted reply function: say so to the client
            self._send_json(500, _error(500, f"the reply script raised {exc!r}"))
            return
        if reply.status == 200:  # accepted: billed in full whatever the client does next
            usage = self._responses_usage(body, reply)
            self.owner.record_billed(
                self._model(body, reply), endpoint="responses",
                stream=bool(body.get("stream")), prompt_tokens=usage["input_tokens"],
                completion_tokens=usage["output_tokens"],
                cached_tokens=usage["input_tokens_details"]["cached_tokens"],
                reasoning_tokens=usage["output_tokens_details"]["reasoning_tokens"])
        if reply.delay_s > 0:
            time.sleep(reply.delay_s)
        if reply.status != 200:
            headers = {"retry-after": "1", "retry-after-ms": "10"} if reply.status == 429 else {}
            headers.update(reply.headers)
            self._send_json(reply.status, reply.error_body or _error(reply.status), headers)
        elif body.get("stream"):
            self._responses_stream(body, reply)
        else:
            response = self._response_object(body, reply, "completed")
            response["output"] = self._response_items(reply)
            self._send_json(200, response, reply.headers)

    def _responses_usage(self, body: Mapping[str, Any], reply: FakeReply) -> dict[str, Any]:
        model = str(body["model"])
        prompt = reply.prompt_tokens
        if prompt is None:
            items = body["input"]
            messages = [{"role": "user", "content": items}] if isinstance(items, str) \
                else list(items)
            if isinstance(body.get("instructions"), str):
                messages.insert(0, {"role": "system", "content": body["instructions"]})
            prompt = max(reply.cached_tokens,
                         count_prompt(messages, model, tools=body.get("tools")))
        reasoning = max(reply.reasoning_tokens,
                        count_text(reply.reasoning_summary, model)
                        if reply.reasoning_summary else 0)
        completion = reply.completion_tokens
        if completion is None:
            completion = count_output(reply.content, reply.tool_calls, model) + reasoning
        reasoning = min(reasoning, completion)
        return {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": reply.cached_tokens,
                                     "cache_write_tokens": 0},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": prompt + completion,
        }

    def _response_object(self, body: Mapping[str, Any], reply: FakeReply, status: str,
                         response_id: str | None = None) -> dict[str, Any]:
        done = status == "completed"
        return {
            "id": response_id or f"resp_{uuid.uuid4().hex[:24]}", "object": "response",
            "created_at": int(time.time()), "status": status, "error": None,
            "incomplete_details": None, "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "model": self._model(body, reply), "output": [],
            "parallel_tool_calls": True, "previous_response_id": None,
            "reasoning": body.get("reasoning") or {"effort": None, "summary": None},
            "store": bool(body.get("store", True)), "temperature": 1.0,
            "text": body.get("text") or {"format": {"type": "text"}},
            "tool_choice": body.get("tool_choice") or "auto",
            "tools": body.get("tools") or [], "top_p": 1.0, "truncation": "disabled",
            "usage": self._responses_usage(body, reply) if done else None,
            "user": None, "metadata": {},
        }

    def _response_items(self, reply: FakeReply) -> list[dict[str, Any]]:
        """The output items of a finished response: reasoning (when the reply has
        hidden reasoning or a summary), the message, then the function calls."""
        items: list[dict[str, Any]] = []
        if reply.reasoning_tokens or reply.reasoning_summary:
            summary = ([{"type": "summary_text", "text": reply.reasoning_summary}]
                       if reply.reasoning_summary else [])
            items.append({"id": f"rs_{uuid.uuid4().hex[:24]}", "type": "reasoning",
                          "summary": summary})
        if reply.content or not reply.tool_calls:
            items.append({"id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message",
                          "status": "completed", "role": "assistant",
                          "content": [{"type": "output_text", "text": reply.content,
                                       "annotations": [], "logprobs": []}]})
        for tc in self._tool_calls(reply):
            fn = tc["function"]
            items.append({"id": f"fc_{uuid.uuid4().hex[:24]}", "type": "function_call",
                          "status": "completed", "call_id": tc["id"], "name": fn["name"],
                          "arguments": fn["arguments"]})
        return items

    def _responses_stream(self, body: Mapping[str, Any], reply: FakeReply) -> None:
        """The Responses API's SSE events, in the order OpenAI sends them."""
        response = self._response_object(body, reply, "in_progress")
        items = self._response_items(reply)  # ids fixed before any byte is sent
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        sequence = 0
        pause = reply.chunk_delay_s

        def event(kind: str, **data: Any) -> None:
            nonlocal sequence
            if pause and sequence > 1:
                time.sleep(pause)
            payload = json.dumps({"type": kind, "sequence_number": sequence, **data})
            sequence += 1
            chunk = f"event: {kind}\ndata: {payload}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))

        step = self.owner.chunk_chars
        event("response.created", response=response)
        event("response.in_progress", response=response)
        for index, item in enumerate(items):
            where = {"output_index": index, "item_id": item["id"]}
            if item["type"] == "reasoning":
                event("response.output_item.added", output_index=index,
                      item={**item, "summary": []})
                for s, part in enumerate(item["summary"]):
                    text = part["text"]
                    event("response.reasoning_summary_part.added", **where, summary_index=s,
                          part={"type": "summary_text", "text": ""})
                    for i in range(0, len(text), step):
                        event("response.reasoning_summary_text.delta", **where,
                              summary_index=s, delta=text[i:i + step])
                    event("response.reasoning_summary_text.done", **where, summary_index=s,
                          text=text)
                    event("response.reasoning_summary_part.done", **where, summary_index=s,
                          part=part)
            elif item["type"] == "message":
                event("response.output_item.added", output_index=index,
                      item={**item, "status": "in_progress", "content": []})
                part = item["content"][0]
                text = part["text"]
                event("response.content_part.added", **where, content_index=0,
                      part={**part, "text": ""})
                for i in range(0, len(text), step):
                    event("response.output_text.delta", **where, content_index=0,
                          delta=text[i:i + step], logprobs=[])
                event("response.output_text.done", **where, content_index=0, text=text,
                      logprobs=[])
                event("response.content_part.done", **where, content_index=0, part=part)
            else:  # function_call
                args = item["arguments"]
                event("response.output_item.added", output_index=index,
                      item={**item, "status": "in_progress", "arguments": ""})
                for i in range(0, len(args), step):
                    event("response.function_call_arguments.delta", **where,
                          delta=args[i:i + step])
                event("response.function_call_arguments.done", **where, arguments=args)
            event("response.output_item.done", output_index=index, item=item)
        done = self._response_object(body, reply, "completed", response["id"])
        done["output"] = items
        event("response.completed", response=done)
        self.wfile.write(b"0\r\n\r\n")

