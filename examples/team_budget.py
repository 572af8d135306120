"""Team budgets: two support agents share team acme's monthly cap; a Slack-style
webhook hears about 50% and 80% once; the FinOps report says who spent what. Offline.

    python examples/team_budget.py

The webhook goes to a tiny receiver this script starts on 127.0.0.1 (use your
Slack incoming-webhook URL instead). The usage records and the ledger share one
SQLite file, so `agent-guard report --store sqlite:///<printed path>` works after.
"""

from __future__ import annotations

import json
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

from langchain_core.messages import AIMessage

from agent_guard import BudgetExceeded, Budgets, Guard, GuardCallbackHandler, Limits, UsageStore
from agent_guard.finops import WebhookAlert, report
from agent_guard.testing import ScriptedChatModel

received: list[dict] = []


class Receiver(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def main() -> None:
    server = HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    webhook = WebhookAlert(f"http://127.0.0.1:{server.server_port}/hooks/T000/B000/XXXX")

    db = Path(tempfile.mkdtemp()) / "guard.db"
    guard = Guard(
        Budgets(session=Limits(max_cost_usd="0.05", thresholds=()),
                team=Limits(max_cost_usd="0.03", window="month", thresholds=(0.5, 0.8))),
        ledger=f"sqlite:///{db}",
        attributes={"team": "acme"},
        on_threshold=[webhook],
    )
    store = UsageStore.for_ledger(guard.ledger).attach(guard)
    llm = ScriptedChatModel(model_name="gpt-4o", max_tokens=300,
                            respond=lambda m: AIMessage("Here is a detailed answer. " * 40))
    handler = GuardCallbackHandler(guard)

    for user in ("ana", "ben") * 6:
        config = {"callbacks": [handler],
                  "metadata": {"session_id": f"{user}-chat", "user_id": user,
                               "feature": "support-chat"}}
        try:
            llm.invoke("Summarise the customer's last three tickets. " * 30, config=config)
        except BudgetExceeded as exc:
            print(f"{user}: refused by {exc.scope} (${exc.remaining / 1e9:.6f} left, "
                  f"the call needs up to ${exc.requested / 1e9:.6f})")
    webhook.flush(5)
    store.flush()

    team = guard.scope_usage("team", "acme")
    print(f"team acme this month: ${team.cost_usd:.6f} of ${team.cap_usd}")
    for alert in received:
        print("webhook:", alert["text"])
    for row in report(store, group_by="user"):
        print(f"user {row['user']}: {row['calls']} calls, ${row['cost_usd']}")
    print(f"records: {db}")
    webhook.close()
    server.shutdown()


if __name__ == "__main__":
    main()
