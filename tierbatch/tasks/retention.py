"""Retention of bodies: the prompts, outputs and provider answers of tasks finished long ago are removed.

`[retention] bodies_days`: a finished task (succeeded, failed or cancelled; shadow tasks too) whose
`finished_at` is older than that loses its prompt (`request` becomes `{}`: the column stays NOT NULL and
no reader needs to tell an absent prompt from an empty one), `output` and `response` (NULL), and gets
`bodies_removed_at`. Everything else stays: status, tier, model, tokens, costs, timestamps, item id,
metadata, error, and every ledger row, so costs, reports and job counts do not change.

- Labels stay: a task that asked for a label (a classification job's `response_format` enum) and answered
  one keeps the canonical answer `{"label": "<label>"}` as its output, so job results and schedule runs
  still show the label, the product of the job; any other answer is removed.
- Not yet: a task whose shadow is still live (the quality monitor compares the two answers when the
  shadow finishes), and a line of a facade batch (`/v1/batches`) whose output file is not assembled yet
  (the file is built from the tasks' answers once, when the batch is first read after its last line).
- The status is never written here (transitions.py stays its only writer): the guard is `finished_at`.

Each call removes at most `limit` tasks' bodies through `ix_tasks_bodies_kept` (finished, bodies kept,
oldest first), locking with SKIP LOCKED, so two ticks at once never wait on each other; the caller commits
each batch in its own transaction.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import Text, bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY, UUID
from sqlalchemy.orm import Session

from tierbatch.base.states import FINAL_CLIENT_BATCH_STATUSES, sql_in
from tierbatch.db.partitions import months_spanned, plan_for_the_values
from tierbatch.metrics.catalog import RETENTION_BODIES_REMOVED, RemovedKind
from tierbatch.metrics.commit import after_commit
from tierbatch.tasks.labels import extract_label, labels_of

DUE_TASKS = text(
    "SELECT t.id, t.output, t.request -> 'response_format' AS response_format FROM tasks t"
    " WHERE t.finished_at IS NOT NULL AND t.bodies_removed_at IS NULL AND t.finished_at < :cutoff"
    "   AND NOT EXISTS (SELECT 1 FROM tasks s WHERE s.shadow_of = t.id AND s.finished_at IS NULL)"
    "   AND (t.job_id IS NULL OR NOT EXISTS (SELECT 1 FROM client_batches b WHERE b.job_id = t.job_id"
    f"                                        AND b.status NOT IN {sql_in(FINAL_CLIENT_BATCH_STATUSES)}))"
    " ORDER BY t.finished_at LIMIT :limit FOR UPDATE OF t SKIP LOCKED"
)

# one statement for the whole batch; the guard repeats the selection's so a row can never be emptied twice
_REMOVE = text(
    "UPDATE tasks t SET request = '{}'::jsonb, output = v.kept_output, response = NULL,"
    " bodies_removed_at = now()"
    " FROM unnest(:ids, :kept) AS v(id, kept_output)"
    " WHERE t.id = v.id AND t.finished_at IS NOT NULL AND t.bodies_removed_at IS NULL"
    # the batch's months: planned over their partitions only (db/partitions.months_spanned)
    " AND t.id >= :months_from AND t.id < :months_to"
).bindparams(bindparam("ids", type_=ARRAY(UUID(as_uuid=True))), bindparam("kept", type_=ARRAY(Text)))


def kept_output(output: str | None, response_format: Mapping[str, Any] | None) -> str | None:
    """What stays of an output: the canonical label answer of a labelled request, else nothing."""
    if output is None or not isinstance(response_format, Mapping):
        return None
    labels = labels_of({"response_format": response_format})
    if labels is None:
        return None
    label = extract_label(output, labels)
    return None if label is None else json.dumps({"label": label}, ensure_ascii=False)


def remove_bodies(session: Session, cutoff: datetime, limit: int) -> int:
    """Remove the bodies of up to `limit` tasks finished before `cutoff`; how many. Doesn't commit."""
    rows = session.execute(DUE_TASKS, {"cutoff": cutoff, "limit": limit}).all()
    if not rows:
        return 0
    ids: list[uuid.UUID] = [row.id for row in rows]
    kept = [kept_output(row.output, row.response_format) for row in rows]
    plan_for_the_values(session)
    result = session.execute(_REMOVE, {"ids": ids, "kept": kept, **months_spanned(ids)})
    removed = int(getattr(result, "rowcount", 0) or 0)
    if removed:
        after_commit(session, lambda: RETENTION_BODIES_REMOVED.labels(RemovedKind.TASK).inc(removed))
    return removed
