"""Alerts: soft-threshold events sent to logs, your code, Slack or any webhook.

Each handler is a ``Guard(on_threshold=[...])`` hook::

    from agent_guard.finops import LogAlert, WebhookAlert

    slack = WebhookAlert(os.environ["SLACK_WEBHOOK_URL"])
    guard = Guard(budgets, on_threshold=[LogAlert(), slack])

The guard calls its hooks synchronously, inside the agent's call, after the
call is settled. So the handlers here never raise into the agent (a failure
is logged) and :class:`WebhookAlert` never waits on the network: it queues
the event and a daemon thread posts it.

**Once per threshold.** The guard fires a threshold once per scope, dimension,
threshold and window period, and across processes its ledger decides which
process fires. A handler adds a second, in-process guarantee: by default
(``dedupe="process"``) the same destination (one webhook URL and format, one
logger and level, one callback function) is sent an alert for a given
(ledger, scope, dimension, threshold, period) at most once in the life of the
process, even when the guard or the handler is created again. The ledger is
part of the key (``ThresholdEvent.ledger``: its redacted URL and namespace, or
the instance for ``memory://``): the same scope name in another ledger is
another budget. With
``dedupe="instance"`` the memory belongs to the handler object only. Delivery
is at most once: an alert that was queued and then failed is not sent again.

**Secrets.** A webhook URL is a credential (Slack's embeds a token), so it is
never logged or put in an error: it is shown as ``https://hooks.slack.com/…``,
including in ``httpx``'s own request log lines.
"""

from __future__ import annotations

import atexit
import contextlib
import email.utils
import inspect
import json
import logging
import os
import queue
import random
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

from ..engine.thresholds import ThresholdEvent
from ..errors import dimension_label, format_amount

__all__ = ["CallbackAlert", "LogAlert", "WebhookAlert", "slack_payload"]

logger = logging.getLogger("agent_guard.alerts")

Dedupe = Literal["process", "instance"]
WebhookFormat = Literal["slack", "json"]

# How many (destination, scope, dimension, threshold, period) keys are remembered.
_MAX_REMEMBERED = 100_000
# Slack limits: a header's plain text, a section field's text.
_HEADER_MAX = 150
_FIELD_MAX = 2000


# -- at most once per threshold --------------------------------------------------------------


class _Sent:
    """The alerts already handled: bounded, oldest forgotten first (the ledger's
    marker still stops the guard from firing them again)."""

    def __init__(self, max_entries: int = _MAX_REMEMBERED) -> None:
        self._keys: OrderedDict[Hashable, None] = OrderedDict()
        self._lock = threading.Lock()
        self._max = max_entries

    def claim(self, key: Hashable) -> bool:
        """True the first time ``key`` is seen (the caller then sends)."""
        with self._lock:
            if key in self._keys:
                return False
            self._keys[key] = None
            if len(self._keys) > self._max:
                self._keys.popitem(last=False)
            return True

    def release(self, key: Hashable) -> None:
        """Forget ``key`` (it was not sent after all, e.g. the queue was full)."""
        with self._lock:
            self._keys.pop(key, None)


_PROCESS_SENT = _Sent()


class _Alert:
    """A threshold hook that handles each (scope, dimension, threshold, period) once."""

    def __init__(self, dedupe: Dedupe) -> None:
        if dedupe not in ("process", "instance"):
            raise ValueError(f"dedupe must be 'process' or 'instance', got {dedupe!r}")
        self.dedupe: Dedupe = dedupe
        self._sent = _PROCESS_SENT if dedupe == "process" else _Sent()

    def _destination(self) -> Hashable:
        """What identifies where this handler sends (two handlers with the same
        destination share the process-wide memory of what was sent)."""
        raise NotImplementedError

    def _deliver(self, event: ThresholdEvent) -> bool:
        """Handle ``event``; False when it was not accepted (may be tried again)."""
        raise NotImplementedError

    def __call__(self, event: ThresholdEvent) -> None:
        try:
            key = (self._destination(), getattr(event, "ledger", ""),
                   event.scope or f"session:{event.session}",
                   event.dimension, float(event.threshold), event.period)
            if self._sent.claim(key) and not self._deliver(event):
                self._sent.release(key)
        except Exception:  # an alert must never break the agent's call
            logger.exception("agent-guard: alert handler %r failed", self)


