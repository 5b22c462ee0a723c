"""Every change of `tasks.status`: the one module allowed to write it (a unit test scans the tree).

Task states (tierbatch.base.states.TaskStatus): ``queued`` → ``waiting_batch`` → ``in_batch`` on the batch path,
``queued`` → ``running`` on the immediate path; ``succeeded`` / ``failed`` / ``cancelled`` are terminal
(``finished_at`` is set exactly for these).

Single-task transitions: one guarded ``UPDATE tasks … WHERE id = … AND status … RETURNING``; each
raises TransitionError when no row moved (the task was not in an allowed state, or its lease was lost).

- ``claim_for_call``: queued → running under a fresh lease (escalation: waiting_batch / in_batch → running).
- ``succeed_running``: running → succeeded, or failed when the answer is not one of the labels.
- ``succeed_running_from_cache``: running → succeeded (mode `cache`) with a cached answer.
- ``requeue``: running → queued after a retryable error, not claimable before a delay.
- ``fail_running``: running → failed.
- ``cancel``: queued / waiting_batch → cancelled (one task of a tenant).

Bulk transitions: one set-based statement each (bulk paths are benchmarked: never one statement per
row); they move what is still in the state they start from and say what moved.

- ``move_to_batch_path``: queued → waiting_batch for routed Light non-urgent tasks.
- ``succeed_queued_from_cache``: queued → succeeded (mode `cache`) for the hits of a chunk.
- ``claim_for_lane``: queued → running under one fresh lease, for the tasks the background lane takes.
- ``cancel_unstarted_of_job``: queued / waiting_batch → cancelled for every task of a job.
- ``release_expired_leases``: running → queued where the worker stopped renewing its lease.
- ``claim_for_batch``: waiting_batch → in_batch for the tasks placed in a provider batch.
- ``apply_ingested_rows``: in_batch → succeeded / failed from a batch's results, with their ledger rows.
- ``return_lines_to_waiting``: in_batch → waiting_batch for another batch, or failed after max attempts.
- ``fail_batch_lines``: in_batch → failed.

Nothing here commits: the caller owns the transaction, so a state change and its ledger row land
together. Terminal transitions are counted (`tierbatch_tasks_finished_total`) once that transaction commits.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Collection, Sequence
from typing import Any

from sqlalchemy import ARRAY, BindParameter, Connection, Row, and_, any_, bindparam, func, or_, select, text, update
from sqlalchemy.dialects.postgresql import UUID as PG_UUID
from sqlalchemy.orm import Session

from tierbatch.base.errors import TransitionError
from tierbatch.base.states import CANCELLABLE_TASK_STATUSES, Mode, TaskStatus
from tierbatch.db.bulk_sql import INGEST_LEDGER_COLUMNS, LEDGER_USAGE_COLUMNS
from tierbatch.db.models import Task
from tierbatch.db.partitions import months_spanned, plan_for_the_values
from tierbatch.metrics.record import FinishedTasks, tasks_finished

ESCALATABLE_STATUSES = (TaskStatus.WAITING_BATCH, TaskStatus.IN_BATCH)


def _uuid_array(ids: Sequence[uuid.UUID]) -> BindParameter[Any]:
    array_type: Any = ARRAY(PG_UUID(as_uuid=True))
    return bindparam("ids_" + uuid.uuid4().hex[:8], value=list(ids), type_=array_type)


def _finish_values(status: TaskStatus) -> dict[str, Any]:
    return {"status": status, "finished_at": func.now(), "updated_at": func.now(), "lease_token": None,
            "lease_expires_at": None, "not_before": None}


def _finished(session: Session, moved: Any, status: TaskStatus) -> None:
    tasks_finished(session, FinishedTasks(status, moved.tier, moved.mode))


def _tally(session: Session, rows: Any) -> None:
    """Count a bulk statement's (status, tier, mode, count) rows."""
    tasks_finished(session, *(FinishedTasks(status, tier, mode, int(count)) for status, tier, mode, count in rows))


