"""The per-item results of a schedule: one classification per (schedule, item id, sha256 of the text).

Items already classified for this schedule (same item id and same text hash; pending or succeeded) are
skipped by a unique index on `classifications`; once a run's tasks are terminal, each classification gets
its task's label (or raw answer), model, cost and status.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from tierbatch.base.states import ClassificationStatus, TaskStatus
from tierbatch.db.models import Classification, ScheduleRun, Task
from tierbatch.tasks.labels import extract_label, label_error


def text_hash(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


def invalid_answers(session: Session, run: ScheduleRun) -> list[tuple[str, list[dict[str, Any]]]]:
    """Items whose task failed because the answer was not one of the labels: (item id, messages)."""
    rows = session.execute(
        select(Classification.item_id, Task.request, Task.output)
        .join(Task, Task.id == Classification.task_id)
        .where(Classification.run_id == run.id, Task.status == TaskStatus.FAILED, Task.output.is_not(None))
    ).all()
    return [(item_id, request["messages"]) for item_id, request, output in rows
            if isinstance(request, dict) and request.get("messages") and label_error(request, output) is not None]



def record_results(session: Session, run: ScheduleRun, labels: Sequence[str] | None, page: int = 5000) -> None:
    """classifications ← their tasks (label, raw answer, model, cost, status), a page at a time."""
    last = 0
    while True:
        rows = session.execute(
            select(Classification.id, Task.status, Task.output, Task.served_model, Task.cost_usd, Task.error,
                   Task.finished_at)
            .outerjoin(Task, Task.id == Classification.task_id)
            .where(Classification.run_id == run.id, Classification.id > last)
            .order_by(Classification.id).limit(page)
        ).all()
        if not rows:
            return
        ids, statuses, answers, outputs, models, costs, errors, times = [], [], [], [], [], [], [], []
        for cid, status, output, model, cost, error, finished in rows:
            label: str | None = None
            kept: str | None = output
            if status == TaskStatus.SUCCEEDED:
                if labels is not None:
                    label = extract_label(output, labels)
                    if label is None:
                        status, error = TaskStatus.FAILED, f"answer {(output or '')[:200]!r} is not one of the labels"
                    else:
                        kept = None  # the label says it all
            elif status is None:
                error = "the item's task is missing"
            elif status == TaskStatus.CANCELLED:
                error = error or "cancelled"
            ids.append(cid)
            statuses.append(ClassificationStatus.SUCCEEDED if status == TaskStatus.SUCCEEDED
                            else ClassificationStatus.FAILED)
            answers.append(label)
            outputs.append(kept)
            models.append(model)
            costs.append(cost)
            errors.append(error)
            times.append(finished)
        session.execute(text(
            "UPDATE classifications AS c SET status = v.status, label = v.label, output = v.output, "
            "  model = v.model, cost_usd = v.cost_usd, error = v.error, classified_at = v.finished_at "
            "FROM unnest(CAST(:ids AS bigint[]), CAST(:statuses AS classification_status[]), CAST(:labels AS text[]), "
            "            CAST(:outputs AS text[]), CAST(:models AS text[]), CAST(:costs AS numeric[]), "
            "            CAST(:errors AS text[]), CAST(:times AS timestamptz[])) "
            "  AS v(id, status, label, output, model, cost_usd, error, finished_at) "
            "WHERE c.id = v.id"),
            {"ids": ids, "statuses": statuses, "labels": answers, "outputs": outputs, "models": models,
             "costs": costs, "errors": errors, "times": times})
        last = ids[-1]


def iter_classifications(session: Session, run_id: uuid.UUID, page: int = 5000) -> Iterator[list[Classification]]:
    last = 0
    while True:
        rows = list(session.scalars(select(Classification).where(Classification.run_id == run_id,
                                                                 Classification.id > last)
                                    .order_by(Classification.id).limit(page)))
        if not rows:
            return
        yield rows
        last = rows[-1].id