# -- logging and callbacks -------------------------------------------------------------------


class LogAlert(_Alert):
    """Log each threshold event (default: logger ``agent_guard.alerts`` at WARNING).

    The record's message is the event's sentence; its ``agent_guard`` attribute
    holds :meth:`ThresholdEvent.to_dict` for structured (JSON) log handlers.
    (The guard itself also logs every event on the ``agent_guard`` logger; use
    this handler to route alerts to a logger or level of their own.)
    """

    def __init__(self, logger: logging.Logger | str | None = None,
                 level: int | str = logging.WARNING, *, dedupe: Dedupe = "process") -> None:
        super().__init__(dedupe)
        if logger is None or isinstance(logger, str):
            logger = logging.getLogger(logger or "agent_guard.alerts")
        if isinstance(level, str):
            named = logging.getLevelNamesMapping().get(level.upper())
            if named is None:
                raise ValueError(f"LogAlert(level={level!r}) is not a logging level name")
            level = named
        self.logger = logger
        self.level = level

    def _destination(self) -> Hashable:
        return ("log", self.logger.name, self.level)

    def _deliver(self, event: ThresholdEvent) -> bool:
        self.logger.log(self.level, "agent-guard alert: %s", event,
                        extra={"agent_guard": event.to_dict()})
        return True

    def __repr__(self) -> str:
        return f"LogAlert({self.logger.name!r}, {logging.getLevelName(self.level)})"


class CallbackAlert(_Alert):
    """Call ``fn(event)`` for each threshold event, in the agent's thread.

    ``fn`` must be a plain (sync) function and should be quick: it runs inside
    the guarded call. An exception it raises is logged and swallowed. To do
    async or slow work, hand the event off yourself (``loop.call_soon_threadsafe``,
    a queue) or use :class:`WebhookAlert`. Coroutine functions are refused.
    """

    def __init__(self, fn: Callable[[ThresholdEvent], object], *,
                 dedupe: Dedupe = "process") -> None:
        super().__init__(dedupe)
        if not callable(fn):
            raise TypeError(f"CallbackAlert needs a callable, got {type(fn).__name__}")
        if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
                type(fn).__call__):  # an object with an async __call__
            raise TypeError("CallbackAlert runs its function synchronously inside the "
                            "agent's call; pass a sync function (schedule async work from "
                            "it, e.g. with loop.call_soon_threadsafe)")
        self.fn = fn

    def _destination(self) -> Hashable:
        try:
            hash(self.fn)
        except TypeError:
            return ("callback-id", id(self.fn))
        return ("callback", self.fn)

    def _deliver(self, event: ThresholdEvent) -> bool:
        try:
            result = self.fn(event)
        except Exception:
            logger.exception("agent-guard: alert callback %r failed on %s", self.fn,
                             event.subject)
            return True  # handled (at most once), even if the callback failed
        if inspect.isawaitable(result):
            close = getattr(result, "close", None)
            if callable(close):
                close()  # never awaited: close it so Python does not warn later
            logger.error("agent-guard: alert callback %r returned an awaitable, which "
                         "was not awaited; CallbackAlert needs a sync function", self.fn)
        return True

    def __repr__(self) -> str:
        return f"CallbackAlert({self.fn!r})"


# -- Slack-compatible payloads ------------------------------------------------------------------


