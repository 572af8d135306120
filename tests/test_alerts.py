"""Threshold alerts: logs, callbacks and webhooks posted over real HTTP to a local receiver."""

from __future__ import annotations

import json
import logging
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from agent_guard import BudgetExceeded, CallRecord, Guard, Limits
from agent_guard.engine.admission import ModelCall
from agent_guard.engine.budgets import Budgets
from agent_guard.engine.thresholds import ThresholdEvent
from agent_guard.engine.usage import Usage
from agent_guard.finops import CallbackAlert, LogAlert, WebhookAlert, slack_payload

from .conftest import FakeClock

NOV_30 = datetime(2026, 11, 30, 23, 59, tzinfo=UTC).timestamp()
DEC_1 = datetime(2026, 12, 1, 0, 1, tzinfo=UTC).timestamp()
WAIT = 30.0  # generous upper bound for waits that normally end at once (never asserted on)


def team_guard(clock: FakeClock, hooks: list[Callable[[ThresholdEvent], None]],
               ledger: Any = None) -> Guard:
    """Each call costs $0.00045: the team's $0.002 a month crosses 50% at the 3rd
    call (68%) and 80% at the 4th (90%); a 5th does not fit."""
    return Guard(Budgets(session=Limits(max_cost_usd=1),
                         team=Limits(max_cost_usd="0.002", window="month",
                                     thresholds=(0.5, 0.8))),
                 ledger or "memory://", attributes={"team": "acme"}, clock=clock,
                 on_threshold=hooks)


def spend(guard: Guard, session: str) -> CallRecord:
    admission = guard.before_model_call(ModelCall(session=session, model="gpt-4o-mini",
                                                  input_tokens=1000, max_output_tokens=500))
    return guard.after_model_call(admission, Usage(1000, 500))


def event(threshold: float = 0.5, period: str = "2026-11", value: str = "acme",
          session: str = "s1") -> ThresholdEvent:
    return ThresholdEvent(session, "usd_nano", threshold, 1_350_000, 2_000_000,
                          scope=f"team:{value}@{period}", kind="team", value=value,
                          period=period, window="month")


# -- a local webhook receiver ------------------------------------------------------------------


class Receiver:
    """An HTTP server on 127.0.0.1 that records each POST and answers from a script
    (``200`` once the script runs out). With ``hold=True`` every request waits for
    ``release`` before it is answered."""

    def __init__(self, script: list[int | tuple[int, dict[str, str]]] | None = None,
                 hold: bool = False) -> None:
        self.script = list(script or [])
        self.hold = hold
        self.release = threading.Event()
        self.requests: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._cond:
                    receiver.requests.append({"path": self.path, "headers": dict(self.headers),
                                              "body": json.loads(body)})
                    answer = receiver.script.pop(0) if receiver.script else 200
                    receiver._cond.notify_all()
                if receiver.hold:
                    receiver.release.wait(WAIT)
                status, headers = answer if isinstance(answer, tuple) else (answer, {})
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: None  # type: ignore[method-assign]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.01,),
                                       daemon=True)
        self.thread.start()
        self.token = uuid.uuid4().hex  # the secret part of the URL, unique per receiver
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/services/T0/B0/{self.token}"

    def wait_for(self, n: int) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.requests) >= n, WAIT)

    def bodies(self) -> list[dict[str, Any]]:
        return [r["body"] for r in self.requests]

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(*script: int | tuple[int, dict[str, str]], hold: bool = False) -> Receiver:
        made.append(Receiver(list(script), hold))
        return made[-1]

    yield make
    for r in made:
        r.stop()


@pytest.fixture
def webhook() -> Iterator[Callable[..., WebhookAlert]]:
    made: list[WebhookAlert] = []

    def make(url: str, **options: Any) -> WebhookAlert:
        made.append(WebhookAlert(url, **options))
        return made[-1]

    yield make
    for alert in made:
        alert.close(timeout=0)


@pytest.fixture(autouse=True)
def all_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)  # httpx's request lines too
    return caplog