def _seconds(seconds: float) -> Any:
    return func.make_interval(0, 0, 0, 0, 0, 0, seconds)


def _moved(row: object, task_id: uuid.UUID, transition: str) -> None:
    if row is None:
        raise TransitionError(f"task {task_id}: {transition} moved no row")


# --- single tasks ---------------------------------------------------------------------------------------


def claim_for_call(session: Session, task_id: uuid.UUID, token: uuid.UUID, lease_seconds: float, *,
                   escalate: bool = False) -> Row[Any]:
    """queued (or, escalating, waiting_batch / in_batch) → running under `token`; due tasks only."""
    allowed = Task.status.in_(ESCALATABLE_STATUSES) if escalate else Task.status == TaskStatus.QUEUED
    row = session.execute(
        update(Task)
        .where(Task.id == task_id, allowed,
               or_(Task.not_before.is_(None), Task.not_before <= func.now()))
        .values(status=TaskStatus.RUNNING, mode=Mode.IMMEDIATE, lease_token=token,
                lease_expires_at=func.now() + _seconds(lease_seconds),
                attempts=Task.attempts + 1, started_at=func.coalesce(Task.started_at, func.now()),
                updated_at=func.now(), not_before=None)
        .returning(Task.tenant_id, Task.job_id, Task.task_type, Task.tier, Task.request, Task.attempts,
                   Task.task_metadata, Task.urgent)
    ).one_or_none()
    _moved(row, task_id, "claim for a call")
    assert row is not None
    return row


def _running(task_id: uuid.UUID, token: uuid.UUID) -> Any:
    return and_(Task.id == task_id, Task.status == TaskStatus.RUNNING, Task.lease_token == token)


def succeed_running(session: Session, task_id: uuid.UUID, token: uuid.UUID, problem: str | None) -> None:
    """running → succeeded; → failed with `problem` (an answer that is not one of the labels)."""
    moved = session.execute(
        update(Task).where(_running(task_id, token))
        .values(**_finish_values(TaskStatus.FAILED if problem else TaskStatus.SUCCEEDED), error=problem)
        .returning(Task.id, Task.tier, Task.mode)
    ).first()
    _moved(moved, task_id, "running → succeeded")
    _finished(session, moved, TaskStatus.FAILED if problem else TaskStatus.SUCCEEDED)


def succeed_running_from_cache(session: Session, task_id: uuid.UUID, token: uuid.UUID) -> None:
    """running → succeeded, mode `cache`."""
    moved = session.execute(
        update(Task).where(_running(task_id, token))
        .values(**_finish_values(TaskStatus.SUCCEEDED), mode=Mode.CACHE, error=None,
                started_at=func.coalesce(Task.started_at, func.now()))
        .returning(Task.id, Task.tier, Task.mode)
    ).first()
    _moved(moved, task_id, "running → succeeded from the cache")
    _finished(session, moved, TaskStatus.SUCCEEDED)


def requeue(session: Session, task_id: uuid.UUID, token: uuid.UUID, error: str, delay_seconds: float) -> None:
    """running → queued, not to be claimed before `delay_seconds`."""
    moved = session.execute(
        update(Task).where(_running(task_id, token))
        .values(status=TaskStatus.QUEUED, lease_token=None, lease_expires_at=None, error=error,
                not_before=func.now() + _seconds(delay_seconds),
                dispatched_at=func.now(), updated_at=func.now())
        .returning(Task.id)
    ).first()
    _moved(moved, task_id, "running → queued")


def fail_running(session: Session, task_id: uuid.UUID, token: uuid.UUID, error: str) -> None:
    """running → failed."""
    moved = session.execute(
        update(Task).where(_running(task_id, token))
        .values(**_finish_values(TaskStatus.FAILED), error=error)
        .returning(Task.id, Task.tier, Task.mode)
    ).first()
    _moved(moved, task_id, "running → failed")
    _finished(session, moved, TaskStatus.FAILED)