def _esc(text: str) -> str:
    """Escape Slack's control characters, so a team named ``<!channel>`` pings no one."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _who(event: ThresholdEvent) -> str:
    value = event.session if event.kind == "session" and event.value is None else event.value
    return event.kind if value is None else f"{event.kind} {value!r}"


def slack_payload(event: ThresholdEvent) -> dict[str, Any]:
    """A Slack incoming-webhook message for ``event``: ``text`` (the notification
    and fallback) and Block Kit ``blocks`` with the scope, window, dimension, spent
    of cap in human units (dollars for cost) and percent used."""
    d = event.dimension
    label = dimension_label(d)
    pct = f"{event.fraction:.0%}"
    who = _who(event)
    window = f"{event.window} {event.period}" if event.period is not None else "none"
    amounts = f"{format_amount(d, event.spent)} of {format_amount(d, event.cap)} ({pct})"
    icon = ":rotating_light:" if event.threshold >= 1 else ":warning:"
    scope = event.scope or f"session:{event.session}"

    def field(title: str, value: str) -> dict[str, str]:
        return {"type": "mrkdwn", "text": _clip(f"*{title}*\n{_esc(value)}", _FIELD_MAX)}

    return {
        "text": _esc(f"agent-guard: {event}"),
        "blocks": [
            {"type": "header", "text": {
                "type": "plain_text", "emoji": True,
                "text": _clip(f"{icon} Budget alert: {who} at {pct} of its {label} cap",
                              _HEADER_MAX)}},
            {"type": "section", "text": {"type": "mrkdwn", "text": _esc(str(event))}},
            {"type": "section", "fields": [
                field("Scope", who),
                field("Window", window),
                field(label[:1].upper() + label[1:], amounts),
                field("Threshold", f"{event.threshold:.0%}"),
            ]},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": _clip(
                _esc(f"scope {scope} · session {event.session}"), _FIELD_MAX)}]},
        ],
    }


# -- webhooks -----------------------------------------------------------------------------------


def redact_url(url: str) -> str:
    """``scheme://host[:port]/…``: a URL with its credentials (user info, path,
    query, fragment) left out."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<webhook url>"
    if not parts.scheme or not host:
        return "<webhook url>"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{port}/…"


class _RedactSecrets(logging.Filter):
    """Rewrites ``httpx`` log records that mention a webhook URL (``HTTP Request:
    POST https://hooks.slack.com/services/...``) to show it redacted."""

    def __init__(self) -> None:
        super().__init__()
        self._secrets: dict[str, str] = {}
        self._lock = threading.Lock()

    def add(self, secrets: list[str], redacted: str) -> None:
        with self._lock:
            for secret in secrets:
                if secret:
                    self._secrets[secret] = redacted

    def scrub(self, text: str) -> str:
        with self._lock:
            secrets = sorted(self._secrets.items(), key=lambda kv: -len(kv[0]))
        for secret, redacted in secrets:
            if secret in text:
                text = text.replace(secret, redacted)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True
        scrubbed = self.scrub(message)
        if scrubbed != message:
            record.msg, record.args = scrubbed, None
        return True


_REDACT = _RedactSecrets()
logging.getLogger("httpx").addFilter(_REDACT)


def _secrets_of(url: str) -> list[str]:
    """The spellings of ``url``'s secret parts a log line may carry."""
    out = [url]
    with contextlib.suppress(Exception):
        out.append(str(httpx.URL(url)))
    for spelled in list(out):
        parts = urlsplit(spelled)
        tail = parts.path + (f"?{parts.query}" if parts.query else "")
        if len(tail) > 1:
            out.append(tail)
        if parts.username or parts.password:
            out.append(spelled.split("://", 1)[-1].split("@", 1)[0])
    return out


def _retry_after(value: str | None, cap: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date), capped."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    if seconds != seconds:  # NaN
        return None
    return min(max(0.0, seconds), cap)


_STOP = object()


