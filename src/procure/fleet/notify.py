"""What an action tells the world: the seed's audit entry and its Slack messages (🚫 blocked,
✅ executed, ⚠️ requires confirmation, ❌ failed), queued in the outbox in the same transaction
that records the action, so none is lost and none blocks the controller. Text is escaped as
Slack's formatting rules require (`&`, `<`, `>`), so no name can ping a channel or hide a link."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from procure.store import fleet_repo
from procure.store.fleet_tables import ActionRow


def slack_escape(text: str) -> str:
    """Slack's three control characters as entities: `<!channel>`, `<@U123>` and `<url|label>`
    from a cloud, vendor or instance name then show as typed instead of acting."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _impact(row: ActionRow) -> float | None:
    return None if row.cost_impact is None else float(row.cost_impact)


def audit_entry(row: ActionRow, now: datetime) -> dict[str, Any]:
    action: dict[str, Any] = {
        "id": row.action_id,
        "type": row.action_type,
        "target": row.target_instance,
        "reason": row.reason,
        "cost_impact": _impact(row),
        "status": row.status,
    }
    if row.block_reason:
        action["blocked_by"] = row.block_reason
    if row.error_message:
        action["error"] = row.error_message
    if row.decided_by:
        action["decided_by"] = row.decided_by
    if row.rollback_of:
        action["rollback_of"] = row.rollback_of
    return {
        "timestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "dry_run": row.dry_run,
        "action": action,
    }


def headline(row: ActionRow, detail: str = "") -> str | None:
    """The Slack line for the action's current status (None: nothing to say)."""
    impact = _impact(row) or 0.0
    match row.status:
        case "blocked":
            return f"🚫 Action blocked: {row.action_type} {detail or row.error_message or ''}"
        case "executed":
            return f"✅ Executed: {row.action_type} - {row.reason}"
        case "pending":
            return (
                f"⚠️ Action requires confirmation: {row.action_type} "
                f"(cost impact: ${impact:.2f}/hour)"
            )
        case "failed":
            return f"❌ Action failed: {row.action_type} - {row.error_message or 'unknown error'}"
        case "rejected":
            return f"🚫 Action rejected: {row.action_type} - {row.error_message or 'rejected'}"
        case "rolled_back":
            return f"↩️ Rolled back: {row.action_type} {row.action_id}"
    return None


def slack_message(row: ActionRow, text: str) -> dict[str, Any]:
    """The webhook payload; `text` is raw (escaped here, once)."""
    text = slack_escape(text)
    context = [
        f"action `{row.action_id}`",
        f"target `{row.target_instance}`" if row.target_instance else "",
        f"cost impact ${_impact(row) or 0:.2f}/h",
        "dry run" if row.dry_run else "",
    ]
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": text}},
        {
            "type": "context",
            "elements": [
                {"type": "mrkdwn", "text": slack_escape(" · ".join(c for c in context if c))}
            ],
        },
    ]
    if row.status == "pending":
        blocks.insert(
            1,
            {
                "type": "section",
                "text": {
                    "type": "mrkdwn",
                    "text": slack_escape(
                        f"Approve: `procure fleet approve {row.action_id}` · "
                        f"reject: `procure fleet reject {row.action_id}`"
                    ),
                },
            },
        )
    return {"text": text, "blocks": blocks}


def announce(s: Session, row: ActionRow, now: datetime, *, slack: bool, detail: str = "") -> None:
    """Queue the audit entry (always) and the Slack message (when a webhook is configured)."""
    fleet_repo.enqueue(s, "audit", audit_entry(row, now), now)
    text = headline(row, detail)
    if slack and text:
        fleet_repo.enqueue(s, "slack", slack_message(row, text.strip()), now)
