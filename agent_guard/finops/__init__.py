"""FinOps: alerts on budget thresholds (and, alongside, reports on spend)."""

from .alerts import CallbackAlert as CallbackAlert
from .alerts import LogAlert as LogAlert
from .alerts import WebhookAlert as WebhookAlert
from .alerts import slack_payload as slack_payload