class WebhookAlert(_Alert):
    """POST each threshold event as JSON to a Slack incoming webhook (or any URL).

    ``format="slack"`` sends ``{"text": ..., "blocks": [...]}`` (see
    :func:`slack_payload`); ``format="json"`` adds the event's raw fields
    (:meth:`ThresholdEvent.to_dict`) under ``"agent_guard"``, for your own
    receiver. ``headers`` are added to each request (e.g. ``Authorization``).

    The agent never waits: the hook puts the event on a queue of ``max_queue``
    events that a daemon thread posts from; when the queue is full the event
    is dropped and logged (``dropped``). A post that fails on a connection
    error, a timeout (``timeout`` seconds), a 5xx or a 429 is retried
    ``retries`` more times, waiting ``backoff`` seconds doubled at each retry
    (jittered, at most ``max_backoff``), or what the receiver's ``Retry-After``
    asks (at most ``max_retry_after``); any other 4xx is not retried. ``sent``
    and ``failed`` count the outcomes.

    :meth:`flush` waits for the queue to empty (tests, batch jobs); :meth:`close`
    flushes and stops the thread, and runs at interpreter exit (for at most
    ``shutdown_timeout`` seconds). The URL is never logged (see the module docs).
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 2.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        max_retry_after: float = 60.0,
        headers: Mapping[str, str] | None = None,
        format: WebhookFormat = "slack",
        max_queue: int = 1000,
        shutdown_timeout: float = 5.0,
        dedupe: Dedupe = "process",
    ) -> None:
        super().__init__(dedupe)
        if not isinstance(url, str):
            raise TypeError(f"WebhookAlert url must be a string, got {type(url).__name__}")
        self.url = redact_url(url)  # what is safe to show; the real one is kept private
        try:
            scheme = httpx.URL(url).scheme
        except Exception:
            raise ValueError(f"WebhookAlert url {self.url} is not a valid URL") from None
        if scheme not in ("http", "https") or self.url == "<webhook url>":
            raise ValueError(f"WebhookAlert url must be an http(s) URL, got {self.url}")
        if format not in ("slack", "json"):
            raise ValueError(f"WebhookAlert format must be 'slack' or 'json', got {format!r}")
        for name, value in (("timeout", timeout), ("backoff", backoff),
                            ("max_backoff", max_backoff),
                            ("max_retry_after", max_retry_after),
                            ("shutdown_timeout", shutdown_timeout)):
            if not isinstance(value, int | float) or value < 0 or value != value:
                raise ValueError(f"WebhookAlert {name} must be a number >= 0, got {value!r}")
        if timeout <= 0:
            raise ValueError(f"WebhookAlert timeout must be > 0, got {timeout!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"WebhookAlert retries must be an int >= 0, got {retries!r}")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"WebhookAlert max_queue must be an int >= 1, got {max_queue!r}")
        self._url = url
        _REDACT.add(_secrets_of(url), self.url)
        self.timeout = float(timeout)
        self.retries = retries
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.max_retry_after = float(max_retry_after)
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.format: WebhookFormat = format
        self.max_queue = max_queue
        self.shutdown_timeout = float(shutdown_timeout)
        self._sent_count = 0
        self._failed_count = 0
        self._dropped_count = 0
        self._closed = False
        self._reset()
        _LIVE.add(self)

    def _reset(self) -> None:
        """Fresh queue, lock and (not yet started) worker: at creation, and in a
        forked child, which inherits neither the parent's thread nor its queue."""
        self._queue: queue.Queue[Any] = queue.Queue(self.max_queue)
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending = 0

    # -- counters -------------------------------------------------------------------

    @property
    def sent(self) -> int:
        """Alerts the receiver accepted (2xx)."""
        return self._sent_count

    @property
    def failed(self) -> int:
        """Alerts given up on: retries exhausted, a 4xx, or shut down while retrying."""
        return self._failed_count

    @property
    def dropped(self) -> int:
        """Alerts never attempted: the queue was full, or the handler was closed."""
        return self._dropped_count

    @property
    def pending(self) -> int:
        """Alerts queued or being posted."""
        return self._pending

    # -- the hook (agent's thread) ------------------------------------------------------

    def _destination(self) -> Hashable:
        return ("webhook", self._url, self.format)

    def _deliver(self, event: ThresholdEvent) -> bool:
        with self._cond:
            if self._closed:
                reason = "the alert handler is closed"
            else:
                self._ensure_worker()
                try:
                    self._queue.put_nowait(event)
                except queue.Full:
                    reason = f"its queue is full ({self.max_queue} alerts waiting)"
                else:
                    self._pending += 1
                    return True
            self._dropped_count += 1
        logger.warning("agent-guard: webhook %s: dropped the alert for %s: %s", self.url,
                       event.subject, reason)
        return False

    def _ensure_worker(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="agent-guard-webhook",
                                            daemon=True)
            self._thread.start()

    # -- control ----------------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every accepted alert was sent or given up on; False if
        ``timeout`` seconds passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float | None = None) -> None:
        """Flush for up to ``timeout`` seconds (``shutdown_timeout`` by default), then
        stop: an alert still being retried counts as failed, one still queued as
        dropped. Later events are dropped. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
        self.flush(self.shutdown_timeout if timeout is None else timeout)
        self._stop.set()  # cuts a backoff wait short
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(_STOP)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(self.timeout + 1.0)
        _LIVE.discard(self)

    def __enter__(self) -> WebhookAlert:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"WebhookAlert({self.url!r}, format={self.format!r})"

    # -- the worker thread -------------------------------------------------------------------

    def payload(self, event: ThresholdEvent) -> dict[str, Any]:
        """The JSON body posted for ``event``."""
        body = slack_payload(event)
        if self.format == "json":
            body["agent_guard"] = event.to_dict()
        return body

    def _run(self) -> None:
        client = httpx.Client(timeout=self.timeout, headers=self.headers,
                              follow_redirects=False)
        try:
            while True:
                item = self._queue.get()
                if item is _STOP:
                    break
                try:
                    ok = self._post(client, item)
                except Exception as exc:  # never let the worker die
                    logger.error("agent-guard: webhook %s: alert for %s failed: %s",
                                 self.url, item.subject, self._describe(exc))
                    ok = False
                with self._cond:
                    self._pending -= 1
                    if ok:
                        self._sent_count += 1
                    else:
                        self._failed_count += 1
                    self._cond.notify_all()
                if self._stop.is_set():
                    break
        finally:
            client.close()
            self._drain()

    def _drain(self) -> None:
        """At shutdown: what is left in the queue is dropped."""
        left = 0
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                left += 1
        if left:
            with self._cond:
                self._pending -= left
                self._dropped_count += left
                self._cond.notify_all()
            logger.warning("agent-guard: webhook %s: closed with %d alert(s) not sent",
                           self.url, left)

    def _post(self, client: httpx.Client, event: ThresholdEvent) -> bool:
        body = json.dumps(self.payload(event)).encode()
        attempts = self.retries + 1
        attempt = 0
        reason = ""
        while attempt < attempts:
            attempt += 1
            wait: float | None = None
            try:
                response = client.post(self._url, content=body)
            except httpx.TransportError as exc:  # connection errors and timeouts
                reason = self._describe(exc)
            else:
                status = response.status_code
                if 200 <= status < 300:
                    return True
                reason = f"HTTP {status}"
                if status != 429 and status < 500:
                    logger.error("agent-guard: webhook %s refused the alert for %s (%s); "
                                 "not retried", self.url, event.subject, reason)
                    return False
                wait = _retry_after(response.headers.get("Retry-After"),
                                    self.max_retry_after)
            if attempt == attempts:
                break
            if wait is None:
                wait = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
                wait *= random.uniform(0.5, 1.0)
            logger.info("agent-guard: webhook %s: attempt %d of %d failed (%s); retrying "
                        "in %.2fs", self.url, attempt, attempts, reason, wait)
            if self._stop.wait(wait):
                reason += "; shutting down"
                break
        logger.error("agent-guard: webhook %s: gave up on the alert for %s after %d "
                     "attempt(s) (%s)", self.url, event.subject, attempt, reason)
        return False

    def _describe(self, exc: BaseException) -> str:
        """An exception as ``Type: message``, with any spelling of the URL redacted."""
        message = _REDACT.scrub(str(exc))
        return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


# Alive handlers, closed (flushed) at interpreter exit and reset in a forked child.
_LIVE: weakref.WeakSet[WebhookAlert] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for alert in list(_LIVE):
        with contextlib.suppress(Exception):
            alert.close()


def _after_fork_in_child() -> None:
    for alert in list(_LIVE):
        alert._reset()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