def cancel(session: Session, tenant_id: uuid.UUID, task_id: uuid.UUID) -> Task:
    """queued / waiting_batch → cancelled, for a tenant's own (non-shadow) task."""
    moved = session.scalar(
        update(Task).where(Task.id == task_id, Task.tenant_id == tenant_id, Task.shadow_of.is_(None),
                           Task.status.in_(CANCELLABLE_TASK_STATUSES))
        .values(**_finish_values(TaskStatus.CANCELLED))
        .returning(Task)
    )
    _moved(moved, task_id, "cancel")
    assert moved is not None
    tasks_finished(session, FinishedTasks(TaskStatus.CANCELLED, moved.tier, moved.mode))
    return moved


# --- bulk -----------------------------------------------------------------------------------------------


def move_to_batch_path(session: Session, task_ids: Sequence[uuid.UUID], provider: str, model: str) -> int:
    """queued → waiting_batch (mode `batch`, the Light model) for the tasks still queued."""
    moved = session.execute(
        update(Task).where(Task.id == any_(_uuid_array(list(task_ids))), Task.status == TaskStatus.QUEUED)
        .values(status=TaskStatus.WAITING_BATCH, provider=provider, model=model,
                mode=Mode.BATCH, updated_at=func.now(), dispatched_at=func.now()),
        execution_options={"synchronize_session": False},
    )
    return int(getattr(moved, "rowcount", 0) or 0)


def claim_for_lane(session: Session, task_ids: Sequence[uuid.UUID], token: uuid.UUID, lease_seconds: float
                   ) -> list[Row[Any]]:
    """queued → running (mode `immediate`) under `token` for the tasks (locked by the caller) still queued
    and due; their rows, as `claim_for_call` returns them, with the id first."""
    if not task_ids:
        return []
    return list(session.execute(
        update(Task)
        .where(Task.id == any_(_uuid_array(list(task_ids))), Task.status == TaskStatus.QUEUED,
               or_(Task.not_before.is_(None), Task.not_before <= func.now()))
        .values(status=TaskStatus.RUNNING, mode=Mode.IMMEDIATE, lease_token=token,
                lease_expires_at=func.now() + _seconds(lease_seconds),
                attempts=Task.attempts + 1, started_at=func.coalesce(Task.started_at, func.now()),
                updated_at=func.now(), not_before=None)
        .returning(Task.id, Task.tenant_id, Task.job_id, Task.task_type, Task.tier, Task.request, Task.attempts,
                   Task.task_metadata, Task.urgent),
        execution_options={"synchronize_session": False},
    ).all())


_FINISH_QUEUED_FROM_CACHE = text(
    "UPDATE tasks AS t SET status = 'succeeded', mode = 'cache', error = NULL, finished_at = now(),"
    " updated_at = now(), started_at = coalesce(t.started_at, now()), lease_token = NULL, lease_expires_at = NULL,"
    " not_before = NULL, provider = v.provider, model = v.model, served_model = v.served_model, output = v.output,"
    " response = v.response, input_tokens = v.input_tokens, cached_tokens = v.cached_tokens,"
    " output_tokens = v.output_tokens, reasoning_tokens = v.reasoning_tokens, cost_usd = 0,"
    " baseline_cost_usd = v.baseline_cost_usd "
    "FROM json_to_recordset(CAST(:rows AS json)) AS v(id uuid, provider text, model text, served_model text,"
    " output text, response jsonb, input_tokens bigint, cached_tokens bigint, output_tokens bigint,"
    " reasoning_tokens bigint, baseline_cost_usd numeric) "
    "WHERE t.id = v.id AND t.status = 'queued' RETURNING t.id, t.tier"
)