def dead_url() -> tuple[str, str]:
    """A URL on a local port with nothing listening, and its secret token."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = uuid.uuid4().hex
    return f"http://127.0.0.1:{port}/services/T0/B0/{token}", token


def assert_no_secret(caplog: pytest.LogCaptureFixture, token: str) -> None:
    assert caplog.records  # something was logged, and none of it has the token
    assert token not in caplog.text
    for record in caplog.records:
        assert token not in record.getMessage()


# -- the webhook, end to end ---------------------------------------------------------------------


def expected_slack(pct: str, spent: str, threshold: str, period: str, session: str,
                   icon: str = ":warning:") -> dict[str, Any]:
    sentence = (f"team 'acme' (month {period}) has used {pct} of its cost cap "
                f"({spent} of $0.002000; threshold {threshold})")
    return {
        "text": f"agent-guard: {sentence}",
        "blocks": [
            {"type": "header", "text": {
                "type": "plain_text", "emoji": True,
                "text": f"{icon} Budget alert: team 'acme' at {pct} of its cost cap"}},
            {"type": "section", "text": {"type": "mrkdwn", "text": sentence}},
            {"type": "section", "fields": [
                {"type": "mrkdwn", "text": "*Scope*\nteam 'acme'"},
                {"type": "mrkdwn", "text": f"*Window*\nmonth {period}"},
                {"type": "mrkdwn", "text": f"*Cost*\n{spent} of $0.002000 ({pct})"},
                {"type": "mrkdwn", "text": f"*Threshold*\n{threshold}"},
            ]},
            {"type": "context", "elements": [{
                "type": "mrkdwn", "text": f"scope team:acme@{period} · session {session}"}]},
        ],
    }


def test_webhook_sends_each_threshold_once_per_window_as_slack_json(
        receiver: Callable[..., Receiver], webhook: Callable[..., WebhookAlert],
        caplog: pytest.LogCaptureFixture) -> None:
    r = receiver()
    alert = webhook(r.url)
    clock = FakeClock(NOV_30)
    guard = team_guard(clock, [alert])
    for i in range(4):
        spend(guard, f"s{i}")
    with pytest.raises(BudgetExceeded):
        spend(guard, "s4")
    assert alert.flush(WAIT)
    assert r.bodies() == [
        expected_slack("68%", "$0.001350", "50%", "2026-11", "s2"),
        expected_slack("90%", "$0.001800", "80%", "2026-11", "s3"),
    ]
    assert r.requests[0]["path"] == f"/services/T0/B0/{r.token}"
    assert r.requests[0]["headers"]["Content-Type"] == "application/json"

    # The same month again from a guard created anew on the same ledger, with the same
    # handler or a new one on the same URL: nothing is sent twice.
    again = team_guard(clock, [alert, WebhookAlert(r.url)], guard.ledger)
    for i in range(4):
        with pytest.raises(BudgetExceeded):  # the same team budget, used up
            spend(again, f"r{i}")
    # The next month's window starts from zero and alerts again.
    clock.now = DEC_1
    for i in range(3):
        spend(guard, f"d{i}")
    assert alert.flush(WAIT)
    assert len(r.requests) == 3
    assert r.bodies()[2] == expected_slack("68%", "$0.001350", "50%", "2026-12", "d2")
    assert (alert.sent, alert.failed, alert.dropped, alert.pending) == (3, 0, 0, 0)
    assert_no_secret(caplog, r.token)
    assert f"POST http://127.0.0.1:{r.server.server_address[1]}/… " in caplog.text


def test_dedupe_instance_remembers_per_handler_only(
        receiver: Callable[..., Receiver], webhook: Callable[..., WebhookAlert]) -> None:
    r = receiver()
    first = webhook(r.url, dedupe="instance")
    first(event())
    first(event())
    second = webhook(r.url, dedupe="instance")
    second(event())
    assert first.flush(WAIT) and second.flush(WAIT)
    assert (first.sent, second.sent, len(r.requests)) == (1, 1, 2)


def test_json_format_adds_the_raw_fields_and_headers(
        receiver: Callable[..., Receiver], webhook: Callable[..., WebhookAlert]) -> None:
    r = receiver()
    alert = webhook(r.url, format="json", headers={"Authorization": "Bearer t"})
    e = event(threshold=1.0)
    alert(e)
    assert alert.flush(WAIT)
    [body] = r.bodies()
    assert body["agent_guard"] == e.to_dict()
    assert body["agent_guard"]["spent"] == 1_350_000
    assert body["blocks"][0]["text"]["text"].startswith(":rotating_light: Budget alert")
    assert {k: v for k, v in body.items() if k != "agent_guard"} == slack_payload(e)
    assert r.requests[0]["headers"]["Authorization"] == "Bearer t"


def test_slack_markup_in_scope_values_is_escaped() -> None:
    payload = slack_payload(event(value="<!channel> & co"))
    # every text Slack parses for mentions and links (the notification text and the
    # mrkdwn blocks) carries the value escaped; the header is plain_text, never parsed
    header, section, fields, context = payload["blocks"]
    assert header["text"]["type"] == "plain_text"
    parsed = [payload["text"], section["text"]["text"], context["elements"][0]["text"],
              *(f["text"] for f in fields["fields"])]
    assert all(t["type"] == "mrkdwn" for t in [section["text"], *fields["fields"]])
    assert not any("<!channel>" in text for text in parsed)
    assert "&lt;!channel&gt; &amp; co" in payload["text"]
    assert "&lt;!channel&gt; &amp; co" in fields["fields"][0]["text"]


# -- retries ------------------------------------------------------------------------------------


def test_5xx_is_retried_until_delivered(receiver: Callable[..., Receiver],
                                        webhook: Callable[..., WebhookAlert],
                                        caplog: pytest.LogCaptureFixture) -> None:
    r = receiver(500, 500, 200)
    alert = webhook(r.url, retries=3, backoff=0.001)
    alert(event())
    assert alert.flush(WAIT)
    assert len(r.requests) == 3
    assert r.bodies()[0] == r.bodies()[1] == r.bodies()[2]
    assert (alert.sent, alert.failed) == (1, 0)
    assert "attempt 2 of 4 failed (HTTP 500)" in caplog.text
    assert_no_secret(caplog, r.token)


def test_429_honours_retry_after_up_to_a_cap(receiver: Callable[..., Receiver],
                                             webhook: Callable[..., WebhookAlert]) -> None:
    # an hour-long Retry-After is capped (else flush would time out), then delivered
    r = receiver((429, {"Retry-After": "3600"}), (503, {"Retry-After": "0"}), 200)
    alert = webhook(r.url, backoff=3600, max_retry_after=0.01)
    alert(event())
    assert alert.flush(WAIT)
    assert (len(r.requests), alert.sent) == (3, 1)


def test_other_4xx_is_not_retried(receiver: Callable[..., Receiver],
                                  webhook: Callable[..., WebhookAlert],
                                  caplog: pytest.LogCaptureFixture) -> None:
    r = receiver(404, 200)
    alert = webhook(r.url, backoff=0.001)
    alert(event())
    assert alert.flush(WAIT)
    assert (len(r.requests), alert.sent, alert.failed) == (1, 0, 1)
    assert "refused the alert for team 'acme' (month 2026-11) (HTTP 404); not retried" \
        in caplog.text
    assert_no_secret(caplog, r.token)


# -- the agent never waits on the webhook ---------------------------------------------------


def test_agent_calls_return_while_the_webhook_is_stuck(
        receiver: Callable[..., Receiver], webhook: Callable[..., WebhookAlert]) -> None:
    r = receiver(hold=True)  # answers nothing until released
    alert = webhook(r.url, timeout=WAIT)
    guard = team_guard(FakeClock(NOV_30), [alert])
    records = [spend(guard, f"s{i}") for i in range(4)]  # both thresholds crossed
    assert r.wait_for(1)  # the first alert is in flight, unanswered...
    assert [rec.outcome for rec in records] == ["ok"] * 4  # ...yet every call returned
    assert (alert.sent, alert.failed, alert.pending) == (0, 0, 2)
    r.release.set()
    assert alert.flush(WAIT)
    assert (alert.sent, alert.failed, len(r.requests)) == (2, 0, 2)


def test_a_receiver_slower_than_the_timeout_fails_after_retries(
        receiver: Callable[..., Receiver], webhook: Callable[..., WebhookAlert],
        caplog: pytest.LogCaptureFixture) -> None:
    r = receiver(hold=True)  # never answers within the timeout
    alert = webhook(r.url, timeout=0.2, retries=1, backoff=0.001)
    guard = team_guard(FakeClock(NOV_30), [alert])
    records = [spend(guard, f"s{i}") for i in range(4)]
    assert [rec.outcome for rec in records] == ["ok"] * 4
    assert alert.flush(WAIT)
    assert (alert.sent, alert.failed, len(r.requests)) == (0, 2, 4)
    assert "ReadTimeout" in caplog.text
    assert_no_secret(caplog, r.token)


def test_a_dead_receiver_fails_without_failing_the_agent(
        webhook: Callable[..., WebhookAlert], caplog: pytest.LogCaptureFixture) -> None:
    url, token = dead_url()
    alert = webhook(url, retries=2, backoff=0.001)
    guard = team_guard(FakeClock(NOV_30), [alert])
    records = [spend(guard, f"s{i}") for i in range(4)]
    assert [rec.outcome for rec in records] == ["ok"] * 4
    assert guard.scope_usage("team", "acme").cost_nano == 1_800_000
    assert alert.flush(WAIT)
    assert (alert.sent, alert.failed) == (0, 2)
    assert "gave up on the alert for team 'acme' (month 2026-11) after 3 attempt(s) " \
           "(ConnectError" in caplog.text
    assert_no_secret(caplog, token)


def test_a_full_queue_drops_and_counts(receiver: Callable[..., Receiver],
                                       webhook: Callable[..., WebhookAlert],
                                       caplog: pytest.LogCaptureFixture) -> None:
    r = receiver(hold=True)
    alert = webhook(r.url, max_queue=1, timeout=WAIT)
    alert(event(0.5))
    assert r.wait_for(1)  # taken off the queue and in flight
    alert(event(0.8))  # waits in the queue (1 slot)
    alert(event(1.0))  # no room: dropped
    assert (alert.dropped, alert.pending) == (1, 2)
    assert "dropped the alert for team 'acme' (month 2026-11): its queue is full" \
        in caplog.text
    r.release.set()
    assert alert.flush(WAIT)
    assert [b["blocks"][3]["elements"][0]["text"] for b in r.bodies()] == [
        "scope team:acme@2026-11 · session s1"] * 2
    assert (alert.sent, alert.dropped) == (2, 1)
    alert(event(1.0))  # a dropped alert was not marked as sent: it can still go
    assert alert.flush(WAIT)
    assert (alert.sent, len(r.requests)) == (3, 3)
    assert_no_secret(caplog, r.token)


def test_close_stops_retrying_and_drops_later_alerts(webhook: Callable[..., WebhookAlert]
                                                     ) -> None:
    url, _ = dead_url()
    alert = webhook(url, retries=5, backoff=3600)  # would wait an hour between attempts
    alert(event(0.5))
    alert.close(timeout=0)
    assert (alert.failed, alert.pending) == (1, 0)  # the backoff wait was cut short
    alert(event(0.8))
    assert (alert.dropped, alert.pending) == (1, 0)
    alert.close()  # idempotent


def test_the_url_is_never_shown(caplog: pytest.LogCaptureFixture) -> None:
    token = uuid.uuid4().hex
    alert = WebhookAlert(f"https://user:{token}@hooks.slack.com/services/T0/B0/{token}?k={token}")
    assert repr(alert) == "WebhookAlert('https://hooks.slack.com/…', format='slack')"
    assert alert.url == "https://hooks.slack.com/…"
    for bad in (f"ftp://hooks.slack.com/{token}", f"hooks.slack.com/{token}",
                f"https://[{token}/x"):
        with pytest.raises(ValueError) as error:
            WebhookAlert(bad)
        assert token not in str(error.value)
    logging.getLogger("httpx").info("HTTP Request: POST %s", f"https://user:{token}@"
                                    f"hooks.slack.com/services/T0/B0/{token}?k={token}")
    assert_no_secret(caplog, token)
    alert.close()


def test_bad_options_are_refused() -> None:
    url = "https://example.com/hook"
    for options in ({"retries": -1}, {"timeout": 0}, {"max_queue": 0}, {"format": "xml"},
                    {"dedupe": "never"}, {"backoff": float("nan")}):
        with pytest.raises(ValueError):
            WebhookAlert(url, **options)


# -- logs and callbacks --------------------------------------------------------------------


def test_log_alert_logs_once_per_threshold_with_the_fields(
        caplog: pytest.LogCaptureFixture) -> None:
    name = f"alerts.{uuid.uuid4().hex}"
    guard = team_guard(FakeClock(NOV_30), [LogAlert(name, "ERROR")])
    for i in range(4):
        spend(guard, f"s{i}")
    again = team_guard(FakeClock(NOV_30), [LogAlert(name, "ERROR")],  # same destination
                       guard.ledger)
    for i in range(4):
        with pytest.raises(BudgetExceeded):
            spend(again, f"r{i}")
    mine = [rec for rec in caplog.records if rec.name == name]
    assert [rec.levelno for rec in mine] == [logging.ERROR] * 2
    assert mine[0].getMessage() == (
        "agent-guard alert: team 'acme' (month 2026-11) has used 68% of its cost cap "
        "($0.001350 of $0.002000; threshold 50%)")
    assert mine[1].agent_guard["threshold"] == 0.8  # type: ignore[attr-defined]
    assert mine[1].agent_guard["scope"] == "team:acme@2026-11"  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="not a logging level"):
        LogAlert(level="LOUD")


def test_callback_alert_gets_each_event_once() -> None:
    events: list[ThresholdEvent] = []
    guard = team_guard(FakeClock(NOV_30), [CallbackAlert(events.append)])
    for i in range(4):
        spend(guard, f"s{i}")
    again = team_guard(FakeClock(NOV_30), [CallbackAlert(events.append)], guard.ledger)
    for i in range(4):
        with pytest.raises(BudgetExceeded):  # the same team budget: already spent
            spend(again, f"r{i}")
    assert [(e.threshold, e.session, e.period) for e in events] == [
        (0.5, "s2", "2026-11"), (0.8, "s3", "2026-11")]


def test_the_same_scope_name_on_another_ledger_is_another_budget_and_alerts(
        redis_url: str) -> None:
    """Two tenants' guards on separate Redis namespaces (or separate memory ledgers)
    both have a team 'acme' this month: each budget's crossing is its own alert, even
    through one process-wide handler."""
    from agent_guard.ledger.redis import RedisLedger

    events: list[ThresholdEvent] = []
    hook = CallbackAlert(events.append)
    ledgers = [RedisLedger(redis_url, namespace=f"alerts-{uuid.uuid4().hex}")
               for _ in range(2)]
    for n, ledger in enumerate([*ledgers, None, None]):
        guard = team_guard(FakeClock(NOV_30), [hook], ledger)
        for i in range(3):
            spend(guard, f"t{n}-{i}")
    assert [(e.threshold, e.session) for e in events] == [
        (0.5, f"t{n}-2") for n in range(4)]
    assert len({e.ledger for e in events}) == 4 and "{alerts-" in events[0].ledger
    for ledger in ledgers:
        ledger.client.delete(*ledger.client.keys(ledger.prefix + "*"))
        ledger.close()


def test_a_raising_callback_is_logged_and_the_agent_goes_on(
        caplog: pytest.LogCaptureFixture) -> None:
    after: list[ThresholdEvent] = []

    def broken(event: ThresholdEvent) -> None:
        raise RuntimeError("pager down")

    guard = team_guard(FakeClock(NOV_30), [CallbackAlert(broken), CallbackAlert(after.append)])
    records = [spend(guard, f"s{i}") for i in range(4)]
    assert [rec.outcome for rec in records] == ["ok"] * 4
    assert len(after) == 2  # the next hook still ran
    failures = [rec for rec in caplog.records if "alert callback" in rec.getMessage()]
    assert len(failures) == 2
    assert failures[0].exc_info is not None and "pager down" in str(failures[0].exc_info[1])


def test_callbacks_must_be_sync(caplog: pytest.LogCaptureFixture) -> None:
    async def notify(event: ThresholdEvent) -> None:
        pass

    class Notifier:
        async def __call__(self, event: ThresholdEvent) -> None:
            pass

    for fn in (notify, Notifier()):
        with pytest.raises(TypeError, match="synchronously"):
            CallbackAlert(fn)
    with pytest.raises(TypeError, match="callable"):
        CallbackAlert("notify")  # type: ignore[arg-type]
    # a sync function that returns a coroutine: not awaited, closed, and logged
    sneaky = CallbackAlert(lambda e: notify(e), dedupe="instance")
    sneaky(event())
    assert "returned an awaitable" in caplog.text
