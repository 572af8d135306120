"""A local OpenAI-compatible chat-completions server for offline tests.

It speaks the wire format the ``openai`` client (and so ``ChatOpenAI``)
parses: JSON answers, and SSE streams whose usage chunk is sent only when the
request asks for it with ``stream_options.include_usage``, as OpenAI does.

    with FakeOpenAIServer([FakeReply("hi", prompt_tokens=12)]) as server:
        llm = ChatOpenAI(model="gpt-4o", base_url=server.base_url, api_key="test")
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["FakeOpenAIServer", "FakeReply"]


@dataclass
class FakeReply:
    """One scripted answer.

    Token counts left as ``None`` are computed: the prompt from the request's
    messages, the completion from the content and tool calls (with
    :class:`agent_guard.tokens.TokenCounter`). ``status`` other than 200 sends
    ``error_body`` (an OpenAI error object) instead.
    """

    content: str = ""
    tool_calls: Sequence[Mapping[str, Any]] = ()
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    model: str | None = None
    status: int = 200
    error_body: Mapping[str, Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    finish_reason: str | None = None


Replies = Sequence[FakeReply] | Callable[[dict[str, Any]], FakeReply]


class FakeOpenAIServer:
    """Serves ``POST /v1/chat/completions`` on 127.0.0.1 from a script.

    ``replies`` is a list used in order, the last one repeating once the list
    is exhausted, or a function of the request body. Every request body is kept
    in ``requests``. The response model name is the request's plus
    ``response_model_suffix`` (as OpenAI answers ``gpt-4o`` with a dated name).
    """

    def __init__(self, replies: Replies = (), *, response_model_suffix: str = "-2024-08-06",
                 chunk_chars: int = 8) -> None:
        self._replies = replies if callable(replies) else list(replies) or [FakeReply("ok")]
        self.response_model_suffix = response_model_suffix
        self.chunk_chars = max(1, chunk_chars)
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> FakeOpenAIServer:
        server = self

        class Handler(_Handler):
            owner = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,),
                                        name="fake-openai-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the server is not started; use it as a context manager")
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self.requests)

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()

    # -- scripting -------------------------------------------------------------------

    def _next_reply(self, body: dict[str, Any]) -> FakeReply:
        with self._lock:
            index = len(self.requests)
            self.requests.append(body)
        if callable(self._replies):
            return self._replies(body)
        return self._replies[min(index, len(self._replies) - 1)]


def _count_prompt(body: Mapping[str, Any]) -> int:
    from ..tokens import TokenCounter

    return TokenCounter().count_messages(body.get("messages") or [], str(body.get("model", "")),
                                         tools=body.get("tools"))


def _count_completion(reply: FakeReply, model: str) -> int:
    from ..tokens import TokenCounter

    counter = TokenCounter()
    n = counter.count_text(reply.content, model)
    for tc in reply.tool_calls:
        n += counter.count_text(str(tc.get("name", "")) + _args(tc), model) + 6
    return n


def _args(tc: Mapping[str, Any]) -> str:
    args = tc.get("arguments", tc.get("args", {}))
    return args if isinstance(args, str) else json.dumps(args)


class _Handler(BaseHTTPRequestHandler):
    owner: FakeOpenAIServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _send_json(self, status: int, payload: Any, headers: Mapping[str, str] = {}) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/v1/models":
            self._send_json(200, {"object": "list", "data": [
                {"id": "gpt-4o", "object": "model", "owned_by": "fake"}]})
        else:
            self._send_json(404, {"error": {"message": f"no route {self.path}",
                                            "type": "invalid_request_error"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except json.JSONDecodeError:
            self._send_json(400, {"error": {"message": "invalid JSON body",
                                            "type": "invalid_request_error"}})
            return
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send_json(404, {"error": {"message": f"no route {self.path}",
                                            "type": "invalid_request_error"}})
            return
        reply = self.owner._next_reply(body)
        if reply.delay_s:
            time.sleep(reply.delay_s)
        if reply.status != 200:
            error = reply.error_body or {"error": {"message": "scripted error",
                                                   "type": "server_error", "code": None}}
            headers = dict(reply.headers)
            if reply.status == 429:
                headers.setdefault("retry-after", "0")
            self._send_json(reply.status, error, headers)
            return
        try:
            if body.get("stream"):
                self._stream(body, reply)
            else:
                self._send_json(200, self._completion(body, reply), reply.headers)
        except (BrokenPipeError, ConnectionResetError):
            pass

    # -- payloads ------------------------------------------------------------------------

    def _model(self, body: Mapping[str, Any], reply: FakeReply) -> str:
        return reply.model or f"{body.get('model', 'gpt-4o')}{self.owner.response_model_suffix}"

    def _usage(self, body: Mapping[str, Any], reply: FakeReply) -> dict[str, Any]:
        model = str(body.get("model", ""))
        prompt = reply.prompt_tokens if reply.prompt_tokens is not None else _count_prompt(body)
        completion = (reply.completion_tokens if reply.completion_tokens is not None
                      else _count_completion(reply, model))
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": reply.cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": reply.reasoning_tokens,
                                          "audio_tokens": 0},
        }

    def _tool_calls(self, reply: FakeReply) -> list[dict[str, Any]]:
        return [
            {"id": tc.get("id") or f"call_{uuid.uuid4().hex[:12]}", "type": "function",
             "function": {"name": tc["name"], "arguments": _args(tc)}}
            for tc in reply.tool_calls
        ]

    def _finish(self, reply: FakeReply) -> str:
        return reply.finish_reason or ("tool_calls" if reply.tool_calls else "stop")

    def _completion(self, body: Mapping[str, Any], reply: FakeReply) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": reply.content or None}
        if reply.tool_calls:
            message["tool_calls"] = self._tool_calls(reply)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:16]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self._model(body, reply),
            "system_fingerprint": "fp_fake",
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": self._finish(reply)}],
            "usage": self._usage(body, reply),
        }

    def _stream(self, body: Mapping[str, Any], reply: FakeReply) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        base = {"id": f"chatcmpl-{uuid.uuid4().hex[:16]}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": self._model(body, reply),
                "system_fingerprint": "fp_fake"}

        def send(choices: list[dict[str, Any]], **extra: Any) -> None:
            payload = {**base, "choices": choices, **extra}
            self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
            self.wfile.flush()

        send([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        text, step = reply.content, self.owner.chunk_chars
        for i in range(0, len(text), step):
            send([{"index": 0, "delta": {"content": text[i:i + step]}, "finish_reason": None}])
        for index, tc in enumerate(self._tool_calls(reply)):
            send([{"index": 0, "finish_reason": None, "delta": {"tool_calls": [
                {"index": index, "id": tc["id"], "type": "function",
                 "function": {"name": tc["function"]["name"], "arguments": ""}}]}}])
            send([{"index": 0, "finish_reason": None, "delta": {"tool_calls": [
                {"index": index, "function": {"arguments": tc["function"]["arguments"]}}]}}])
        send([{"index": 0, "delta": {}, "finish_reason": self._finish(reply)}])
        options = body.get("stream_options") or {}
        if options.get("include_usage"):
            send([], usage=self._usage(body, reply))
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