def succeed_queued_from_cache(session: Session, rows_json: str) -> set[uuid.UUID]:
    """queued → succeeded (mode `cache`, cost 0) for every row of `rows_json` (a JSON array of answers:
    id, provider, model, served_model, output, response, token counts, baseline_cost_usd); the ids moved."""
    moved = session.execute(_FINISH_QUEUED_FROM_CACHE, {"rows": rows_json}).all()
    tiers = Counter(tier for _, tier in moved)
    _tally(session, ((TaskStatus.SUCCEEDED, tier, Mode.CACHE, count) for tier, count in tiers.items()))
    return {task_id for task_id, _ in moved}


def cancel_unstarted_of_job(session: Session, job_id: uuid.UUID) -> int:
    """queued / waiting_batch → cancelled for every task of the job; how many moved. Tasks at a provider
    or in flight are left to finish."""
    moved = (update(Task).where(Task.job_id == job_id, Task.status.in_(CANCELLABLE_TASK_STATUSES))
             .values(status=TaskStatus.CANCELLED, finished_at=func.now(), updated_at=func.now(), lease_token=None,
                     lease_expires_at=None, not_before=None)
             .returning(Task.tier, Task.mode).cte("moved"))
    # counted by (tier, mode) in the statement: one row per group back, not one per task
    groups = session.execute(select(moved.c.tier, moved.c.mode, func.count())
                             .group_by(moved.c.tier, moved.c.mode)).all()
    _tally(session, ((TaskStatus.CANCELLED, tier, mode, count) for tier, mode, count in groups))
    return sum(int(count) for _, _, count in groups)


def release_expired_leases(session: Session) -> list[uuid.UUID]:
    """running → queued for tasks whose worker stopped renewing its lease (it died or hung)."""
    return list(session.scalars(
        update(Task).where(Task.status == TaskStatus.RUNNING, Task.lease_expires_at < func.now())
        .values(status=TaskStatus.QUEUED, lease_token=None, lease_expires_at=None,
                error="worker lost while the call was in flight", updated_at=func.now())
        .returning(Task.id)
    ))


def claim_for_batch(session: Session, batch_id: uuid.UUID, task_ids: Sequence[uuid.UUID]) -> int:
    """waiting_batch → in_batch for the chosen tasks; how many moved."""
    # one array parameter, not 50,000 bound parameters, read through a sub-select: given the values, the
    # planner estimated each one against the statistics of each partition (~0.2 s for 50,000); the months'
    # range prunes the partitions (`months_spanned`: an array this long prunes none)
    plan_for_the_values(session)
    moved = session.execute(text(
        "UPDATE tasks SET status = 'in_batch', batch_id = :batch, attempts = attempts + 1, updated_at = now() "
        "WHERE id = ANY(CAST((SELECT CAST(:ids AS uuid[])) AS uuid[])) AND status = 'waiting_batch' "
        "AND id >= :months_from AND id < :months_to"
    ), {"batch": batch_id, "ids": task_ids, **months_spanned(task_ids)})
    return int(getattr(moved, "rowcount", 0) or 0)


