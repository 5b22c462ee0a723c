"""A finished run as others see it: its summary (the API's run object, and the webhook's `run`), the
webhook body signed with the schedule's secret, and the record of its attempts."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from tierbatch.db.models import Schedule, ScheduleRun, WebhookDelivery
from tierbatch.schedules.sinks import money_text
from tierbatch.schedules.sql_sources import cursor_json
from tierbatch.webhooks.delivery import SCHEDULE_RUNS, attempts_of


def run_summary(run: ScheduleRun) -> dict[str, Any]:
    def stamp(value: datetime | None) -> str | None:
        return None if value is None else value.isoformat()

    return {
        "id": str(run.id), "object": "schedule_run", "schedule_id": str(run.schedule_id),
        "fire_time": stamp(run.fire_time), "trigger": run.trigger, "status": run.status, "phase": run.phase,
        "job_id": str(run.job_id) if run.job_id else None,
        "retry_job_id": str(run.retry_job_id) if run.retry_job_id else None,
        "task_count": run.task_count, "skipped_count": run.skipped_count, "source_counts": run.source_counts,
        "counts": run.counts, "label_counts": run.label_counts, "cost_usd": money_text(run.cost_usd),
        "cursor_before": cursor_json(run.cursor_before), "cursor_after": cursor_json(run.cursor_after),
        "sink_path": run.sink_path, "error": run.error, "webhook_status": run.webhook_status,
        "created_at": stamp(run.created_at), "finished_at": stamp(run.finished_at),
    }


def webhook_payload(schedule: Schedule, run: ScheduleRun) -> dict[str, Any]:
    summary = run_summary(run)
    summary.pop("webhook_status")
    return {"type": "schedule_run.finished", "schedule": {"id": str(schedule.id), "name": schedule.name},
            "run": summary,
            "results_url": f"/v1/jobs/{run.job_id}/results" if run.job_id else None}


# The attempts themselves (what to send, the record of each, resends) are tierbatch/webhooks/delivery.py's outbox,
# shared with the job webhooks: `SCHEDULE_RUNS` keeps the state on the run row.

def webhook_attempts(session: Session, run_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, list[WebhookDelivery]]:
    return attempts_of(session, SCHEDULE_RUNS, run_ids)