# One statement: the guarded task update and the ledger rows of exactly the rows it moved; it answers
# one row: how many it moved, and which of the watched ids it moved to `succeeded`.
APPLY_INGEST_ROWS = text(
    "WITH moved AS ("
    " UPDATE tasks AS t SET status = v.status, error = v.error, mode = 'batch', served_model = v.served_model,"
    "   output = v.output, response = v.response, input_tokens = v.input_tokens,"
    "   cached_tokens = v.cached_tokens, output_tokens = v.output_tokens, reasoning_tokens = v.reasoning_tokens,"
    "   cost_usd = CASE WHEN t.shadow_of IS NULL THEN v.cost_usd END,"
    "   baseline_cost_usd = CASE WHEN t.shadow_of IS NULL THEN v.baseline_cost_usd END,"
    "   finished_at = now(), updated_at = now()"
    # The guard compares each task with its line (which carries the batch it came from; OFFSET 0 keeps
    # that a column, not a constant), so it is a join condition, not a filter of `tasks` alone: the
    # statistics of a batch's tasks are those of when they waited (none in a batch), and as a filter it
    # made the planner expect one task, loop over all of them and read the whole chunk again for each
    # (minutes for one batch on a small table). As one boolean test, no index on status or batch serves
    # it either: the update is driven from the chunk's rows, by primary key or by one hash join.
    " FROM (SELECT *, CAST(:batch AS uuid) AS batch_id FROM ingest_rows OFFSET 0) AS v"
    " WHERE t.id = v.id AND (t.status = 'in_batch' AND t.batch_id = v.batch_id) IS TRUE"
    # the months the chunk's tasks fall in: planned over their partitions only (db/partitions.months_spanned)
    " AND t.id >= :months_from AND t.id < :months_to"
    # the ledger columns come back with the row: the INSERT reads `moved` alone, no second join
    " RETURNING t.id, t.tenant_id, t.job_id, t.task_type, t.tier, t.status, t.shadow_of, v.served_model, "
    + ", ".join(f"v.{name}" for name in LEDGER_USAGE_COLUMNS) + ", v.cost_usd, v.baseline_cost_usd), "
    f"billed AS (INSERT INTO ledger_entries ({', '.join(INGEST_LEDGER_COLUMNS)}) "
    # a shadow task's line is a `shadow` row of the task it shadows, in that task's job
    "SELECT m.tenant_id, coalesce(m.shadow_of, m.id),"
    " CASE WHEN m.shadow_of IS NULL THEN m.job_id ELSE (SELECT o.job_id FROM tasks AS o WHERE o.id = m.shadow_of) END,"
    " :batch, m.task_type, m.tier,"
    " CASE WHEN m.shadow_of IS NULL THEN 'batch' ELSE 'shadow' END::serve_mode, :provider, :model,"
    " m.served_model, " + ", ".join(f"m.{name}" for name in LEDGER_USAGE_COLUMNS) + ","
    " m.cost_usd, m.baseline_cost_usd, m.cost_usd IS NULL, false "
    "FROM moved AS m) "
    "SELECT (SELECT count(*) FROM moved) AS written,"
    " (SELECT json_agg(json_build_array(m.id, m.tenant_id, m.task_type, m.tier)) FROM moved AS m"
    "  WHERE m.status = 'succeeded' AND m.shadow_of IS NULL AND m.id = ANY(CAST(:watch AS uuid[]))) AS succeeded,"
    " (SELECT array_agg(m.id) FROM moved AS m WHERE m.shadow_of IS NOT NULL) AS shadows,"
    # what the metrics count: tasks by (status, tier), and the ledger rows' money by (tenant, mode)
    " (SELECT json_agg(json_build_array(g.status, g.tier, g.n)) FROM (SELECT m.status, m.tier, count(*) AS n"
    "  FROM moved AS m GROUP BY 1, 2) AS g) AS finished,"
    " (SELECT json_agg(json_build_array(g.tenant_id, g.shadow, g.cost, g.baseline, g.unpriced)) FROM ("
    "  SELECT m.tenant_id, m.shadow_of IS NOT NULL AS shadow, coalesce(sum(m.cost_usd), 0)::text AS cost,"
    "  coalesce(sum(m.baseline_cost_usd) FILTER (WHERE m.cost_usd IS NOT NULL), 0)::text AS baseline,"
    "  count(*) FILTER (WHERE m.cost_usd IS NULL) AS unpriced FROM moved AS m GROUP BY 1, 2) AS g) AS billed"
)


def apply_ingested_rows(connection: Connection, batch_id: uuid.UUID, provider: str, model: str,
                        ids: Collection[uuid.UUID], watch: Collection[uuid.UUID]) -> Row[Any]:
    """in_batch → the status of each row of the `ingest_rows` temp table (succeeded / failed), for the
    tasks still in this batch, with their ledger rows. One row back: `written` (how many moved),
    `succeeded` (the watched ids moved to succeeded, as JSON), `shadows` (the shadow tasks moved), and for
    the metrics `finished` ([status, tier, count] as JSON) and `billed` ([tenant, shadow, cost, baseline,
    unpriced] as JSON; the caller counts them after its commit, `tierbatch.metrics.record`). `ids`: the
    temp table's task ids."""
    plan_for_the_values(connection)
    return connection.execute(APPLY_INGEST_ROWS, {"batch": batch_id, "provider": provider, "model": model,
                                                   "watch": list(watch), **months_spanned(ids)}).one()


# a bulk statement's `moved` rows counted by (status, tier, mode): one row per group back, not one per task
_GROUPED = "SELECT status::text, tier::text, mode::text, count(*) FROM moved GROUP BY 1, 2, 3"
# a chunk's error lines, each carrying the batch it came from, and the guard as a join condition between
# each task and its line (as in APPLY_INGEST_ROWS): as a filter of `tasks` alone, with statistics from
# before the claim, the planner read the whole batch through its index for every chunk
_ERROR_LINES = ("(SELECT v.*, CAST(:batch AS uuid) AS batch_id"
                " FROM unnest(CAST(:ids AS uuid[]), CAST(:errors AS text[])) AS v(id, error) OFFSET 0) AS v")
_STILL_IN_THE_BATCH = ("t.id = v.id AND (t.status = 'in_batch' AND t.batch_id = v.batch_id) IS TRUE"
                       " AND t.id >= :months_from AND t.id < :months_to")

RETURN_LINES_TO_WAITING = text(
    "WITH moved AS (UPDATE tasks AS t SET "
    "  status = CASE WHEN t.attempts >= :max THEN 'failed'::task_status ELSE 'waiting_batch'::task_status END, "
    "  finished_at = CASE WHEN t.attempts >= :max THEN now() END, "
    "  batch_id = CASE WHEN t.attempts >= :max THEN t.batch_id END, "
    "  error = CASE WHEN t.attempts >= :max THEN 'gave up after ' || t.attempts || ' batches: ' || v.error "
    "          ELSE v.error END, "
    "  updated_at = now() "
    f"FROM {_ERROR_LINES} WHERE {_STILL_IN_THE_BATCH} RETURNING t.status, t.tier, t.mode) " + _GROUPED
)

FAIL_BATCH_LINES = text(
    "WITH moved AS (UPDATE tasks AS t SET status = 'failed', finished_at = now(), error = v.error, "
    f"updated_at = now() FROM {_ERROR_LINES} WHERE {_STILL_IN_THE_BATCH} RETURNING t.status, t.tier, t.mode) "
    + _GROUPED
)


def return_lines_to_waiting(session: Session, batch_id: uuid.UUID, errors: dict[uuid.UUID, str],
                            max_attempts: int) -> int:
    """in_batch → waiting_batch for another batch, or → failed once a task has used `max_attempts`
    batches; how many moved."""
    plan_for_the_values(session)
    groups = session.execute(RETURN_LINES_TO_WAITING, {
        "ids": list(errors), "errors": list(errors.values()), "max": max_attempts, "batch": batch_id,
        **months_spanned(errors)}).all()
    _tally(session, (group for group in groups if group[0] == TaskStatus.FAILED))
    return sum(int(group[3]) for group in groups)


def fail_batch_lines(session: Session, batch_id: uuid.UUID, errors: dict[uuid.UUID, str]) -> int:
    """in_batch → failed with each line's error; how many moved."""
    plan_for_the_values(session)
    groups = session.execute(FAIL_BATCH_LINES, {"ids": list(errors), "errors": list(errors.values()),
                                                "batch": batch_id, **months_spanned(errors)}).all()
    _tally(session, groups)
    return sum(int(group[3]) for group in groups)
